"""The comparison figures say what a user means: FP8 vs BF16, two cosine bounds that look different, and a still
image that is not called "frame 0 (first)"."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from fp8cookbook.compare import CompareReport, Thresholds, frame_metrics  # noqa: E402
from fp8cookbook.plots import plot_images, plot_step_metrics, side_names  # noqa: E402


def _report(num_frames: int, fp8_layers: int = 13) -> CompareReport:
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 255, (num_frames, 16, 16, 3), dtype=np.uint8)
    cand = np.clip(ref.astype(np.int16) + rng.integers(-2, 3, ref.shape), 0, 255).astype(np.uint8)
    latents = {"cosine": 0.999, "mae": 1e-3, "mse": 1e-6, "rmse": 1e-3, "max_abs": 1e-2, "l2": 0.1, "rel_l2": 1e-2}
    component = {"class": "X", "source": None, "pipeline_component": False, "fp8_layers_ran": fp8_layers,
                 "fp8_attention_layers": 0}
    return CompareReport(
        family="flux1", settings={"prompt": "a red house", "seed": 0, "steps": 3},
        reference={"seconds": 1.0, "components": {"transformer": {**component, "fp8_layers": 0}}},
        candidate={"seconds": 1.0, "components": {"transformer": {**component, "fp8_layers": fp8_layers}}},
        steps=[{"step": i, "timestep": 1000 - i, "experts": ["transformer"], "latents": latents} for i in range(3)],
        decoded=frame_metrics(ref, cand), reference_frames=ref, candidate_frames=cand)


def _titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes] + [fig._suptitle.get_text()]


def test_two_cosine_bounds_look_different():
    fig = plot_step_metrics(_report(1), Thresholds(min_cosine=0.98, min_step_cosine=0.95, max_rel_l2=0.2))
    cosine_axes = fig.axes[0]
    bounds = [line for line in cosine_axes.get_lines() if line.get_label().startswith("min ")]
    assert len(bounds) == 2
    styles = {(line.get_linestyle(), line.get_color()) for line in bounds}
    assert len(styles) == 2, f"the two cosine bounds are drawn alike: {styles}"
    labels = [t.get_text() for t in cosine_axes.get_legend().get_texts()]
    assert any("every step" in t for t in labels) and any("last step" in t for t in labels), labels


def test_titles_say_fp8_vs_bf16():
    report = _report(1)
    assert side_names(report) == ("FP8", "BF16")
    for fig in (plot_step_metrics(report), plot_images(report)):
        titles = " / ".join(_titles(fig))
        assert "FP8 vs BF16" in titles and "candidate" not in titles and "reference" not in titles, titles
    # a BF16 candidate (e.g. a re-saved transformer) keeps the neutral names
    assert side_names(_report(1, fp8_layers=0)) == ("candidate", "reference")


def test_still_image_has_no_frame_label():
    titles = _titles(plot_images(_report(1)))
    assert not any("frame" in t for t in titles), titles
    video = _titles(plot_images(_report(5)))
    assert any("frame 0 (first)" in t for t in video) and any("frame 2 (middle)" in t for t in video), video
