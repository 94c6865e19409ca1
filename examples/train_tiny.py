"""Train nanoserve's embedded default model: a tiny GPT-2 on the Python standard library.

    python examples/train_tiny.py prepare                  # CPU: tokenize the corpus into .train/
    python examples/train_tiny.py train --out ckpt         # GPU: train, write fp16 parts + log
    python examples/train_tiny.py merge ckpt weights/nanoserve-stdlib-tiny
    python examples/train_tiny.py eval weights/nanoserve-stdlib-tiny [--hf]

The shipped weights add a short second stage (`train --init-from ckpt --align-starts ...`, see
weights/nanoserve-stdlib-tiny/README.md for the exact commands): windows that start at a line
start teach the model that position 0 is column 0, so a bare "def f(n):" prompt gets a body
instead of an endless run of indentation spaces.

The corpus is the .py source of the running interpreter's standard library (PSF license),
site-packages excluded, test packages included; files sorted by path, every file whose sorted
index % 50 == 0 held out for evaluation. Each file becomes its tokens followed by
<|endoftext|> (50256), so the streams are the files joined with <|endoftext|> separators.

The model is GPT-2 exactly (learned positions, pre-LN blocks, gelu_new, lm_head tied to wte) and
its parameters carry the hub checkpoint's names and layouts: the Conv1D weights stay [in, out]
and are applied as x @ W + b, so `state_dict()` *is* the checkpoint, keys and all.

`train` writes the fp16 weights in parts of at most --max-part-mb, because the machine we train
on hands back files of at most 16 MiB; `merge` joins them into one model.safetensors.
Left out: gradient accumulation, DDP, data loaders (the whole corpus fits on the GPU).

References: nanoGPT `train.py` / `model.py`, llm.c `train_gpt2.py`, HF `modeling_gpt2.py`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import sysconfig
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

# B = batch size (sequences)  T = sequence length  C = n_embd  H = n_head  D = head_dim  V = vocab
EOT_ID = 50256
VAL_EVERY = 50          # files whose sorted index % VAL_EVERY == 0 are held out


@dataclass(frozen=True)
class TinyConfig:
    n_layer: int = 3
    n_head: int = 4
    n_embd: int = 256
    n_positions: int = 1024
    vocab_size: int = 50257     # GPT-2's, unpadded, so wte.weight is exactly the hub shape
    dropout: float = 0.1        # training only; inference ignores it

    def hf_config(self) -> dict:
        """The config.json a hub GPT-2 checkpoint of this shape would carry."""
        return dict(
            model_type="gpt2", architectures=["GPT2LMHeadModel"],
            n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd, n_inner=None,
            n_positions=self.n_positions, n_ctx=self.n_positions, vocab_size=self.vocab_size,
            layer_norm_epsilon=1e-5, activation_function="gelu_new", initializer_range=0.02,
            resid_pdrop=self.dropout, embd_pdrop=self.dropout, attn_pdrop=self.dropout,
            scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
            reorder_and_upcast_attn=False, bos_token_id=EOT_ID, eos_token_id=EOT_ID,
            tie_word_embeddings=True, torch_dtype="float16", use_cache=True)


# ---------------------------------------------------------------------------------- model

class Conv1D(nn.Module):
    """GPT-2's linear layer: weight stored [in, out] (the checkpoint's layout), y = x @ W + b."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))   # (in, out)
        self.bias = nn.Parameter(torch.zeros(n_out))           # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:        # (..., in) -> (..., out)
        return x @ self.weight + self.bias


