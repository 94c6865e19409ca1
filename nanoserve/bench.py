"""Benchmarks: nanoserve beside Hugging Face transformers, in the same process and run.

    python -m nanoserve bench cpu                      # the CPU workloads (2 cores, fp32)
    python -m nanoserve bench cpu --dtype bfloat16     # ... bf16 weights (HF in bf16 too)
    python -m nanoserve bench cpu --quantization int8  # ... int8 weights (HF in fp32)
    python -m nanoserve bench cpu --fused-decode       # ... decode steps in C++ (or one-sequence ones compiled)
    python -m nanoserve bench throughput --device cuda --compare-hf
    python -m nanoserve bench latency --device cuda --model gpt2-xl --compare-hf
    python -m nanoserve bench throughput --device cuda --compare vllm   # vLLM too, if importable

Workloads (../DESIGN.md): random token-id prompts from seed 0, greedy, ignore_eos, so every
request generates exactly its max_tokens. Without real weights the model is a randomly
initialised GPT-2 of the named size: speed does not depend on the weights' values.
HF figures come from `generate` (padded batches) or `generate_batch` (its continuous batching).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from .config import PRESETS, resolve_dtype


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("workload", choices=["cpu", "throughput", "latency", "sweep"], nargs="?", default="cpu")
    p.add_argument("--model", default="gpt2", help="preset name (random weights of that size) or checkpoint dir")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="default: float32 on cpu, float16 on cuda")
    p.add_argument("--quantization", default=None, choices=["int8"], help="cpu: int8 weights (linear.py)")
    p.add_argument("--compare-hf", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--output-len", type=int, default=None)
    p.add_argument("--out", default="bench_out", help="directory for JSON results and plots")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--fused-decode", action=argparse.BooleanOptionalAction, default=None,
                   help="GPU: CUDA graphs of the compiled decode step (default: on); cpu: decode steps of up "
                        "to 8 sequences in C++ (cpu_step.py, default: on where it builds), elsewhere one-sequence "
                        "steps compiled (default: off) (EngineConfig.fused_decode)")
    p.add_argument("--gemv", action=argparse.BooleanOptionalAction, default=None,
                   help="GPU: decode linears of few rows through gemv.py's Triton kernel (EngineConfig.gemv; default: on)")
    p.add_argument("--compare", choices=["vllm"], default=None,
                   help="GPU: also run vLLM on the same checkpoint and prompts (when `import vllm` works)")
    p.add_argument("--quick", action="store_true", help="smaller workloads (smoke test)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="cpu: torch.compile the decode attention (EngineConfig.compile_cpu_attention)")


# ---- models ------------------------------------------------------------------------------
def checkpoint_for(model: str, workdir: Path) -> Path:
    """A checkpoint directory: the given one, or random weights of a preset's size."""
    if Path(model).is_dir():
        return Path(model)
    if model not in PRESETS:
        raise ValueError(f"--model {model!r}: give a checkpoint directory or one of {list(PRESETS)}")
    path = workdir / model
    if not (path / "config.json").exists():
        from transformers import GPT2Config as HFConfig, GPT2LMHeadModel
        torch.manual_seed(0)
        p = PRESETS[model]
        cfg = HFConfig(n_layer=p["n_layer"], n_head=p["n_head"], n_embd=p["n_embd"])
        # On a GPU, initialise there and save fp16: gpt2-xl's CPU init takes minutes.
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(dev):
            m = GPT2LMHeadModel(cfg)
        (m.half() if dev == "cuda" else m).save_pretrained(path, safe_serialization=True)
    return path


def hf_model(path: Path, device: str, dtype: torch.dtype):
    from transformers import GPT2LMHeadModel
    return GPT2LMHeadModel.from_pretrained(path, dtype=dtype).to(device).eval()


