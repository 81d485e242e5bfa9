"""Printing and plotting ``carve bench`` results (the data comes from ``optimizer.bench``).

The table puts speed and accuracy on one line per system, because a speed-up means nothing
without what it cost; the plot shows the same trade-off as a picture: speed-up against ORT
fp32 across, agreement with ORT fp32 up, one labelled point per system.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from runtime.errors import CarveError


def format_bench(result: dict[str, Any]) -> str:
    source = (result.get("source") or {}).get("name") or (result.get("source") or {}).get("kind")
    lines = [
        f"{result['artifact']}: {source} ({result['family'] or 'unknown family'}), passes: {', '.join(result['passes']) or 'none'}",
        f"inputs: {result['inputs']}; {result['threads']} threads; {result['runs']} interleaved runs after "
        f"{result['warmup']} warm-up; accuracy of '{result['main_output']}' against ort-fp32",
        "",
    ]
    decoder = any("top1_agreement" in (r.get("accuracy") or {}) for r in result["rows"])
    lines += _table(result["rows"], _main_columns(decoder))
    if result.get("generation"):
        gen = result["generation"]
        lines += ["", f"generation: {gen['new_tokens']} new tokens after {gen['prompt']!r}, greedy, "
                      f"{gen['runs']} interleaved runs after 1 warm-up; token match against ort-fp32", ""]
        lines += _table(gen["rows"], GEN_COLUMNS)
    lines += ["", "speed-up = median(ort-fp32) / median(system), > 1 is faster; memory is RSS growth while "
                  "loading and first run (approximate); timings are noisy on a shared machine (docs/metrics.md)"]
    return "\n".join(lines)


def _main_columns(decoder: bool) -> list[tuple[str, str, str]]:
    """(header, key, format) for the main table; accuracy keys live under row['accuracy']."""
    columns = [("median ms", "median_ms", "{:.1f}"), ("p90 ms", "p90_ms", "{:.1f}"), ("speed-up", "speedup", "{:.2f}x"),
               ("mem MB", "peak_mem_mb", "{:.0f}"), ("size MB", "size_mb", "{:.1f}"),
               ("cos mean", "accuracy.cosine_mean", "{:.6f}"), ("cos min", "accuracy.cosine_min", "{:.6f}")]
    if decoder:
        columns.append(("top-1", "accuracy.top1_agreement", "{:.4f}"))
    return columns


GEN_COLUMNS = [("tokens/s", "tokens_per_s", "{:.1f}"), ("median ms", "median_ms", "{:.0f}"),
               ("speed-up", "speedup", "{:.2f}x"), ("mem MB", "peak_mem_mb", "{:.0f}"),
               ("size MB", "size_mb", "{:.1f}"), ("match", "token_match", "{:.3f}")]


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> list[str]:
    width = max(len(r["system"]) for r in rows) + 2
    header = "system".ljust(width) + "".join(h.rjust(11) for h, _, _ in columns) + "  note"
    out = [header]
    for row in rows:
        if row.get("skipped"):
            out.append(row["system"].ljust(width) + f"skipped: {row['skipped']}")
            continue
        cells = "".join(_cell(row, key, fmt).rjust(11) for _, key, fmt in columns)
        out.append(row["system"].ljust(width) + cells + f"  {row.get('note', '')}")
    return out


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value: Any = row
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "-" if value is None else fmt.format(value)


def plot_bench(result: dict[str, Any], path: str | Path) -> Path:
    """Draw speed-up (x) against accuracy (y), one labelled point per system; writes a PNG."""
    path = check_plot_path(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    key, label = _accuracy_axis(result["rows"])
    points = [(row["system"], row["speedup"], row["accuracy"][key]) for row in result["rows"]
              if not row.get("skipped") and (row.get("accuracy") or {}).get(key) is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for (name, x, y), crowded in zip(points, _crowded(points)):
        ax.scatter(x, y, s=40, label=name)
        if not crowded:  # points on top of earlier ones are told apart by the legend alone
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.legend(fontsize=8, loc="best")
    ax.margins(x=0.12, y=0.15)
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("speed-up against ORT fp32 (median latency ratio, > 1 is faster)")
    ax.set_ylabel(label)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.4f" if "top-1" in label else "%.6f"))
    source = (result.get("source") or {}).get("name", "")
    ax.set_title(f"carve bench: {source}, {result['inputs']}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.png")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def _crowded(points: list[tuple[str, float, float]]) -> list[bool]:
    """Whether each point lies on top of an earlier one (identical graphs land on one spot)."""
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    xr, yr = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    return [any(abs(x - x2) < 0.08 * xr and abs(y - y2) < 0.05 * yr for _, x2, y2 in points[:i])
            for i, (_, x, y) in enumerate(points)]


def check_plot_path(path: str | Path) -> Path:
    """Refuse a bad --plot path before minutes of timing, not after."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise CarveError(f"--plot {path} must name a .png file; write e.g. --plot bench.png.")
    if not path.parent.is_dir():
        raise CarveError(f"--plot {path}: the folder {path.parent} does not exist; create it or choose another path.")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CarveError("--plot needs matplotlib, which is not installed; install it with `pip install matplotlib`.") from None
    return path


def _accuracy_axis(rows: list[dict[str, Any]]) -> tuple[str, str]:
    if any("top1_agreement" in (r.get("accuracy") or {}) for r in rows):
        return "top1_agreement", "top-1 next-token agreement with ORT fp32"
    return "cosine_mean", "mean cosine similarity with ORT fp32 (main output)"
