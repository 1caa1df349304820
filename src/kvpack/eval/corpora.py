"""Evaluation and calibration corpora present wherever Python and kvpack are installed, in four sources.

- ``stdlib`` (code): top-level standard-library modules (``sysconfig.get_paths()["stdlib"]/*.py``) of at least
  ``MIN_CHARS``;
- ``pydoc`` (prose): the language-reference topics of ``pydoc_data.topics``, joined in name order into documents of
  at least ``MIN_CHARS``;
- ``site-packages`` (code by other authors): one module per top-level package or module of the environment's
  site-packages (and the user's, where Python reads it; kvpack excluded): of its ``.py`` files of ``MIN_CHARS`` to
  ``MAX_BYTES`` bytes, the first by digest of its name that is UTF-8 text without NUL bytes and with lines of at
  most ``MAX_MEAN_LINE`` characters on average (generated tables are not code anyone writes); one per package, so
  torch's thousands of files do not crowd out the rest;
- ``metadata`` (prose): the package descriptions of ``*.dist-info/METADATA`` (the body, or the ``Description``
  field), of ``MIN_DESCRIPTION`` to ``MAX_BYTES`` characters, joined in package-name order into documents of at
  least ``MIN_CHARS``.

Each document goes to exactly one split by the first byte of the BLAKE2b digest of its name (even: ``eval``,
odd: ``calibration``), so calibration never sees an evaluation document; within a split documents are ordered
by that digest. The selection depends only on the Python installation (and, for the last two sources, on the
packages installed), never on randomness. :func:`documents` takes its documents from ``DEFAULT_SOURCES`` unless
given ``sources`` (the cross-source protocol: calibrate on some sources, evaluate on the others).
"""

from __future__ import annotations

import email.parser
import hashlib
import site
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

MIN_CHARS = 12_000
#: Larger files and descriptions are skipped (generated code, vendored bundles, change logs).
MAX_BYTES = 200_000
#: Shorter package descriptions are skipped (one-liners say nothing).
MIN_DESCRIPTION = 500
#: Mean characters per line above which a ``.py`` file is data, not code.
MAX_MEAN_LINE = 100
Kind = Literal["code", "prose"]
Split = Literal["eval", "calibration"]
#: Every corpus source and the kind of its documents; ``file`` is a user's own text (``--text``).
SOURCES: dict[str, Kind] = {"stdlib": "code", "site-packages": "code", "pydoc": "prose", "metadata": "prose"}
#: What :func:`documents` draws from by default (the in-source protocol of every committed result).
DEFAULT_SOURCES = ("stdlib", "pydoc")
#: Name prefixes of site-packages entries that are not third-party code (kvpack, caches, editable-install shims).
_NOT_THIRD_PARTY = ("kvpack", "__pycache__", "__editable__")


@dataclass(frozen=True)
class Document:
    """One corpus document: ``name`` (stable identifier), ``kind`` (code, prose, or file for a user's text), its
    ``text`` and ``source`` (a key of ``SOURCES``, or ``file``)."""

    name: str
    kind: str
    text: str
    source: str = "file"

    def __post_init__(self) -> None:
        if self.kind not in ("code", "prose", "file"):
            raise ValueError(f"document kind must be code, prose or file, got {self.kind!r}")
        if self.source != "file" and SOURCES.get(self.source) != self.kind:
            raise ValueError(f"a {self.kind} document cannot come from source {self.source!r} "
                             f"(sources: {', '.join(SOURCES)}, file)")


def _digest(name: str) -> bytes:
    return hashlib.blake2b(name.encode(), digest_size=8).digest()


def _split_of(name: str) -> Split:
    return "eval" if _digest(name)[0] % 2 == 0 else "calibration"


def parse_sources(text: str) -> tuple[str, ...]:
    """``"stdlib,pydoc"`` into known source names in ``SOURCES`` order (the order never changes a selection)."""
    names = {s.strip() for s in text.split(",") if s.strip()}
    if not names or names - SOURCES.keys():
        raise ValueError(f"sources must be a comma-separated subset of {', '.join(SOURCES)}, got {text!r}")
    return tuple(s for s in SOURCES if s in names)


def source_order(sources: Iterable[str]) -> list[str]:
    """The distinct ``sources`` in ``SOURCES`` order, then ``file``."""
    order = [*SOURCES, "file"]
    return sorted(set(sources), key=order.index)


