"""Notebook parameters are checked in one place before any work (issue: a bad `-p steps -3` used to fail after
quantize ran, and `-p height 63` in bench, naming a flag the user never typed); one folder per family variant."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

papermill = pytest.importorskip("papermill")

from fp8cookbook import template, workflow  # noqa: E402
from fp8cookbook.cli import main  # noqa: E402
from fp8cookbook.errors import Fp8CookbookError  # noqa: E402
from fp8cookbook.notebook import _default, find_notebook, notebook_parameters  # noqa: E402
from fp8cookbook.params import validate_notebook_parameters  # noqa: E402


@pytest.fixture
def no_kernel(monkeypatch):
    """papermill must not be reached: a bad parameter is refused before a kernel starts."""
    def refuse(*args, **kwargs):
        raise AssertionError("papermill started a kernel although a parameter was bad")

    monkeypatch.setattr(papermill, "execute_notebook", refuse)


@pytest.fixture
def captured(monkeypatch):
    """Record what `fp8cookbook run` hands papermill instead of running the notebook."""
    calls = []

    def fake(source, executed, parameters, **kwargs):
        calls.append(dict(parameters))
        raise papermill.PapermillExecutionError(0, 1, "stopped by the test", "Stop", "stopped by the test", [])

    monkeypatch.setattr(papermill, "execute_notebook", fake)
    return calls


@pytest.mark.parametrize("notebook, name, value, allowed", [
    ("flux1", "steps", "-3", "an integer >= 1"),
    ("flux1", "steps", "0", "an integer >= 1"),
    ("flux1", "steps", "abc", "an integer >= 1"),
    ("flux1", "height", "63", "a multiple of 16"),
    ("wan22-ti2v-5b", "width", "48", "a multiple of 32"),
    ("wan22", "num_frames", "6", "4k+1"),
    ("wan22", "family", "flux1", "one of 'wan22-a14b', 'wan22-ti2v-5b'"),
    ("flux2", "seed", "-1", "an integer >= 0"),
    ("flux1", "min_cosine", "2", "a number from -1 to 1"),
    ("flux1", "keep_bf16", '["(unclosed"]', "regular expressions"),
    ("flux1", "prompts", "[]", "non-empty list"),
    ("flux1", "dtype", "int8", "one of 'auto', 'bfloat16'"),
    ("flux1", "device", "tpu", "'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("flux1", "run_bench", "yes", "True or False"),
    ("flux1", "fp8_attention", "maybe", "one of 'auto', 'on', 'off'"),
    ("flux1", "num_calibration_prompts", "0.5", "an integer >= 1"),
    ("flux1", "model_path", "/no/such/folder", "is not a folder"),
])
def test_bad_parameter_refused_before_any_work(notebook, name, value, allowed, tmp_path, capsys, no_kernel):
    out = tmp_path / "out"
    t0 = time.perf_counter()
    rc = main(["run", notebook, "-p", name, value, "-p", "output_dir", str(out)])
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    given, _, allowed_part = err.partition("; allowed: ")
    assert f"-p {name}: got " in given and value.strip("[]\"") in given and allowed in allowed_part, err
    assert not out.exists(), "nothing may be written for a refused run"
    assert seconds < 10, f"{seconds:.1f} s to refuse a parameter"


def test_every_problem_in_one_line(capsys, no_kernel):
    assert main(["run", "flux1", "-p", "steps", "0", "-p", "height", "63"]) == 2
    err = capsys.readouterr().err
    assert "-p steps: got 0" in err and "-p height: got 63" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("name", sorted(template.NOTEBOOKS))
def test_defaults_pass_and_check_fast(name):
    """Every notebook's own defaults are allowed; the check itself takes well under a second."""
    path, _ = find_notebook(name)
    defaults = {k: _default(p) for k, p in notebook_parameters(path).items()}
    spec = template.NOTEBOOKS[name]
    validate_notebook_parameters(defaults, families=spec.families)  # imports warm
    t0 = time.perf_counter()
    checked = validate_notebook_parameters(defaults, families=spec.families)
    assert time.perf_counter() - t0 < 1.0
    assert checked["prompts"] == defaults["prompts"]


def test_notebook_check_names_the_variable(tmp_path):
    """In Jupyter the user edited `steps = -3`: the first cell says `parameter steps`, before any model loads."""
    namespace = {"model_path": None, "device": "cpu", "dtype": "auto", "prompts": ["a"], "steps": -3, "seed": 0,
                 "output_dir": str(tmp_path / "o")}
    with pytest.raises(Fp8CookbookError, match=r"^parameter steps: got -3; allowed: an integer >= 1, or None$"):
        workflow.start("flux1", namespace)
    assert not (tmp_path / "o").exists()


