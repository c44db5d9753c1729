"""Figures of a comparison: per-step latent metrics, FP8 / BF16 / difference images side by side, and the per-step
view of both latent trajectories (a slider in a live kernel, a static strip everywhere).

Built on `matplotlib.figure.Figure` directly (no pyplot), so they touch no global state, need no display, and show
in a notebook as returned. `plot_step_metrics` also takes the JSON dict of a saved compare.json.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from .errors import Fp8CookbookError
from .files import atomic_file

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

    from .compare import CompareReport, Thresholds


def _as_dict(report: "CompareReport | dict[str, Any]") -> dict[str, Any]:
    return report if isinstance(report, dict) else report.to_dict()


def _values(steps: list[dict[str, Any]], metric: str) -> list[float]:
    return [math.nan if s["latents"][metric] is None else s["latents"][metric] for s in steps]


def side_names(report: "CompareReport | dict[str, Any]") -> tuple[str, str]:
    """(candidate, reference) as a user names them: "FP8" and "BF16" when the candidate has FP8 layers and the
    reference none (every cookbook comparison), else the neutral "candidate" and "reference"."""
    def fp8(side: str) -> int:
        info = report.get(side) if isinstance(report, dict) else getattr(report, side, None)
        return sum(c.get("fp8_layers", 0) for c in (info or {}).get("components", {}).values())

    return ("FP8", "BF16") if fp8("candidate") and not fp8("reference") else ("candidate", "reference")


# Each bound its own style: two cosine bounds share the left panel and must not look alike.
THRESHOLD_STYLES = {
    "min_step_cosine": dict(linestyle="--", color="tab:red"),
    "min_cosine": dict(linestyle="-.", color="tab:purple"),
    "max_rel_l2": dict(linestyle="--", color="tab:red"),
}


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
    cand, ref = side_names(data)
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
    ax.set_title(f"latent relative L2  ||{cand} - {ref}|| / ||{ref}||")
    ax = axes[2]
    series = [_values(steps, m) for m in ("mae", "rmse", "max_abs")]
    for vals, name, color in zip(series, ("MAE", "RMSE", "max abs"), ("C2", "C3", "C4")):
        ax.plot(x, vals, "o-", color=color, label=name)
    _log_if_positive(ax, *series)
    ax.set_title("latent absolute error")

    if thresholds is not None:
        for key, ax, label in (("min_step_cosine", axes[0], "min step cosine (every step)"),
                               ("min_cosine", axes[0], "min final cosine (last step)"),
                               ("max_rel_l2", axes[1], "max final rel L2 (last step)")):
            value = getattr(thresholds, key)
            if value is not None:
                y = 1 - value if ax is axes[0] else value
                ax.axhline(y, linewidth=1.2, label=label, **THRESHOLD_STYLES[key])
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
    fig.suptitle(f"{data['family']}: {cand} vs {ref} latents, {s['steps']} steps, seed {s['seed']}")
    return fig


def plot_images(report: "CompareReport") -> "Figure":
    """Reference (BF16), candidate (FP8) and |difference| (scaled to its own maximum) for the first and middle
    frames of a video, or for the one image."""
    from matplotlib.figure import Figure

    ref, cand = report.reference_frames, report.candidate_frames
    if ref is None or cand is None:
        raise ValueError("the report holds no frames (a report read back from JSON has none)")
    cand_name, ref_name = side_names(report)
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
        where = f", frame {i} ({name})" if len(ref) > 1 else ""  # a still image has no frames to tell apart
        row[0].set_title(f"{ref_name}{where}")
        row[1].imshow(cand[i])
        row[1].set_title(f"{cand_name}: PSNR {'inf' if math.isinf(p) else f'{p:.2f} dB'}, SSIM {per_frame['ssim'][i]:.4f}")
        im = row[2].imshow(diff, cmap="magma", vmin=0, vmax=max(int(diff.max()), 1))
        row[2].set_title(f"|{cand_name} - {ref_name}|, max {int(diff.max())} of 255")
        fig.colorbar(im, ax=row[2], shrink=0.8)
        for ax in row:
            ax.set_axis_off()
    fig.suptitle(f"{report.family}: {cand_name} vs {ref_name} decoded output, {report.settings['prompt']!r}")
    return fig


def save_figure(fig: "Figure", path: str | Path, dpi: int = 110) -> Path:
    """PNG written beside its final name and renamed in, so a reader never sees half a file."""
    path = Path(path)
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    return path


# ---------------------------------------------------------------------------------------- per-step latents
@dataclass
class Trajectories:
    """Per-step latent previews of consecutive pipeline runs: one frame, all channels, (C, h, w) float16 each."""

    height: int
    width: int
    runs: list[list["np.ndarray"]] = field(default_factory=list)
    steps: int | None = None

    def add(self, latents: "torch.Tensor") -> None:
        if not self.runs or (self.steps is not None and len(self.runs[-1]) == self.steps):
            self.runs.append([])
        self.runs[-1].append(latent_preview(latents, self.height, self.width))

    def pair(self, index: int = 0) -> tuple[list["np.ndarray"], list["np.ndarray"]]:
        """(reference, candidate) of the index-th comparison (each comparison is two runs)."""
        if len(self.runs) < 2 * index + 2:
            raise Fp8CookbookError(f"recorded {len(self.runs)} run(s); comparison {index} needs runs {2 * index} and {2 * index + 1}")
        return self.runs[2 * index], self.runs[2 * index + 1]


def latent_preview(latents: "torch.Tensor", height: int, width: int, max_side: int = 128) -> "np.ndarray":
    """The first sample's latents as (C, h, w) float16: video latents (B, C, F, H, W) at their middle frame, packed
    FLUX tokens (B, h*w, C) folded back onto the (height/16, width/16) grid; larger than `max_side` is average-pooled."""
    import torch
    import torch.nn.functional as F

    x = latents.detach()[0].float()
    if x.dim() == 4:  # C, F, H, W
        x = x[:, x.shape[1] // 2]
    elif x.dim() == 2:  # tokens, channels
        h, w = height // 16, width // 16
        if h * w != x.shape[0]:
            h = max(1, round(math.sqrt(x.shape[0] * height / width)))
            w = x.shape[0] // h
            x = x[: h * w]
        x = x.reshape(h, w, -1).permute(2, 0, 1)
    elif x.dim() != 3:
        raise Fp8CookbookError(f"cannot preview latents of shape {list(latents.shape)}")
    factor = math.ceil(max(x.shape[1:]) / max_side)
    if factor > 1:
        x = F.avg_pool2d(x[None], factor, ceil_mode=True)[0]
    return x.to("cpu", torch.float16).numpy()


@contextlib.contextmanager
def record_latents(pipe, height: int, width: int, steps: int | None = None) -> Iterator[Trajectories]:
    """Record the latents after every scheduler step of every run of `pipe` inside the block.

    `compare_trajectories` runs the reference, then the candidate, through the same pipeline; wrapping the
    scheduler's `step` sees both without changing either run. `steps` splits the record into runs.
    """
    record = Trajectories(height, width, steps=steps)
    scheduler = pipe.scheduler
    had_own = "step" in vars(scheduler)
    original = scheduler.step

    def step(*args, **kwargs):
        out = original(*args, **kwargs)
        record.add(out[0] if isinstance(out, tuple) else out.prev_sample)
        return out

    scheduler.step = step
    try:
        yield record
    finally:
        if had_own:
            scheduler.step = original
        else:
            del scheduler.step


def _rgb(x: "np.ndarray", lo: "np.ndarray", hi: "np.ndarray") -> "np.ndarray":
    import numpy as np

    c = x[:3] if x.shape[0] >= 3 else np.repeat(x[:1], 3, axis=0)
    return np.clip((c.astype(np.float32) - lo) / np.maximum(hi - lo, 1e-6), 0, 1).transpose(1, 2, 0)


def _panels(ref: "np.ndarray", cand: "np.ndarray") -> tuple["np.ndarray", "np.ndarray", "np.ndarray"]:
    """BF16 and FP8 as RGB (first three latent channels, both scaled by the BF16 range) and mean |FP8 - BF16|."""
    import numpy as np

    r = ref.astype(np.float32)
    c3 = r[:3] if r.shape[0] >= 3 else np.repeat(r[:1], 3, axis=0)
    lo = c3.reshape(3, -1).min(axis=1)[:, None, None]
    hi = c3.reshape(3, -1).max(axis=1)[:, None, None]
    diff = np.abs(cand.astype(np.float32) - r).mean(axis=0)
    return _rgb(r, lo, hi), _rgb(cand, lo, hi), diff


def _step_title(report, i: int) -> str:
    s = report.steps[i] if report is not None and i < len(report.steps) else None
    if s is None:
        return f"step {i}"
    experts = "+".join(s["experts"])
    return f"step {i}, t={s['timestep']:.0f}" + (f" ({experts})" if experts else "") + f": cosine {s['latents']['cosine']:.6f}"


def step_figure(reference: list["np.ndarray"], candidate: list["np.ndarray"], report=None, step: int = 0) -> "Figure":
    """BF16 latents, FP8 latents and their mean absolute difference at one step."""
    from matplotlib.figure import Figure

    ref_rgb, cand_rgb, diff = _panels(reference[step], candidate[step])
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    axes = fig.subplots(1, 3)
    axes[0].imshow(ref_rgb)
    axes[0].set_title("BF16 latents")
    axes[1].imshow(cand_rgb)
    axes[1].set_title("FP8 latents")
    im = axes[2].imshow(diff, cmap="magma")
    axes[2].set_title("mean |FP8 - BF16| over channels")
    fig.colorbar(im, ax=axes[2], shrink=0.8)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(_step_title(report, step))
    return fig


def steps_strip(reference: list["np.ndarray"], candidate: list["np.ndarray"], report=None, max_steps: int = 6) -> "Figure":
    """The static view: BF16 / FP8 / difference rows for up to `max_steps` evenly spaced steps (last one included)."""
    import numpy as np
    from matplotlib.figure import Figure

    n = len(reference)
    picks = sorted({int(round(i)) for i in np.linspace(0, n - 1, min(n, max_steps))})
    handover = report is not None and len({tuple(s["experts"]) for s in report.steps}) > 1  # Wan2.2 A14B
    fig = Figure(figsize=(2.3 * len(picks) + 1, 7), layout="constrained")
    axes = np.atleast_2d(fig.subplots(3, len(picks)).reshape(3, len(picks)))
    vmax = max(float(_panels(reference[i], candidate[i])[2].max()) for i in picks) or 1.0
    for col, i in enumerate(picks):
        ref_rgb, cand_rgb, diff = _panels(reference[i], candidate[i])
        axes[0, col].imshow(ref_rgb)
        axes[1, col].imshow(cand_rgb)
        im = axes[2, col].imshow(diff, cmap="magma", vmin=0, vmax=vmax)
        cos = (f"\n1 - cos {1 - report.steps[i]['latents']['cosine']:.1e}"
               if report is not None and i < len(report.steps) else "")
        expert = f" ({'+'.join(report.steps[i]['experts'])})" if handover and i < len(report.steps) else ""
        axes[0, col].set_title(f"step {i}{expert}{cos}", fontsize=9)
    for row, label in zip(axes, ("BF16", "FP8", "|FP8 - BF16|")):
        row[0].set_ylabel(label)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(im, ax=axes[2, :].tolist(), shrink=0.8)
    fig.suptitle("latents after each step (first three channels; difference = mean over all channels)")
    return fig


def png(fig: "Figure", dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def show(fig: "Figure") -> None:
    """Display a figure as a PNG: works without pyplot, and the picture stays in the saved notebook."""
    from IPython.display import Image, display

    display(Image(data=png(fig)))


def _live_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def step_viewer(reference: list["np.ndarray"], candidate: list["np.ndarray"], report=None, *,
                save_to: str | Path | None = None) -> "Figure":
    """A slider over the denoising steps showing BF16 and FP8 latents side by side, and the static strip.

    The slider (ipywidgets) needs a live kernel and a front end that renders widgets; the static strip is displayed
    in every case, so an executed notebook (papermill, nbval, GitHub) still shows the trajectories. Returns the strip
    (also saved as PNG to `save_to`).
    """
    if len(reference) != len(candidate) or not reference:
        raise Fp8CookbookError(f"need the same number of steps on both sides, got {len(reference)} and {len(candidate)}")
    if _live_kernel():
        try:
            import ipywidgets as widgets
        except ImportError:
            widgets = None
        if widgets is not None:
            from IPython.display import Image, display

            slider = widgets.IntSlider(value=len(reference) - 1, min=0, max=len(reference) - 1, description="step",
                                       continuous_update=False)
            out = widgets.Output()

            def draw(change=None) -> None:
                out.clear_output(wait=True)
                with out:
                    display(Image(data=png(step_figure(reference, candidate, report, slider.value))))

            slider.observe(draw, names="value")
            draw()
            display(widgets.VBox([slider, out]))
    strip = steps_strip(reference, candidate, report)
    if save_to is not None:
        save_figure(strip, save_to)
    show(strip)
    return strip
