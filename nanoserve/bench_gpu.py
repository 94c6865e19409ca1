"""GPU benchmarks (../DESIGN.md workloads), nanoserve and Hugging Face in the same process.

throughput: 256 requests, prompts uniform in [32, 512], 384 new tokens each, all submitted at
            once; output tok/s over wall time after a warm-up, TTFT / TPOT percentiles.
            HF: `generate_batch` (its continuous batching, attn "paged|sdpa").
latency:    one request, 32-token prompt, 256 new tokens; ms per output token.
            HF: `generate`.
sweep:      output tok/s against the number of concurrent requests (128 in, 128 out), for
            the plot; HF: padded `generate` with the whole batch at once.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch

from .bench import format_memory, hf_model, memory_usage, random_prompts


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def _engine_run(llm, prompts: list[list[int]], max_tokens: int) -> dict:
    """One LLM.generate call over all prompts (the workload's definition); TTFT and TPOT
    per request from the engine's own timestamps (RequestOutput.metrics)."""
    from .sequence import SamplingParams
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.engine.allocator.reset_peak()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    steps0 = llm.engine.runner.num_steps
    outs = llm.generate(prompts, sp, use_tqdm=False)
    wall = time.perf_counter() - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    ttft = [1000 * (o.metrics.first_token_time - t0) for o in outs]
    tpot = [1000 * (o.metrics.finished_time - o.metrics.first_token_time) / max(1, len(o.outputs[0].token_ids) - 1)
            for o in outs]
    return {"wall_s": wall, "output_tokens": out_tokens, "output_tok_s": out_tokens / wall,
            "total_tok_s": (out_tokens + sum(map(len, prompts))) / wall,
            "steps": llm.engine.runner.num_steps - steps0,
            "ttft_ms_p50": _pct(ttft, 50), "ttft_ms_p99": _pct(ttft, 99),
            "tpot_ms_p50": _pct(tpot, 50), "tpot_ms_p99": _pct(tpot, 99), **memory_usage(llm)}


def _hf_generate_batch(model, prompts: list[list[int]], max_tokens: int) -> dict:
    from transformers import GenerationConfig
    gc = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate_batch(inputs=prompts[:8], generation_config=GenerationConfig(
        max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0), progress_bar=False)   # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = model.generate_batch(inputs=prompts, generation_config=gc, progress_bar=False)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    n = sum(len(o.generated_tokens) for o in res.values())
    return {"wall_s": wall, "output_tokens": n, "output_tok_s": n / wall}


def _hf_generate(model, prompts: list[list[int]], max_tokens: int) -> dict:
    from .bench import run_hf_generate
    run_hf_generate(model, prompts[:1], 4, 1)                              # warm-up
    wall, n = run_hf_generate(model, prompts, max_tokens, len(prompts))
    return {"wall_s": wall, "output_tokens": n, "output_tok_s": n / wall}


def profile_decode(llm, prompts: list[list[int]], num_steps: int = 30) -> dict:
    """Where a decode step's time goes: GPU kernel time vs host time, and the top kernels.

    The steps are timed twice, without the profiler (it slows the host) and under it (for the
    kernels). host_ms_per_step is the unprofiled step minus its GPU kernel time: the part of a
    step in which the GPU waits for the host (Python, launches, the sync for sampled tokens)."""
    from torch.profiler import ProfilerActivity, profile
    from .sequence import SamplingParams
    eng = llm.engine
    for i, p in enumerate(prompts):
        eng.add_request(f"p{i}", p, SamplingParams(temperature=0.0, max_tokens=2 * num_steps + 40, ignore_eos=True))
    while eng.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in eng.scheduler.running):
        eng.step()                                               # get through the prefills
    for _ in range(5):
        eng.step(finished_only=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(num_steps):
        eng.step(finished_only=True)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / num_steps
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(num_steps):
            eng.step(finished_only=True)
        torch.cuda.synchronize()
    profiled_wall = (time.perf_counter() - t0) / num_steps
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    gpu_ms = sum(e.self_device_time_total for e in events) / num_steps / 1000
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:8]
    for rid in list(eng.requests):
        eng.abort_request(rid)
    res = {"batch": len(prompts), "fused_decode": eng.runner.decode_logits is not None,
           "gemv": type(eng.model.fast_head).__name__ == "GemvLinear",      # gemv.py's decode linears
           "wall_ms_per_step": 1000 * wall, "profiled_wall_ms_per_step": 1000 * profiled_wall,
           "gpu_kernel_ms_per_step": gpu_ms, "gpu_busy_fraction": gpu_ms / (1000 * wall),
           "host_ms_per_step": 1000 * wall - gpu_ms,
           "kernels_per_step": sum(e.count for e in events) / num_steps,   # memcpys included
           "top_kernels_ms_per_step": {e.key[:60]: e.self_device_time_total / 1000 / num_steps for e in top}}
    print(json.dumps(res, indent=1))
    return res


