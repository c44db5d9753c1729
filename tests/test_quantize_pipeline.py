"""`quantize_pipeline` and `fp8cookbook quantize`: calibration on the real (tiny) pipelines, end to end to SGLang
FP8 folders, for every family; the A14B experts; failures that leave nothing on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("modelopt.torch.quantization")

from fp8cookbook.checkpoint import STATS_NAME, TensorReader, inspect_checkpoint, scan_tensors  # noqa: E402
from fp8cookbook.cli import main  # noqa: E402
from fp8cookbook.convert import load_amax_table  # noqa: E402
from fp8cookbook.errors import Fp8CookbookError  # noqa: E402
from fp8cookbook.families import FAMILIES, get_family  # noqa: E402
from fp8cookbook.fp8.attention_diffusers import attention_modules, count_fp8_attention_calls  # noqa: E402
from fp8cookbook.loader import load_fp8_transformer  # noqa: E402
from fp8cookbook.pipelines import build_tiny_pipeline, load_pipeline, tiny_pipeline_dir  # noqa: E402
from fp8cookbook.quantize import PROMPTS_FILE, QuantizeResult, calibration_prompts, quantize_pipeline  # noqa: E402

NAMES = sorted(FAMILIES)


pytestmark = pytest.mark.usefixtures("one_thread", "tiny_cache_env")


def _pipe(name: str):
    """A fresh float32 load (quantization consumes the pipeline; float32: bf16 matmuls are ~10x slower on CPU)."""
    return load_pipeline(name, dtype=torch.float32)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _check_fp8_folders(result: QuantizeResult, family_name: str) -> None:
    """Every expert has an FP8 folder that inspects clean, whose input scales are the state file's amaxes / 448."""
    family = get_family(family_name)
    assert list(result.paths) == list(family.experts)
    for name, paths in result.paths.items():
        assert set(paths) == {"base", "state", "export", "fp8"}
        assert paths["state"] == result.output_dir / f"{name}.pt"
        assert paths["export"] == result.output_dir / "export" / name
        assert paths["fp8"] == result.output_dir / "fp8" / name
        assert all(p.exists() for p in paths.values()), paths
        report = inspect_checkpoint(paths["fp8"])
        assert not report.problems, report.problems
        stats = result.convert_stats[name]
        assert report.fp8_layers == stats.quantized_weights > 0
        assert result.calibration["forward_calls"][name] > 0
        amax = load_amax_table(paths["state"])
        with TensorReader(paths["fp8"]) as reader:
            scales = {n: float(reader.get(n)) for n in reader.index if n.endswith(".input_scale")}
        assert len(scales) == stats.quantized_weights
        for n, scale in scales.items():
            expected = amax[n.removesuffix("input_scale") + "input_quantizer._amax"] / 448
            assert scale == pytest.approx(expected, rel=1e-6), n
        conversion = json.loads((paths["fp8"] / STATS_NAME).read_text())
        assert conversion["output_dir"] == str(paths["fp8"])  # final paths, not the temporary folder's
    summary = json.loads((result.output_dir / "quantize.json").read_text())
    assert summary["family"] == family.name
    assert summary["paths"][family.experts[0]]["fp8"] == f"fp8/{family.experts[0]}"
    assert summary["calibration"]["forward_calls"] == result.calibration["forward_calls"]
    assert result.seconds > 0 and result.peak_memory_mb > 0
    assert not _leftovers(result.output_dir.parent)


def test_shipped_prompts():
    prompts = calibration_prompts()
    assert len(prompts) >= 60 and len(set(prompts)) == len(prompts)
    assert all(p.isascii() and not p.startswith("#") and len(p) > 20 for p in prompts)
    assert calibration_prompts(limit=5) == prompts[:5]
    assert PROMPTS_FILE.is_file()
    with pytest.raises(Fp8CookbookError, match=f"1000 calibration prompts asked for, the file has {len(prompts)}"):
        calibration_prompts(limit=1000)
    with pytest.raises(Fp8CookbookError, match="at least 1"):
        calibration_prompts(limit=0)


