"""Command line: python -m nanoserve generate | serve | bench | download.

Engine flags map 1:1 onto EngineConfig fields (--block-size -> block_size, ...), and every
flag shows its default in --help.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time

from .config import EngineConfig


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine (EngineConfig)")
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        if flag in p._option_string_actions:      # e.g. generate's --seed is the request's seed
            continue
        base = str(f.type).split(" ")[0]          # "int | None" -> "int"
        if base == "bool":
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            g.add_argument(flag, type={"int": int, "float": float}.get(base, str), default=f.default)


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    names = [f.name for f in dataclasses.fields(EngineConfig)]
    return EngineConfig(**{n: getattr(args, n) for n in names if n != "seed" or "engine_seed" not in args})


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (SamplingParams)")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def cmd_generate(args: argparse.Namespace) -> int:
    """Stream one completion to stdout, then one line of statistics to stderr."""
    from .engine import LLMEngine
    from .sequence import SamplingParams
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                            seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)
    engine = LLMEngine(_engine_config(args))
    t0 = time.perf_counter()
    engine.add_request("cli", args.prompt, params)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    shown, t_first, out = 0, None, None
    while engine.has_unfinished_requests():
        for out in engine.step():
            t_first = t_first or time.perf_counter()
            text = out.outputs[0].text
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)
    t1 = time.perf_counter()
    sys.stdout.write("\n")
    n_gen = len(out.outputs[0].token_ids)
    decode_time = t1 - t_first if n_gen > 1 else float("nan")
    print(f"[nanoserve] model={engine.model_dir.name} device={engine.device} prompt_tokens={len(out.prompt_token_ids)} "
          f"generated_tokens={n_gen} ttft={1000 * (t_first - t0):.1f}ms "
          f"decode={(n_gen - 1) / decode_time if n_gen > 1 else 0:.1f} tok/s "
          f"total={n_gen / (t1 - t0):.1f} tok/s finish_reason={out.outputs[0].finish_reason}", file=sys.stderr)
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from .weights import download
    path = download(args.name)
    print(f"downloaded {args.name} to {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench
    return bench.main(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from . import server
    server.serve(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="nanoserve", description=__doc__, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="stream a completion for one prompt", formatter_class=fmt)
    p.add_argument("--prompt", required=True)
    _add_sampling_args(p)
    _add_engine_args(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("download", help="fetch a checkpoint from the Hugging Face hub into weights/",
                       formatter_class=fmt)
    p.add_argument("name", nargs="?", default="gpt2", help="gpt2, gpt2-medium, ..., or a hub id")
    p.set_defaults(fn=cmd_download)

    p = sub.add_parser("bench", help="benchmarks, Hugging Face side by side", formatter_class=fmt)
    from .bench import add_bench_args
    add_bench_args(p)
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server", formatter_class=fmt)
    try:
        from .server import add_serve_args
        add_serve_args(p)
    except ImportError as e:   # the serve extra is not installed
        p.set_defaults(serve_missing=str(e))
    _add_engine_args(p)
    p.set_defaults(fn=cmd_serve)

    args = parser.parse_args(argv)
    if getattr(args, "serve_missing", None):
        parser.error(f"serving needs the serve extra ({args.serve_missing}); pip install -e '.[serve]'")
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