def random_prompts(n: int, lo: int, hi: int, seed: int = 0, vocab: int = 50257) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab - 1, (L,), generator=g).tolist() for L in lens]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def memory_usage(llm) -> dict:
    """Peak KV (MiB) since the allocator's last reset_peak(), process peak RSS (MiB), and on
    CUDA the caching allocator's peak allocated and current reserved bytes (MiB)."""
    import resource
    s = llm.engine.get_stats()
    mem = {"peak_kv_blocks": s["peak_blocks_used"], "peak_kv_mib": s["peak_blocks_used"] * s["kv_block_bytes"] / 2**20,
           "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10}   # Linux reports KiB
    if "cuda_memory_reserved" in s:
        mem["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated(llm.engine.device) / 2**20
        mem["cuda_reserved_mib"] = s["cuda_memory_reserved"] / 2**20
    return mem


def format_memory(mem: dict) -> str:
    line = f"  memory: peak KV {mem['peak_kv_blocks']} blocks = {mem['peak_kv_mib']:.1f} MiB, " \
           f"process peak RSS {mem['max_rss_mib']:.0f} MiB"
    if "cuda_reserved_mib" in mem:
        line += f", CUDA peak allocated {mem['cuda_peak_allocated_mib']:.0f} MiB, reserved {mem['cuda_reserved_mib']:.0f} MiB"
    return line


# ---- nanoserve and HF runners ------------------------------------------------------------------
def run_nanoserve(llm, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
    """Seconds and generated tokens for one generate() call over all prompts."""
    from .sequence import SamplingParams
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.engine.allocator.reset_peak()      # memory_usage() then reports this call's peak
    _sync(str(llm.engine.device))
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    _sync(str(llm.engine.device))
    dt = time.perf_counter() - t0
    return dt, sum(len(o.outputs[0].token_ids) for o in outs)


@torch.inference_mode()
def run_hf_generate(model, prompts: list[list[int]], max_tokens: int, batch_size: int,
                    use_cache: bool = True) -> tuple[float, int]:
    """HF `generate`, padded batches of `batch_size` (left padding), greedy, exact lengths."""
    device = str(model.device)
    _sync(device)
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        L = max(len(p) for p in chunk)
        ids = torch.tensor([[50256] * (L - len(p)) + p for p in chunk], device=model.device)
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in chunk], device=model.device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, use_cache=use_cache,
                             pad_token_id=50256)
        n += (out.shape[1] - L) * len(chunk)
    _sync(device)
    return time.perf_counter() - t0, n


def _row(name: str, ours: tuple[float, int], hf: tuple[float, int] | None) -> dict:
    r = {"workload": name, "nanoserve_tok_s": ours[1] / ours[0], "nanoserve_s": ours[0], "tokens": ours[1]}
    if hf:
        r["hf_tok_s"] = hf[1] / hf[0]
        r["ratio"] = r["nanoserve_tok_s"] / r["hf_tok_s"]
    return r


def _print_table(rows: list[dict]) -> None:
    print(f"{'workload':44s} {'nanoserve tok/s':>16s} {'HF tok/s':>10s} {'ratio':>7s}")
    for r in rows:
        hf = f"{r['hf_tok_s']:10.1f}" if "hf_tok_s" in r else f"{'-':>10s}"
        ratio = f"{r['ratio']:6.2f}x" if "ratio" in r else f"{'-':>7s}"
        print(f"{r['workload']:44s} {r['nanoserve_tok_s']:16.1f} {hf} {ratio}")


# ---- CPU workloads -----------------------------------------------------------------------------
def bench_cpu(args: argparse.Namespace, ckpt: Path) -> list[dict]:
    from .llm import LLM
    q = args.quick
    # Prompts repeat across workloads and HF has no prefix cache: prefill every token on both sides.
    dtype = args.dtype or "float32"
    kw = dict(device="cpu", dtype=dtype, quantization=args.quantization, quiet=True)
    llm = LLM(str(ckpt), compile_cpu_attention=args.compile, fused_decode=args.fused_decode, enable_prefix_caching=False, **kw)
    nocache = LLM(str(ckpt), enable_kv_cache=False, **kw)
    hf = hf_model(ckpt, "cpu", resolve_dtype(dtype, torch.device("cpu"))) if args.compare_hf else None
    # Warm-up, also compiling the decode attention for one and for several sequences (torch
    # treats a size of 1 as a special case) and for several blocks per sequence. Decode steps
    # that a fused CPU step takes (up to runner.cpu_decode_seqs sequences) never reach that
    # attention, so the second warm-up batch is one sequence larger than those (2 without one).
    warm = random_prompts(max(2, llm.engine.runner.cpu_decode_seqs + 1), 40, 40, seed=1)
    run_nanoserve(llm, warm[:1], 4)
    run_nanoserve(llm, warm, 4)
    if hf:
        run_hf_generate(hf, warm, 4, 2)
    workloads = [("1 request, 32 -> 128", 1, 32, 8 if q else 128, 1),
                 ("8 requests, 32 -> 128", 8, 32, 8 if q else 128, 8),
                 ("32 requests, 64 -> 64 (HF: padded batch 32)", 32, 64, 8 if q else 64, 32)]
    rows = []
    for name, n, plen, olen, hf_bs in workloads:
        prompts = random_prompts(n, plen, plen)
        ours = run_nanoserve(llm, prompts, olen)
        mem = memory_usage(llm)
        theirs = run_hf_generate(hf, prompts, olen, hf_bs) if hf else None
        rows.append(_row(name, ours, theirs) | mem)
        _print_table(rows[-1:])
        print(format_memory(mem))
    # KV cache against full recomputation (the same engine with the cache switched off).
    olen = 16 if q else 256
    prompts = random_prompts(1, 32, 32)
    with_cache = run_nanoserve(llm, prompts, olen)
    without = run_nanoserve(nocache, prompts, olen)
    rows.append(_row(f"1 request, 32 -> {olen}, KV cache", with_cache, None))
    r = _row(f"1 request, 32 -> {olen}, no KV cache (recompute)", without, None)
    if hf:
        hf_nc = run_hf_generate(hf, prompts, olen, 1, use_cache=False)
        r["hf_tok_s"] = hf_nc[1] / hf_nc[0]
        r["ratio"] = r["nanoserve_tok_s"] / r["hf_tok_s"]
    rows.append(r)
    rows.append({"workload": "KV cache speed-up over recompute",
                 "nanoserve_tok_s": with_cache[1] / with_cache[0] / (without[1] / without[0])})
    _print_table(rows[-3:])
    return rows


def main(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint_for(args.model, Path(tmp))
        if args.workload == "cpu":
            rows = bench_cpu(args, ckpt)
        else:
            from . import bench_gpu
            rows = bench_gpu.run(args, ckpt)
    info = {"workload": args.workload, "model": args.model, "date": time.strftime("%Y-%m-%d"),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": args.dtype,
            "quantization": args.quantization, "rows": rows}
    if Path("/proc/loadavg").exists():          # other work on a small machine skews CPU numbers
        info["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    mode = "".join(f"_{m}" for m in (args.dtype, args.quantization) if m)
    (out_dir / f"bench_{args.workload}_{Path(args.model).name}{mode}.json").write_text(json.dumps(info, indent=2))
    print()
    _print_table(rows)
    return 0
