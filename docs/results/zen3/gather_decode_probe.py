"""Does an AVX2 rANS decoder that gathers eight lanes per instruction beat kvpack's four-lane scalar decoder here?

Stop 36's note named it the lever left for the rANS decode (docs/codecs.md, "where the time goes"). This probe
decodes the real rANS calls of `lossless`, `fp8` and `kivi` (4 bits) on 256-token chunks (the first 1,536 tokens of
one code and one prose document, as `coding_split.py` records them) with

* ``scalar``: `kvpack.entropy.rans.decode_lanes` (four lanes in lockstep per thread, branch-free refill);
* ``gather-step Gx``: G lanes (8 or 16) in lockstep as G/8 vectors of eight 32-bit states: the refill word, the
  slot's bucket entry in the decoder's 16-slot rows and the symbol's ``freq | cum << 16`` are each one
  ``vpgatherdd``; a bucket that straddles symbols is stepped in a vector loop, entered when any of the eight lanes
  needs it (a branch);
* ``gather-pair Gx``: the same with rows that hold each bucket's first and last symbol, so a bucket of at most two
  symbols needs no step: one more gather (both symbols' entries), the step loop only for buckets of 3+ symbols;

lanes past the lockstep part are finished by kvpack's scalar code. Each call of every decoder validates its
arguments (`check_lanes`) and orders its lanes, as ``decode_lanes`` does. All on one thread (the gather decoders are
single-threaded here), timed with `kvpack.bench.timing.round_medians`; every decoder's output is checked against
``scalar``'s. The vector step is a numba intrinsic that emits LLVM IR with ``llvm.x86.avx2.gather.d.d.256`` (numba
does not vectorize gathers by itself), so this runs on AVX2 hosts only. Run from the repository root:

    .venv/bin/python docs/results/zen3/gather_decode_probe.py docs/results/zen3/gather-decode.json

It writes the JSON and the Markdown table beside it (``.md``).
"""

import json
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

import kvpack.codecs.common as common
import kvpack.codecs.lossless as lossless
import kvpack.entropy.rans as rans
from kvpack import models
from kvpack.bench.timing import round_medians
from kvpack.codecs import get
from kvpack.cpu import model_name
from kvpack.entropy.models import Model, fill_lookup
from kvpack.eval.corpora import documents
from kvpack.eval.quality import tokenize
from kvpack.inference import prefill
from kvpack.spec import ModelSpec

ROUNDS = 7
PREFIX = 1536
SETTINGS = {"lossless": {}, "fp8": {}, "kivi bits=4": {"bits": 4}}
SHIFT = 4  # 16 slots per bucket, as kvpack's own rows
ROW = 1 << (15 - SHIFT)  # buckets per table (PROB_BITS = 15)

I8, I32, I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
V8 = ir.VectorType(I32, 8)


def _splat(c: int) -> ir.Constant:
    return ir.Constant(V8, [c] * 8)


def _gather(b: ir.IRBuilder, base: ir.Value, index: ir.Value, scale: int) -> ir.Value:
    """Eight 32-bit loads from ``base + index * scale`` (bytes)."""
    name = "llvm.x86.avx2.gather.d.d.256"
    fn = b.module.globals.get(name) or ir.Function(b.module, ir.FunctionType(V8, [V8, base.type, V8, V8, I8]), name)
    return b.call(fn, [_splat(0), base, index, _splat(-1), ir.Constant(I8, scale)])