def protocol(calibrated_on: Sequence[str] | None, evaluated_on: Sequence[str]) -> str | None:
    """The setting of an evaluation (issue 16): ``own files`` when it ran on a user's files (``--text``); else, for
    a profile whose calibration sources are known, ``in-source`` (every evaluated source was calibrated on; the
    documents still differ: calibration and eval splits), ``cross-source`` (none was) or ``mixed``; else None."""
    if "file" in evaluated_on:
        return "own files"
    if calibrated_on is None:
        return None
    seen = set(evaluated_on) & set(calibrated_on)
    return "in-source" if seen == set(evaluated_on) else "cross-source" if not seen else "mixed"


def code_documents() -> list[Document]:
    """Every stdlib top-level module of at least ``MIN_CHARS`` characters, named ``stdlib/NAME.py``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) >= MIN_CHARS:
            docs.append(Document(name=f"stdlib/{path.name}", kind="code", text=text, source="stdlib"))
    return docs


def _joined(prefix: str, source: str, items: Iterable[tuple[str, str]]) -> list[Document]:
    """``(name, text)`` items, in the given order, joined into documents of at least ``MIN_CHARS`` characters
    named ``prefix`` + their names joined by ``+`` (a short remainder is dropped)."""
    docs, names, parts, size = [], [], [], 0
    for name, text in items:
        names.append(name)
        parts.append(text)
        size += len(text)
        if size >= MIN_CHARS:
            docs.append(Document(name=prefix + "+".join(names), kind=SOURCES[source], text="\n\n".join(parts),
                                 source=source))
            names, parts, size = [], [], 0
    return docs


def prose_documents() -> list[Document]:
    """Language-reference topics joined in name order into documents of at least ``MIN_CHARS`` characters."""
    from pydoc_data.topics import topics

    return _joined("topics/", "pydoc", ((name, topics[name]) for name in sorted(topics)))


def _site_roots() -> list[Path]:
    """The environment's site-packages directories, and the user's when Python reads it (``pip install --user``)."""
    paths = sysconfig.get_paths()
    roots = [Path(paths["purelib"]), Path(paths["platlib"])]
    if site.ENABLE_USER_SITE:
        roots.append(Path(site.getusersitepackages()))
    return sorted({root for root in roots if root.is_dir()})


def _code_text(path: Path) -> str | None:
    """The text of ``path`` if it reads as code: UTF-8, no NUL byte, mean line length at most ``MAX_MEAN_LINE``."""
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if "\0" in text or len(text) > MAX_MEAN_LINE * (text.count("\n") + 1):
        return None
    return text


def _packages(root: Path) -> Iterator[tuple[str, list[Path]]]:
    """Third-party top-level packages and modules of ``root`` with their ``.py`` files of ``MIN_CHARS`` to
    ``MAX_BYTES`` bytes, in name order."""
    for entry in sorted(root.iterdir()):
        name = entry.name
        if name.startswith(_NOT_THIRD_PARTY) or ("." in name and entry.is_dir()):
            continue  # *.dist-info, *.libs: no packages
        files = sorted(entry.rglob("*.py")) if entry.is_dir() else [entry] if name.endswith(".py") else []
        sized = [f for f in files if f.is_file() and MIN_CHARS <= f.stat().st_size <= MAX_BYTES]
        if sized:
            yield name, sized


def site_packages_documents() -> list[Document]:
    """One module per third-party top-level package of site-packages, named ``site-packages/RELATIVE/PATH.py``."""
    docs, taken = [], set()
    for root in _site_roots():
        for package, files in _packages(root):
            if package in taken:  # installed in two roots: the first one's
                continue
            taken.add(package)
            names = {f"site-packages/{f.relative_to(root).as_posix()}": f for f in files}
            for name in sorted(names, key=_digest):
                text = _code_text(names[name])
                if text is not None:
                    docs.append(Document(name=name, kind="code", text=text, source="site-packages"))
                    break
    return docs


def _description(path: Path) -> tuple[str, str] | None:
    """``(package name, description)`` of a ``METADATA`` file, if it is a third-party package's."""
    try:
        message = email.parser.Parser().parsestr(path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return None
    name = str(message.get("Name", "")).strip().lower().replace("_", "-")
    body = message.get_payload()
    text = (body if isinstance(body, str) and body.strip() else str(message.get("Description", ""))).strip()
    if not name or name.startswith(_NOT_THIRD_PARTY) or not MIN_DESCRIPTION <= len(text) <= MAX_BYTES:
        return None
    return name, text


def metadata_documents() -> list[Document]:
    """Package descriptions of ``*.dist-info/METADATA`` joined in package-name order into documents of at least
    ``MIN_CHARS`` characters, named ``metadata/NAME+NAME...``."""
    found: dict[str, str] = {}
    for root in _site_roots():
        for path in sorted(root.glob("*.dist-info/METADATA")):
            item = _description(path)
            if item is not None:
                found.setdefault(*item)
    return _joined("metadata/", "metadata", sorted(found.items()))


def source_documents(source: str) -> list[Document]:
    """Every document of ``source`` (a key of ``SOURCES``), in name order, both splits."""
    readers = {"stdlib": code_documents, "site-packages": site_packages_documents, "pydoc": prose_documents,
               "metadata": metadata_documents}
    if source not in readers:
        raise ValueError(f"unknown corpus source {source!r} (sources: {', '.join(SOURCES)})")
    return readers[source]()


def _interleaved(pools: list[list[Document]]) -> list[Document]:
    """Every document, taking one from each pool in turn (an exhausted pool is skipped)."""
    out: list[Document] = []
    for depth in range(max((len(p) for p in pools), default=0)):
        out.extend(p[depth] for p in pools if depth < len(p))
    return out


def documents(n: int, split: Split = "eval", sources: Sequence[str] = DEFAULT_SOURCES, draw: int = 0) -> list[Document]:
    """``n`` documents of ``split`` from ``sources``, in a fixed order: half code and half prose (code gets the odd
    one) when ``sources`` hold both kinds, else all of the one kind; within a kind, one from each of its sources
    in turn (in ``SOURCES`` order), each source's documents in digest order.

    ``draw`` ``k`` takes, of each kind, the ``k``-th run of that many documents in that order instead of the first,
    wrapping around when the kind's documents run out: draws are disjoint as far as the split holds documents (for
    other calibrations of one recipe, e.g. the profile-to-profile spread of a measurement), and a kind with too few
    documents repeats them (:func:`shared_documents` says how many)."""
    if n < 1:
        raise ValueError("need at least one document")
    if draw < 0:
        raise ValueError(f"draw must be 0 or more, got {draw}")
    chosen_sources = parse_sources(",".join(sources))
    kinds = [k for k in ("code", "prose") if any(SOURCES[s] == k for s in chosen_sources)]
    counts = {"code": (n + 1) // 2, "prose": n // 2} if len(kinds) == 2 else {kinds[0]: n}
    chosen: list[Document] = []
    for kind in kinds:
        pools = [sorted((d for d in source_documents(s) if _split_of(d.name) == split), key=lambda d: _digest(d.name))
                 for s in chosen_sources if SOURCES[s] == kind]
        order = _interleaved(pools)
        if len(order) < counts[kind]:
            names = "+".join(s for s in chosen_sources if SOURCES[s] == kind)
            raise ValueError(f"only {len(order)} {kind} documents from {names} in the {split} split, "
                             f"{counts[kind]} asked")
        start = draw * counts[kind]
        chosen.extend(order[(start + i) % len(order)] for i in range(counts[kind]))
    return chosen


def shared_documents(n: int, split: Split, sources: Sequence[str], draw: int) -> list[str]:
    """Names of the documents that :func:`documents` draw ``draw`` shares with an earlier draw of the same ``n``,
    ``split`` and ``sources`` (empty while the split holds enough documents)."""
    earlier = {d.name for k in range(draw) for d in documents(n, split, sources, k)}
    return [d.name for d in documents(n, split, sources, draw) if d.name in earlier]


#: File name suffixes of a user's text (``--text``) taken as code and as prose, so that own-files rows report the
#: two kinds apart as the corpora do; any other file is of kind ``file``.
CODE_SUFFIXES = frozenset({".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java", ".js", ".ts",
                           ".sh", ".rb", ".swift", ".kt", ".scala", ".cu"})
PROSE_SUFFIXES = frozenset({".md", ".rst", ".txt", ".tex", ".adoc", ".org"})


def file_kind(path: Path) -> str:
    """``code``, ``prose`` or ``file`` for a user's text file, by its suffix (case-insensitive)."""
    suffix = Path(path).suffix.lower()
    return "code" if suffix in CODE_SUFFIXES else "prose" if suffix in PROSE_SUFFIXES else "file"


def text_documents(paths: list[Path]) -> list[Document]:
    """User-given text files as documents (``kvpack eval --text FILE``), of source ``file`` and kind
    :func:`file_kind`."""
    return [Document(name=str(p), kind=file_kind(p), text=Path(p).read_text(encoding="utf-8", errors="replace"))
            for p in paths]