def test_values_are_cleaned():
    out = validate_notebook_parameters({"prompts": "one prompt", "keep_bf16": "^a\\.", "family": "wan22"},
                                       families=("wan22-a14b", "wan22-ti2v-5b"))
    assert out == {"prompts": ["one prompt"], "keep_bf16": ["^a\\."], "family": "wan22-a14b"}


# ------------------------------------------------------------------------------------ one folder per variant
@pytest.mark.parametrize("argv, folder", [
    (["wan22", "-p", "family", "wan22-ti2v-5b"], "outputs/wan22-ti2v-5b"),  # the form `run --help` shows
    (["wan22-ti2v-5b"], "outputs/wan22-ti2v-5b"),
    (["wan22"], "outputs/wan22"),
    (["wan22", "-p", "family", "wan22-a14b"], "outputs/wan22"),
    (["wan22", "-p", "family", "wan22-ti2v-5b", "-p", "output_dir", "mine"], "mine"),
    (["flux1"], "outputs/flux1"),
])
def test_one_output_folder_per_family_variant(argv, folder, tmp_path, monkeypatch, captured, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", *argv, "--quiet"]) == 2
    assert Path(captured[0]["output_dir"]) == tmp_path / folder
    assert captured[0]["run_id"]  # the run's id reaches the notebook, which records it beside every file
    capsys.readouterr()


def test_variant_folder_in_jupyter():
    """A Jupyter user who only changes `family` gets the variant's own folder too."""
    assert workflow.variant_output_dir("outputs/wan22", "wan22-ti2v-5b", "wan22-a14b", "outputs/wan22") \
        == "outputs/wan22-ti2v-5b"
    assert workflow.variant_output_dir("outputs/wan22", "wan22-a14b", "wan22-a14b", "outputs/wan22") == "outputs/wan22"
    assert workflow.variant_output_dir("/x/outputs/wan22", "wan22-ti2v-5b", "wan22-a14b", "outputs/wan22") \
        == "/x/outputs/wan22"


def test_run_clears_stale_outputs_first(tmp_path, captured, capsys):
    """A run that fails must not leave the previous run's bench.json (or comparison, or report) behind."""
    out = tmp_path / "o"
    (out / "compare" / "prompt0").mkdir(parents=True)
    for stale in ("bench.json", "report.json", "flux1.ipynb", "compare/prompt0/compare.json"):
        (out / stale).write_text("{}")
    (out / "mine.txt").write_text("not the notebook's")
    assert main(["run", "flux1", "-p", "output_dir", str(out), "--quiet"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    capsys.readouterr()


@pytest.fixture
def cpu_only_torch(monkeypatch):
    """A CPU-only torch build, on any machine: no CUDA compiled in, no GPU."""
    import torch

    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("argv", [
    ["load", "{ckpt}", "--device", "cuda"],
    ["compare", "--family", "flux1", "--candidate", "{ckpt}", "--output-dir", "{out}", "--device", "cuda"],
    ["quantize", "--family", "flux1", "--output-dir", "{out}", "--device", "cuda:0"],
    ["bench", "--family", "flux1", "--synthetic", "tiny", "--device", "cuda"],
    ["run", "flux1", "-p", "device", "cuda", "-p", "output_dir", "{out}"],
])
def test_cuda_on_cpu_only_torch_is_one_line_before_work(argv, cpu_only_torch, handmade, tmp_path, capsys, no_kernel,
                                                        monkeypatch):
    import fp8cookbook.compare
    import fp8cookbook.loader

    def reached(*args, **kwargs):
        raise AssertionError("slow work started although the device cannot run")

    monkeypatch.setattr(fp8cookbook.loader, "_empty_model", reached)
    monkeypatch.setattr(fp8cookbook.compare, "load_transformer", reached)
    out = tmp_path / "out"
    argv = [a.format(ckpt=handmade["export"], out=out) for a in argv]
    t0 = time.perf_counter()
    rc = main(argv)
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith(f"fp8cookbook {argv[0]}: error: "), err
    assert "device" in last and "this torch has no CUDA" in last and "AssertionError" not in err, err
    assert not out.exists() and seconds < 10


def test_cuda_on_cpu_only_torch_in_python(cpu_only_torch, handmade):
    from fp8cookbook.loader import load_fp8_transformer

    with pytest.raises(Fp8CookbookError, match=r"^device cuda: this torch has no CUDA .*CPU-only build"):
        load_fp8_transformer(handmade["export"], device="cuda")
    with pytest.raises(Fp8CookbookError, match=r"^device cuda:1: this torch has no CUDA"):
        workflow.resolve_device("cuda:1")
    assert workflow.resolve_device("auto") == "cpu"
