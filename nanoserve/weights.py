"""Checkpoints: find a model directory (local path, weights/<name>, or the Hugging Face hub),
read its config.json, and load its tensors with safetensors into GPT-2's parameter names.

Two key layouts exist for the same tensors:
  - the hub's original files (openai-community/gpt2 ...): `wte.weight`, `h.0.attn.c_attn.weight`,
    ..., plus `h.N.attn.bias` causal-mask buffers that we ignore, and no `lm_head.weight`;
  - transformers' `save_pretrained`: the same names under `transformer.`, maybe `lm_head.weight`
    and `attn.masked_bias`.
Both are float32 with Conv1D weights stored [in, out]. We return the tensors under the
checkpoint's names and shapes, 1:1; GPT2.load_weights (model.py) then transposes the Conv1D
weights once to [out, in] and the model computes x @ W.T + b, nn.Linear's way.

References: Hugging Face `GPT2LMHeadModel`, nanoGPT `from_pretrained` (which transposes instead).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch

from .config import PRESETS, GPT2Config

# Where hub downloads go: <repo>/weights/<name>, overridable for installed copies.
WEIGHTS_DIR = Path(os.environ.get("NANOSERVE_WEIGHTS", Path(__file__).resolve().parent.parent / "weights"))
# The model this project trains and commits, used when the default gpt2 cannot be fetched.
EMBEDDED_MODEL = "nanoserve-stdlib-tiny"
DEFAULT_MODEL = "gpt2"
_HUB_FILES = ["config.json", "model.safetensors", "vocab.json", "merges.txt", "generation_config.json"]
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def download(name: str, dest: Path | None = None) -> Path:
    """Fetch a hub checkpoint (config, safetensors, tokenizer files) into weights/<name>, once.

    A copy already in the Hugging Face cache (from transformers, say) is reused without
    touching the network; otherwise huggingface_hub downloads it, with progress bars."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    hub_id = PRESETS.get(name, {}).get("hub_id", name)
    dest = dest or WEIGHTS_DIR / name.split("/")[-1]
    try:
        cached = Path(snapshot_download(repo_id=hub_id, allow_patterns=_HUB_FILES, local_files_only=True))
        dest.mkdir(parents=True, exist_ok=True)
        for f in cached.iterdir():
            shutil.copyfile(f, dest / f.name)           # resolves the cache's symlinks to blobs
    except LocalEntryNotFoundError:
        snapshot_download(repo_id=hub_id, allow_patterns=_HUB_FILES, local_dir=str(dest))
    if not (dest / "model.safetensors").is_file():
        raise FileNotFoundError(f"{hub_id} on the hub has no model.safetensors; nanoserve loads safetensors only")
    return dest


def resolve_model(model: str) -> Path:
    """Turn `model` into a checkpoint directory.

    Order: an existing local directory; weights/<name>; a hub download into weights/<name>.
    Only the default model ("gpt2") falls back to the embedded model when the hub cannot be
    reached; a model the user named explicitly is never silently replaced.
    """
    path = Path(model).expanduser()
    if path.exists():
        if not _is_model_dir(path):
            raise FileNotFoundError(f"{path}: not a checkpoint directory (needs config.json and model.safetensors)")
        return path
    local = WEIGHTS_DIR / model.split("/")[-1]
    if _is_model_dir(local) and (local / "model.safetensors").is_file():
        return local
    if model.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{model}: no such directory")
    try:
        return download(model, local)
    except Exception as e:  # hub unreachable, unknown repo, gated repo, ...
        if model == DEFAULT_MODEL and _is_model_dir(WEIGHTS_DIR / EMBEDDED_MODEL):
            print(f"nanoserve: could not fetch {model} from the Hugging Face hub ({type(e).__name__}); "
                  f"running the embedded model {EMBEDDED_MODEL} instead. On a connected machine, "
                  f"`make weights` (python -m nanoserve download gpt2) fetches GPT-2.", file=sys.stderr)
            return WEIGHTS_DIR / EMBEDDED_MODEL
        raise FileNotFoundError(f"model {model!r} is neither a local directory nor in {WEIGHTS_DIR}, "
                                f"and fetching it from the hub failed: {type(e).__name__}: {e}") from None


