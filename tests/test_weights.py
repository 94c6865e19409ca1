"""Checkpoint loading: both key layouts, errors that name the file, and model resolution."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from nanoserve import LLM
from nanoserve import weights as W
from nanoserve.config import GPT2Config


def test_hub_and_save_pretrained_layouts_load_identical_tensors(tiny_ckpt, tiny_ckpt_hf_layout):
    """Unprefixed keys with attn.bias buffers and `transformer.`-prefixed keys with lm_head
    normalise to the same state dict (lm_head dropped because it is tied)."""
    cfg = GPT2Config.from_json(tiny_ckpt / "config.json")
    a = W.load_state_dict(tiny_ckpt, cfg)
    b = W.load_state_dict(tiny_ckpt_hf_layout, cfg)
    assert a.keys() == b.keys() and "lm_head.weight" not in a and "h.0.attn.bias" not in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["h.0.attn.c_attn.weight"].shape == (cfg.n_embd, 3 * cfg.n_embd)   # Conv1D [in, out]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("option", ["scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                                    "add_cross_attention"])
def test_unsupported_config_options_raise(tiny_ckpt, tmp_path, option):
    d = _copy(tiny_ckpt, tmp_path / "m")
    raw = json.loads((d / "config.json").read_text())
    raw[option] = True
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=option):
        LLM(str(d), device="cpu", quiet=True)


def test_missing_and_corrupt_files_name_the_file(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors"):
        LLM(str(d), device="cpu", quiet=True)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        LLM(str(d), device="cpu", quiet=True)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(d), device="cpu", quiet=True)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        LLM(str(tmp_path / "no_such_dir"), device="cpu", quiet=True)


def test_wrong_shapes_are_reported(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path / "m")
    raw = json.loads((d / "config.json").read_text())
    raw["n_embd"], raw["n_head"] = 32, 4
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="shape"):
        LLM(str(d), device="cpu", quiet=True)


def _fake_hub_cache(root: Path, repo: str, files: Path) -> None:
    """The layout huggingface_hub leaves after a download: refs/main -> snapshots/<commit>."""
    base = root / "hub" / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("0123456789abcdef")
    shutil.copytree(files, base / "snapshots" / "0123456789abcdef")


def test_hub_id_is_taken_from_the_local_hub_cache_into_weights(tiny_ckpt, tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub (offline here, from its cache) into weights/."""
    _fake_hub_cache(tmp_path / "hf", "someorg/tiny-gpt2", tiny_ckpt)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as C
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(W, "WEIGHTS_DIR", tmp_path / "weights")
    path = W.resolve_model("someorg/tiny-gpt2")
    assert path == tmp_path / "weights" / "tiny-gpt2" and (path / "model.safetensors").is_file()
    assert W.resolve_model("tiny-gpt2") == path          # second time: found in weights/


def test_default_model_falls_back_to_embedded_but_named_models_do_not(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """Hub unreachable: 'gpt2' runs the embedded model with a one-line notice on stderr;
    an explicitly named model that cannot be fetched is an error."""
    import huggingface_hub.constants as C
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(W, "WEIGHTS_DIR", tmp_path / "weights")
    _copy(tiny_ckpt, tmp_path / "weights" / W.EMBEDDED_MODEL)
    assert W.resolve_model("gpt2") == tmp_path / "weights" / W.EMBEDDED_MODEL
    err = capsys.readouterr().err
    assert "gpt2" in err and W.EMBEDDED_MODEL in err and "download gpt2" in err and err.count("\n") == 1
    with pytest.raises(FileNotFoundError, match="gpt2-medium"):
        W.resolve_model("gpt2-medium")


def _rewrite_tensor(src: Path, dst: Path, name: str, fn) -> Path:
    """A copy of checkpoint `src` with tensor `name` replaced by fn(tensor)."""
    from safetensors.torch import load_file, save_file
    d = _copy(src, dst)
    sd = load_file(str(d / "model.safetensors"))
    sd[name] = fn(sd[name])
    save_file(sd, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.float64])
def test_only_float16_bfloat16_and_float32_weights_load(tiny_ckpt, tmp_path, dtype):
    """int8 or bool weights would load as nonsense numbers: refused, naming the tensor."""
    d = _rewrite_tensor(tiny_ckpt, tmp_path / "m", "h.1.mlp.c_fc.weight", lambda t: t.to(dtype))
    with pytest.raises(ValueError, match=rf"h.1.mlp.c_fc.weight is {dtype}"):
        LLM(str(d), device="cpu", quiet=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_infinite_weights_are_refused_at_load_by_name(tiny_ckpt, tmp_path, bad):
    """One NaN weight would make every logprob NaN (and a stream invalid JSON)."""
    def spoil(t):
        t = t.clone()
        t[3, 5] = bad
        return t
    d = _rewrite_tensor(tiny_ckpt, tmp_path / "m", "h.0.attn.c_proj.weight", spoil)
    with pytest.raises(ValueError, match="h.0.attn.c_proj.weight holds NaN or infinite values"):
        LLM(str(d), device="cpu", quiet=True)


def test_float16_weights_load_as_the_same_model(tiny_ckpt, tmp_path):
    """A checkpoint stored in float16 loads (upcast to float32) and keeps its names."""
    from safetensors.torch import load_file, save_file
    d = _copy(tiny_ckpt, tmp_path / "m")
    save_file({k: v.half() for k, v in load_file(str(d / "model.safetensors")).items()}, str(d / "model.safetensors"))
    cfg = GPT2Config.from_json(d / "config.json")
    half, full = W.load_state_dict(d, cfg), W.load_state_dict(tiny_ckpt, cfg)
    assert half.keys() == full.keys() and all(v.dtype == torch.float32 for v in half.values())
    torch.testing.assert_close(half["wte.weight"], full["wte.weight"], atol=1e-2, rtol=1e-2)
