"""Per-chunk rate control of the `transform` codec: the error every preset would leave on a chunk, computed at
encode time in the PCA domain (no decode), so that a chunk can take the highest-ratio preset meeting an error target.

The error is the codec's own distortion measure, the feature-weighted squared error (``w``: Fisher weights of the
profile) summed over a token's features: ``sum_i sigma_i^2 (z_i - zhat_i)^2`` over the profile's components (a
dropped component contributes ``sigma_i^2 z_i^2``) plus the chunk's energy outside the basis, the same for every
preset. The chosen preset's name is in the chunk's meta, as for any preset: decoding needs nothing new.
"""

from __future__ import annotations

import numpy as np
import torch

from kvpack.codecs.transform.profile import Allocation, TransformProfile
from kvpack.codecs.transform.quant import (
    TYPE_DROP,
    TYPE_EC,
    ec_dequantize,
    ec_quantize,
    rates,
    simulate_fixed,
)

#: Name of the pseudo-allocation that codes every component of the profile (its projection gives all of ``z``).
EVERY = "*every*"


def every_block(st: TransformProfile) -> Allocation:
    """An allocation that keeps every block (used only to project on all components)."""
    n = len(st.block_group)
    return Allocation(EVERY, np.full(n, TYPE_EC, np.uint8), np.zeros(n, np.int64), np.arange(n), {})


def preset_errors(st: TransformProfile, x: torch.Tensor) -> tuple[dict[str, float], list[np.ndarray]]:
    """Weighted squared error per token that each preset of ``st`` leaves on the features ``x [T, D]``, and the
    normalized coefficients ``z [T, C_g]`` of every PCA group (every component; a preset codes its subset)."""
    every = every_block(st)
    zs, outside = [], 0.0
    for g in range(len(st.groups)):
        p = st.projection(every, g)
        xg = x if p.columns is None else x[:, p.columns]
        z = torch.addmm(-p.encode_bias, xg, p.encode).numpy()
        zs.append(z)
        energy = float(((xg - st.means[g]) * st.weights[g]).double().pow(2).sum())
        outside += energy - float((z.astype(np.float64) ** 2 * st.sigmas[g].astype(np.float64) ** 2).sum())
    cache: dict[tuple[int, int, int], float] = {}

    def block_error(b: int, kind: int, param: int) -> float:
        if (b, kind, param) not in cache:
            g, s, n = st.block_span(b)
            z = zs[g][:, s : s + n]
            if kind == TYPE_DROP:
                zhat = np.zeros_like(z)
            elif kind == TYPE_EC:
                r = rates()[param : param + 1]
                zhat = ec_dequantize(ec_quantize(z, r, st.rounding), r, st.shrink[param])
            else:
                zhat = simulate_fixed(z, kind, param)
            cache[b, kind, param] = float((((z - zhat).astype(np.float64) ** 2) * st.sigmas[g][s : s + n] ** 2).sum())
        return cache[b, kind, param]

    tokens = max(x.shape[0], 1)
    errors = {name: (max(outside, 0.0) + sum(block_error(b, int(a.block_type[b]), int(a.block_param[b]))
                                              for b in range(len(a.block_type)))) / tokens
              for name, a in st.presets.items()}
    return errors, zs


def choose(st: TransformProfile, errors: dict[str, float], max_error: float) -> Allocation:
    """The highest-ratio preset whose error is at most ``max_error``; the lowest-ratio one if none is."""
    ordered = sorted(st.presets.values(), key=lambda a: a.info["ratio"])
    meeting = [a for a in ordered if errors[a.name] <= max_error]
    return meeting[-1] if meeting else ordered[0]
