"""`fp8cookbook run`: find a cookbook notebook, check its parameters, and execute it with papermill.

The notebooks are generated from `notebooks/template.py` (`python -m fp8cookbook.template`); what their cells call
lives in `workflow` (the steps), `report` (report.json), `plots` (figures) and `serve` (the SGLang command). This
module only runs them: every parameter is checked (`params`) before a kernel starts, the outputs of an earlier run
are removed, and the run gets an id that report.json records beside every file it wrote.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import Fp8CookbookError
from .report import OUTPUT_NAMES, REPORT_NAME, clear_outputs, new_run_id
from .template import NOTEBOOK_ALIASES, NOTEBOOKS


# ------------------------------------------------------------------------------------------- finding notebooks
def notebooks_dir() -> Path:
    """`notebooks/` of the repository the package is installed from (editable install: `pip install -e .`)."""
    return Path(__file__).resolve().parent.parent / "notebooks"


def find_notebook(name: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """A notebook name (`flux1`, `wan22`, `wan22-ti2v-5b`) or path -> (the .ipynb or .py file, preset parameters)."""
    text = os.fspath(name)
    path = Path(text).expanduser()
    if path.suffix in (".ipynb", ".py") or os.sep in text or path.is_file():
        if not path.is_file():
            raise Fp8CookbookError(f"{text}: no such notebook file")
        return path.resolve(), {}
    stem, preset = NOTEBOOK_ALIASES.get(text, (text, {}))
    folder = notebooks_dir()
    candidate = folder / f"{stem}.ipynb"
    if candidate.is_file():
        return candidate, dict(preset)
    known = sorted(p.stem for p in folder.glob("*.ipynb")) if folder.is_dir() else []
    if known:
        names = ", ".join(known + sorted(NOTEBOOK_ALIASES))
        raise Fp8CookbookError(f"no notebook named {text!r} in {folder}; known: {names} "
                               "(or pass a path to an .ipynb or jupytext .py file)")
    raise Fp8CookbookError(f"{folder}: no notebooks there. fp8cookbook finds them in the repository it was installed "
                           "from (`pip install -e .` in a clone); pass a path to an .ipynb or jupytext .py file instead")


def parse_value(text: str) -> Any:
    """A `-p NAME VALUE` value the way papermill's own `-p` reads it (True/False/None, int, float, else the string),
    plus JSON/YAML for values that start with `[` or `{` (lists of prompts, thresholds)."""
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.lstrip()[:1] in ("[", "{"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            problem = str(e).replace("\n", " ")
            raise Fp8CookbookError(f"cannot read {text!r} as a JSON/YAML list or mapping: {problem}") from None
    return text


def notebook_parameters(path: Path) -> dict[str, dict[str, Any]]:
    """The parameters cell of a notebook: name -> {"default", "inferred_type_name", "help"} (papermill's view)."""
    import papermill

    return papermill.inspect_notebook(str(path))


def _default(param: dict[str, Any]) -> Any:
    try:
        return ast.literal_eval(param["default"])
    except (ValueError, SyntaxError):
        return None


@dataclass
class RunResult:
    """Where `run_notebook` put things; `report` is report.json as written by the notebook."""

    source: Path
    executed: Path
    output_dir: Path
    report_path: Path
    report: dict[str, Any]
    seconds: float

    @property
    def passed(self) -> bool:
        return bool(self.report.get("passed"))

    def lines(self) -> list[str]:
        r = self.report
        out = [f"notebook             {self.source} ({self.seconds:.1f} s)",
               f"executed             {self.executed}",
               f"report               {self.report_path}"]
        for name, path in (r.get("checkpoint") or {}).items():
            out.append(f"checkpoint           {name}: {path}")
        for row in r.get("summary", []):
            out.append(f"{row['what']:20s} {row['result']}")
        out += [f"MISSED               {f}" for f in r.get("failures", [])]
        if r.get("serve"):
            out += ["serve with SGLang:", "  " + r["serve"].replace("\n", "\n  ")]
        if r.get("serve_repo"):
            out += ["or the full repo alone:", "  " + r["serve_repo"].replace("\n", "\n  ")]
        for note in r.get("notes", []):
            out.append(f"note                 {note}")
        return out


def run_notebook(notebook: str | os.PathLike, parameters: dict[str, Any] | None = None, *, progress: bool = True,
                 kernel_name: str | None = None) -> RunResult:
    """Execute a cookbook notebook with papermill; the executed copy and report.json land in its `output_dir`.

    `output_dir` (a parameter of every cookbook notebook) defaults to the notebook's own default taken relative to
    the current directory, and is passed to the kernel as an absolute path; the kernel runs in the current directory.
    Unknown parameter names are refused with the list of known ones.
    """
    import papermill

    source, preset = find_notebook(notebook)
    params = {**preset, **(parameters or {})}
    with contextlib.ExitStack() as stack:
        path = source
        try:
            import jupytext

            notebook = jupytext.read(source)
        except Exception as e:  # noqa: BLE001 - jupytext and nbformat raise many kinds; say which file
            raise Fp8CookbookError(f"{source}: cannot read as a notebook ({e})") from e
        if source.suffix == ".py" or not notebook.metadata.get("kernelspec", {}).get("name"):
            # execute the .ipynb form of a jupytext file; a notebook without a kernel gets this Python's
            import tempfile

            notebook.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3",
                                                        "language": "python"})
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fp8cookbook-run-")))
            path = tmp / f"{source.stem}.ipynb"
            jupytext.write(notebook, path)
        known = notebook_parameters(path)
        if not known:
            raise Fp8CookbookError(f"{source}: no cell tagged `parameters`; papermill cannot set anything in it")
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise Fp8CookbookError(f"{source.name}: unknown parameter(s) {', '.join(unknown)}; "
                                   f"known: {', '.join(known)}")
        spec = NOTEBOOKS.get(source.stem)
        if spec is not None:  # a cookbook notebook: every parameter checked now, before a kernel starts
            from .params import validate_notebook_parameters
            from .workflow import variant_output_dir

            defaults = {name: _default(p) for name, p in known.items()}
            checked = validate_notebook_parameters({**defaults, **params}, families=spec.families,
                                                   spelled=lambda name: f"-p {name}" if name in params else name)
            params.update({k: checked[k] for k in params if k in checked})
            if "output_dir" not in params:
                family = checked.get("family", spec.families[0])
                params["output_dir"] = variant_output_dir(spec.output_dir, family, spec.families[0], spec.output_dir)
        default_out = _default(known["output_dir"]) if "output_dir" in known else None
        out = Path(str(params.get("output_dir") or default_out or f"outputs/{source.stem}")).expanduser().resolve()
        if "output_dir" in known:
            params["output_dir"] = str(out)
        if "run_id" in known:
            params["run_id"] = new_run_id()
        executed = out / f"{source.stem}.ipynb"
        report_path = out / REPORT_NAME
        # never leave last run's results beside this one's: a failed run must not look like it benched
        clear_outputs(out, (OUTPUT_NAMES if spec is not None else (REPORT_NAME,)) + (executed.name,))
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        try:
            papermill.execute_notebook(str(path), str(executed), parameters=params, cwd=os.getcwd(),
                                       progress_bar=progress, log_output=False, kernel_name=kernel_name,
                                       # the kernel's own start-up chatter (e.g. the TCP transport notice) is noise here
                                       extra_arguments=["--IPKernelApp.log_level=CRITICAL"])
        except papermill.PapermillExecutionError as e:
            evalue = str(e.evalue).strip().splitlines()[0] if str(e.evalue).strip() else ""
            raise Fp8CookbookError(f"{source.name} stopped in cell {e.exec_count}: {e.ename}: {evalue} "
                                   f"(the executed notebook with the traceback: {executed})") from None
        seconds = time.perf_counter() - t0
    if not report_path.is_file():
        raise Fp8CookbookError(f"{source.name} ran but wrote no {REPORT_NAME} into {out}")
    report = json.loads(report_path.read_text())
    return RunResult(source, executed, out, report_path, report, seconds)
