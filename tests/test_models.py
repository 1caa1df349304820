"""kvpack.models: the bundled model's converted form (kept after the first load) is the same model as the GGUF."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from kvpack import models
from kvpack.spec import ModelSpec, config_digest
from test_families import tiny


def word_tokenizer() -> Any:
    vocab = {"[UNK]": 0, "a": 1, "b": 2}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")), unk_token="[UNK]")


def test_converted_form_round_trips_and_a_broken_one_is_rebuilt(tmp_path: Path) -> None:
    model, tokenizer = tiny("llama", torch.float32), word_tokenizer()
    target = tmp_path / "models" / "tiny"
    models._save_converted(model, tokenizer, target)
    assert sorted(p.name for p in target.iterdir() if not p.name.startswith(".")) >= ["kvpack-config.json",
                                                                                       "model.safetensors"]
    for dtype in (torch.float32, torch.bfloat16):
        loaded = models._load_converted(target, dtype)
        assert loaded is not None
        again, vocab = loaded
        assert config_digest(again.config) == config_digest(model.config)
        assert vocab.get_vocab() == tokenizer.get_vocab()
        reference = model.state_dict()
        assert all(torch.equal(t, reference[name].to(dtype)) for name, t in again.state_dict().items())
    data = (target / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(data[: len(data) // 2])  # a torn file: no model, and it is removed
    assert models._load_converted(target, torch.bfloat16) is None and not target.exists()


@pytest.mark.model
def test_bundled_model_is_the_same_from_its_converted_form(smollm: tuple[Any, Any, ModelSpec]) -> None:
    """The session's model came from the converted form (the first load converts, then loads that back); the GGUF
    file loaded directly (a path is never converted) gives the same fingerprint and the same logits."""
    model, tokenizer, spec = smollm
    assert (models.converted_dir() / "model.safetensors").is_file()
    directory, gguf_file = models.bundled_path()
    direct, direct_tokenizer = models.load(str(directory / gguf_file))
    assert ModelSpec.from_model(direct, direct_tokenizer).fingerprint == spec.fingerprint
    ids = torch.tensor([tokenizer("def f(x):\n    return x", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, model(ids).logits)