def vllm_compare(ckpt: Path, workloads: list[tuple[list[list[int]], int]], warm: list[list[int]]) -> list[dict]:
    """vLLM on the same checkpoint, for each (prompts, max_tokens) workload one generate call
    (as ../shared/tools/vllm_compare.py runs it) on one engine, or why it could not run: one
    dict per workload. vLLM is not a dependency: it is used only if importable."""
    # No usage reports from a benchmark; greedy decoding never uses FlashInfer's sampler, whose
    # start-up probe would import flashinfer (often not installed beside vLLM).
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    try:
        import vllm
        from vllm import LLM as VLLM, SamplingParams as VSamplingParams
    except Exception as e:     # ImportError, or a vLLM built for another torch
        print(f"vLLM: not run, `import vllm` failed here ({type(e).__name__}: {e}). DESIGN.md records vLLM 0.26.0 "
              "measured on one H200 on 2026-11-30: throughput 19,700-32,000 output tok/s, latency 1.77-2.97 "
              "ms/token (gpt2), 2.81-2.95 (gpt2-xl).")
        return [{"vllm_error": f"{type(e).__name__}: {e}"}] * len(workloads)
    rows = []
    try:
        # Half the GPU is far more KV cache than these workloads use, and leaves room for
        # whatever this process still holds.
        llm = VLLM(str(ckpt), dtype="float16", skip_tokenizer_init=True, max_num_seqs=256,
                   max_num_batched_tokens=16384, gpu_memory_utilization=0.5)
        sp = lambda n: VSamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)   # noqa: E731
        run = lambda ps, n: llm.generate([{"prompt_token_ids": p} for p in ps], sp(n), use_tqdm=False)     # noqa: E731
        run(warm, 16)
        for prompts, max_tokens in workloads:
            t0 = time.perf_counter()
            outs = run(prompts, max_tokens)
            wall = time.perf_counter() - t0
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            rows.append({"vllm_version": vllm.__version__, "vllm_wall_s": wall, "vllm_output_tokens": n,
                         "vllm_tok_s": n / wall})
    except Exception as e:     # record, do not hide, a baseline that failed to run
        print(f"vLLM {vllm.__version__}: failed ({type(e).__name__}: {e})")
        rows += [{"vllm_version": vllm.__version__, "vllm_error": f"{type(e).__name__}: {e}"}] * (len(workloads) - len(rows))
    llm = None                 # shut vLLM's engine down before whatever runs next
    gc.collect()
    return rows


def _new_llm(args, ckpt: Path, **kw):
    from .llm import LLM
    # The workloads repeat prompts across warm-up and timed runs, and HF has no prefix cache:
    # measure without ours, so that every prompt token is prefilled on both sides.
    return LLM(str(ckpt), device="cuda", dtype=args.dtype or "float16", enforce_eager=args.enforce_eager,
               fused_decode=args.fused_decode, gemv=args.gemv, quiet=False, enable_prefix_caching=False, **kw)


def bench_throughput(args, ckpt: Path) -> list[dict]:
    n, olen = args.num_requests, args.output_len or 384
    prompts = random_prompts(n, 32, 512)
    llm = _new_llm(args, ckpt)
    _engine_run(llm, random_prompts(16, 32, 64, seed=1), 16)               # warm-up
    ours = _engine_run(llm, prompts, olen)
    row = {"workload": f"throughput: {n} requests, [32, 512] -> {olen}", **{f"nanoserve_{k}": v for k, v in ours.items()},
           "nanoserve_tok_s": ours["output_tok_s"]}
    print(json.dumps(row, indent=1))
    print(format_memory(ours))
    row["profile"] = [profile_decode(llm, prompts[:n], 30), profile_decode(llm, prompts[:1], 30)]
    del llm                          # the other engines need the GPU memory our KV pool took
    gc.collect()
    torch.cuda.empty_cache()
    if args.compare_hf:
        try:
            from transformers import GPT2LMHeadModel
            hf = GPT2LMHeadModel.from_pretrained(ckpt, dtype=torch.float16, attn_implementation="paged|sdpa").cuda().eval()
            theirs = _hf_generate_batch(hf, prompts, olen)
            row.update({f"hf_{k}": v for k, v in theirs.items()}, hf_tok_s=theirs["output_tok_s"],
                       ratio=ours["output_tok_s"] / theirs["output_tok_s"])
        except Exception as e:   # record, do not hide, a baseline that failed to run
            row["hf_error"] = f"{type(e).__name__}: {e}"
        print(json.dumps({k: v for k, v in row.items() if k.startswith(("hf", "ratio"))}, indent=1))
    if args.compare == "vllm":
        row.update(vllm_compare(ckpt, [(prompts, olen)], random_prompts(16, 32, 64, seed=1))[0])
        if "vllm_tok_s" in row:
            row["ratio_vllm"] = ours["output_tok_s"] / row["vllm_tok_s"]
        print(json.dumps({k: v for k, v in row.items() if "vllm" in k}, indent=1))
    return [row]