def test_prompts_file_forms_and_errors(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("# a comment\n\n  a red house  \nA cat\n\n# another\na dog\n")
    assert calibration_prompts(good) == ["a red house", "A cat", "a dog"]
    assert calibration_prompts(good, limit=2) == ["a red house", "A cat"]
    cases = {
        "missing.txt": (None, "does not exist"),
        "folder": ("dir", "is a folder"),
        "empty.txt": ("# only a comment\n\n", "no prompts"),
        "latin1.txt": ("caf\xe9\n".encode("latin-1"), "not UTF-8"),
        "nul.txt": (b"a\x00b\n", "NUL bytes"),
    }
    for fname, (content, message) in cases.items():
        path = tmp_path / fname
        if content == "dir":
            path.mkdir()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        with pytest.raises(Fp8CookbookError, match=message) as info:
            calibration_prompts(path)
        assert str(path) in str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_quantize_pipeline_end_to_end(name, tmp_path):
    family = get_family(name)
    out = tmp_path / "out"
    result = quantize_pipeline(name, _pipe(name), out, num_prompts=2, seed=5, progress=False)
    assert result.output_dir == out and result.family == name
    _check_fp8_folders(result, name)
    cal = result.calibration
    assert cal["prompts"] == calibration_prompts(limit=2) and cal["seed"] == 5 and cal["tiny"]
    assert cal["dtype"] == "float32" and cal["device"] == "cpu"
    # The tiny pipeline is a local BF16 folder: it is the converter's base, and nothing is saved under base/.
    for expert in family.experts:
        assert result.paths[expert]["base"] == (tiny_pipeline_dir(name) / expert).resolve()
    assert not (out / "base").exists()
    text = "\n".join(result.lines())
    assert all(str(p["fp8"]) in text for p in result.paths.values())
    if name == "wan22-a14b":  # one run calibrated both experts, each on its own side of the boundary
        boundary = family.boundary_ratio * 1000
        assert cal["forward_calls"]["transformer"] > 0 and cal["forward_calls"]["transformer_2"] > 0
        assert cal["timesteps"]["transformer"] and min(cal["timesteps"]["transformer"]) >= boundary
        assert cal["timesteps"]["transformer_2"] and max(cal["timesteps"]["transformer_2"]) < boundary
        amax = [load_amax_table(result.paths[e]["state"]) for e in family.experts]
        shared = [k for k in amax[0] if k.endswith("input_quantizer._amax")]
        assert shared and any(amax[0][k] != amax[1][k] for k in shared)


@pytest.mark.parametrize("name", NAMES)
def test_cli_end_to_end(name, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# mine\na red house at night\n\na green tree under the sky\na third one, unused\n")
    out = tmp_path / "cli-out"
    rc = main(["quantize", "--family", name, "--prompts-file", str(prompts), "--num-prompts", "2", "--seed", "1",
               "--output-dir", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    experts = get_family(name).experts
    for expert in experts:
        assert f"FP8 checkpoint   {expert}: {out / 'fp8' / expert}" in captured.out
        assert not inspect_checkpoint(out / "fp8" / expert).problems
        assert (out / f"{expert}.pt").is_file() and (out / "export" / expert / "config.json").is_file()
    summary = json.loads((out / "quantize.json").read_text())
    assert summary["calibration"]["prompts"] == ["a red house at night", "a green tree under the sky"]
    assert summary["calibration"]["dtype"] == "float32"  # --dtype auto on CPU
    assert all(summary["calibration"]["forward_calls"][e] > 0 for e in experts)
    assert "fp8cookbook compare --family" in captured.out


def test_a14b_expert_without_calibration_names_quantizer_and_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "out"  # parents are created, and removed again on failure
    rc = main(["quantize", "--family", "wan22", "--calib-steps", "1", "--num-prompts", "1", "--output-dir", str(out),
               "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    errors = [line for line in err if line.startswith("fp8cookbook quantize: error:")]
    assert len(errors) == 1 and errors[0] == err[-1]
    assert "transformer_2: " in errors[0] and "blocks.3.attn1.to_q.input_quantizer" in errors[0]
    assert "never ran" in errors[0] and "[999.0]" in errors[0]
    assert not (tmp_path / "new").exists()
    assert _leftovers(tmp_path) == []


def test_existing_output_refused_then_overwritten(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["quantize", "--family", "flux1", "--num-prompts", "1", "--calib-steps", "1", "--output-dir", str(out),
            "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fp8cookbook quantize: error: {out}: already exists (pass --overwrite to replace it)"]
    assert (out / "keep.txt").read_text() == "mine"
    assert main(args + ["--overwrite"]) == 0
    assert not (out / "keep.txt").exists()
    assert not inspect_checkpoint(out / "fp8" / "transformer").problems
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("content", [b"\xff\xfe\x00binary", b"# nothing but a comment\n"])
def test_bad_prompts_file_is_one_line_exit_2(tmp_path, capsys, content):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(content)
    out = tmp_path / "out"
    assert main(["quantize", "--family", "flux1", "--prompts-file", str(bad), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fp8cookbook quantize: error: {bad}: "), err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_base_saved_in_bf16_when_pipeline_has_no_local_folder(tmp_path):
    pipe = build_tiny_pipeline("flux1").to(torch.float32)  # built in memory: no transformer folder to reuse
    reference = {k: v.to(torch.bfloat16) for k, v in pipe.transformer.state_dict().items()}
    result = quantize_pipeline("flux1", pipe, tmp_path / "out", num_prompts=1, progress=False)
    base = result.paths["transformer"]["base"]
    assert base == tmp_path / "out" / "base" / "transformer"
    tensors = scan_tensors(base)
    assert set(tensors) == set(reference)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    with TensorReader(base) as reader:
        assert all(torch.equal(reader.get(k), v) for k, v in reference.items())
    _check_fp8_folders(result, "flux1")
    assert result.convert_stats["transformer"].bf16_fallback_weights > 0


def test_bad_arguments_refused_before_quantizing(tmp_path):
    pipe = _pipe("flux1")
    own = tiny_pipeline_dir("flux1")
    with pytest.raises(Fp8CookbookError, match="holds the pipeline's own transformer weights"):
        quantize_pipeline("flux1", pipe, own, overwrite=True)
    with pytest.raises(Fp8CookbookError, match="num_frames"):
        quantize_pipeline("flux1", pipe, tmp_path / "a", num_frames=5)
    with pytest.raises(Fp8CookbookError, match="3 calibration prompts asked for, 2 available"):
        quantize_pipeline("flux1", pipe, tmp_path / "b", prompts=["a", "b"], num_prompts=3)
    with pytest.raises(Fp8CookbookError, match=r"has transformers \['transformer'\], but Wan2.2 T2V-A14B"):
        quantize_pipeline("wan22-a14b", pipe, tmp_path / "c")
    assert (own / "transformer" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert not any(True for n, _ in pipe.transformer.named_modules() if n.endswith("_quantizer"))


def test_quantize_mha_adds_attention_scales(tmp_path):
    result = quantize_pipeline("flux1", _pipe("flux1"), tmp_path / "out", num_prompts=1, quantize_mha=True,
                               progress=False)
    _check_fp8_folders(result, "flux1")
    stats = result.convert_stats["transformer"]
    assert stats.attention_scales > 0 and result.calibration["quantize_mha"]
    fp8 = result.paths["transformer"]["fp8"]
    assert (fp8 / "fp8cookbook_attention_scales.json").is_file()
    # The loader uses them by default ("auto": only long calls on a GPU, so none on this CPU), for every call with
    # fp8_attention="on" (True), never with "off", for every attention module ModelOpt calibrated.
    plain, report = load_fp8_transformer(fp8, dtype=torch.float32, fp8_attention="off")
    assert report.attention_scales_available and report.fp8_attention_layers == 0
    assert "Q/K/V scales present, not used" in "\n".join(report.lines())
    _, auto = load_fp8_transformer(fp8, dtype=torch.float32)
    assert auto.fp8_attention_mode == "auto" and auto.fp8_attention_layers == stats.attention_scales // 3
    assert "calls with >= 16384 keys on a GPU" in "\n".join(auto.lines())
    model, report = load_fp8_transformer(fp8, dtype=torch.float32, fp8_attention=True)
    assert report.fp8_attention_layers == len(attention_modules(model)) == stats.attention_scales // 3
    fam = get_family("flux1")
    inputs = fam.make_inputs(dict(model.config), height=64, width=64, text_len=8,
                             generator=torch.Generator().manual_seed(0))
    inputs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad(), count_fp8_attention_calls(model) as calls:
        out = model(**inputs)[0]
        ref = plain(**inputs)[0]
    assert all(c["fp8"] == 1 for c in calls.values()) and len(calls) == report.fp8_attention_layers
    assert not torch.equal(out, ref) and torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99
    # The pipeline benchmark times the FP8 checkpoint with FP8 attention.
    out = tmp_path / "bench.json"
    assert main(["bench", "--family", "flux1", "--model-path", str(tiny_pipeline_dir("flux1")), "--fp8",
                 str(result.output_dir / "fp8"), "--fp8-attention", "--device", "cpu", "--steps", "2", "--runs", "1",
                 "--warmup", "0", "--height", "32", "--width", "32", "--output", str(out)]) == 0
    bench = json.loads(out.read_text())
    assert bench["fp8_attention_layers"] == {"transformer": report.fp8_attention_layers}
    assert bench["settings"]["fp8_attention"] == "on" and bench["fp8_layers_ran"] == bench["fp8_layers"] > 0
    # Without the side file, asking for FP8 attention names the missing file.
    (fp8 / "fp8cookbook_attention_scales.json").unlink()
    with pytest.raises(Fp8CookbookError, match="fp8cookbook_attention_scales.json not found.*--quantize-mha"):
        load_fp8_transformer(fp8, dtype=torch.float32, fp8_attention=True)
    # ... while the default ("auto") just loads BF16 attention and says how to get FP8 attention.
    _, auto = load_fp8_transformer(fp8, dtype=torch.float32)
    assert auto.fp8_attention_layers == 0 and "quantize with --quantize-mha" in "\n".join(auto.lines())


def _is_modelopt(module: torch.nn.Module) -> bool:
    return any(c.__module__.startswith("modelopt.") for c in type(module).__mro__)


def _transformer_output(family_name: str, model: torch.nn.Module) -> torch.Tensor:
    family = get_family(family_name)
    inputs = family.make_inputs(dict(model.config), height=32, width=32, num_frames=5 if family.is_video else None,
                                text_len=8, dtype=next(model.parameters()).dtype,
                                device=next(model.parameters()).device, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(**inputs)[0]


@pytest.mark.parametrize("name, fails", [("flux1", False), ("wan22-a14b", True)])
def test_callers_pipeline_is_left_as_it_was(name, fails, tmp_path):
    """quantize_pipeline calibrates and exports copies: the caller's transformers keep their classes, weights and
    outputs (no ModelOpt QuantLinear left behind), after success and after a failed calibration alike."""
    pipe = _pipe(name)
    experts = get_family(name).experts
    own = {e: getattr(pipe, e) for e in experts}
    before = {e: {k: v.clone() for k, v in m.state_dict().items()} for e, m in own.items()}
    outputs = {e: _transformer_output(name, m) for e, m in own.items()}
    config = dict(pipe.config)
    if fails:  # one step never reaches transformer_2: the run stops, naming its quantizers
        with pytest.raises(Fp8CookbookError, match="never ran"):
            quantize_pipeline(name, pipe, tmp_path / "out", num_prompts=1, num_inference_steps=1, progress=False)
    else:
        _check_fp8_folders(quantize_pipeline(name, pipe, tmp_path / "out", num_prompts=1, progress=False), name)
    assert dict(pipe.config) == config
    for e in experts:
        model = getattr(pipe, e)
        assert model is own[e], f"pipe.{e} was replaced"
        quantized = [n for n, m in model.named_modules() if _is_modelopt(m)]
        assert not quantized, f"pipe.{e} holds ModelOpt modules: {quantized[:3]}"
        state = model.state_dict()
        assert set(state) == set(before[e]) and all(torch.equal(state[k], v) for k, v in before[e].items())
        assert torch.equal(_transformer_output(name, model), outputs[e])
    again = quantize_pipeline(name, pipe, tmp_path / "again", num_prompts=1, progress=False)  # "already holds
    _check_fp8_folders(again, name)  # ModelOpt quantizers: reload the pipeline" before


@pytest.mark.parametrize("fails", [False, True])
def test_given_up_pipeline_is_quantized_in_place_and_export_dropped(fails, tmp_path):
    """keep_pipeline=False: the pipeline's own transformers are quantized (no copy held meanwhile) and gone
    afterwards, also after a failure. keep_export=False: each export is removed once its checkpoint exists, the
    checkpoints are whole and quantize.json lists no export (the converter's stats still name where it came from)."""
    pipe = _pipe("wan22-a14b")
    own = pipe.transformer
    seen = []
    import fp8cookbook.quantize.pipeline as qp

    real_export = qp.export_transformer

    def spy(model, folder):  # the model exported is the pipeline's own object, not a copy
        seen.append(model)
        return real_export(model, folder)

    qp.export_transformer = spy
    try:
        if fails:  # one step never reaches transformer_2
            with pytest.raises(Fp8CookbookError, match="never ran"):
                quantize_pipeline("wan22-a14b", pipe, tmp_path / "out", num_prompts=1, num_inference_steps=1,
                                  progress=False, keep_pipeline=False, keep_export=False)
            assert not (tmp_path / "out").exists()
        else:
            result = quantize_pipeline("wan22-a14b", pipe, tmp_path / "out", num_prompts=1, progress=False,
                                       keep_pipeline=False, keep_export=False)
            assert seen and seen[0] is own
            assert not (tmp_path / "out" / "export").exists()
            for name, paths in result.paths.items():
                assert "export" not in paths and paths["fp8"].is_dir()
                assert not inspect_checkpoint(paths["fp8"]).problems
                stats = json.loads((paths["fp8"] / STATS_NAME).read_text())
                assert stats["export_dir"] == str(tmp_path / "out" / "export" / name)
            report = json.loads((tmp_path / "out" / "quantize.json").read_text())
            assert all("export" not in entry for entry in report["paths"].values())
    finally:
        qp.export_transformer = real_export
    assert pipe.transformer is None and pipe.transformer_2 is None
    with pytest.raises(Fp8CookbookError):  # a second call names what is missing instead of running a used-up model
        quantize_pipeline("wan22-a14b", pipe, tmp_path / "again", num_prompts=1, progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_callers_pipeline_back_on_its_gpu(tmp_path):
    """On a GPU the originals wait on the CPU while the copy calibrates, and come back to the GPU unchanged."""
    pipe = load_pipeline("flux1", device="cuda")
    own = pipe.transformer
    before = {k: v.clone() for k, v in own.state_dict().items()}
    output = _transformer_output("flux1", own)
    _check_fp8_folders(quantize_pipeline("flux1", pipe, tmp_path / "out", num_prompts=1, progress=False), "flux1")
    assert pipe.transformer is own and next(own.parameters()).device.type == "cuda"
    assert not any(_is_modelopt(m) for m in own.modules())
    assert all(torch.equal(own.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(_transformer_output("flux1", own), output)


def test_wan_download_with_float32_time_embedders_is_the_base(tmp_path):
    """A Wan2.2 download holds its `_keep_in_fp32_modules` (time embedders) in float32: that folder is still the
    converter's base, so quantize writes no second full BF16 copy (a reduced stand-in has the same dtypes)."""
    from fp8cookbook.standin import write_standin

    folder = tmp_path / "ti2v"
    write_standin("wan22-ti2v-5b", folder, size="reduced", progress=False)
    on_disk = scan_tensors(folder / "transformer")
    float32 = sorted(k for k, t in on_disk.items() if t.dtype == torch.float32)
    assert float32 and all("time_embedder" in k or "norm" in k or "scale_shift" in k for k in float32), float32
    pipe = load_pipeline("wan22-ti2v-5b", folder, dtype=torch.bfloat16)
    result = quantize_pipeline("wan22-ti2v-5b", pipe, tmp_path / "out", num_prompts=1, progress=False,
                               height=64, width=64, num_frames=5, num_inference_steps=2)
    assert result.paths["transformer"]["base"] == (folder / "transformer").resolve()
    assert not (tmp_path / "out" / "base").exists()
    fp8 = result.paths["transformer"]["fp8"]
    assert not inspect_checkpoint(fp8).problems
    model, report = load_fp8_transformer(fp8, device="cpu", dtype=torch.bfloat16)
    kept = {n: p.dtype for n, p in model.named_parameters() if "time_embedder" in n}
    assert kept and set(kept.values()) == {torch.float32}, kept  # as from_pretrained keeps them
    assert report.fp8_layers > 0


def test_a_model_with_nothing_to_quantize_is_refused_before_any_work(tmp_path):
    """Wan2.2 keeps its first and last three blocks BF16: a stand-in cut to 6 blocks or fewer has no FP8 layer.
    Seen on the H200 (`full_size.py --layers 4`): ModelOpt raised a raw RuntimeError after the base copy."""
    from fp8cookbook.standin import build_standin_pipeline

    pipe = build_standin_pipeline("wan22-ti2v-5b", size="reduced", layers=6, device="cpu")
    with pytest.raises(Fp8CookbookError, match=r"pipe.transformer: no Linear layer may become FP8.*first and last"):
        quantize_pipeline("wan22-ti2v-5b", pipe, tmp_path / "out", num_prompts=1, progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
