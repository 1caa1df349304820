"""Forged, CRC-valid containers (``tests/forged.py``) end in a typed kvpack error, in bounded time and memory.

Each decode runs in a worker process under ``RLIMIT_AS`` (its start-up size plus ``forged.HEADROOM_BYTES``) with a
per-case timeout (``forged.CASE_SECONDS``): an allocation the header talked the decoder into, or a loop it made
spin, shows up as a crash or a timeout of that one case.
"""

from __future__ import annotations

import copy
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forged import Outcome, Sandbox, Source, attacks, rewrite, sources
from kvpack.codecs import available, codec_class
from kvpack.format import read_container


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Source]:
    return {s.codec: s for s in sources(tmp_path_factory.mktemp("profiles"))}


@pytest.fixture(scope="module")
def sandbox(corpus: dict[str, Source]) -> Iterator[Sandbox]:
    with Sandbox(list(corpus.values())) as box:
        yield box


def _refused(outcome: Outcome) -> bool:
    return not outcome.crashed and outcome.typed and outcome.error is not None


@pytest.mark.parametrize("codec", available())
def test_named_attacks_end_in_typed_errors(corpus: dict[str, Source], sandbox: Sandbox, codec: str) -> None:
    """Every attack of the corpus, decoded with and without the trusted spec (and, for progressive codecs, through
    ``decode_prefix``), raises a KvpackError subclass."""
    source = corpus[codec]
    clean = sandbox.decode(source.data, source.profile)
    assert clean.error is None and not clean.crashed, clean  # the unmodified container decodes under the limit
    failures = []
    # a progressive codec also reads prefixes of containers, with its own header and section-table parsing
    ways: list[tuple[dict[str, Any] | None, dict[str, Any] | None]] = [(None, None), (source.spec_json, None)]
    if hasattr(codec_class(codec), "decode_prefix"):
        ways.append((None, read_container(source.data).header["codec"]))
    for attack in attacks(source):
        forged = rewrite(source.data, attack.edit)
        for spec, prefix_of in ways:
            outcome = sandbox.decode(forged, source.profile, spec, prefix_of=prefix_of)
            if not _refused(outcome):
                how = "decode_prefix" if prefix_of else f"spec {'given' if spec else 'from header'}"
                failures.append(f"{attack.name} ({how}): {outcome}")
    assert not failures, f"{len(failures)} forged containers were not refused:\n" + "\n".join(failures)


def _leaves(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Paths of every field in a JSON header (dict keys and list indices), containers included."""
    if path:
        yield path
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node[:3]):
            yield from _leaves(value, (*path, i))


_JSON = st.one_of(
    st.none(), st.booleans(), st.integers(-(1 << 64), 1 << 64),
    st.sampled_from([0, 1, 2, 3, 7, 8, 16, 255, 256, 4095, 4096, 1 << 16, (1 << 20) - 1, 1 << 20, 1 << 31, 1 << 62]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.lists(st.integers(-2, 2), max_size=3),
    st.dictionaries(st.sampled_from(["start", "section", "a"]), st.integers(-2, 40), max_size=2),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data(), codec=st.sampled_from(available()))
def test_random_header_mutations_are_decoded_or_refused(corpus: dict[str, Source], sandbox: Sandbox,
                                                        data: st.DataObject, codec: str) -> None:
    """One to three header fields set to arbitrary JSON: the decode succeeds or raises a KvpackError subclass, within
    the time and memory limits, with and without the trusted spec."""
    source = corpus[codec]
    header = {k: v for k, v in read_container(source.data).header.items() if k != "sections"}
    edits = []
    for _ in range(data.draw(st.integers(1, 3), label="fields")):
        paths = sorted(_leaves(header), key=repr)
        edits.append((data.draw(st.sampled_from(paths), label="path"), data.draw(_JSON, label="value")))

    def edit(head: dict[str, Any], _: dict[str, bytes]) -> None:
        for path, value in edits:
            node = head
            try:
                for key in path[:-1]:
                    node = node[key]
                node[path[-1]] = copy.deepcopy(value)
            except (KeyError, IndexError, TypeError):  # an earlier edit replaced a parent: nothing left to set
                continue

    forged = rewrite(source.data, edit)
    for spec in (None, source.spec_json):
        outcome = sandbox.decode(forged, source.profile, spec)
        assert not outcome.crashed and outcome.typed, (edits, spec is not None, outcome)


def _edited(data: st.DataObject, body: bytes) -> bytes:
    """``body`` after one drawn edit: bits flipped, bytes set to edge values or random, a run overwritten, the end
    cut or extended (an empty body becomes random bytes)."""
    if not body:
        return data.draw(st.binary(min_size=1, max_size=64), label="new body")
    out = bytearray(body)
    at = data.draw(st.integers(0, len(out) - 1), label="at")
    kind = data.draw(st.sampled_from(["flip", "set", "run", "cut", "extend"]), label="edit")
    if kind == "flip":
        out[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    elif kind == "set":
        out[at] = data.draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]) | st.integers(0, 255), label="byte")
    elif kind == "run":
        run = data.draw(st.binary(min_size=1, max_size=32), label="run")
        out[at : at + len(run)] = run[: len(out) - at]
    elif kind == "cut":
        del out[at:]
    else:
        out += data.draw(st.binary(min_size=1, max_size=64), label="tail")
    return bytes(out)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data(), codec=st.sampled_from(available()))
def test_random_section_edits_are_decoded_or_refused(corpus: dict[str, Source], sandbox: Sandbox,
                                                     data: st.DataObject, codec: str) -> None:
    """One or two sections edited at random under fresh checksums (what a writer to a shared store can do): the
    decode succeeds (raw bytes, mantissas and scales can take any value) or raises a KvpackError subclass, within the
    time and memory limits, whole or (progressive codecs) through ``decode_prefix``."""
    source = corpus[codec]
    clean = read_container(source.data)
    chosen = data.draw(st.lists(st.sampled_from(sorted(clean.sections)), min_size=1, max_size=2, unique=True),
                       label="sections")
    bodies = {name: _edited(data, bytes(clean.sections[name])) for name in chosen}

    def edit(_: dict[str, Any], sections: dict[str, bytes]) -> None:
        sections.update(bodies)

    forged = rewrite(source.data, edit)
    prefix = hasattr(codec_class(codec), "decode_prefix") and data.draw(st.booleans(), label="prefix")
    outcome = sandbox.decode(forged, source.profile, None,
                             prefix_of=clean.header["codec"] if prefix else None)
    assert not outcome.crashed and (outcome.error is None or outcome.typed), (chosen, outcome)


def test_sandbox_replaces_a_worker_that_dies(corpus: dict[str, Source]) -> None:
    """The harness itself: a worker that dies mid-run (as one killed for memory would) is reported as a crash, and
    a new worker takes over."""
    source = corpus["raw"]
    with Sandbox([source]) as box:
        assert box.decode(source.data, source.profile).error is None
        assert box.pid is not None
        os.kill(box.pid, signal.SIGKILL)
        assert box.decode(source.data, source.profile).crashed
        assert box.decode(source.data, source.profile).error is None