def lockstep(lanes: int, pair: bool) -> Any:
    """An intrinsic ``(words, rows, etab, out, x, p, last, roff, toff, at, m)`` that pops ``m`` symbols of each of
    ``lanes`` lanes: states ``x`` (uint32 ``[lanes]``) and word positions ``p`` (int32) are read and written back;
    ``last``: each lane's last word; ``roff``: its row's first byte in ``rows``; ``toff``: its table's first entry in
    ``etab`` (flat uint32); ``at``: where its symbols go in ``out`` (int64)."""
    nv = lanes // 8

    @intrinsic
    def step(typingctx, words, rows, etab, out, x, p, last, roff, toff, at, m):  # type: ignore[no-untyped-def]
        def codegen(context, b, sig, args):  # type: ignore[no-untyped-def]
            ptr = [b.bitcast(context.make_array(t)(context, b, v).data, I8.as_pointer())
                   for t, v in zip(sig.args[:10], args[:10], strict=True)]
            wb, rb, eb, ob, xb, pb, lb, rob, tob, ab = ptr

            def vload(base: ir.Value, v: int) -> ir.Value:
                return b.load(b.bitcast(b.gep(base, [ir.Constant(I64, 32 * v)]), V8.as_pointer()), align=4)

            xv0 = [vload(xb, v) for v in range(nv)]
            pv0 = [vload(pb, v) for v in range(nv)]
            lastv = [vload(lb, v) for v in range(nv)]
            roffv = [vload(rob, v) for v in range(nv)]
            toffv = [vload(tob, v) for v in range(nv)]
            at64 = b.bitcast(ab, I64.as_pointer())
            dest = [b.load(b.gep(at64, [ir.Constant(I64, i)])) for i in range(lanes)]
            pre = b.block
            loop = b.append_basic_block("loop")
            b.branch(loop)
            b.position_at_end(loop)
            k = b.phi(I64)
            k.add_incoming(ir.Constant(I64, 0), pre)
            xv = [b.phi(V8) for _ in range(nv)]
            pv = [b.phi(V8) for _ in range(nv)]
            for v in range(nv):
                xv[v].add_incoming(xv0[v], pre)
                pv[v].add_incoming(pv0[v], pre)
            word, slot, sym, ent, strays = [], [], [], [], []
            for v in range(nv):
                q = b.select(b.icmp_signed("<", pv[v], lastv[v]), pv[v], lastv[v])  # reads clamp to the last word
                # words[q] is the high half of the 32 bits at words[q - 1] (q >= 2: in bounds, no read past the end)
                word.append(b.lshr(_gather(b, wb, b.shl(b.sub(q, _splat(1)), _splat(1)), 1), _splat(16)))
                s = b.and_(xv[v], _splat((1 << 15) - 1))
                slot.append(s)
                if pair:  # rows of byte pairs: the bucket's first symbol, its last
                    e = _gather(b, rb, b.add(roffv[v], b.shl(b.lshr(s, _splat(SHIFT)), _splat(1))), 1)
                    first, final = b.and_(e, _splat(0xFF)), b.and_(b.lshr(e, _splat(8)), _splat(0xFF))
                    e_first = _gather(b, eb, b.add(toffv[v], first), 4)
                    e_final = _gather(b, eb, b.add(toffv[v], final), 4)
                    use_final = b.icmp_unsigned(">=", s, b.lshr(e_final, _splat(16)))
                    sym.append(b.select(use_final, final, first))
                    ent.append(b.select(use_final, e_final, e_first))
                else:  # kvpack's rows: the symbol at the bucket's first slot
                    first = b.and_(_gather(b, rb, b.add(roffv[v], b.lshr(s, _splat(SHIFT))), 1), _splat(0xFF))
                    sym.append(first)
                    ent.append(_gather(b, eb, b.add(toffv[v], first), 4))
                strays.append(b.icmp_unsigned(">=", s, b.add(b.lshr(ent[v], _splat(16)),
                                                             b.and_(ent[v], _splat(0xFFFF)))))
            for v in range(nv):  # step on while a lane's slot lies past its symbol's range
                before = b.block
                fix, join = b.append_basic_block(f"step{v}"), b.append_basic_block(f"join{v}")
                b.cbranch(b.icmp_unsigned("!=", b.bitcast(strays[v], I8), ir.Constant(I8, 0)), fix, join)
                b.position_at_end(fix)
                s_in, e_in, st_in = b.phi(V8), b.phi(V8), b.phi(strays[v].type)
                s_next = b.add(s_in, b.zext(st_in, V8))
                e_next = _gather(b, eb, b.add(toffv[v], s_next), 4)
                st_next = b.icmp_unsigned(">=", slot[v], b.add(b.lshr(e_next, _splat(16)),
                                                               b.and_(e_next, _splat(0xFFFF))))
                for phi, a, c in ((s_in, sym[v], s_next), (e_in, ent[v], e_next), (st_in, strays[v], st_next)):
                    phi.add_incoming(a, before)
                    phi.add_incoming(c, fix)
                b.cbranch(b.icmp_unsigned("!=", b.bitcast(st_next, I8), ir.Constant(I8, 0)), fix, join)
                b.position_at_end(join)
                s_out, e_out = b.phi(V8), b.phi(V8)
                s_out.add_incoming(sym[v], before)
                s_out.add_incoming(s_next, fix)
                e_out.add_incoming(ent[v], before)
                e_out.add_incoming(e_next, fix)
                sym[v], ent[v] = s_out, e_out
            x_new, p_new = [], []
            for v in range(nv):
                freq, cum = b.and_(ent[v], _splat(0xFFFF)), b.lshr(ent[v], _splat(16))
                x1 = b.add(b.mul(freq, b.lshr(xv[v], _splat(15))), b.sub(slot[v], cum))
                refill = b.icmp_unsigned("<", x1, _splat(1 << 16))
                x_new.append(b.select(refill, b.or_(b.shl(x1, _splat(16)), word[v]), x1))
                p_new.append(b.add(pv[v], b.zext(refill, V8)))
                for i in range(8):
                    b.store(b.trunc(b.extract_element(sym[v], ir.Constant(I32, i)), I8),
                            b.gep(ob, [b.add(dest[8 * v + i], k)]))
            k_next = b.add(k, ir.Constant(I64, 1))
            k.add_incoming(k_next, b.block)
            for v in range(nv):
                xv[v].add_incoming(x_new[v], b.block)
                pv[v].add_incoming(p_new[v], b.block)
            done = b.append_basic_block("done")
            b.cbranch(b.icmp_signed("<", k_next, args[10]), loop, done)
            b.position_at_end(done)
            for v in range(nv):
                b.store(x_new[v], b.bitcast(b.gep(xb, [ir.Constant(I64, 32 * v)]), V8.as_pointer()), align=4)
                b.store(p_new[v], b.bitcast(b.gep(pb, [ir.Constant(I64, 32 * v)]), V8.as_pointer()), align=4)
            return context.get_dummy_value()

        return types.none(words, rows, etab, out, x, p, last, roff, toff, at, m), codegen

    return step