class Attention(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = Conv1D(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = Conv1D(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:        # (B, T, C) -> (B, T, C)
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)               # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in (q, k, v))                         # 3 x (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)                 # (B, T, C)
        return F.dropout(self.c_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.dropout = cfg.dropout
        self.c_fc = Conv1D(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = Conv1D(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:        # (B, T, C) -> (B, T, C)
        h = F.gelu(self.c_fc(x), approximate="tanh")          # (B, T, 4C); gelu_new is tanh GELU
        return F.dropout(self.c_proj(h), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:        # (B, T, C) -> (B, T, C)
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)   # (V, C), also the lm_head
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)  # (n_positions, C)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        # GPT-2's init: N(0, 0.02), residual projections scaled down by sqrt(2 * n_layer) so
        # the residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))
            elif p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx (B, T) int64 -> logits (B, T, V); with targets (B, T), the mean loss instead."""
        T = idx.shape[1]
        assert T <= self.cfg.n_positions, f"T={T} exceeds n_positions={self.cfg.n_positions}"
        pos = torch.arange(T, device=idx.device)                       # (T,)
        x = F.dropout(self.wte(idx) + self.wpe(pos), self.cfg.dropout, self.training)  # (B, T, C)
        for block in self.h:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)              # (B, T, V), tied head
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1))


# ---------------------------------------------------------------------------------- prepare

def corpus_files(stdlib: Path) -> list[Path]:
    """Every .py file under the stdlib, site-packages and __pycache__ excluded, sorted by path."""
    return sorted(p for p in stdlib.rglob("*.py")
                  if not {"site-packages", "__pycache__"} & set(p.relative_to(stdlib).parts))


def cmd_prepare(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout
    from nanoserve.tokenizer import Tokenizer
    tok, stdlib, data = Tokenizer(), Path(args.stdlib), Path(args.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    streams: dict[str, list[int]] = {"train": [], "val": []}
    val_texts, skipped = [], []
    for i, path in enumerate(corpus_files(stdlib)):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:       # a few test files are deliberately mis-encoded
            skipped.append(str(path.relative_to(stdlib)))
            continue
        split = "val" if i % VAL_EVERY == 0 else "train"
        streams[split] += tok.encode(text) + [EOT_ID]
        if split == "val":
            val_texts.append((path.relative_to(stdlib), text))
    for split, ids in streams.items():
        np.array(ids, dtype=np.uint16).tofile(data / f"{split}.bin")   # V < 65536
    # The small held-out text the tests use: whole val files from outside test packages, in
    # sorted order, joined like the training stream, until it reaches about 30 KB.
    heldout, names = "", []
    for rel, text in val_texts:
        if {"test", "tests", "idle_test"} & set(rel.parts) or len(heldout) + len(text) > 40_000:
            continue
        heldout += ("<|endoftext|>" if heldout else "") + text
        names.append(str(rel))
        if len(heldout) >= 25_000:
            break
    Path(args.heldout).parent.mkdir(parents=True, exist_ok=True)
    Path(args.heldout).write_text(heldout, encoding="utf-8")
    meta = dict(stdlib=str(stdlib), python=sys.version.split()[0], val_every=VAL_EVERY,
                num_files=len(corpus_files(stdlib)), skipped_undecodable=skipped,
                num_train_tokens=len(streams["train"]), num_val_tokens=len(streams["val"]),
                val_files=[str(r) for r, _ in val_texts], heldout_files=names,
                heldout_chars=len(heldout),
                # tokens whose text ends a line: `train --align-starts` starts windows after them
                newline_token_ids=[i for i in range(tok.eos_token_id)
                                   if tok.token_bytes(i).endswith(b"\n")])
    (data / "meta.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps({k: v for k, v in meta.items()
                      if k not in ("val_files", "newline_token_ids")}, indent=1))


# ---------------------------------------------------------------------------------- train

def window_loss(model: GPT, ids: torch.Tensor, n_ctx: int, batch: int = 16,
                full_only: bool = False) -> tuple[float, int]:
    """Mean next-token NLL over non-overlapping n_ctx windows of one token stream.

    Window j holds ids[j*n_ctx : (j+1)*n_ctx]; inside it every token after the first is
    predicted from the ones before it in the same window. The last, shorter window counts
    when it has >= 2 tokens (unless full_only). Returns (mean NLL per predicted token, count).
    """
    n_full = len(ids) // n_ctx
    total, count = 0.0, 0
    full = ids[: n_full * n_ctx].view(n_full, n_ctx)                     # (W, n_ctx)
    chunks = [full[i:i + batch] for i in range(0, n_full, batch)]
    rest = ids[n_full * n_ctx:]
    if not full_only and len(rest) >= 2:
        chunks.append(rest[None])                                         # (1, <n_ctx)
    for x in chunks:
        logits = model(x[:, :-1]).float()                                 # (b, t-1, V)
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1),
                              reduction="sum")
        total, count = total + nll.item(), count + x[:, 1:].numel()
    return total / count, count


def fp16_state(model: GPT) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}


def save_parts(state: dict[str, torch.Tensor], out: Path, max_bytes: int) -> None:
    """Write `state` as part-k.safetensors files of at most max_bytes; a tensor larger than
    that is split along dim 0 into "name|j" pieces, which `merge` concatenates back."""
    pieces = []
    for name, t in state.items():
        n = math.ceil(t.numel() * t.element_size() / max_bytes)
        pieces += [(f"{name}|{j}" if n > 1 else name, c.contiguous())
                   for j, c in enumerate(t.chunk(n, dim=0))]
    parts, size = [{}], 0
    for name, t in pieces:
        nbytes = t.numel() * t.element_size()
        if parts[-1] and size + nbytes > max_bytes:
            parts, size = parts + [{}], 0
        parts[-1][name], size = t, size + nbytes
    for k, part in enumerate(parts):
        tmp = out / f"part-{k}.safetensors.tmp"
        save_file(part, str(tmp))
        os.replace(tmp, out / f"part-{k}.safetensors")    # a timeout never leaves half a file


def cmd_train(args: argparse.Namespace) -> None:
    t_start = time.time()
    out, data = Path(args.out), Path(args.data_dir)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "train_log.txt", "a")

    def log(msg: str) -> None:
        line = f"[{time.time() - t_start:7.1f}s] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    is_cuda = device.type == "cuda"
    torch.set_float32_matmul_precision("high")
    cfg = TinyConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                     n_positions=args.n_positions, dropout=args.dropout)
    (out / "config.json").write_text(json.dumps(cfg.hf_config(), indent=2) + "\n")
    train_ids = torch.from_numpy(np.fromfile(data / "train.bin", dtype=np.uint16).astype(np.int64)).to(device)
    val_ids = torch.from_numpy(np.fromfile(data / "val.bin", dtype=np.uint16).astype(np.int64)).to(device)
    model = GPT(cfg)
    if args.init_from:
        model.load_state_dict({k: v.float() for k, v in load_state(Path(args.init_from), cfg).items()})
        log(f"initialized from {args.init_from}")
    model = model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"device={torch.cuda.get_device_name() if is_cuda else 'cpu'} torch={torch.__version__} "
        f"params={n_params:,} cfg={asdict(cfg)} args={vars(args)}")
    log(f"train_tokens={len(train_ids):,} val_tokens={len(val_ids):,}")
    B, T = args.batch_size, args.seq_len or cfg.n_positions
    # Window starts: anywhere, or (--align-starts) only at the start of a line or a file, so
    # that position 0 means "column 0" and a bare prompt like "def f():" reads as top level.
    starts = torch.arange(len(train_ids) - T - 1, device=device)                 # (S,)
    if args.align_starts:
        ends_line = json.loads((data / "meta.json").read_text())["newline_token_ids"] + [EOT_ID]
        is_after = torch.isin(train_ids[:-1], torch.tensor(ends_line, device=device))  # (N-1,)
        starts = (torch.nonzero(is_after).squeeze(1) + 1)                        # (S,)
        starts = starts[starts < len(train_ids) - T - 1]
        log(f"--align-starts: {len(starts):,} line starts")

    # Weight decay on matrices and embeddings only, not on biases and LayerNorm gains.
    params = [p for p in model.parameters()]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=is_cuda)
    step_model = torch.compile(model) if args.compile else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if is_cuda else nullcontext()
    gen = torch.Generator(device=device).manual_seed(args.seed)
    offsets = torch.arange(T + 1, device=device)                         # (T+1,)

    def lr_at(step: int, max_steps: int) -> float:
        """Linear warmup, then cosine decay to lr/10 at max_steps."""
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = min(1.0, (step - args.warmup) / max(1, max_steps - args.warmup))
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        with amp:
            loss, _ = window_loss(model, val_ids, cfg.n_positions, batch=16, full_only=True)
        model.train()
        return loss

    # Without --max-steps, time the steps after compilation and fix the schedule's length so
    # that training ends within --max-minutes; the log prints it, and passing that number as
    # --max-steps reproduces the run.
    max_steps, budget_s = args.max_steps, args.max_minutes * 60
    best, tokens_seen, t_calib = float("inf"), 0, None
    step = 0
    while max_steps is None or step < max_steps:
        if step in (10, 60) and is_cuda:
            torch.cuda.synchronize()    # the CPU runs ahead of the GPU; time finished work
        if step == 10:
            t_calib = time.time()
        if max_steps is None and step == 60:
            per_step = (time.time() - t_calib) / 50
            left = budget_s - (time.time() - t_start) - args.reserve_s
            max_steps = step + max(1, int(left / per_step))
            log(f"{per_step * 1000:.1f} ms/step -> max_steps={max_steps}")
        for g in opt.param_groups:
            g["lr"] = lr_at(step, max_steps or 10**9)
        ix = starts[torch.randint(len(starts), (B,), generator=gen, device=device)]  # (B,)
        xy = train_ids[ix[:, None] + offsets]                            # (B, T+1)
        opt.zero_grad(set_to_none=True)
        try:
            with amp:
                loss = step_model(xy[:, :-1], xy[:, 1:])
            loss.backward()
        except Exception as e:  # noqa: BLE001 -- a compiler failure should not cost the run
            if step_model is model:
                raise
            log(f"torch.compile failed ({type(e).__name__}: {e}); continuing in eager mode")
            step_model = model
            opt.zero_grad(set_to_none=True)
            with amp:
                loss = model(xy[:, :-1], xy[:, 1:])
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step, tokens_seen = step + 1, tokens_seen + B * T
        if step % args.log_every == 0 or step == 1:
            log(f"step {step} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"tokens {tokens_seen:,}")
        is_late = args.max_steps is None and time.time() - t_start > budget_s + 60
        if step % args.eval_every == 0 or step == max_steps or is_late:
            val = evaluate()
            log(f"step {step} val_loss {val:.4f} (ppl {math.exp(val):.2f})")
            if val < best:           # keep the best, and write it so a timeout still returns it
                best = val
                save_parts(fp16_state(model), out, args.max_part_mb * 2**20)
                log(f"saved step {step} (best val_loss {best:.4f})")
        if is_late:                  # a safety net for a bad step-time estimate
            log(f"over the time budget at step {step}; stopping early")
            break
    log(f"done: {step} steps, {tokens_seen:,} tokens, {time.time() - t_start:.1f}s wall, "
        f"best val_loss {best:.4f}")


# ---------------------------------------------------------------------------------- merge / eval

def load_state(src: Path, cfg: TinyConfig) -> dict[str, torch.Tensor]:
    """The state dict in `src`: a model.safetensors, or the part files `train` writes."""
    files = [src / "model.safetensors"] if (src / "model.safetensors").is_file() \
        else sorted(src.glob("part-*.safetensors"))
    pieces: dict[str, torch.Tensor] = {}
    for f in files:
        pieces.update(load_file(str(f)))
    state = {}
    for name in GPT(cfg).state_dict():              # the checkpoint's order and keys
        if name in pieces:
            state[name] = pieces[name]
        else:
            parts = sorted((k for k in pieces if k.startswith(name + "|")),
                           key=lambda k: int(k.split("|")[1]))
            if not parts:
                raise ValueError(f"{name} is missing from {src}; expected model.safetensors "
                                 "or the part-*.safetensors files that `train` writes")
            state[name] = torch.cat([pieces[k] for k in parts]).contiguous()
    return state


def cmd_merge(args: argparse.Namespace) -> None:
    src, dst = Path(args.parts_dir), Path(args.model_dir)
    dst.mkdir(parents=True, exist_ok=True)
    cfg = TinyConfig(**{k: v for k, v in json.loads((src / "config.json").read_text()).items()
                        if k in ("n_layer", "n_head", "n_embd", "n_positions")})
    state = load_state(src, cfg)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(src / "config.json", dst / "config.json")
    print(f"{dst / 'model.safetensors'}: {os.path.getsize(dst / 'model.safetensors'):,} bytes, "
          f"{sum(t.numel() for t in state.values()):,} params")


@torch.no_grad()
def cmd_eval(args: argparse.Namespace) -> None:
    """fp32 CPU loss of a checkpoint directory, by the window procedure in `window_loss`."""
    raw = json.loads((Path(args.model_dir) / "config.json").read_text())
    cfg = TinyConfig(n_layer=raw["n_layer"], n_head=raw["n_head"], n_embd=raw["n_embd"],
                     n_positions=raw["n_positions"], dropout=0.0)
    if args.hf:                 # the reference: transformers reading the same directory
        from transformers import GPT2LMHeadModel
        hf = GPT2LMHeadModel.from_pretrained(args.model_dir, torch_dtype=torch.float32).eval()
        model = lambda x: hf(x).logits                                   # noqa: E731
    else:
        model = GPT(cfg).eval()
        model.load_state_dict({k: v.float() for k, v in
                               load_file(str(Path(args.model_dir) / "model.safetensors")).items()})
    for text in args.text:
        if text.endswith(".bin"):
            ids = torch.from_numpy(np.fromfile(text, dtype=np.uint16).astype(np.int64))
        else:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from nanoserve.tokenizer import Tokenizer
            ids = torch.tensor(Tokenizer().encode(Path(text).read_text(encoding="utf-8")))
        loss, n = window_loss(model, ids, cfg.n_positions, batch=4)
        print(f"{text}: {'transformers' if args.hf else 'train_tiny'} loss {loss:.5f} "
              f"ppl {math.exp(loss):.3f} over {n:,} predicted tokens ({len(ids):,} tokens)")


def main() -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=fmt)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="tokenize the stdlib into train/val .bin", formatter_class=fmt)
    p.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"])
    p.add_argument("--data-dir", default=".train")
    p.add_argument("--heldout", default="tests/data/heldout_stdlib.txt")
    p = sub.add_parser("train", help="train and write fp16 parts", formatter_class=fmt)
    p.add_argument("--data-dir", default=".train")
    p.add_argument("--out", default=".train/ckpt")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--n-layer", type=int, default=3)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-positions", type=int, default=1024)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence; default n_positions")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--max-steps", type=int, default=None, help="default: fit --max-minutes")
    p.add_argument("--max-minutes", type=float, default=6.0)
    p.add_argument("--reserve-s", type=float, default=20.0, help="seconds kept for evals/saves")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--max-part-mb", type=int, default=15, help="largest weight file written")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--align-starts", action="store_true",
                   help="start training windows only at line/file starts")
    p.add_argument("--init-from", default=None,
                   help="a checkpoint dir (model.safetensors or part files) to continue from")
    p = sub.add_parser("merge", help="join fp16 parts into model.safetensors", formatter_class=fmt)
    p.add_argument("parts_dir")
    p.add_argument("model_dir")
    p = sub.add_parser("eval", help="fp32 CPU window loss of a checkpoint", formatter_class=fmt)
    p.add_argument("model_dir")
    p.add_argument("--text", nargs="+", default=["tests/data/heldout_stdlib.txt"],
                   help="text files, or .bin token files from prepare")
    p.add_argument("--hf", action="store_true", help="evaluate with transformers instead")
    args = ap.parse_args()
    {"prepare": cmd_prepare, "train": cmd_train, "merge": cmd_merge, "eval": cmd_eval}[args.cmd](args)


if __name__ == "__main__":
    main()
