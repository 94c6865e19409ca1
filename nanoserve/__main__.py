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


# One line of help per EngineConfig field (the defaults are appended by the formatter).
_ENGINE_HELP = {
    "model": "checkpoint directory, weights/<name>, or hub id (gpt2, gpt2-medium, ...)",
    "device": "cuda or cpu; default: cuda when available", "dtype": "float32, float16 or bfloat16; "
    "default: float32 on CPU, float16 on CUDA", "block_size": "tokens per KV block",
    "num_blocks": "KV blocks in the pool; default: sized from free memory",
    "gpu_memory_utilization": "fraction of GPU memory the engine may use",
    "cpu_kv_cache_gb": "KV pool size on CPU (GiB)", "max_num_seqs": "sequences per step, at most",
    "max_num_batched_tokens": "tokens per step, at most; default: 2048 on CPU, 8192 on CUDA",
    "seed": "seed of the sampler for requests without their own seed",
    "enable_kv_cache": "off: recompute every token's K/V at every step (for comparison)",
    "enable_prefix_caching": "reuse the KV blocks of prompts that start with the same tokens",
    "enforce_eager": "no CUDA graphs", "compile_cpu_attention": "torch.compile the CPU decode attention "
    "(fused gather + softmax; ~10 s compile on first use; needs a C++ compiler)", "use_triton": "Triton attention kernels on CUDA (default: when installed)",
    "fused_decode": "CUDA: graphs capture the torch.compile'd decode step (default: on with CUDA graphs); "
    "CPU: decode steps of up to 8 sequences in C++ where AVX-512 BF16/VNNI cpu_gemv builds (default: on); "
    "elsewhere one-sequence steps compiled by torch.compile (default: off; 13-84 s compile on first use)",
    "gemv": "CUDA: decode linears of 1-2 rows run a Triton GEMV, not cuBLAS (default: on with CUDA graphs)",
    "quiet": "no progress bars or info logs",
    "log_stats_interval": "seconds between one-line engine stats logs while busy (0: none)",
    "context_overflow": "a sequence reaching n_ctx: error (refused up front) or shift (keep its last "
    "shift_window tokens, recompute them, go on)", "shift_window": "tokens kept by a context shift; default n_ctx // 2",
    "attention_window": "sliding-window attention over the last W positions, with blocks behind it freed; "
    "default: full attention",
    "quantization": "int8: per-channel int8 weights made at load (CPU only; see linear.py)",
}


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine (EngineConfig)")
    added = []
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        if flag in p._option_string_actions:      # e.g. generate's --seed is the request's seed
            continue
        added.append(f.name)
        base = str(f.type).split(" ")[0]          # "int | None" -> "int"
        kw = dict(default=f.default, help=_ENGINE_HELP.get(f.name, " "))
        if base == "bool":
            g.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            g.add_argument(flag, type={"int": int, "float": float}.get(base, str), **kw)
    p.set_defaults(engine_fields=added)


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{name: getattr(args, name) for name in args.engine_fields})


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (SamplingParams)")
    g.add_argument("--max-tokens", type=int, default=64, help="tokens to generate, at most")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = all")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * top probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, -2..2: > 0 favours new tokens")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's, -2..2: > 0 discourages "
                   "tokens by how often they were generated")
    g.add_argument("--seed", type=int, default=None, help="per-request seed")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past <|endoftext|>")


def cmd_generate(args: argparse.Namespace) -> int:
    """Stream one completion to stdout, then one line of statistics to stderr."""
    from .engine import LLMEngine
    from .sequence import SamplingParams
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                                presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                                seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)
    except (ValueError, TypeError) as e:
        print(f"nanoserve: error: {e}", file=sys.stderr)
        return 2
    try:
        engine = LLMEngine(_engine_config(args))
        engine.add_request("cli", args.prompt, params)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        print(f"nanoserve: error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
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
          f"total={n_gen / (t1 - t0):.1f} tok/s finish_reason={out.outputs[0].finish_reason} "
          f"kv_blocks_peak={out.metrics.num_kv_blocks_peak} shifts={out.metrics.num_shifts}", file=sys.stderr)
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
    from . import launch
    return launch.serve(args)


def main(argv: list[str] | None = None) -> int:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="nanoserve", description=__doc__, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="stream a completion for one prompt", formatter_class=fmt)
    p.add_argument("text", nargs="?", default=None, help="text to continue (or use --prompt)")
    p.add_argument("--prompt", default=None, help="text to continue")
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
        from .launch import add_serve_args
        add_serve_args(p)
    except ImportError as e:   # the serve extra is not installed
        p.set_defaults(serve_missing=str(e))
    _add_engine_args(p)
    p.set_defaults(fn=cmd_serve)

    args = parser.parse_args(argv)
    if args.command == "generate":
        args.prompt = args.prompt if args.prompt is not None else args.text
        if args.prompt is None:
            parser.error("generate needs a prompt: python -m nanoserve generate \"Hello\" (or --prompt)")
    if getattr(args, "serve_missing", None):
        parser.error(f"serving needs the serve extra ({args.serve_missing}); pip install -e '.[serve]'")
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
