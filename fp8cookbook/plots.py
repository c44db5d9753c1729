"""Figures of a comparison: per-step latent metrics, and reference / candidate / difference images side by side.

Built on `matplotlib.figure.Figure` directly (no pyplot), so they touch no global state, need no display, and show
in a notebook as returned. `plot_step_metrics` also takes the JSON dict of a saved compare.json.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .compare import CompareReport, Thresholds


def _as_dict(report: "CompareReport | dict[str, Any]") -> dict[str, Any]:
    return report if isinstance(report, dict) else report.to_dict()


def _values(steps: list[dict[str, Any]], metric: str) -> list[float]:
    return [math.nan if s["latents"][metric] is None else s["latents"][metric] for s in steps]


def _log_if_positive(ax, *series: list[float]) -> None:
    """Log scale shows errors across orders of magnitude, but not zeros (an identical run): then stay linear."""
    vals = [v for s in series for v in s if math.isfinite(v)]
    if vals and min(vals) > 0:
        ax.set_yscale("log")


def plot_step_metrics(report: "CompareReport | dict[str, Any]", thresholds: "Thresholds | None" = None) -> "Figure":
    """Cosine, relative L2 and absolute errors of the latents per step; bounds as dashed lines, expert switches
    (Wan2.2 A14B's high- to low-noise handover) as dotted ones."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    data = _as_dict(report)
    steps = data["steps"]
    x = [s["step"] for s in steps]
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)

    ax = axes[0]
    gap = [1 - v for v in _values(steps, "cosine")]  # 0.999 vs 0.9999 is readable as 1e-3 vs 1e-4 on a log axis
    ax.plot(x, gap, "o-", label="1 - cosine")
    _log_if_positive(ax, gap)
    ax.set_title("latent 1 - cosine similarity")
    ax = axes[1]
    ax.plot(x, _values(steps, "rel_l2"), "o-", color="C1", label="relative L2")
    _log_if_positive(ax, _values(steps, "rel_l2"))
    ax.set_title("latent relative L2  ||c - r|| / ||r||")
    ax = axes[2]
    series = [_values(steps, m) for m in ("mae", "rmse", "max_abs")]
    for vals, name, color in zip(series, ("MAE", "RMSE", "max abs"), ("C2", "C3", "C4")):
        ax.plot(x, vals, "o-", color=color, label=name)
    _log_if_positive(ax, *series)
    ax.set_title("latent absolute error")

    if thresholds is not None:
        for value, ax, label in ((thresholds.min_step_cosine, axes[0], "min step cosine"),
                                 (thresholds.min_cosine, axes[0], "min final cosine"),
                                 (thresholds.max_rel_l2, axes[1], "max final rel L2")):
            if value is not None:
                y = 1 - value if ax is axes[0] else value
                ax.axhline(y, linestyle="--", color="red", linewidth=1, label=label)
    for i in range(1, len(steps)):
        if steps[i]["experts"] != steps[i - 1]["experts"]:
            for ax in axes:
                ax.axvline(x[i] - 0.5, linestyle=":", color="gray")
            axes[0].annotate(" " + "+".join(steps[i]["experts"]), (x[i] - 0.5, 0.02), xycoords=("data", "axes fraction"),
                             color="gray", fontsize=8)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("denoising step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    s = data["settings"]
    fig.suptitle(f"{data['family']}: candidate vs reference latents, {s['steps']} steps, seed {s['seed']}")
    return fig


def plot_images(report: "CompareReport") -> "Figure":
    """Reference, candidate and |difference| (scaled to its own maximum) for the first and middle frames."""
    from matplotlib.figure import Figure

    ref, cand = report.reference_frames, report.candidate_frames
    if ref is None or cand is None:
        raise ValueError("the report holds no frames (a report read back from JSON has none)")
    sets = report.decoded["frame_sets"]
    rows = [(name, sets[name]["frames"][0]) for name in ("first", "middle")]
    rows = rows[:1] if rows[0][1] == rows[1][1] else rows  # an image: one row
    fig = Figure(figsize=(11, 3.6 * len(rows)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(rows), 3))
    per_frame = report.decoded["per_frame"]
    for (name, i), row in zip(rows, axes):
        diff = np.abs(ref[i].astype(np.int16) - cand[i].astype(np.int16)).max(axis=-1)
        p = per_frame["psnr"][i]
        row[0].imshow(ref[i])
        row[0].set_title(f"reference, frame {i} ({name})")
        row[1].imshow(cand[i])
        row[1].set_title(f"candidate: PSNR {'inf' if math.isinf(p) else f'{p:.2f} dB'}, SSIM {per_frame['ssim'][i]:.4f}")
        im = row[2].imshow(diff, cmap="magma", vmin=0, vmax=max(int(diff.max()), 1))
        row[2].set_title(f"|difference|, max {int(diff.max())} of 255")
        fig.colorbar(im, ax=row[2], shrink=0.8)
        for ax in row:
            ax.set_axis_off()
    fig.suptitle(f"{report.family}: decoded output, {report.settings['prompt']!r}")
    return fig


def save_figure(fig: "Figure", path: str | Path, dpi: int = 110) -> Path:
    """PNG written beside its final name and renamed in, so a reader never sees half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
