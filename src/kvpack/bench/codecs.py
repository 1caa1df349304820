"""`kvpack bench codecs`: every codec setting through the quality harness on the real model, side by side.

One run computes each document's reference once and evaluates every setting on it (BENCHMARKS.md protocol), then
prints the table, writes JSON rows (the keys of `kvpack eval`), and optionally docs/results/codecs.md and a PNG of
ratio against perplexity increase. Per-model profiles are reported separately from the ratio, with their size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

from kvpack import codecs
from kvpack.bench.rows import fmt, passkey_cells, profile_tag
from kvpack.codecs.base import Codec

#: Settings measured by default, as (codec name, parameters); those whose codec is not installed are skipped.
DEFAULT_SETTINGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("raw", {}),
    ("zstd", {"level": 3}),
    ("zstd", {"level": 19}),
    ("lossless", {}),
    ("fp8", {}),
    ("kivi", {"bits": 4}),
    ("kivi", {"bits": 3}),
    ("kivi", {"bits": 2}),
)


def settings(extra: list[Codec] | None = None) -> list[Codec]:
    """The default settings whose codec is registered, then ``extra`` (profile-based codecs built by the caller)."""
    out = [codecs.get(name, **params) for name, params in DEFAULT_SETTINGS if name in codecs.available()]
    return out + list(extra or [])


def label(row: dict[str, Any]) -> str:
    params = ",".join(f"{k}={v}" for k, v in row["params"].items() if v is not None)
    return f"{row['codec']}({params})" if params else row["codec"]


def passkey_legend(row: dict[str, Any]) -> str:
    """What the passkey columns mean, for a page whose rows ran passkey trials (else empty)."""
    if not row.get("passkey_trials"):
        return ""
    return (f" Passkey: accuracy over {row['passkey_trials']} haystacks of {row['passkey_tokens']} tokens, the "
            "uncompressed cache's in parentheses, then the trials only this cache answers (+) and only the "
            "uncompressed one answers (-); key log p: mean log-probability (nats) of the key read after the "
            "question, teacher-forced (kvpack.eval.passkey).")


def markdown(rows: list[dict[str, Any]], command: str, profiles: dict[str, int], plot_path: Path | None) -> str:
    """docs/results/codecs.md from the rows."""
    first = rows[0]
    lines = [
        "# Codecs on SmolLM2-135M", "",
        f"Produced by `{command}` on {first['machine']}.", "",
        f"{len(first['documents'])} eval documents ({', '.join(first['documents'])}); prefix {first['prefix_tokens']} "
        f"tokens encoded, continuation {first['cont_tokens']} tokens scored. Ratio = fp16 bytes / stored bytes, every "
        "byte of every container counted (one container per document prefix). Δppl is the mean relative "
        "continuation-perplexity increase; KL is next-token KL(original ‖ decoded); greedy is the fraction of 64 "
        "greedy tokens generated before the first disagreement. MB/s are of fp16 KV, single process, "
        f"{first['threads']} threads.{passkey_legend(first)}", "",
        "| setting | ratio | bits/el | Δppl % | code % | prose % | KL mean | KL p99 | top-1 | greedy "
        "| passkey (ref) +/- | key log p (ref) | enc MB/s | dec MB/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pk, lp = passkey_cells(r)
        lines.append(
            f"| {label(r)}{profile_tag(r)} | {r['ratio']:.2f} | {r['bits_per_element']:.2f} | "
            f"{r['ppl_increase_pct']:+.2f} | "
            f"{fmt(r.get('ppl_increase_pct_code'), '+.2f')} | {fmt(r.get('ppl_increase_pct_prose'), '+.2f')} | "
            f"{r['kl_mean']:.4f} | {r['kl_p99']:.3f} | {r['top1_agreement']:.3f} | {r['greedy_agreement']:.2f} | "
            f"{pk} | {lp} | {r['encode_MBps']:.0f} | {r['decode_MBps']:.0f} |")
    facts = sorted({f"- `{p['hash'][:8]}`: quantizer rounding {p.get('rounding')}, {p.get('calibration_tokens')} "
                    "calibration tokens" + (f", PCA groups {p['grouping']}" if p.get("grouping") else "")
                    for r in rows if (p := r.get("profile"))})
    if facts:
        lines += ["", "Profiles (`[hash]` after a setting):", "", *facts]
    if profiles:
        lines += ["", "Per-model profiles (stored once per model, not counted in the ratios above):", ""]
        lines += [f"- {name}: {size / 1e6:.2f} MB" for name, size in profiles.items()]
    if plot_path:
        lines += ["", f"![ratio against perplexity increase]({plot_path.name})"]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Ratio (log) against perplexity increase, one marker per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        x = max(r["ppl_increase_pct"], 1e-3)
        ax.scatter(x, r["ratio"], s=30)
        ax.annotate(label(r), (x, r["ratio"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", yscale="log", xlabel="continuation perplexity increase (%, log; 0 shown at 0.001)",
           ylabel="ratio vs fp16 (all bytes)", title="kvpack codecs on SmolLM2-135M")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(rows: list[dict[str, Any]], console: Console, command: str, profiles: dict[str, int],
                  json_path: Path | None, markdown_path: Path | None, plot_path: Path | None) -> None:
    if json_path:
        json_path.write_text(json.dumps({"rows": rows, "profiles_bytes": profiles}, indent=2))
        console.print(f"wrote {json_path}")
    if plot_path:
        plot(rows, plot_path)
        console.print(f"wrote {plot_path}")
    if markdown_path:
        markdown_path.write_text(markdown(rows, command, profiles, plot_path))
        console.print(f"wrote {markdown_path}")
