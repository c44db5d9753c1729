"""The cookbook notebooks and `fp8cookbook run`.

nbval (`pytest --nbval-lax tests notebooks`) executes every notebook on its defaults; these tests check what nbval
cannot: each .ipynb is what notebooks/template.py generates, the .ipynb files carry no outputs, every notebook has
the template's shape and the parameters papermill needs, bad parameters stop a run before any work, and
`fp8cookbook run` works end to end with `-p` overrides (read back from report.json, the notebook's results recorded
by name, every file with the id of the run that wrote it).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
papermill = pytest.importorskip("papermill")
nbformat = pytest.importorskip("nbformat")

from fp8cookbook import notebook as nb  # noqa: E402
from fp8cookbook import template  # noqa: E402
from fp8cookbook.checkpoint import inspect_checkpoint  # noqa: E402
from fp8cookbook.cli import main  # noqa: E402
from fp8cookbook.errors import Fp8CookbookError  # noqa: E402
from fp8cookbook.params import as_prompts  # noqa: E402
from fp8cookbook.report import REPORT_SCHEMA  # noqa: E402
from fp8cookbook.serve import sglang_command  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ["flux1", "flux2", "wan22"]
PARAMETERS = {"model_path", "device", "dtype", "prompts", "calibration_prompts", "num_calibration_prompts",
              "calibration_steps", "height", "width", "steps", "guidance_scale", "seed", "min_cosine",
              "min_step_cosine", "max_rel_l2", "min_psnr", "min_ssim", "keep_bf16", "output_dir", "run_bench",
              "compile"}


def _cells(notebook) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(c.cell_type, c.source.strip(), tuple(c.metadata.get("tags", ()))) for c in notebook.cells]


# ------------------------------------------------------------------------------------------ the notebook files
def test_notebooks_are_generated_from_the_template():
    """One template, no per-notebook copies: every .ipynb is what `python -m fp8cookbook.template` writes (fix a
    failure by editing notebooks/template.py and running that), and notebooks/ holds no other source."""
    assert template.main(["--check"]) == 0, "a notebook differs from the template: run python -m fp8cookbook.template"
    assert sorted(p.name for p in (ROOT / "notebooks").glob("*.py")) == ["template.py"]
    assert sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb")) == sorted(template.NOTEBOOKS) == NOTEBOOKS


def test_template_check_sees_a_hand_edit(tmp_path):
    for f in ["template.py"] + [f"{n}.ipynb" for n in NOTEBOOKS]:
        (tmp_path / f).write_text((ROOT / "notebooks" / f).read_text())
    edited = tmp_path / "flux2.ipynb"
    edited.write_text(edited.read_text().replace("FLUX.2-dev in FP8", "FLUX.2-dev in FP4"))
    assert template.main(["--check", "--folder", str(tmp_path)]) == 1
    assert edited.read_text().count("FP4") == 1  # --check writes nothing
    assert template.main(["--folder", str(tmp_path)]) == 0 and "FP4" not in edited.read_text()
    assert template.main(["--check", "--folder", str(tmp_path)]) == 0


def test_template_render_blocks_and_variables():
    spec = template.NOTEBOOKS["wan22"]
    text = "# %%\nall {{family}}\n#@ flux1 flux2\nflux only\n#@ wan22\nwan only\n#@ end\nall again\n"
    assert template.render(text, spec, {"family": "wan22-a14b"}) == "# %%\nall wan22-a14b\nwan only\nall again\n"
    with pytest.raises(ValueError, match="unknown variable {{nope}}"):
        template.render("# %%\n{{nope}}\n", spec, {})
    with pytest.raises(ValueError, match="notebook names"):
        template.render("# %%\n#@ flux3\n", spec, {})


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_ipynb_committed_without_outputs(name):
    notebook = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    dirty = [i for i, c in enumerate(notebook.cells)
             if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{name}.ipynb: cells {dirty} carry outputs; clear them (jupytext --to ipynb notebooks/{name}.py)"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_template_shape(name):
    """Title and intent, imports, the parameters cell, numbered sections, results, and the serve command last."""
    cells = jupytext.read(ROOT / "notebooks" / f"{name}.ipynb").cells
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith("# "), f"{name}: no title first"
    assert len(cells[0].source.split("\n\n")) >= 2, f"{name}: the title cell needs a paragraph of intent"
    assert cells[1].cell_type == "code" and "import" in cells[1].source, f"{name}: imports come second"
    assert cells[2].metadata.get("tags") == ["parameters"], f"{name}: the third cell must be tagged `parameters`"
    sections = [m.group(1, 2) for c in cells if c.cell_type == "markdown"
                for m in re.finditer(r"^## (\d+)\. (.+)$", c.source, re.M)]
    numbers = [int(n) for n, _ in sections]
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= 8, f"{name}: sections {sections}"
    titles = " / ".join(t for _, t in sections).lower()
    for word in ("quantize", "convert", "inspect", "load", "compare", "time", "results", "serve"):
        assert word in titles, f"{name}: no section about {word!r}: {titles}"
    assert "sglang_command" in cells[-3].source + cells[-1].source or "print(serve)" in cells[-1].source


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_parameters(name):
    params = papermill.inspect_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"))
    missing = (PARAMETERS | ({"num_frames", "family"} if name == "wan22" else set())) - set(params)
    assert not missing, f"{name}: parameters cell lacks {sorted(missing)}"
    defaults = {k: p["default"] for k, p in params.items()}
    assert defaults["model_path"] == "None", "the default must be the tiny offline pipeline"
    assert defaults["run_bench"] == "True" and defaults["compile"] == "False"
    assert defaults["output_dir"] == f'"outputs/{name}"'
    assert all(p["help"] for p in params.values()), f"{name}: every parameter needs a `# help` comment"


# ----------------------------------------------------------------------------------------- helpers of `run`
@pytest.mark.parametrize("text, value", [
    ("3", 3), ("-2", -2), ("0.5", 0.5), ("1e-3", 1e-3), ("True", True), ("False", False), ("None", None),
    ("outputs/x", "outputs/x"), ("a red fox", "a red fox"), ("true", "true"),
    ('["a cat", "a dog"]', ["a cat", "a dog"]), ("[1, 2]", [1, 2]), ("{min_cosine: 0.9}", {"min_cosine": 0.9}),
    ('["^blocks\\\\.0\\\\."]', ["^blocks\\.0\\."]),
])
def test_parse_value_like_papermill(text, value):
    assert nb.parse_value(text) == value


def test_parse_value_bad_list():
    with pytest.raises(Fp8CookbookError, match="JSON/YAML"):
        nb.parse_value('["unclosed"')


def test_find_notebook(tmp_path):
    path, preset = nb.find_notebook("flux1")
    assert path == ROOT / "notebooks" / "flux1.ipynb" and preset == {}
    path, preset = nb.find_notebook("wan22-ti2v-5b")
    assert path.name == "wan22.ipynb" and preset == {"family": "wan22-ti2v-5b", "output_dir": "outputs/wan22-ti2v-5b"}
    (tmp_path / "flux2.py").write_text(_SMALL)
    assert nb.find_notebook(str(tmp_path / "flux2.py"))[0].name == "flux2.py"
    with pytest.raises(Fp8CookbookError, match="known: flux1, flux2, wan22"):
        nb.find_notebook("flux3")
    with pytest.raises(Fp8CookbookError, match="no such notebook file"):
        nb.find_notebook("missing/flux1.ipynb")


def test_notebooks_not_found_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(nb, "notebooks_dir", lambda: tmp_path / "notebooks")
    with pytest.raises(Fp8CookbookError, match=r"pip install -e \."):
        nb.find_notebook("flux1")


def test_run_refuses_unknown_parameter(capsys):
    assert main(["run", "flux1", "-p", "sed", "3"]) == 2
    err = capsys.readouterr().err
    assert "unknown parameter(s) sed" in err and "seed" in err and err.count("\n") == 1, err


def test_help_notebook(capsys):
    assert main(["run", "wan22-ti2v-5b", "--help-notebook"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"family\s+'wan22-ti2v-5b'", out) and re.search(r"num_frames\s+None", out), out


def test_sglang_command_per_family():
    flux1 = sglang_command("flux1", "black-forest-labs/FLUX.1-dev", {"transformer": "out/fp8/transformer"},
                           prompt="a red house", height=1024, width=1024, steps=28, guidance_scale=3.5, seed=0)
    assert flux1.startswith("sglang generate --model-path black-forest-labs/FLUX.1-dev")
    assert "--transformer-path out/fp8/transformer" in flux1 and "--transformer-2-path" not in flux1
    assert "--dit-cpu-offload false --dit-layerwise-offload false" in flux1
    assert "--prompt 'a red house'" in flux1 and "--num-frames" not in flux1 and "--num-gpus" not in flux1
    a14b = sglang_command("wan22", "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
                          {"transformer": "w/transformer", "transformer_2": "w/transformer_2"},
                          prompt="a fox", height=480, width=832, num_frames=81, steps=40)
    for flag in ("--transformer-path w/transformer", "--transformer-2-path w/transformer_2", "--num-gpus 4",
                 "--ulysses-degree 4", "--dit-cpu-offload false --dit-layerwise-offload false", "--num-frames 81"):
        assert flag in a14b, (flag, a14b)
    five = sglang_command("wan22-ti2v-5b", "Wan-AI/Wan2.2-TI2V-5B-Diffusers", {"transformer": "t"}, prompt="x")
    assert "--num-gpus" not in five and "--transformer-2-path" not in five
    assert "--text-encoder-cpu-offload true" in sglang_command("flux2", "m", {"transformer": "t"}, prompt="x")
    with pytest.raises(Fp8CookbookError, match="transformer, transformer_2"):
        sglang_command("wan22", "m", {"transformer_3": "t"}, prompt="x")
    repo = sglang_command("wan22", "w/repo", None, prompt="a fox", num_frames=81)  # a full repo: no path flags
    assert repo.startswith("sglang generate --model-path w/repo") and "--transformer" not in repo
    assert "--num-gpus 4" in repo and "--dit-cpu-offload false" in repo and "--num-frames 81" in repo


def test_as_prompts(tmp_path):
    assert as_prompts("a cat") == ["a cat"]
    assert as_prompts(["a", "b"]) == ["a", "b"]
    assert as_prompts(None, optional=True) is None
    (tmp_path / "p.txt").write_text("# mine\na cat\n\na dog\n")
    assert as_prompts(str(tmp_path / "p.txt"), files=True) == ["a cat", "a dog"]
    with pytest.raises(Fp8CookbookError, match="non-empty"):
        as_prompts([])


# ------------------------------------------------------------------------------------- `run`, end to end
_SMALL = '''# %% [markdown]
# # A small notebook

# %% tags=["parameters"]
values = [1]  # numbers
fail = False  # raise on purpose
output_dir = "outputs/small"  # where report.json goes

# %%
import json, pathlib
if fail:
    raise ValueError("asked to fail")
pathlib.Path(output_dir).mkdir(parents=True, exist_ok=True)
pathlib.Path(output_dir, "report.json").write_text(json.dumps(
    {"passed": sum(values) > 0, "values": values, "summary": [{"what": "sum", "result": str(sum(values))}]}))
'''


def test_run_a_jupytext_file(tmp_path, monkeypatch, capsys):
    """A .py path runs too; -p lists arrive as lists; output_dir defaults under the current directory."""
    source = tmp_path / "small.py"
    source.write_text(_SMALL)
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(source), "-p", "values", "[2, 3]", "--quiet"]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "outputs" / "small" / "report.json").read_text())
    assert report["values"] == [2, 3]
    assert (tmp_path / "outputs" / "small" / "small.ipynb").is_file()
    assert "executed" in out and re.search(r"^sum\s+5$", out, re.M), out
    assert main(["run", str(source), "-p", "values", "[-1]", "--quiet"]) == 1  # report says not passed
    assert main(["run", str(source), "-p", "fail", "True", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "stopped in cell" in err and "ValueError: asked to fail" in err and err.count("\n") <= 2, err


DOCS = [ROOT / "README.md", ROOT / "SKILL.md", *sorted((ROOT / "skills").glob("*/SKILL.md"))]


def _check_documented_output_paths(flux1_out: Path) -> None:
    """Every outputs/... path in the README and the skills is a folder `fp8cookbook run` writes, and what it names
    inside is in a real run's output (`flux1_out`; another notebook's executed copy and Wan2.2 A14B's second expert
    are checked by name)."""
    from fp8cookbook.families import get_family

    folders = {spec.output_dir: spec.families[0] for spec in template.NOTEBOOKS.values()}
    folders.update({preset["output_dir"]: preset["family"] for _, preset in nb.NOTEBOOK_ALIASES.values()})
    found = 0
    for doc in DOCS:
        for path in re.findall(r"(?<![\w/.-])outputs/[A-Za-z0-9_./-]*[A-Za-z0-9_/]", doc.read_text()):
            found += 1
            parts = path.rstrip("/").split("/")
            folder, rest = "/".join(parts[:2]), parts[2:]
            assert folder in folders, f"{doc.name}: {path}: `fp8cookbook run` writes no folder {folder}"
            family = get_family(folders[folder])
            notebook = next(n for n, spec in template.NOTEBOOKS.items() if family.name in spec.families)
            if rest == [f"{notebook}.ipynb"]:
                rest = ["flux1.ipynb"]
            if "transformer_2" in rest:
                assert "transformer_2" in family.experts, f"{doc.name}: {path}: {family.title} has one transformer"
                rest = ["transformer" if r == "transformer_2" else r for r in rest]
            assert (flux1_out.joinpath(*rest)).exists(), f"{doc.name}: {path}: a run writes no {'/'.join(rest)}"
    assert found >= 5


def test_run_flux1_with_overrides(tmp_path, capsys):
    """README's main command with papermill overrides: seed and keep_bf16 reach every step; output_dir holds all."""
    out_dir = tmp_path / "flux1 run"
    keep = r'["^single_transformer_blocks\\."]'
    old_umask = os.umask(0o022)
    try:
        assert main(["run", "flux1", "-p", "output_dir", str(out_dir), "-p", "seed", "3", "-p", "keep_bf16", keep,
                     "--quiet"]) == 0
    finally:
        os.umask(old_umask)
    # every folder and file of the run is what a plain write gives under umask 022: readable by another user
    modes = {str(p.relative_to(out_dir)): p.stat().st_mode & 0o777 for p in [out_dir, *out_dir.rglob("*")]
             if not p.is_symlink()}
    assert {k: oct(v) for k, v in modes.items() if v != (0o755 if (out_dir / k).is_dir() else 0o644)} == {}
    printed = capsys.readouterr().out
    report = json.loads((out_dir / "report.json").read_text())
    assert report["schema"] == REPORT_SCHEMA and report["passed"] is True, report["failures"]
    assert report["settings"]["seed"] == 3 and report["quantize"]["calibration"]["seed"] == 3
    assert [c["settings"]["seed"] for c in report["compare"]["prompts"]] == [3]
    assert report["settings"]["keep_bf16"] == ["^single_transformer_blocks\\."]
    stats = report["convert"]["transformer"]
    assert stats["bf16_fallback_weights"] > 7, stats  # FLUX.1's 7 fallbacks plus the single block's layers
    assert any(p.startswith("single_transformer_blocks.0.attn.to_q") for p in stats["ignore"]), stats["ignore"]
    checkpoint = Path(report["checkpoint"]["transformer"])
    assert checkpoint == out_dir / "checkpoint" / "fp8" / "transformer"
    assert not inspect_checkpoint(checkpoint).problems
    assert len(report["load"]["warnings"]) == 2 and "offload disabled" in report["load"]["warnings"][0]
    assert report["bench"]["fp8_layers_ran"] == report["bench"]["fp8_layers"] > 0
    assert f"--transformer-path '{checkpoint}'" in report["serve"]  # quoted: the folder name has a space
    assert "--dit-cpu-offload false --dit-layerwise-offload false" in report["serve"] and "--seed 3" in report["serve"]
    repo = out_dir / "checkpoint" / "repo"  # both serve forms: base + --transformer-path, and the full repo alone
    assert report["serve_repo"].startswith(f"sglang generate --model-path '{repo}'")
    assert "--transformer-path" not in report["serve_repo"] and "--seed 3" in report["serve_repo"]
    from fp8cookbook.repo import detect_layout

    assert detect_layout(repo).fp8_components() == ["transformer"]
    assert (repo / "vae").is_dir() and all(p.is_symlink() for p in (repo / "vae").iterdir())
    for line in (f"executed             {out_dir / 'flux1.ipynb'}", f"report               {out_dir / 'report.json'}",
                 f"checkpoint           transformer: {checkpoint}", "serve with SGLang:", "  sglang generate",
                 "or the full repo alone:"):
        assert line in printed, (line, printed)
    executed = nbformat.read(out_dir / "flux1.ipynb", as_version=4)
    assert not [o for c in executed.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    images = [o for c in executed.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # step metrics, decoded images, the static steps strip
    assert (out_dir / "compare" / "prompt0" / "steps.png").is_file() and (out_dir / "bench.json").is_file()
    # every step is a measured stage: time, host peak, bytes written; quantize's own stages nest inside it
    stages = {r["name"]: r for r in report["stages"]}
    assert list(stages) == ["load_bf16", "calibrate", "state", "export", "convert", "quantize",
                            "convert transformer (keep_bf16)", "load_bf16 (reference)", "load_fp8", "compare prompt0",
                            "bench"], list(stages)
    assert all(r["status"] == "ok" and r["seconds"] > 0 and r["peak_rss_mb"] > 0 for r in report["stages"])
    assert stages["quantize"]["seconds"] >= stages["calibrate"]["seconds"]
    assert stages["quantize"]["bytes_written"] == stages["quantize"]["output_bytes"] > 0  # a cleared folder
    assert stages["compare prompt0"]["bytes_written"] > 0
    assert {n for n, r in stages.items() if r["outer"] == "quantize"} == {"calibrate", "state", "export", "convert"}
    assert any(r["what"] == "time and memory" and "quantize" in r["result"] for r in report["summary"])

    _check_documented_output_paths(out_dir)

    # the CLI twin of section 6, on its defaults, gives the notebook's numbers (float32 on CPU, the same prompt)
    assert report["settings"]["dtype"] == "torch.float32"
    cli = tmp_path / "cli compare"
    rc = main(["compare", "--family", "flux1", "--candidate", str(checkpoint), "--seed", "3", "--output-dir", str(cli),
               "--quiet"])
    capsys.readouterr()
    twin = json.loads((cli / "compare.json").read_text())
    mine = report["compare"]["prompts"][0]
    assert rc == 0 and twin["environment"]["dtype"] == mine["dtype"] == "float32"
    assert twin["settings"]["prompt"] == mine["prompt"]
    assert twin["thresholds"] == report["compare"]["thresholds"]  # the CLI's default bounds are the notebook's
    assert twin["final_latents"]["cosine"] == pytest.approx(mine["final_latents"]["cosine"], abs=1e-9)
    assert twin["decoded"]["frame_sets"]["all"]["psnr"] == pytest.approx(mine["psnr"], abs=1e-6)


def test_run_wan22_ti2v_5b(tmp_path, capsys):
    """TI2V-5B through the wan22 notebook, chosen by name (the `family` parameter), without the benchmark, with the
    FP8-attention opt-in: --quantize-mha calibration, scale side file, FP8 attention in the compared model."""
    out_dir = tmp_path / "w"
    (out_dir / "compare" / "prompt7").mkdir(parents=True)  # an earlier run's outputs: none may survive this one
    (out_dir / "bench.json").write_text('{"speedup": 9.9}')
    (out_dir / "compare" / "prompt7" / "compare.json").write_text("{}")
    assert main(["run", "wan22-ti2v-5b", "-p", "output_dir", str(out_dir), "-p", "run_bench", "False",
                 "-p", "fp8_attention", "True", "--quiet"]) == 0
    report = json.loads((out_dir / "report.json").read_text())
    assert report["family"] == "wan22-ti2v-5b" and report["bench"] is None and report["passed"] is True
    assert report["settings"]["fp8_attention"] is True
    assert report["load"]["components"]["transformer"]["fp8_attention_layers"] > 0
    assert (Path(report["checkpoint"]["transformer"]) / "fp8cookbook_attention_scales.json").is_file()
    assert list(report["checkpoint"]) == ["transformer"] and "--num-frames 5" in report["serve"]
    assert not (out_dir / "bench.json").exists() and not (out_dir / "compare" / "prompt7").exists()
    on_disk = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    assert sorted(report["files"]) == on_disk and set(report["files"].values()) == {report["run_id"]}
    assert "checkpoint/fp8/transformer/config.json" in report["files"] and "wan22.ipynb" in report["files"]
    capsys.readouterr()


def test_outputs_folder_is_ignored():
    """nbval runs the notebooks inside notebooks/, whose default output_dir is outputs/NAME there."""
    assert "outputs/" in (ROOT / "notebooks" / ".gitignore").read_text().split()


# ------------------------------------------------------------------------------------------------ Jupyter
def test_notebooks_extra_has_a_front_end_and_nbconvert():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["notebooks"]
    names = {re.split(r"[<>=\[ ]", r, maxsplit=1)[0].lower() for r in extra}
    assert {"jupyterlab", "nbconvert", "ipykernel"} <= names, names
    readme = (ROOT / "README.md").read_text()
    assert "jupyter lab notebooks/" in readme and "jupyter nbconvert" in readme, "README must say how to open them"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_opens_in_jupyter_and_converts(name, tmp_path):
    """What the front end does on opening (the Jupyter server's contents manager, which validates the notebook),
    and what nbconvert does to export it (script and HTML)."""
    pytest.importorskip("jupyterlab")
    from jupyter_server.services.contents.filemanager import FileContentsManager
    from nbconvert import HTMLExporter, PythonExporter

    model = FileContentsManager(root_dir=str(ROOT / "notebooks")).get(f"{name}.ipynb")
    assert model["type"] == "notebook" and model["format"] == "json" and not model.get("message"), model.get("message")
    notebook = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    script, _ = PythonExporter().from_notebook_node(notebook)
    assert f'workflow.start("{name}", globals())' in script and "workflow.results(run)" in script
    html, _ = HTMLExporter().from_notebook_node(notebook)
    assert "in FP8" in html and "<html" in html
