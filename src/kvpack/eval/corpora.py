"""Evaluation and calibration corpora taken from CPython itself (present wherever Python is).

- code: top-level standard-library modules (``sysconfig.get_paths()["stdlib"]/*.py``) of at least ``MIN_CHARS``;
- prose: the language-reference topics of ``pydoc_data.topics``, joined in name order into documents of at least
  ``MIN_CHARS``.

Each document goes to exactly one split by the first byte of the BLAKE2b digest of its name (even: ``eval``,
odd: ``calibration``), so calibration never sees an evaluation document; within a split documents are ordered
by that digest. The selection depends only on the Python installation, never on randomness.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

MIN_CHARS = 12_000
Kind = Literal["code", "prose"]
Split = Literal["eval", "calibration"]


@dataclass(frozen=True)
class Document:
    """One corpus document: ``name`` (stable identifier), ``kind`` (code or prose) and its ``text``."""

    name: str
    kind: str
    text: str

    def __post_init__(self) -> None:
        if self.kind not in ("code", "prose", "file"):
            raise ValueError(f"document kind must be code, prose or file, got {self.kind!r}")


def _digest(name: str) -> bytes:
    return hashlib.blake2b(name.encode(), digest_size=8).digest()


def _split_of(name: str) -> Split:
    return "eval" if _digest(name)[0] % 2 == 0 else "calibration"


def code_documents() -> list[Document]:
    """Every stdlib top-level module of at least ``MIN_CHARS`` characters, named ``stdlib/NAME.py``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) >= MIN_CHARS:
            docs.append(Document(name=f"stdlib/{path.name}", kind="code", text=text))
    return docs


def prose_documents() -> list[Document]:
    """Language-reference topics joined in name order into documents of at least ``MIN_CHARS`` characters."""
    from pydoc_data.topics import topics

    docs, names, parts, size = [], [], [], 0
    for name in sorted(topics):
        names.append(name)
        parts.append(topics[name])
        size += len(topics[name])
        if size >= MIN_CHARS:
            docs.append(Document(name="topics/" + "+".join(names), kind="prose", text="\n\n".join(parts)))
            names, parts, size = [], [], 0
    return docs


def documents(n: int, split: Split = "eval") -> list[Document]:
    """``n`` documents of ``split``, half code and half prose (code gets the odd one), in a fixed order."""
    if n < 1:
        raise ValueError("need at least one document")
    chosen = []
    for kind_docs, count in ((code_documents(), (n + 1) // 2), (prose_documents(), n // 2)):
        pool = sorted((d for d in kind_docs if _split_of(d.name) == split), key=lambda d: _digest(d.name))
        if len(pool) < count:
            raise ValueError(f"only {len(pool)} {kind_docs[0].kind} documents in the {split} split, {count} asked")
        chosen.extend(pool[:count])
    return chosen


def text_documents(paths: list[Path]) -> list[Document]:
    """User-given text files as documents (``kvpack eval --text FILE``)."""
    return [Document(name=str(p), kind="file", text=Path(p).read_text(encoding="utf-8", errors="replace"))
            for p in paths]