def load_state_dict(model_dir: Path, config: GPT2Config) -> dict[str, torch.Tensor]:
    """Read the checkpoint's tensors, normalised to unprefixed GPT-2 names, float32 on CPU.

    Refuses, naming the file and the tensor: a config.json that implies more parameters than
    the file can hold (checked before anything is read or allocated), missing or misshapen
    tensors, dtypes other than float16/bfloat16/float32, and NaN or infinite values."""
    sd = _read_tensors(model_dir, config)
    expected = _expected_shapes(config)
    missing = [k for k in expected if k not in sd]
    if missing:
        raise ValueError(f"{model_dir}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}; "
                         "is this a GPT-2 (GPT2LMHeadModel) checkpoint?")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise ValueError(f"{model_dir}: {k} has shape {tuple(sd[k].shape)}, config.json implies {shape}")
    if "lm_head.weight" in sd:
        # Tied checkpoints store a copy of wte; only an untied fine-tune needs its own head.
        if config.tie_word_embeddings or torch.equal(sd["lm_head.weight"], sd["wte.weight"]):
            del sd["lm_head.weight"]
    elif not config.tie_word_embeddings:
        raise ValueError(f"{model_dir}: tie_word_embeddings is false but there is no lm_head.weight")
    unknown = [k for k in sd if k not in expected and k != "lm_head.weight"]
    if unknown:
        raise ValueError(f"{model_dir}: unexpected tensors {unknown[:3]}; not a plain GPT-2 checkpoint")
    sd = {k: v.float() for k, v in sd.items()}
    for k, v in sd.items():
        # One NaN weight makes every logit NaN: refuse it here, by name, not at the first request.
        if not torch.isfinite(v).all():
            raise ValueError(f"{model_dir}: tensor {k} holds NaN or infinite values; the checkpoint is corrupt")
    return sd


def _read_tensors(model_dir: Path, config: GPT2Config) -> dict[str, torch.Tensor]:
    """The file's float tensors under unprefixed names, without the mask buffers we ignore."""
    st = model_dir / "model.safetensors"
    _check_file_can_hold(config, st if st.is_file() else model_dir / "pytorch_model.bin", model_dir)
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            raw = load_file(str(st))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{st}: cannot read safetensors file ({e}); re-download it") from None
    elif (model_dir / "pytorch_model.bin").is_file():   # older fine-tunes ship only this
        raw = torch.load(model_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{model_dir}: no model.safetensors (or pytorch_model.bin) found")
    sd: dict[str, torch.Tensor] = {}
    for name, t in raw.items():
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if t.dtype not in _FLOAT_DTYPES:     # int8 or bool would load as nonsense numbers
            raise ValueError(f"{model_dir}: tensor {name} is {t.dtype}; nanoserve loads float16, bfloat16 "
                             "or float32 weights only (quantized checkpoints are not supported)")
        sd[name.removeprefix("transformer.")] = t
    return sd


def _expected_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a GPT-2 of this config has (the tied lm_head aside), with its shape."""
    C, V = config.n_embd, config.vocab_size
    expected = {"wte.weight": (V, C), "wpe.weight": (config.n_ctx, C),
                "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(config.n_layer):
        p = f"h.{i}."
        expected.update({
            p + "ln_1.weight": (C,), p + "ln_1.bias": (C,), p + "ln_2.weight": (C,), p + "ln_2.bias": (C,),
            p + "attn.c_attn.weight": (C, 3 * C), p + "attn.c_attn.bias": (3 * C,),
            p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,),
            p + "mlp.c_fc.weight": (C, 4 * C), p + "mlp.c_fc.bias": (4 * C,),
            p + "mlp.c_proj.weight": (4 * C, C), p + "mlp.c_proj.bias": (C,),
        })
    return expected


def _check_file_can_hold(config: GPT2Config, path: Path, model_dir: Path) -> None:
    """A config.json claiming n_layer=10**6 or n_embd=20000 would have us allocate gigabytes
    before a shape check could fail. Its parameter count is known up front, and the weights
    file must hold at least 2 bytes (float16) per parameter."""
    if not path.is_file():
        return                  # load_state_dict reports the missing file
    need, have = 2 * config.num_parameters, path.stat().st_size
    if need > have:
        c = config
        raise ValueError(f"{model_dir / 'config.json'}: n_layer={c.n_layer}, n_embd={c.n_embd}, n_ctx={c.n_ctx}, "
                         f"vocab_size={c.vocab_size} imply {c.num_parameters:,} parameters, at least "
                         f"{need / 2**20:,.1f} MiB of weights, but {path.name} holds {have / 2**20:,.1f} MiB; "
                         "config.json does not describe these weights (or the file is truncated: re-download it)")