@njit(nogil=True, cache=True)
def fill_pairs(tab, row):  # type: ignore[no-untyped-def]
    """``row[2b]``: the symbol of table ``tab`` at slot ``16b``; ``row[2b + 1]``: at slot ``16b + 15``."""
    for s in range(256):
        f = tab[s] & 0xFFFF
        if f:
            c = tab[s] >> 16
            row[2 * ((c + 15) >> 4) : 2 * ((c + f + 15) >> 4) : 2] = s
            row[2 * (c >> 4) + 1 : 2 * ((c + f) >> 4) + 1 : 2] = s


def decoder(lanes: int, pair: bool) -> Callable[..., Any]:
    """One thread's decode of every lane (longest first, ``lanes`` at a time) with :func:`lockstep`."""
    step = lockstep(lanes, pair)
    width = 2 * ROW if pair else ROW

    @njit(nogil=True)
    def decode(words, word_offsets, lane_starts, lane_table, etab, order, out):  # type: ignore[no-untyped-def]
        rows = np.zeros(lanes * width + 4, np.uint8)  # + 4: a gather reads 4 bytes at the last entry
        scalar_rows = np.zeros((lanes, ROW), np.uint8)
        cached = np.full(lanes, -1, np.int64)
        x, p, last = np.empty(lanes, np.uint32), np.empty(lanes, np.int32), np.empty(lanes, np.int32)
        roff = (np.arange(lanes) * width).astype(np.int32)
        toff, at = np.empty(lanes, np.int32), np.empty(lanes, np.int64)
        flat = etab.ravel()
        bad = np.zeros(lane_starts.shape[0] - 1, np.bool_)
        j = 0
        while j < order.shape[0]:
            g = min(lanes, order.shape[0] - j)
            m = lane_starts[-1] if g == lanes else 0  # a last, partial group runs scalar
            for r in range(g):
                lane = order[j + r]
                t = lane_table[lane]
                if cached[r] != t:
                    fill_lookup(etab[t], SHIFT, scalar_rows[r])
                    if pair:
                        fill_pairs(etab[t], rows[r * width : (r + 1) * width])
                    else:
                        rows[r * width : (r + 1) * width] = scalar_rows[r]
                    cached[r] = t
                m = min(m, lane_starts[lane + 1] - lane_starts[lane])
            for r in range(g if m > 0 else 0):
                lane = order[j + r]
                x[r] = rans._dec_init(words, word_offsets[lane])
                p[r] = word_offsets[lane] + 2
                last[r] = word_offsets[lane + 1] - 1
                toff[r] = lane_table[lane] * 256
                at[r] = lane_starts[lane]
            if m > 0:
                step(words, rows, flat, out, x, p, last, roff, toff, at, m)
            for r in range(g):
                lane = order[j + r]
                if lane_starts[lane + 1] > lane_starts[lane]:
                    x0 = rans._dec_init(words, word_offsets[lane])
                    xr, pr = (np.uint64(x[r]), np.int64(p[r])) if m > 0 else (x0, word_offsets[lane] + 2)
                    bad[lane] = rans._dec_run(xr, pr, words, word_offsets[lane + 1], scalar_rows[r], SHIFT,
                                              etab[lane_table[lane]], out, lane_starts[lane] + m,
                                              lane_starts[lane + 1], x0)
            j += g
        return bad

    return decode  # type: ignore[no-any-return]