def bench_latency(args, ckpt: Path) -> list[dict]:
    olen = args.output_len or 256
    prompt = random_prompts(1, 32, 32)
    llm = _new_llm(args, ckpt, max_num_seqs=8)
    _engine_run(llm, prompt, 16)
    runs = [_engine_run(llm, prompt, olen) for _ in range(3)]
    best = min(runs, key=lambda r: r["wall_s"])
    row = {"workload": f"latency {args.model}: 1 request, 32 -> {olen}", "nanoserve_tok_s": best["output_tok_s"],
           "nanoserve_ms_per_token": 1000 * best["wall_s"] / olen, "nanoserve_tpot_ms": best["tpot_ms_p50"],
           "nanoserve_ttft_ms": best["ttft_ms_p50"], "runs_ms_per_token": [1000 * r["wall_s"] / olen for r in runs]}
    print(format_memory(best))
    row["profile"] = profile_decode(llm, prompt, 30)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    if args.compare_hf:
        hf = hf_model(ckpt, "cuda", torch.float16)
        theirs = _hf_generate(hf, prompt, olen)
        row.update(hf_tok_s=theirs["output_tok_s"], hf_ms_per_token=1000 * theirs["wall_s"] / olen,
                   ratio=theirs["wall_s"] / best["wall_s"])
        del hf
    if args.compare == "vllm":
        theirs = vllm_compare(ckpt, [(prompt, olen)], prompt)[0]
        row.update(theirs)
        if "vllm_tok_s" in theirs:
            row.update(vllm_ms_per_token=1000 * theirs["vllm_wall_s"] / olen,
                       ratio_vllm=theirs["vllm_wall_s"] / best["wall_s"])
    print(json.dumps(row, indent=1))
    return [row]


def bench_sweep(args, ckpt: Path) -> list[dict]:
    olen = args.output_len or 128
    llm = _new_llm(args, ckpt)
    _engine_run(llm, random_prompts(16, 32, 64, seed=1), 16)
    rows = []
    for c in [1, 8, 32, 64, 128, 256]:
        prompts = random_prompts(c, 128, 128, seed=c)
        ours = _engine_run(llm, prompts, olen)
        rows.append({"workload": f"sweep: {c} concurrent, 128 -> {olen}", "concurrency": c,
                     "nanoserve_tok_s": ours["output_tok_s"]})
    if args.compare_hf:
        del llm
        gc.collect()
        torch.cuda.empty_cache()
        hf = hf_model(ckpt, "cuda", torch.float16)
        for r in rows:
            c = r["concurrency"]
            theirs = _hf_generate(hf, random_prompts(c, 128, 128, seed=c), olen)
            r.update(hf_tok_s=theirs["output_tok_s"], ratio=r["nanoserve_tok_s"] / theirs["output_tok_s"])
        del hf
    if args.compare == "vllm":
        if not args.compare_hf:
            del llm
        gc.collect()
        torch.cuda.empty_cache()
        workloads = [(random_prompts(r["concurrency"], 128, 128, seed=r["concurrency"]), olen) for r in rows]
        for r, theirs in zip(rows, vllm_compare(ckpt, workloads, random_prompts(16, 32, 64, seed=1))):
            r.update(theirs)
            if "vllm_tok_s" in theirs:
                r["ratio_vllm"] = r["nanoserve_tok_s"] / theirs["vllm_tok_s"]
    print(json.dumps(rows, indent=1))
    _plot(rows, Path(args.out) / "throughput_vs_concurrency.png", args.model)
    return rows


def _plot(rows: list[dict], path: Path, model: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    c = [r["concurrency"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(c, [r["nanoserve_tok_s"] for r in rows], "o-", label="nanoserve")
    if "hf_tok_s" in rows[0]:
        ax.plot(c, [r["hf_tok_s"] for r in rows], "s--", label="HF transformers generate (padded)")
    if "vllm_tok_s" in rows[0]:
        ax.plot(c, [r["vllm_tok_s"] for r in rows], "^-.", label=f"vLLM {rows[0]['vllm_version']}")
    ax.set_xscale("log", base=2); ax.set_yscale("log")
    ax.set_xlabel("concurrent requests (128 in, 128 out)"); ax.set_ylabel("output tokens / s")
    ax.set_title(f"{model} fp16, {torch.cuda.get_device_name()}"); ax.grid(True, which="both", alpha=0.3)
    ax.legend(); fig.tight_layout(); fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def run(args: argparse.Namespace, ckpt: Path) -> list[dict]:
    return {"throughput": bench_throughput, "latency": bench_latency, "sweep": bench_sweep}[args.workload](args, ckpt)
