"""config.json checks: every bad file is refused at load, before any allocation, with an error
that names the file and the field."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nanoserve import LLM
from nanoserve import engine as engine_module
from nanoserve.config import GPT2Config


def _with_config(src: Path, dst: Path, edit) -> Path:
    """A copy of checkpoint `src` whose config.json is `edit(raw)` (edit may change raw in place)."""
    shutil.copytree(src, dst)
    raw = json.loads((dst / "config.json").read_text())
    new = edit(raw)
    (dst / "config.json").write_text(json.dumps(raw if new is None else new))
    return dst


@pytest.mark.parametrize("field, value", [("eos_token_id", 50257), ("bos_token_id", 99999),
                                          ("eos_token_id", -1)])
def test_special_token_ids_outside_the_vocabulary_are_refused_at_load(tiny_ckpt, tmp_path, field, value):
    """An eos or bos id the model has no logit for would kill the engine at its first step."""
    d = _with_config(tiny_ckpt, tmp_path / "m", lambda raw: raw.update({field: value}))
    with pytest.raises(ValueError, match=rf"config.json: {field}={value} is outside the vocabulary \[0, 50257\)"):
        LLM(str(d), device="cpu", quiet=True)


@pytest.mark.parametrize("edit, words", [
    (lambda raw: raw.update(n_head=0), r"n_head=0 must be >= 1"),
    (lambda raw: raw.update(n_layer="2"), r"n_layer='2' must be an integer"),
    (lambda raw: raw.update(n_embd=64.0), r"n_embd=64.0 must be an integer"),
    (lambda raw: raw.update(layer_norm_epsilon="tiny"), r"layer_norm_epsilon='tiny' must be a number"),
    (lambda raw: raw.update(tie_word_embeddings="yes"), r"tie_word_embeddings='yes' must be true or false"),
    (lambda raw: raw.pop("n_embd") and None, r"lacks the required field\(s\) \['n_embd'\]"),
    (lambda raw: [raw], r"must hold a JSON object of GPT-2 settings, got \[\{"),
    (lambda raw: 12, r"must hold a JSON object of GPT-2 settings, got 12"),
    (lambda raw: raw.update(n_inner=100), r"n_inner=100 is not supported"),
])
def test_malformed_config_json_names_the_file_and_field(tiny_ckpt, tmp_path, edit, words):
    """No ZeroDivisionError, TypeError, KeyError or AttributeError from deep inside: a
    ValueError that says which file and which field."""
    d = _with_config(tiny_ckpt, tmp_path / "m", edit)
    with pytest.raises(ValueError, match=rf"config.json: .*{words}"):
        LLM(str(d), device="cpu", quiet=True)


@pytest.mark.parametrize("field, value", [("n_layer", 10**6), ("n_embd", 20000), ("vocab_size", 10**9)])
def test_a_config_too_big_for_its_weights_fails_before_the_model_is_built(tiny_ckpt, tmp_path, monkeypatch,
                                                                          field, value):
    """n_layer 10**6 or n_embd 20000 beside a small weights file is refused from the parameter
    count alone, before GPT2(...) allocates anything."""
    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the config was checked")
    monkeypatch.setattr(engine_module, "GPT2", no_model)
    d = _with_config(tiny_ckpt, tmp_path / "m", lambda raw: raw.update({field: value, "n_head": 1}))
    with pytest.raises(ValueError, match=rf"config.json: .*{field}={value}.*parameters.*model.safetensors holds"):
        LLM(str(d), device="cpu", quiet=True)


def test_parameter_count_is_gpt2s():
    """The estimate the size check uses is exact: GPT-2 small has 124,439,808 parameters."""
    assert GPT2Config().num_parameters == 124_439_808
    assert GPT2Config(n_layer=48, n_head=25, n_embd=1600).num_parameters == 1_557_611_200
