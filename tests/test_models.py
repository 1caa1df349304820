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


def test_float32_matmuls_keep_the_parameters_and_round_the_float32_product(monkeypatch: pytest.MonkeyPatch) -> None:
    """:func:`models.use_float32_matmuls` changes how linear layers multiply, not what they hold: the state dict is
    the same tensors, and from ``FLOAT32_FROM_ROWS`` rows on each layer's output is the float32 product of its bf16
    input and weight rounded to bf16 (to the bit); fewer rows go through torch's own kernel."""
    model = tiny("llama", torch.bfloat16)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert models.use_float32_matmuls(model) == len(linears) > 0
    assert all(isinstance(m, models.Float32MatmulLinear) for m in linears)
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())
    layer = linears[0]
    rows = models.FLOAT32_FROM_ROWS
    x = torch.randn(2, rows, layer.in_features, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    expected = (x.float() @ layer.weight.float().T).to(torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16 and torch.equal(layer(x), expected)
    few = x[0, : rows - 1]  # a decode step's rows: torch's own kernel
    assert torch.equal(layer(few), torch.nn.functional.linear(few, layer.weight))
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.dtype == torch.bfloat16

    # load() decides by the CPU: float32 products where bf16 would be emulated, torch's own kernels where native
    for native in (True, False):
        monkeypatch.setattr(models.cpu, "native_bf16_matmul", lambda native=native: native)
        loaded, _ = models.load()
        kinds = {type(m) for m in loaded.modules() if isinstance(m, torch.nn.Linear)}
        assert kinds == ({torch.nn.Linear} if native else {models.Float32MatmulLinear})
    assert {type(m) for m in models.load(dtype=torch.float32)[0].modules()
            if isinstance(m, torch.nn.Linear)} == {torch.nn.Linear}
