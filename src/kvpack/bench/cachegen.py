"""CacheGen reproduction table (arXiv 2310.07240): size, speed and error per quality level, with and without the
anchor/delta step, plus the statistics that explain the anchor/delta result.

``python -m kvpack.bench.cachegen --kv-dir DIR [--profile PATH] [--json PATH] [--chunk N] [--quality] [--diagnose]``

- ``--kv-dir``: KV caches dumped as ``.kvp`` files with an ``index.json`` listing ``file``, ``split``
  (``calibration``/``eval``), ``document`` and ``kind``. Without it, the bundled model prefills ``--docs``
  calibration and eval documents (``--tokens`` each) itself.
- ``--profile``: the profile to use; built from the calibration caches (and written there) when the file is absent.
- Rows (one per level and anchor/delta setting, on the eval caches): ``ratio`` (fp16 bytes / stored bytes, every
  container byte counted, one container per ``--chunk`` tokens), ``bits_per_element``, ``x_vs_8bit`` (8 /
  bits_per_element, the paper's comparison), ``escapes`` and their bytes, encode/decode MB/s of fp16 KV (median of
  ``REPEATS`` runs; wall-clock and per CPU-second, numba threads stated), ``max_abs_error_keys/values``,
  ``max_error_over_bound`` (worst ``|x - x_hat| / bound``; at most 1) and ``rmse_over_std`` (RMS error in units of
  each channel's calibration std). ``profile_bytes`` is reported separately: it is stored once per model.
- ``anchor_delta_stats``: per K/V and layer group, the median over channels of ``var(x - x_anchor) / var(x - mean)``
  (the paper compares ``var(x - x_anchor)`` with ``var(x)``: that ratio is given too) and the ideal bits/element of
  raw and delta symbols under the profile's tables.
- ``--quality``: also runs :func:`kvpack.eval.evaluate` (perplexity, KL, ...) for each level with anchor/delta on
  ``--eval-docs`` eval documents, prefix ``--prefix``, continuation ``--cont`` (minutes).
- ``--diagnose``: KL and perplexity increase (continuation ``--cont / 2``) of variants outside the paper (attention
  sinks kept exact, flat or reversed bins over the layer groups, near-lossless bins) to locate the quality loss.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numba
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from kvpack.codecs.cachegen.calibrate import build_profile_from_caches
from kvpack.codecs.cachegen.codec import CacheGen, error_bound, quantize_indices
from kvpack.codecs.cachegen.profile import GROUP_SIZE, LEVELS, layer_groups
from kvpack.cpu import model_name
from kvpack.entropy import PROB_SCALE
from kvpack.kv import KVCache

REPEATS = 3
#: Attention-sink tokens restored in the ``--diagnose`` variants.
SINKS = 4


def load_dumped(kv_dir: Path) -> dict[str, list[tuple[str, str, KVCache]]]:
    """``{"calibration": [...], "eval": [...]}`` of ``(document, kind, cache)`` from ``kv_dir/index.json``."""
    from kvpack.codecs import decode

    out: dict[str, list[tuple[str, str, KVCache]]] = {"calibration": [], "eval": []}
    for entry in json.loads((kv_dir / "index.json").read_text()):
        kv = decode((kv_dir / entry["file"]).read_bytes())
        out[entry["split"]].append((entry["document"], entry["kind"], kv))
    return out


def prefill_documents(docs: int, tokens: int) -> dict[str, list[tuple[str, str, KVCache]]]:
    """The same structure as :func:`load_dumped`, computed with the bundled model."""
    from kvpack import models
    from kvpack.eval.corpora import documents
    from kvpack.inference import prefill
    from kvpack.spec import ModelSpec

    model, tokenizer = models.load()
    spec = ModelSpec.from_model(model, tokenizer)
    out: dict[str, list[tuple[str, str, KVCache]]] = {}
    for split in ("calibration", "eval"):
        out[split] = []
        for doc in documents(docs, split=split):
            ids = tokenizer(doc.text, return_tensors="pt", add_special_tokens=False).input_ids[0][:tokens]
            out[split].append((doc.name, doc.kind, prefill(model, spec, ids, step=256)[0]))
    return out


def _timed(fn: Any) -> tuple[Any, float, float]:
    result, walls, cpus = None, [], []
    for _ in range(REPEATS):
        w, c = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return result, float(np.median(walls)), float(np.median(cpus))


def measure(codec: CacheGen, caches: list[KVCache], chunk: int | None = None) -> dict[str, Any]:
    """One row: size, speed and error of ``codec`` over ``caches`` (each cut into ``chunk``-token containers)."""
    from kvpack.format import read_container

    parts = [p for kv in caches for p in (kv.chunks(chunk) if chunk else [kv])]
    fp16 = sum(p.fp16_bytes for p in parts)
    codec.encode(parts[0])  # warm-up (numba, profile)
    blobs, enc_wall, enc_cpu = _timed(lambda: [codec.encode(p) for p in parts])
    decoded, dec_wall, dec_cpu = _timed(lambda: [codec.decode(b) for b in blobs])
    stored = sum(len(b) for b in blobs)
    elements = sum(p.num_tokens * p.spec.elements_per_token for p in parts)
    escapes = sum(read_container(b).header["meta"]["escapes"] for b in blobs)
    escape_bytes = sum(len(read_container(b).section("escapes")) for b in blobs)
    std = torch.from_numpy(codec.tables.std).view(caches[0].spec.num_layers, 2, caches[0].spec.num_kv_heads, 1, -1)
    worst, err_k, err_v, sq = 0.0, 0.0, 0.0, 0.0
    for p, out in zip(parts, decoded, strict=True):
        bound_k, bound_v = error_bound(codec, out)
        for kind, (xs, ys, bs) in enumerate(((p.keys, out.keys, bound_k), (p.values, out.values, bound_v))):
            for layer, (x, y, b) in enumerate(zip(xs, ys, bs, strict=True)):
                e = (x.double() - y.double()).abs()
                worst = max(worst, float((e / b).max()))
                sq += float(((e / std[layer, kind]) ** 2).sum())
                if kind:
                    err_v = max(err_v, float(e.max()))
                else:
                    err_k = max(err_k, float(e.max()))
    bits = 8 * stored / elements
    return {
        "level": codec.level, "anchor_delta": codec.anchor_delta, "chunk_tokens": chunk or caches[0].num_tokens,
        "containers": len(parts), "ratio": fp16 / stored, "bits_per_element": bits, "x_vs_8bit": 8 / bits,
        "stored_bytes": stored, "fp16_bytes": fp16, "escapes": escapes, "escape_bytes": escape_bytes,
        "encode_MBps": fp16 / 1e6 / enc_wall, "decode_MBps": fp16 / 1e6 / dec_wall,
        "encode_MBps_per_cpu_s": fp16 / 1e6 / enc_cpu, "decode_MBps_per_cpu_s": fp16 / 1e6 / dec_cpu,
        "threads": numba.get_num_threads(), "max_abs_error_keys": err_k, "max_abs_error_values": err_v,
        "max_error_over_bound": worst, "rmse_over_std": (sq / elements) ** 0.5,
    }


def anchor_delta_stats(codec: CacheGen, caches: list[KVCache]) -> dict[str, Any]:
    """Why anchor/delta does or does not pay, under ``codec``'s level and tables.

    Returns ``groups``: per K/V and layer group, the medians over channels of ``var(x - x_anchor) / var(x - mean)``
    and ``var(x - x_anchor) / E[x^2]``, the fraction of channels whose delta varies less, and the ideal bits/element
    (cross-entropy under the profile's tables, escapes at their symbol's cost) of raw and of delta symbols; and
    ``ideal_bits``: the whole caches coded raw, and coded as anchors plus deltas.
    """
    t = codec.tables
    level = int(codec.level)
    groups = np.repeat(layer_groups(t.num_layers), 2 * t.num_kv_heads * t.head_dim)
    kinds = np.tile(np.repeat([0, 1], t.num_kv_heads * t.head_dim), t.num_layers)
    raw_f, delta_f = (t.freqs[level][role::2] / PROB_SCALE for role in (0, 1))
    escape = raw_f.shape[1] - 1
    var_c, var_d, mean_sq = (np.zeros(t.rows) for _ in range(3))
    bits_raw, bits_anchor, bits_delta, n_raw, n_delta = (np.zeros(t.rows) for _ in range(5))
    for kv in caches:
        stacked = kv.data.double()  # [L, 2, H, T, D]
        x = stacked.transpose(-1, -2).reshape(t.rows, kv.num_tokens).numpy()
        anchor = (np.arange(kv.num_tokens) // GROUP_SIZE) * GROUP_SIZE
        others = np.arange(kv.num_tokens) % GROUP_SIZE != 0
        var_c += ((x - t.mean[:, None]) ** 2).sum(1)
        mean_sq += (x**2).sum(1)
        var_d += ((x - x[:, anchor])[:, others] ** 2).sum(1)
        q, _ = quantize_indices(kv, t.mean, t.scale(level))
        for role, values, freqs in ((0, q, raw_f), (1, (q - q[:, anchor])[:, others], delta_f)):
            z = values - t.lo[level][:, role][:, None]
            sym = np.where((z >= 0) & (z < t.width[level][:, role][:, None]), z, escape)
            bits = -np.log2(np.take_along_axis(freqs, sym, axis=1))
            if role == 0:
                bits_raw += bits.sum(1)
                bits_anchor += bits[:, ~others].sum(1)
                n_raw += sym.shape[1]
            else:
                bits_delta += bits.sum(1)
                n_delta += sym.shape[1]
    rows = []
    for kind in (0, 1):
        for group in range(3):
            sel = (kinds == kind) & (groups == group)
            rows.append({
                "kind": "KV"[kind], "layer_group": group,
                "var_delta_over_var_centered": float(np.median(var_d[sel] / var_c[sel])),
                "var_delta_over_mean_square": float(np.median(var_d[sel] / mean_sq[sel])),
                "channels_where_delta_has_lower_variance": float(np.mean(var_d[sel] < var_c[sel])),
                "raw_bits_per_element": float(bits_raw[sel].sum() / n_raw[sel].sum()),
                "delta_bits_per_element": float(bits_delta[sel].sum() / n_delta[sel].sum()),
            })
    ideal = {"raw": float(bits_raw.sum() / n_raw.sum()),
             "anchor_delta": float((bits_anchor.sum() + bits_delta.sum()) / n_raw.sum())}
    return {"level": level, "groups": rows, "ideal_bits": ideal}


def run(kv_dir: Path | None, profile_path: Path, *, docs: int = 6, tokens: int = 1536, chunk: int | None = None,
        quality: bool = False, diagnose: bool = False, eval_docs: int = 2, prefix: int = 1024, cont: int = 256,
        console: Console | None = None) -> dict[str, Any]:
    """Measure every level with and without anchor/delta; print tables; return the JSON-able results."""
    console = console or Console(width=200)
    data = load_dumped(kv_dir) if kv_dir else prefill_documents(docs, tokens)
    calibration = [kv for _, _, kv in data["calibration"]]
    evaluation = [kv for _, _, kv in data["eval"]]
    if not profile_path.exists():
        profile = build_profile_from_caches(calibration, document_names=[d for d, _, _ in data["calibration"]])
        profile.save(profile_path)
        console.print(f"built {profile_path} ({profile.nbytes / 1e6:.2f} MB) from {len(calibration)} caches")
    rows = []
    for level in LEVELS.values():
        for anchor_delta in (True, False):
            codec = CacheGen(profile=str(profile_path), level=level, anchor_delta=anchor_delta)
            rows.append(measure(codec, evaluation, chunk))
    stats = anchor_delta_stats(CacheGen(profile=str(profile_path), level=1), evaluation)
    machine = {"cpu": model_name(), "cores": os.cpu_count(), "load_1min": os.getloadavg()[0],
               "numba_threads": numba.get_num_threads()}
    result: dict[str, Any] = {
        "profile": str(profile_path), "profile_hash": CacheGen(profile=str(profile_path)).profile_hash(),
        "profile_bytes": profile_path.stat().st_size, "eval_documents": [d for d, _, _ in data["eval"]],
        "calibration_documents": [d for d, _, _ in data["calibration"]], "machine": machine, "rows": rows,
        "anchor_delta_stats": stats,
    }
    table = Table(title=f"CacheGen on {len(evaluation)} eval caches ({machine['cpu']}, {machine['cores']} cores, "
                        f"load {machine['load_1min']:.1f}, {machine['numba_threads']} threads); profile "
                        f"{result['profile_bytes'] / 1e6:.2f} MB not counted")
    for column in ("level", "anchor/delta", "ratio", "bits/el", "x vs 8-bit", "escapes", "enc MB/s", "dec MB/s",
                   "enc/cpu-s", "dec/cpu-s", "max err K", "max err V", "err/bound", "rmse/std"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(list(LEVELS)[r["level"]], "yes" if r["anchor_delta"] else "no", f"{r['ratio']:.2f}",
                      f"{r['bits_per_element']:.3f}", f"{r['x_vs_8bit']:.2f}", str(r["escapes"]),
                      f"{r['encode_MBps']:.0f}", f"{r['decode_MBps']:.0f}", f"{r['encode_MBps_per_cpu_s']:.0f}",
                      f"{r['decode_MBps_per_cpu_s']:.0f}", f"{r['max_abs_error_keys']:.3f}",
                      f"{r['max_abs_error_values']:.3f}", f"{r['max_error_over_bound']:.3f}",
                      f"{r['rmse_over_std']:.3f}")
    console.print(table)
    ideal = stats["ideal_bits"]
    stats_table = Table(title=f"Why anchor/delta does (not) pay (level medium): ideal bits/element {ideal['raw']:.3f} "
                              f"raw, {ideal['anchor_delta']:.3f} with anchor/delta")
    for column in ("K/V", "layer group", "var(d)/var(x-mean)", "var(d)/E[x²]", "channels d<x", "raw bits",
                   "delta bits"):
        stats_table.add_column(column, justify="right")
    for s in stats["groups"]:
        stats_table.add_row(s["kind"], str(s["layer_group"]), f"{s['var_delta_over_var_centered']:.2f}",
                            f"{s['var_delta_over_mean_square']:.2f}",
                            f"{s['channels_where_delta_has_lower_variance']:.2f}", f"{s['raw_bits_per_element']:.3f}",
                            f"{s['delta_bits_per_element']:.3f}")
    console.print(stats_table)
    if quality:
        result["quality"] = _quality(profile_path, eval_docs, prefix, cont)
    if diagnose:
        result["diagnose"] = _diagnose(profile_path, calibration, eval_docs, prefix, cont // 2)
    return result


def _quality(profile_path: Path, eval_docs: int, prefix: int, cont: int) -> list[dict[str, Any]]:
    from kvpack import models
    from kvpack.bench.rows import print_rows
    from kvpack.eval import documents, evaluate
    from kvpack.spec import ModelSpec

    model, tokenizer = models.load()
    spec = ModelSpec.from_model(model, tokenizer)
    codecs = [CacheGen(profile=str(profile_path), level=level) for level in LEVELS.values()]
    rows = evaluate(model, tokenizer, spec, codecs, documents(eval_docs), prefix=prefix, cont=cont)
    print_rows(rows, title="CacheGen quality (kvpack.eval.evaluate)")
    return rows


def _diagnose(profile_path: Path, calibration: list[KVCache], eval_docs: int, prefix: int,
              cont: int) -> list[dict[str, Any]]:
    """KL and perplexity increase of variants that are *not* the paper's method, to locate the quality loss.

    Variants: the profile's levels medium and high; the same with the first ``SINKS`` tokens (attention sinks)
    restored from the original after decoding; flat bins ``(1, 1, 1)`` and reversed ``(1.5, 1, 0.5)`` over the layer
    groups (own profiles from the same calibration caches, about the medium size); and bins of 0.05 std (a
    near-lossless reference). Continuation log-probs only (no greedy generation): cheaper than ``--quality``.
    """
    from kvpack import models
    from kvpack.eval import documents
    from kvpack.eval.quality import perplexity, tokenize
    from kvpack.inference import forward, prefill
    from kvpack.spec import ModelSpec

    def variant_profile(name: str, bins: tuple[float, float, float]) -> str:
        path = profile_path.with_name(f"{profile_path.stem}-{name}.kvprof")
        build_profile_from_caches(calibration, bins=(bins, bins, bins)).save(path)
        return str(path)

    model, tokenizer = models.load()
    spec = ModelSpec.from_model(model, tokenizer)
    refs = []
    for doc in documents(eval_docs):
        prefix_ids, cont_ids = tokenize(tokenizer, doc, prefix, cont)
        kv = prefill(model, spec, prefix_ids, step=256)[0]
        refs.append((doc, kv, cont_ids, forward(model, cont_ids, kv.to_hf()).log_softmax(-1)))
    flat, reverse, fine = (variant_profile(n, b) for n, b in (("flat", (1.0, 1.0, 1.0)),
                                                             ("reversed", (1.5, 1.0, 0.5)),
                                                             ("fine", (0.05, 0.05, 0.05))))
    variants = [("medium", str(profile_path), 1, 0), ("medium, sinks exact", str(profile_path), 1, SINKS),
                ("high", str(profile_path), 2, 0), ("high, sinks exact", str(profile_path), 2, SINKS),
                ("flat bins (1, 1, 1)", flat, 1, 0), ("flat bins (1, 1, 1), sinks exact", flat, 1, SINKS),
                ("reversed bins (1.5, 1, 0.5)", reverse, 1, 0), ("bins 0.05 std", fine, 1, 0)]
    rows: list[dict[str, Any]] = []
    for name, path, level, sinks in variants:
        codec = CacheGen(profile=path, level=level)
        stored, fp16, kls, increases = 0, 0, [], {}
        for doc, kv, cont_ids, ref in refs:
            data = codec.encode(kv)
            out = codec.decode(data)
            stored, fp16 = stored + len(data), fp16 + kv.fp16_bytes
            if sinks:
                out = KVCache(spec=kv.spec, positions=kv.positions,
                              data=torch.cat([kv.data[:, :, :, :sinks], out.data[:, :, :, sinks:]], dim=3))
            logprobs = forward(model, cont_ids, out.to_hf()).log_softmax(-1)
            kls.append(float((ref.exp() * (ref - logprobs)).sum(-1).mean()))
            increases[doc.name] = 100 * (perplexity(logprobs, cont_ids) / perplexity(ref, cont_ids) - 1)
        rows.append({"variant": name, "ratio": fp16 / stored, "bits_per_element": 16 * stored / fp16,
                     "kl_mean": float(np.mean(kls)), "ppl_increase_pct": increases})
    table = Table(title=f"Where the quality goes (not the paper's method; prefix {prefix}, continuation {cont})")
    for column in ("variant", "ratio", "bits/el", "KL mean", *(d.name for d, _, _, _ in refs)):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for r in rows:
        table.add_row(r["variant"], f"{r['ratio']:.2f}", f"{r['bits_per_element']:.2f}", f"{r['kl_mean']:.3f}",
                      *(f"{v:+.1f}%" for v in r["ppl_increase_pct"].values()))
    Console(width=200).print(table)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--kv-dir", type=Path, help="dumped caches with index.json (default: prefill with the model)")
    parser.add_argument("--profile", type=Path, default=Path("cachegen.kvprof"))
    parser.add_argument("--docs", type=int, default=6, help="documents per split when prefilling")
    parser.add_argument("--tokens", type=int, default=1536, help="tokens per document when prefilling")
    parser.add_argument("--chunk", type=int, default=None, help="tokens per container (default: whole caches)")
    parser.add_argument("--quality", action="store_true", help="also measure perplexity/KL per level")
    parser.add_argument("--diagnose", action="store_true", help="also measure KL of non-paper variants (sinks, bins)")
    parser.add_argument("--eval-docs", type=int, default=2)
    parser.add_argument("--prefix", type=int, default=1024)
    parser.add_argument("--cont", type=int, default=256)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = run(args.kv_dir, args.profile, docs=args.docs, tokens=args.tokens, chunk=args.chunk,
                 quality=args.quality, diagnose=args.diagnose, eval_docs=args.eval_docs, prefix=args.prefix,
                 cont=args.cont)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
