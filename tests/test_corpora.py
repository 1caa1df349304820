"""Corpus sources (stdlib, site-packages, pydoc, metadata): deterministic, tagged, split disjointly, none empty here;
the default selection is the one every committed result used."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from unittest.mock import patch

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvpack.eval import corpora
from kvpack.eval.corpora import SOURCES, Document, documents, parse_sources, source_documents, text_documents

PREFIX = {"stdlib": "stdlib/", "site-packages": "site-packages/", "pydoc": "topics/", "metadata": "metadata/"}


@pytest.fixture(scope="module")
def every() -> dict[str, list[Document]]:
    return {s: source_documents(s) for s in SOURCES}


@pytest.fixture
def cached_sources(monkeypatch: pytest.MonkeyPatch, every: dict[str, list[Document]]) -> Iterator[None]:
    """Reading site-packages takes most of a second: the selection tests reuse one read per source."""
    monkeypatch.setattr(corpora, "source_documents", lambda s: list(every[s]))
    yield


def test_every_source_has_documents_in_both_splits(every: dict[str, list[Document]]) -> None:
    for source, docs in every.items():
        splits = [corpora._split_of(d.name) for d in docs]
        assert "eval" in splits and "calibration" in splits, source


def test_sources_are_deterministic(every: dict[str, list[Document]]) -> None:
    for source, docs in every.items():
        again = source_documents(source)
        assert [(d.name, d.text) for d in again] == [(d.name, d.text) for d in docs], source


def test_documents_are_tagged(every: dict[str, list[Document]]) -> None:
    for source, docs in every.items():
        names = [d.name for d in docs]
        assert len(set(names)) == len(names), source
        for d in docs:
            assert d.source == source and d.kind == SOURCES[source] and d.name.startswith(PREFIX[source])
            assert len(d.text) >= corpora.MIN_CHARS, d.name
            assert "\0" not in d.text
        if source in ("site-packages", "metadata"):
            assert not any("kvpack" in n.split("/")[1] for n in names)  # third-party only
            assert all(len(d.text) <= corpora.MAX_BYTES or source == "metadata" for d in docs)


def test_site_packages_take_one_module_per_package(every: dict[str, list[Document]]) -> None:
    tops = [d.name.split("/")[1] for d in every["site-packages"]]
    assert len(set(tops)) == len(tops)
    assert any(t in ("torch", "numpy", "transformers") for t in tops)  # kvpack's own dependencies are there


def test_default_selection_is_unchanged(cached_sources: None) -> None:
    """The selection of every committed result: stdlib code then pydoc prose, each split's pool in digest order."""
    for split in ("eval", "calibration"):
        for n in (1, 6, 12):
            old = []
            for docs, count in ((corpora.code_documents(), (n + 1) // 2), (corpora.prose_documents(), n // 2)):
                pool = sorted((d for d in docs if corpora._split_of(d.name) == split),
                              key=lambda d: corpora._digest(d.name))
                old += pool[:count]
            assert [d.name for d in documents(n, split)] == [d.name for d in old]  # type: ignore[arg-type]
            assert documents(n, split, ("pydoc", "stdlib")) == documents(n, split)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(chosen=st.sets(st.sampled_from(list(SOURCES)), min_size=1), n=st.integers(1, 6))
def test_selection_is_split_disjoint_and_balanced(chosen: set[str], n: int) -> None:
    every = _every()
    kinds = {SOURCES[s] for s in chosen}
    wanted = {"code": (n + 1) // 2, "prose": n // 2} if len(kinds) == 2 else dict.fromkeys(kinds, n)
    for split in ("eval", "calibration"):  # a machine with few packages may hold fewer documents than asked
        assume(all(sum(corpora._split_of(d.name) == split for s in chosen if SOURCES[s] == k for d in every[s])
                   >= wanted[k] for k in kinds))
    with patch.object(corpora, "source_documents", lambda s: list(every[s])):
        picked = {split: documents(n, split, sorted(chosen)) for split in ("eval", "calibration")}  # type: ignore
    assert not {d.name for d in picked["eval"]} & {d.name for d in picked["calibration"]}
    for split, docs in picked.items():
        assert len(docs) == n and all(corpora._split_of(d.name) == split for d in docs)
        assert {d.source for d in docs} <= chosen
        for kind in kinds:  # half code, half prose; each source of a kind takes its turn
            assert sum(d.kind == kind for d in docs) == wanted[kind]
            same = [s for s in SOURCES if s in chosen and SOURCES[s] == kind]
            assert len({d.source for d in docs if d.kind == kind}) == min(len(same), wanted[kind])


@settings(max_examples=40, deadline=None)
@given(chosen=st.sets(st.sampled_from(list(SOURCES)), min_size=1), n=st.integers(1, 12), draw=st.integers(0, 6))
def test_draws_are_disjoint_while_the_split_holds_documents(chosen: set[str], n: int, draw: int) -> None:
    """Draw ``k`` of a kind holding ``c`` documents per draw is the ``k``-th run of ``c`` in the order of draw 0's
    selection, wrapping around: disjoint from every earlier draw exactly while the split holds ``(k + 1) * c``."""
    every = _every()
    kinds = {SOURCES[s] for s in chosen}
    wanted = {"code": (n + 1) // 2, "prose": n // 2} if len(kinds) == 2 else dict.fromkeys(kinds, n)
    held = {k: sum(corpora._split_of(d.name) == "calibration" for s in chosen if SOURCES[s] == k for d in every[s])
            for k in kinds}
    assume(all(held[k] >= wanted[k] for k in kinds))
    with patch.object(corpora, "source_documents", lambda s: list(every[s])):
        whole = documents(sum(held.values()), "calibration", sorted(chosen)) if len(kinds) == 1 else None
        drawn = [documents(n, "calibration", sorted(chosen), k) for k in range(draw + 1)]
        shared = corpora.shared_documents(n, "calibration", sorted(chosen), draw)
    last = drawn[-1]
    assert len(last) == n and all(corpora._split_of(d.name) == "calibration" for d in last)
    for kind in kinds:
        assert sum(d.kind == kind for d in last) == wanted[kind]
    earlier = {d.name for got in drawn[:-1] for d in got}
    assert shared == [d.name for d in last if d.name in earlier]
    fits = all(held[k] >= (draw + 1) * wanted[k] for k in kinds)
    assert (not shared) == fits
    if whole is not None and fits:  # one kind: draw k is the k-th run of n in the order of one long selection
        assert last == whole[draw * n:(draw + 1) * n]


@functools.cache
def _every() -> dict[str, list[Document]]:
    return {s: source_documents(s) for s in SOURCES}


def test_too_many_documents_is_a_clear_error(cached_sources: None) -> None:
    with pytest.raises(ValueError, match=r"only \d+ prose documents from pydoc\+metadata in the eval split, 500"):
        documents(500, "eval", ["pydoc", "metadata"])


def test_sources_and_tags_are_validated() -> None:
    assert parse_sources(" pydoc,stdlib ,") == ("stdlib", "pydoc")
    for bad in ("", "stdlib,nope", ","):
        with pytest.raises(ValueError, match="comma-separated subset"):
            parse_sources(bad)
    with pytest.raises(ValueError, match="cannot come from source 'pydoc'"):
        Document(name="x", kind="code", text="", source="pydoc")
    with pytest.raises(ValueError, match="unknown corpus source"):
        source_documents("file")
    assert Document(name="x", kind="file", text="").source == "file"


def test_own_files_are_code_or_prose_by_suffix(tmp_path: Path) -> None:
    paths = [tmp_path / n for n in ("a.py", "B.MD", "c.txt", "d.json", "Makefile")]
    for p in paths:
        p.write_text("x")
    docs = text_documents(paths)
    assert [d.kind for d in docs] == ["code", "prose", "prose", "file", "file"]
    assert {d.source for d in docs} == {"file"} and [d.name for d in docs] == [str(p) for p in paths]


def test_selection_rules_on_a_made_up_site_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kvpack, dist-info and .libs folders, small, huge, binary and table-like files are left out; one module per
    package; descriptions come from the body or the Description field, one-liners skipped."""
    line = "def f(x):\n    return x + 1\n"
    code = line * (corpora.MIN_CHARS // len(line) + 1)

    def put(rel: str, text: str | bytes) -> None:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())

    put("kvpack/codec.py", code)
    put("numpy.libs/x.py", code)
    put("foo/a.py", code)
    put("foo/sub/b.py", code)
    put("foo/small.py", "x = 1\n")
    put("bar/table.py", "T = (" + "1, " * corpora.MIN_CHARS + ")\n")
    put("bar/huge.py", line * (corpora.MAX_BYTES // len(line) + 1))
    put("bar/binary.py", code.encode() + b"\0")
    put("six.py", code)
    prose = "A sentence about a package. " * 100
    put("foo-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: Foo_Bar\n\n{prose}")
    put("six-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: six\nDescription: " + prose + "\n\n")
    put("tiny-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: tiny\n\nOne line.\n")
    put("kvpack-0.1.dist-info/METADATA", f"Metadata-Version: 2.1\nName: kvpack\n\n{prose}")
    monkeypatch.setattr(corpora, "_site_roots", lambda: [tmp_path])
    monkeypatch.setattr(corpora, "MIN_CHARS", 2 * len(prose) - 10)

    code_docs = corpora.site_packages_documents()
    assert [d.name.split("/")[1] for d in code_docs] == ["foo", "six.py"]
    assert code_docs[0].name in ("site-packages/foo/a.py", "site-packages/foo/sub/b.py")
    assert code_docs == corpora.site_packages_documents()
    user = tmp_path.with_name(tmp_path.name + "-user")  # a second root (the user's site-packages): foo is taken
    (user / "foo").mkdir(parents=True)
    (user / "foo" / "c.py").write_text(code)
    (user / "qux.py").write_text(code)
    monkeypatch.setattr(corpora, "_site_roots", lambda: [tmp_path, user])
    assert [d.name for d in corpora.site_packages_documents()] == [d.name for d in code_docs] + ["site-packages/qux.py"]
    (doc,) = corpora.metadata_documents()
    assert doc.name == "metadata/foo-bar+six" and doc.kind == "prose" and doc.source == "metadata"
    assert doc.text.count("A sentence") == 200


def test_protocol_names_the_setting() -> None:
    from kvpack.eval.corpora import protocol

    assert protocol(["stdlib", "pydoc"], ["stdlib", "pydoc"]) == "in-source"
    assert protocol(["stdlib", "pydoc", "metadata"], ["pydoc"]) == "in-source"
    assert protocol(["stdlib", "pydoc"], ["site-packages", "metadata"]) == "cross-source"
    assert protocol(["stdlib", "pydoc"], ["stdlib", "metadata"]) == "mixed"
    assert protocol(None, ["file"]) == protocol(["stdlib"], ["file"]) == "own files"
    assert protocol(None, ["stdlib", "pydoc"]) is None


def test_draws_of_the_default_recipes(cached_sources: None) -> None:
    """The 6-document default has other disjoint draws; the 12-document recipe's prose half is every pydoc
    calibration document, so its draws vary the code half only, and say so."""
    prose = sum(corpora._split_of(d.name) == "calibration" for d in source_documents("pydoc"))
    for n in (6, 12):
        first, second = documents(n, "calibration"), documents(n, "calibration", draw=1)
        repeated = corpora.shared_documents(n, "calibration", corpora.DEFAULT_SOURCES, 1)
        assert [d.name for d in first if d.name in {e.name for e in second}] == repeated
        assert (repeated == []) == (prose >= n)  # n // 2 prose documents per draw, 2 draws
        assert not {d.name for d in first if d.kind == "code"} & {d.name for d in second if d.kind == "code"}
    with pytest.raises(ValueError, match="draw must be 0 or more"):
        documents(6, "calibration", draw=-1)
