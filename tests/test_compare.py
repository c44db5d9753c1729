"""Trajectory comparison: metric math on known tensors, the report and its schema, swapping transformers into one
tiny pipeline (identical runs score perfectly, perturbed ones lower), thresholds, figures, and the CLI's exit codes."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from fp8cookbook.cli import main
from fp8cookbook.compare import (SCHEMA_VERSION, CompareReport, Thresholds, compare_trajectories, frame_metrics, psnr,
                                 ssim, tensor_metrics, to_uint8_frames)
from fp8cookbook.errors import Fp8CookbookError
from fp8cookbook.pipelines import default_tiny_settings, load_pipeline

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _settings(family: str, **over) -> dict:
    s = default_tiny_settings(family)
    s = dict(height=s["height"], width=s["width"], num_frames=s["num_frames"], steps=s["num_inference_steps"],
             guidance_scale=s["guidance_scale"])
    return {**s, **over}


# ------------------------------------------------------------------------------------------------- metrics
def test_identical_tensors_are_perfect():
    x = torch.randn(2, 3, 4, dtype=torch.bfloat16)
    m = tensor_metrics(x, x.clone())
    assert m["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert m["mae"] == m["mse"] == m["rmse"] == m["max_abs"] == m["l2"] == m["rel_l2"] == 0.0


def test_tensor_metrics_known_values():
    r = torch.tensor([3.0, 4.0])  # norm 5
    c = torch.tensor([3.0, 5.0])  # difference [0, 1]
    m = tensor_metrics(r, c)
    assert m["mae"] == 0.5 and m["mse"] == 0.5 and m["rmse"] == pytest.approx(math.sqrt(0.5))
    assert m["max_abs"] == 1.0 and m["l2"] == 1.0 and m["rel_l2"] == pytest.approx(0.2)
    assert m["cosine"] == pytest.approx(29 / (5 * math.sqrt(34)))
    assert tensor_metrics(r, -r)["cosine"] == pytest.approx(-1.0)
    zero = torch.zeros(2)
    assert tensor_metrics(zero, zero)["cosine"] == 1.0 and tensor_metrics(zero, zero)["rel_l2"] == 0.0
    assert tensor_metrics(zero, r)["cosine"] == 0.0 and tensor_metrics(zero, r)["rel_l2"] == math.inf
    assert math.isnan(tensor_metrics(r, torch.tensor([math.nan, 1.0]))["cosine"])
    with pytest.raises(Fp8CookbookError, match="elements"):
        tensor_metrics(r, torch.zeros(3))


def test_psnr_and_ssim_known_values():
    a = np.full((8, 8, 3), 100, np.uint8)
    assert psnr(a, a) == math.inf
    b = a.copy()
    b[..., 0] += 10  # MSE = 100 / 3
    assert psnr(a, b) == pytest.approx(20 * math.log10(255) - 10 * math.log10(100 / 3))
    b = a + 1  # MSE = 1: PSNR = 20·log10(255)
    assert psnr(a, b) == pytest.approx(48.1308, abs=1e-4)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)  # smaller than the default 7x7 window
    assert ssim(img, img) == pytest.approx(1.0)
    assert ssim(img, 255 - img) < 0.5


def test_frames_layout_and_sets():
    video = torch.rand(1, 5, 3, 16, 24)  # B F C H W
    frames = to_uint8_frames(video)
    assert frames.shape == (5, 16, 24, 3) and frames.dtype == np.uint8
    assert to_uint8_frames(torch.ones(1, 3, 16, 24)).max() == 255
    noisy = np.clip(frames.astype(int) + np.arange(5)[:, None, None, None], 0, 255).astype(np.uint8)
    d = frame_metrics(frames, noisy)
    assert [d["frame_sets"][k]["frames"] for k in ("first", "middle", "all")] == [[0], [2], [0, 1, 2, 3, 4]]
    assert d["per_frame"]["psnr"][0] == math.inf and d["frame_sets"]["first"]["psnr"] == math.inf
    assert d["frame_sets"]["all"]["psnr"] < d["frame_sets"]["middle"]["psnr"] < math.inf  # MSE ~6 vs ~4


# ---------------------------------------------------------------------------------------------- pipelines
@pytest.fixture(scope="module")
def flux_pipe():
    return load_pipeline("flux1")


def test_identical_runs_score_perfectly(flux_pipe):
    own = flux_pipe.transformer
    report = compare_trajectories(flux_pipe, {}, {"transformer": own}, family="flux1", seed=3, progress=False,
                                  **_settings("flux1", steps=2, height=32, width=32))
    assert flux_pipe.transformer is own
    assert [s["step"] for s in report.steps] == [0, 1] and all(s["experts"] == ["transformer"] for s in report.steps)
    for s in report.steps:
        assert s["latents"]["cosine"] == pytest.approx(1.0, abs=1e-12) and s["latents"]["rel_l2"] == 0.0, s
    for name, m in report.decoded["frame_sets"].items():
        assert m["psnr"] == math.inf and m["ssim"] == pytest.approx(1.0), (name, m)
    strict = Thresholds(min_cosine=1 - 1e-9, min_step_cosine=1 - 1e-9, max_rel_l2=0.0, min_psnr=200, min_ssim=0.999)
    assert report.failures(strict) == []

    doc = json.loads(json.dumps(report.to_dict(strict), allow_nan=False))
    assert doc["schema_version"] == SCHEMA_VERSION == 1
    assert set(doc) == {"schema_version", "tool", "created", "family", "settings", "environment", "reference",
                        "candidate", "steps", "final_latents", "decoded", "thresholds", "failures"}
    assert doc["settings"] == {"prompt": "a photo of a red house", "seed": 3, "height": 32, "width": 32,
                               "num_frames": None, "steps": 2, "guidance_scale": 3.5, "max_sequence_length": 32}
    assert doc["decoded"]["frame_sets"]["all"]["psnr"] is None  # identical: infinite PSNR encodes as null
    assert doc["decoded"]["num_frames"] == 1 and doc["final_latents"] == doc["steps"][-1]["latents"]
    assert set(doc["steps"][0]["latents"]) == {"cosine", "mae", "mse", "rmse", "max_abs", "l2", "rel_l2"}
    assert doc["thresholds"]["min_psnr"] == 200 and doc["failures"] == []
    comp = doc["candidate"]["components"]["transformer"]
    assert comp["pipeline_component"] is True and comp["class"] == "FluxTransformer2DModel"


def test_perturbed_transformer_2_scores_lower_only_after_the_boundary():
    """Wan2.2 A14B: noise in transformer_2 leaves the high-noise steps exact and lowers the low-noise ones."""
    pipe = load_pipeline("wan22-a14b")
    own2 = pipe.transformer_2
    noisy = copy.deepcopy(own2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in noisy.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * p.float().std().to(p.dtype) * 0.05)
    report = compare_trajectories(pipe, {}, {"transformer_2": noisy}, family="wan22-a14b", progress=False,
                                  offload_idle=True, **_settings("wan22-a14b", height=32, width=32))
    assert pipe.transformer_2 is own2 and pipe.transformer is not noisy
    assert [s["experts"] for s in report.steps] == [["transformer"]] * 2 + [["transformer_2"]] * 2
    cos = [s["latents"]["cosine"] for s in report.steps]
    assert cos[0] == pytest.approx(1.0, abs=1e-12) and cos[1] == pytest.approx(1.0, abs=1e-12), cos
    assert cos[3] < 0.99999, cos
    all_frames = report.decoded["frame_sets"]["all"]
    assert all_frames["frames"] == [0, 1, 2, 3, 4] and all_frames["psnr"] < 80 and all_frames["ssim"] < 1.0

    fails = report.failures(Thresholds(min_step_cosine=0.999999, min_psnr=200, min_ssim=0.99999))
    assert any(f.startswith("latent cosine at step 3 ") and "min_step_cosine 0.999999" in f for f in fails), fails
    assert not any("step 0" in f or "step 1 " in f for f in fails), fails
    assert sum("PSNR over" in f for f in fails) == 3 and any("PSNR over frames 0-4 (all) = " in f for f in fails), fails


def test_incompatible_candidate_is_refused(flux_pipe):
    from fp8cookbook.families import get_family

    fam = get_family("flux1")
    other = fam.transformer_class()(**{**fam.tiny_config, "num_layers": 2})
    with pytest.raises(Fp8CookbookError, match="num_layers 2 vs 1"):
        compare_trajectories(flux_pipe, {}, {"transformer": other}, family="flux1", progress=False)
    with pytest.raises(Fp8CookbookError, match="no component 'transformer_2'"):
        compare_trajectories(flux_pipe, {}, {"transformer_2": other}, family="flux1", progress=False)


# ----------------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def fp8_flux(handmade, tmp_path):
    """An FP8 checkpoint of the tiny FLUX.1 pipeline's own transformer (same seed), in SGLang's format."""
    from fp8cookbook.convert import convert_checkpoint

    out = tmp_path / "fp8"
    convert_checkpoint(handmade["export"], out, base_transformer=handmade["base"], family="flux1", progress=False)
    return out


def test_cli_fp8_candidate_threshold_fails_and_writes_outputs(fp8_flux, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["compare", "--family", "flux1", "--candidate", str(fp8_flux), "--output-dir", str(out), "--quiet",
               "--steps", "2", "--height", "32", "--width", "32", "--min-cosine", "0.999999999", "--min-psnr", "99", "--min-ssim", "0.5"])
    cap = capsys.readouterr()
    assert rc == 1, cap
    missed = [line for line in cap.err.splitlines() if "threshold missed" in line]
    assert len(missed) == 2, cap.err
    assert "final latent cosine (step 1)" in missed[0] and "< min_cosine 0.999999999" in missed[0]
    assert "PSNR over frame 0 (all) = " in missed[1] and "< min_psnr 99" in missed[1]
    assert "FP8 layers ran" in cap.out and "PSNR" in cap.out

    doc = json.loads((out / "compare.json").read_text())
    assert doc["schema_version"] == 1 and len(doc["failures"]) == 2 and doc["thresholds"]["min_ssim"] == 0.5
    comp = doc["candidate"]["components"]["transformer"]
    assert comp["source"] == str(fp8_flux) and comp["fp8_layers"] > 0 and comp["fp8_layers_ran"] == comp["fp8_layers"]
    assert 0.999 < doc["final_latents"]["cosine"] < 1 and 30 < doc["decoded"]["frame_sets"]["all"]["psnr"] < 99
    for name in ("compare_metrics.png", "compare_images.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, name
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare_images.png", "compare_metrics.png"]

    from fp8cookbook.plots import plot_step_metrics  # a saved report plots again, for notebooks

    assert len(plot_step_metrics(doc).axes) == 3


def test_cli_passes_within_thresholds(fp8_flux, handmade, tmp_path, capsys):
    """--reference: a BF16 folder (the same weights as the pipeline's) instead of the pipeline's own transformer."""
    rc = main(["compare", "--family", "flux", "--candidate", str(fp8_flux), "--reference", str(handmade["base"]),
               "--output-dir", str(tmp_path / "r"), "--quiet", "--steps", "1", "--height", "32", "--width", "32", "--min-cosine", "0.99", "--min-step-cosine", "0.99", "--max-rel-l2", "0.1",
               "--min-psnr", "25", "--min-ssim", "0.9"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    doc = json.loads((tmp_path / "r" / "compare.json").read_text())
    assert doc["settings"]["steps"] == 1 and doc["failures"] == []
    ref = doc["reference"]["components"]["transformer"]
    assert ref["source"] == str(handmade["base"]) and not ref["pipeline_component"] and ref["fp8_layers"] == 0


@pytest.mark.parametrize("extra, message", [
    ([], "config.json: missing"),
    (["--candidate-2", "x"], "has one transformer"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, extra, message):
    rc = main(["compare", "--family", "flux1", "--candidate", str(tmp_path / "nowhere"), "--output-dir",
               str(tmp_path / "out"), "--quiet", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert err.startswith("fp8cookbook compare: error:")
    assert not (tmp_path / "out").exists()


def test_report_without_frames_cannot_plot_images():
    from fp8cookbook.plots import plot_images

    report = CompareReport(family="flux1", settings={}, reference={}, candidate={}, steps=[], decoded={})
    with pytest.raises(ValueError, match="no frames"):
        plot_images(report)


def test_cli_fp8_attention_candidate(fp8_flux, handmade, tmp_path, capsys):
    """--fp8-attention: the candidate runs FP8 attention with its side file's scales; without the file, one line."""
    from fp8cookbook.families import build_transformer, get_family
    from fp8cookbook.checkpoint import ATTENTION_SCALES_NAME
    from fp8cookbook.fp8.attention_diffusers import attention_modules, record_attention_amax

    args = ["compare", "--family", "flux1", "--candidate", str(fp8_flux), "--fp8-attention", "--quiet",
            "--steps", "2", "--height", "32", "--width", "32"]
    rc = main([*args, "--output-dir", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert rc == 2 and ATTENTION_SCALES_NAME in err and "--quantize-mha" in err and len(err.strip().splitlines()) == 1

    fam = get_family("flux1")
    model = build_transformer(fam, "tiny", seed=0)
    with torch.no_grad(), record_attention_amax(model) as amax:
        model(**fam.make_inputs(dict(model.config), height=64, width=64, text_len=8,
                                generator=torch.Generator().manual_seed(0)))
    entries = {f"{m}.{c}_bmm_quantizer": float(a[c]) for m, a in amax.items() for c in "qkv"}
    (fp8_flux / ATTENTION_SCALES_NAME).write_text(json.dumps({"format": "amax", "amax": entries}))
    rc = main([*args, "--output-dir", str(tmp_path / "r")])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    comp = json.loads((tmp_path / "r" / "compare.json").read_text())["candidate"]["components"]["transformer"]
    assert comp["fp8_attention_layers"] == len(attention_modules(model)) > 0
    assert f"FP8 attention in {comp['fp8_attention_layers']} modules" in cap.out