captured: list[tuple[Any, ...]] = []
decode_lanes = rans.decode_lanes


def capturing(*args: Any, **kwargs: Any) -> Any:
    captured.append(args)
    return decode_lanes(*args, **kwargs)


common.decode_lanes = lossless.decode_lanes = capturing
model, tokenizer = models.load()
spec = ModelSpec.from_model(model, tokenizer)
docs = documents(2)
caches = [prefill(model, spec, tokenize(tokenizer, doc, PREFIX, 0)[0], step=256)[0] for doc in docs]
calls: dict[str, list[tuple[Any, ...]]] = {}
for name, params in SETTINGS.items():
    codec = get(name.split()[0], **params)
    captured.clear()
    for kv in caches:
        for blob in [codec.encode(part) for part in kv.chunks(256)]:
            codec.decode(blob, spec)
    prepared = []
    for words, offsets, starts, table, freqs in captured:
        m = freqs if isinstance(freqs, Model) else Model.from_freqs(np.asarray(freqs))
        prepared.append((words, offsets, starts, table, m))
    calls[name] = prepared
common.decode_lanes = lossless.decode_lanes = decode_lanes

DECODERS = {f"gather-{kind} {lanes}x": decoder(lanes, kind == "pair") for kind in ("step", "pair") for lanes in (8, 16)}


def run_scalar(prepared: list[tuple[Any, ...]]) -> list[np.ndarray]:
    return [decode_lanes(w, o, s, t, m, threads=1) for w, o, s, t, m in prepared]


def run(fn: Callable[..., Any], prepared: list[tuple[Any, ...]]) -> list[np.ndarray]:
    outs = []
    for call in prepared:  # per call what decode_lanes does before its kernel: validate, then order the lanes
        w, o, s, t, m = rans.check_lanes(*call)
        order = np.argsort(-np.diff(s), kind="stable").astype(np.int64)
        out = np.empty(int(s[-1]), np.uint8)
        if fn(w, o, s, t.astype(np.int32), m.etab, order, out).any():
            raise AssertionError("a lane failed its checks")
        outs.append(out)
    return outs


keys, fns = [], []
for name, prepared in calls.items():
    reference = run_scalar(prepared)
    for label, fn in DECODERS.items():
        assert all(np.array_equal(a, c) for a, c in zip(run(fn, prepared), reference, strict=True)), (name, label)
    for label, call in [("scalar", partial(run_scalar, prepared))] + [(k, partial(run, f, prepared))
                                                                      for k, f in DECODERS.items()]:
        keys.append((name, label, sum(int(np.asarray(s)[-1]) for _, _, s, _, _ in prepared)))
        fns.append(call)
times = round_medians(fns, ROUNDS, primed=True)
rows = [{"setting": name, "decoder": label, "symbols": n, "ms": 1e3 * t, "msym_per_s": n / t / 1e6}
        for (name, label, n), (t, _) in zip(keys, times, strict=True)]

commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
meta = {"cpu": model_name(), "threads": 1, "rounds": ROUNDS, "prefix": PREFIX, "chunk": 256,
        "documents": [d.name for d in docs], "commit": commit, "numba": numba.__version__}
with open(sys.argv[1], "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
base = {r["setting"]: r["ms"] for r in rows if r["decoder"] == "scalar"}
lines = [f"Produced by `.venv/bin/python docs/results/zen3/gather_decode_probe.py {sys.argv[1]}` (code as of "
         f"{commit}): {meta['cpu']}, one thread, medians of {ROUNDS} primed rounds; the rANS decodes of 256-token "
         f"chunks of the first {PREFIX} tokens of {' and '.join(meta['documents'])}; every decoder's output equals "
         "`scalar`'s.", "", "| setting | decoder | ms | Msym/s | vs scalar |", "|---|---|---|---|---|"]
for r in rows:
    lines.append(f"| {r['setting']} | {r['decoder']} | {r['ms']:.1f} | {r['msym_per_s']:.0f} | "
                 f"{base[r['setting']] / r['ms']:.2f}x |")
with open(sys.argv[1].removesuffix(".json") + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
