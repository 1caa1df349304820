"""Probe for issue 12: the transform decode's projection as an int8 GEMM (``torch._int_mm``) beside bfloat16.

Usage: ``.venv/bin/python docs/results/zen4/int8_projection.py PROFILE PRESET OUT.json``

The decode multiplies the coefficients ``z [T, U]`` by ``decode [U, D]`` (``kvpack.codecs.transform.codec``), where
component ``c``'s coefficient is ``z = (q - sign(q) s_c) / r_c`` for its integer level ``q``, rate ``r_c`` and
shrink ``s_c`` (``levels.dequantize``). The variant measured: with a multiplier ``M``, the components whose rate
allows ``|q| <= 127 / (4 M)`` up to four standard deviations (``r_c <= 127 / (4 M)``) multiply in int8, left
``L = clamp(rint(M (q - sign(q) s_c)), -127, 127)`` (the shrink rounded to ``1 / M``; entries clamped are added back
exactly in float32) and right ``decode[c] / (M r_c)`` quantized to int8 with one float32 scale per feature column;
the others multiply in bfloat16 as today. Not in the codec: this measures what such a decoder would cost in error
and gain in time, on 256-token chunks of the 6 eval caches of ``kvpack bench speed`` (1,536 tokens each).

Error: squared differences from the float32 projection, weighted by the profile's feature weights, summed over
chunks, as a share of the codec's own error (float32 projection against the features the encoder projected).
Time: medians of 15 runs on one chunk of the multiplies (and the int8 path's scaling and clamped-entry
correction; building ``L`` is left out, as the decoder's dequantization would write it in place of ``z``).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable

os.environ["KVPACK_TRANSFORM_GEMM"] = "float32"  # the reference projection, and z exactly as dequantized

import numpy as np
import torch

from kvpack.bench import speed
from kvpack.cli import DEFAULT_MODEL, corpus, load_model, parse_setting
from kvpack.codecs.transform import levels
from kvpack.codecs.transform.quant import rates
from kvpack.cpu import model_name

MULTIPLIERS = (4, 8, 16)


def median_ms(fn: Callable[[], object], n: int = 15) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


Chunk = tuple[torch.Tensor, torch.Tensor, np.ndarray]  # the encoder's features, the decoder's z, the levels q


def variant(m: int, decode: torch.Tensor, bias: torch.Tensor, rate: np.ndarray, shrink: np.ndarray,
            chunks: list[Chunk], refs: list[torch.Tensor], weighted: Callable[[torch.Tensor, torch.Tensor], float],
            own: float) -> dict[str, float]:
    """Error and time of the int8 projection with multiplier ``m`` (module docstring)."""
    low = np.flatnonzero(rate <= 127 / (4 * m))
    high = np.flatnonzero(rate > 127 / (4 * m))
    pad = (-low.size) % 8  # _int_mm wants the inner size a multiple of 8
    scaled = decode[low] / torch.from_numpy((m * rate[low]).astype(np.float32))[:, None]
    column_scale = scaled.abs().amax(0).clamp_min(1e-30) / 127
    right = torch.cat([torch.round(scaled / column_scale).clamp(-127, 127).to(torch.int8),
                       torch.zeros(pad, decode.shape[1], dtype=torch.int8)])
    high_decode, bf_bias = decode[high].bfloat16(), bias.bfloat16()

    def left_of(q: np.ndarray) -> tuple[torch.Tensor, tuple[np.ndarray, np.ndarray], torch.Tensor]:
        exact = np.rint(m * (q[:, low] - np.sign(q[:, low]) * shrink[low]))
        tok_i, comp_i = np.nonzero(np.abs(exact) > 127)
        clamped = np.clip(exact, -127, 127)
        extra = torch.from_numpy(((exact - clamped)[tok_i, comp_i] / (m * rate[low][comp_i])).astype(np.float32))
        left = np.concatenate([clamped, np.zeros((q.shape[0], pad))], 1).astype(np.int8)
        return torch.from_numpy(left), (tok_i, comp_i), extra

    def project(left: torch.Tensor, where: tuple[np.ndarray, np.ndarray], extra: torch.Tensor,
                z_high: torch.Tensor) -> torch.Tensor:
        x = torch.addmm(bf_bias, z_high, high_decode).float().addcmul_(torch._int_mm(left, right).float(),
                                                                        column_scale)
        if extra.numel():
            x.index_add_(0, torch.from_numpy(where[0]), extra[:, None] * decode[torch.from_numpy(low[where[1]])])
        return x

    err, clamped_n = 0.0, 0
    for ref, (_, z, q) in zip(refs, chunks, strict=True):
        left, where, extra = left_of(q)
        clamped_n += extra.numel()
        err += weighted(project(left, where, extra, z[:, high].bfloat16()), ref)
    _, z0, q0 = chunks[0]
    left0, where0, extra0 = left_of(q0)
    z0_high = z0[:, high].bfloat16().contiguous()
    return {"multiplier": m, "int8_components": int(low.size), "bf16_components": int(high.size),
            "error_share": err / own, "clamped_share": clamped_n / (len(chunks) * z0.shape[0] * max(low.size, 1)),
            "ms": median_ms(lambda: project(left0, where0, extra0, z0_high))}


def main(profile: str, preset: str, out: str) -> None:
    lm, tok, spec = load_model(DEFAULT_MODEL)
    entries = speed.caches(lm, tok, spec, corpus(6, "eval", None), 1536)
    codec = parse_setting(f"transform:profile={profile},preset={preset}")
    st = codec.state()
    if len(st.groups) != 1:
        raise SystemExit("the probe handles one PCA group (layers=1 profiles)")
    p = st.projection(codec.allocation(), 0)
    decode, bias, weight = p.decode, p.decode_bias, st.weights[0]
    n_comp = decode.shape[0]

    # capture, per chunk: the encoder's features, the decoder's z, and each component's (rate, shrink)
    seen: dict[str, object] = {}
    real_addmm, real_dequantize, real_transposed = torch.addmm, levels.dequantize, levels.transposed

    def grab_addmm(*args: torch.Tensor, **kw: torch.Tensor) -> torch.Tensor:
        seen.setdefault("x", args[1].clone())
        return real_addmm(*args, **kw)  # type: ignore[call-overload]

    def grab_dequantize(*args: np.ndarray) -> None:
        classes, shrink, target = args[4], args[5], args[6]
        seen.setdefault("rows", []).append((classes.copy(), shrink.copy(), target.copy()))  # type: ignore[attr-defined]
        real_dequantize(*args)

    def grab_transposed(z: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        seen["z"] = real_transposed(z, dtype)
        return seen["z"]  # type: ignore[return-value]

    chunks: list[Chunk] = []
    rate = np.zeros(n_comp)
    shrink = np.zeros(n_comp, np.float32)
    for _, kv in entries:
        for part in kv.chunks(256):
            seen.clear()
            torch.addmm = grab_addmm  # type: ignore[assignment]
            blob = codec.encode(part)
            torch.addmm = real_addmm
            levels.dequantize, levels.transposed = grab_dequantize, grab_transposed
            codec.decode(blob)
            levels.dequantize, levels.transposed = real_dequantize, real_transposed
            covered = np.zeros(n_comp, bool)
            for classes, s, target in seen["rows"]:  # type: ignore[attr-defined]
                rate[target], shrink[target], covered[target] = rates()[classes], s[classes], True
            if not covered.all():
                raise SystemExit("the probe handles entropy-coded components only")
            z = seen["z"].numpy()  # type: ignore[attr-defined]
            q = np.rint(z * rate + np.sign(z) * shrink)
            if not np.array_equal(((q.astype(np.float32) - np.sign(q).astype(np.float32) * shrink) / rate)
                                  .astype(np.float32), z):
                raise SystemExit("levels not recovered exactly")
            chunks.append((seen["x"], seen["z"], q))  # type: ignore[arg-type]

    def weighted(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((((a - b) * weight) ** 2).sum())

    refs = [real_addmm(bias, z, decode) for _, z, _ in chunks]
    own = sum(weighted(ref, x) for ref, (x, _, _) in zip(refs, chunks, strict=True))
    bf_decode, bf_bias = decode.bfloat16(), bias.bfloat16()

    def bf16(z: torch.Tensor) -> torch.Tensor:
        return real_addmm(bf_bias, z.bfloat16(), bf_decode).float()

    result: dict[str, object] = {
        "cpu": model_name(), "threads": torch.get_num_threads(), "profile_hash": st.hash, "preset": preset,
        "chunks": len(chunks), "components": n_comp, "features": decode.shape[1],
        "codec_error_share_of_signal": own / sum(float(((x * weight) ** 2).sum()) for x, _, _ in chunks),
        "bf16_error_share": sum(weighted(bf16(z), ref) for ref, (_, z, _) in zip(refs, chunks, strict=True)) / own,
    }
    z0 = chunks[0][1]
    z0_bf = z0.bfloat16()
    result["ms_float32"] = median_ms(lambda: real_addmm(bias, z0, decode))
    result["ms_bfloat16"] = median_ms(lambda: real_addmm(bf_bias, z0_bf, bf_decode))
    left_all = torch.randint(-127, 128, (z0.shape[0], n_comp), dtype=torch.int8)
    right_all = torch.randint(-127, 128, (n_comp, decode.shape[1]), dtype=torch.int8)
    result["ms_int8_all_components"] = median_ms(lambda: torch._int_mm(left_all, right_all))
    result["variants"] = [variant(m, decode, bias, rate, shrink, chunks, refs, weighted, own) for m in MULTIPLIERS]
    print(json.dumps(result, indent=2))
    with open(out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main(*sys.argv[1:4])
