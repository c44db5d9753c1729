"""What the cookbook notebooks share, and the `fp8cookbook run` command.

The notebooks (`notebooks/flux1`, `flux2`, `wan22`) are narrative, parameters and calls into the library; the few
things they need that are not part of the FP8 workflow itself live here:

- finding and running a notebook through papermill: `find_notebook`, `parse_value`, `run_notebook`;
- runtime choices: `runtime` (device, dtype, CPU threads), `generation_settings`, `load_fp8_transformers`;
- the per-step view of the two trajectories: `record_latents` and `step_viewer` (an ipywidgets slider in a live
  kernel, and always a static figure, which is what an executed or exported notebook shows);
- the results: `NotebookReport` (written to `output_dir/report.json`, read back by tests and `fp8cookbook run`);
- serving: `sglang_command`, the exact `sglang generate` line for the checkpoint that was written.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import math
import os
import shlex
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .errors import Fp8CookbookError
from .families import Family, get_family

if TYPE_CHECKING:
    import numpy as np
    import torch
    from matplotlib.figure import Figure

REPORT_NAME = "report.json"
REPORT_SCHEMA = "fp8cookbook.notebook/1"
# `fp8cookbook run NAME`: a family name that is not a notebook of its own runs the notebook that covers it.
NOTEBOOK_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "wan22-a14b": ("wan22", {"family": "wan22-a14b", "output_dir": "outputs/wan22-a14b"}),
    "wan22-ti2v-5b": ("wan22", {"family": "wan22-ti2v-5b", "output_dir": "outputs/wan22-ti2v-5b"}),
}


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
        default_out = _default(known["output_dir"]) if "output_dir" in known else None
        out = Path(str(params.get("output_dir") or default_out or f"outputs/{source.stem}")).expanduser().resolve()
        if "output_dir" in known:
            params["output_dir"] = str(out)
        out.mkdir(parents=True, exist_ok=True)
        executed = out / f"{source.stem}.ipynb"
        report_path = out / REPORT_NAME
        report_path.unlink(missing_ok=True)  # never print last run's results for this one
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


# ---------------------------------------------------------------------------------------------------- runtime
def runtime(device: str | None = "auto", dtype: str = "auto", *, tiny: bool = False) -> tuple[str, "torch.dtype"]:
    """(device, torch dtype) for a notebook run, printed in one line.

    `device` "auto": CUDA when available, else CPU. `dtype` "auto": bfloat16 on CUDA, float32 on CPU (CPU bfloat16
    matmuls are about 10x slower than float32). With `tiny`, loading progress bars are off, and on CPU torch runs
    on one thread: the matrices are so small that waking a thread pool costs more than the arithmetic.
    """
    import torch

    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise Fp8CookbookError(f"device {device!r}: CUDA is not available here (use device='cpu' or 'auto')")
    dtypes = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
              "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    elif dtype in dtypes:
        torch_dtype = dtypes[dtype]
    else:
        raise Fp8CookbookError(f"dtype {dtype!r}: expected 'auto' or one of {', '.join(dtypes)}")
    threads = ""
    if tiny:  # loading a pipeline of a few MB needs no progress bars, nor advice about torchvision
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        if str(device) == "cpu":
            torch.set_num_threads(1)
            threads = ", 1 CPU thread (tiny model)"
    print(f"device {device}, {str(torch_dtype).replace('torch.', '')}{threads}, torch {torch.__version__}")
    return str(device), torch_dtype


def as_prompts(value: Any, *, optional: bool = False, files: bool = False) -> list[str] | None:
    """A notebook's prompt parameter as a list: one string is one prompt (or, with `files`, the prompts file it
    names: one prompt per line, `#` comments), a list is a list of strings; None only where `optional`."""
    if value is None and optional:
        return None
    if isinstance(value, str):
        if files and Path(value).expanduser().is_file():
            from .quantize import calibration_prompts

            return calibration_prompts(value)
        value = [value]
    prompts = [str(p) for p in value]
    if not prompts or not all(p.strip() for p in prompts):
        raise Fp8CookbookError(f"prompts must be a non-empty list of non-empty strings, got {value!r}")
    return prompts


def generation_settings(family: str | Family, model_path: str | None, *, height: int | None = None,
                        width: int | None = None, num_frames: int | None = None, steps: int | None = None,
                        guidance_scale: float | None = None) -> dict[str, Any]:
    """height, width, num_frames, steps, guidance_scale for the comparison and the benchmark: the values given,
    else the tiny pipeline's small settings (model_path None) or the family's real defaults."""
    from .pipelines import default_tiny_settings

    fam = get_family(family) if isinstance(family, str) else family
    if model_path is None:
        base = default_tiny_settings(fam.name)
        base["steps"] = base.pop("num_inference_steps")
    else:
        base = dict(height=fam.height, width=fam.width, num_frames=fam.num_frames, steps=fam.num_steps,
                    guidance_scale=fam.guidance_scale)
    given = dict(height=height, width=width, num_frames=num_frames, steps=steps, guidance_scale=guidance_scale)
    if num_frames is not None and not fam.is_video:
        raise Fp8CookbookError(f"{fam.title} makes images: num_frames applies to the Wan2.2 families")
    return {k: (base[k] if v is None else v) for k, v in given.items()}


def release_memory() -> None:
    """Free what deleted models held: Python garbage, then the CUDA cache (before loading the next big model)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_fp8_transformers(paths: dict[str, dict[str, Path]], *, device: str, dtype: "torch.dtype",
                          ask_for_offload: bool = True,
                          fp8_attention: bool | str = "auto") -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Load every FP8 checkpoint of a `QuantizeResult.paths` with fp8cookbook's loader.

    With `ask_for_offload` the loader is asked for DiT CPU and layer-wise offload, as a serving config might, so the
    notebook shows that both are refused for FP8 (and why). `fp8_attention` is the loader's ("auto": FP8 attention
    where the checkpoint has --quantize-mha scales and a call is long enough on a GPU; "on"; "off").
    Returns (modules, load reports, warning messages).
    """
    from .loader import load_fp8_transformer

    modules: dict[str, Any] = {}
    reports: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, p in paths.items():
            modules[name], reports[name] = load_fp8_transformer(
                p["fp8"], device=device, dtype=dtype, dit_cpu_offload=ask_for_offload,
                dit_layerwise_offload=ask_for_offload, fp8_attention=fp8_attention)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    return modules, reports, messages


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
        from .plots import save_figure

        save_figure(strip, save_to)
    show(strip)
    return strip


# ------------------------------------------------------------------------------------------------------ report
def _plain(obj: Any) -> Any:
    """JSON-safe: paths as strings, dataclasses as dicts, non-finite floats as None."""
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        return _plain(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return _plain(obj.item())
    return obj


class NotebookReport:
    """The results of one notebook run, recorded by name and written to `output_dir/report.json`.

    Keys: schema, notebook, family, title, settings, quantize, convert, inspect, load, compare, bench, checkpoint,
    serve, summary (rows of the results table), failures, passed, seconds. `passed` is False when a threshold was
    missed, a checkpoint is inconsistent, or an FP8 layer did not run.
    """

    def __init__(self, notebook: str, family: str | Family, output_dir: str | Path, settings: dict[str, Any]):
        fam = get_family(family) if isinstance(family, str) else family
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / REPORT_NAME
        self._t0 = time.perf_counter()
        self.data: dict[str, Any] = {
            "schema": REPORT_SCHEMA, "notebook": notebook, "family": fam.name, "title": fam.title,
            "settings": _plain(settings), "quantize": None, "convert": {}, "inspect": {}, "load": {},
            "compare": {"thresholds": None, "prompts": []}, "bench": None, "checkpoint": {}, "serve": None,
            "summary": [], "failures": [], "notes": [], "passed": None, "seconds": None,
        }

    def quantize(self, result) -> None:
        cal = result.calibration
        self.data["quantize"] = _plain({
            "output_dir": result.output_dir, "seconds": round(result.seconds, 2),
            "peak_memory_mb": round(result.peak_memory_mb, 1), "peak_cuda_memory_mb": result.peak_cuda_memory_mb,
            "calibration": {k: cal[k] for k in ("prompts", "num_inference_steps", "seed", "height", "width",
                                                "num_frames", "guidance_scale", "dtype", "device", "forward_calls")
                            if k in cal},
            "paths": result.paths,
        })
        self.data["checkpoint"] = {name: str(p["fp8"]) for name, p in result.paths.items()}
        self.convert(result.convert_stats)

    def convert(self, stats: dict[str, Any]) -> None:
        self.data["convert"] = {name: _plain(s) for name, s in stats.items()}

    def inspect(self, name: str, report) -> None:
        self.data["inspect"][name] = _plain(report)

    def load(self, reports: dict[str, Any], warnings_shown: list[str]) -> None:
        self.data["load"] = {"components": {n: _plain(r) for n, r in reports.items()}, "warnings": list(warnings_shown)}

    def compare(self, report, thresholds, paths: list[Path]) -> None:
        d = report.to_dict(thresholds)
        self.data["compare"]["thresholds"] = d["thresholds"]
        sets = d["decoded"]["frame_sets"]
        ran = {n: (c["fp8_layers_ran"], c["fp8_layers"]) for n, c in d["candidate"]["components"].items()}
        self.data["compare"]["prompts"].append({
            "prompt": d["settings"]["prompt"], "settings": d["settings"],
            "final_latents": d["final_latents"],
            "min_step_cosine": min(s["latents"]["cosine"] for s in d["steps"]),
            "psnr": sets["all"]["psnr"], "ssim": sets["all"]["ssim"],
            "fp8_layers_ran": ran, "failures": d["failures"],
            "files": [str(p) for p in paths],
        })

    def bench(self, report: dict[str, Any], path: str | Path | None) -> None:
        fp8 = next(s for s in report["sides"] if s["name"] == report["fp8"])
        bf16 = next(s for s in report["sides"] if s["name"] == report["bf16"])
        self.data["bench"] = _plain({
            "path": path, "mode": report["mode"], "device": report["environment"].get("gpu") or "cpu",
            "bf16_loop_s": bf16["loop_s"]["median"], "fp8_loop_s": fp8["loop_s"]["median"],
            "speedup": report["speedup"], "peak_memory_ratio": report.get("peak_memory_ratio"),
            "fp8_layers_ran": report.get("fp8_layers_ran"), "fp8_layers": report.get("fp8_layers"),
            "steps": report["settings"]["steps"], "compile": report["settings"]["compile"],
        })

    def serve(self, command: str) -> None:
        self.data["serve"] = command

    def note(self, text: str) -> None:
        self.data["notes"].append(text)

    def _summarize(self) -> None:
        d = self.data
        rows: list[dict[str, str]] = []
        failures: list[str] = []
        if d["quantize"]:
            q = d["quantize"]
            cal = q["calibration"]
            rows.append({"what": "quantize", "result": f"{len(cal['prompts'])} prompt(s) x {cal['num_inference_steps']} "
                                                         f"steps, {q['seconds']:.1f} s, peak {q['peak_memory_mb']:.0f} MB"})
        for name, s in d["convert"].items():
            rows.append({"what": f"convert {name}", "result": f"{s['quantized_weights']} FP8 layers, "
                                                                f"{s['bf16_fallback_weights']} BF16 fallback, "
                                                                f"{len(s['ignore'])} ignore patterns"})
        for name, r in d["inspect"].items():
            rows.append({"what": f"inspect {name}", "result": "consistent" if not r["problems"] else f"{len(r['problems'])} problem(s)"})
            failures += [f"inspect {name}: {p}" for p in r["problems"]]
        if d["load"]:
            comps = d["load"]["components"]
            rows.append({"what": "load", "result": ", ".join(f"{n} {r['fp8_layers']} FP8 + {r['bf16_linear_layers']} BF16 Linear"
                                                            for n, r in comps.items())
                         + f"; offload refused: {len(d['load']['warnings'])} warning(s)"})
        for i, c in enumerate(d["compare"]["prompts"]):
            fl = c["final_latents"]
            psnr = "inf" if c["psnr"] is None else f"{c['psnr']:.1f} dB"
            rows.append({"what": f"compare #{i}", "result": f"final cosine {fl['cosine']:.6f}, min step cosine "
                                                             f"{c['min_step_cosine']:.6f}, rel L2 {fl['rel_l2']:.2e}, "
                                                             f"PSNR {psnr}, SSIM {c['ssim']:.4f}"})
            failures += [f"compare #{i} ({c['prompt']!r}): {f}" for f in c["failures"]]
            failures += [f"compare #{i}: only {r}/{n} FP8 layers of {name} ran" for name, (r, n) in c["fp8_layers_ran"].items()
                         if r != n]
        b = d["bench"]
        if b:
            rows.append({"what": "bench", "result": f"BF16 {b['bf16_loop_s']:.3f} s, FP8 {b['fp8_loop_s']:.3f} s per "
                                                     f"{b['steps']}-step loop: {b['speedup']:.2f}x on {b['device']}"})
        d["summary"], d["failures"] = rows, failures
        d["passed"] = not failures and bool(d["compare"]["prompts"])

    def table(self):
        """The results as a Markdown table (displayed as the last expression of a cell)."""
        from IPython.display import Markdown

        self._summarize()
        lines = ["| step | result |", "| --- | --- |"]
        lines += [f"| {r['what']} | {r['result']} |" for r in self.data["summary"]]
        verdict = "**all checks passed**" if self.data["passed"] else "**checks missed:**<br>" + "<br>".join(self.data["failures"])
        lines.append(f"| verdict | {verdict} |")
        return Markdown("\n".join(lines))

    def write(self) -> Path:
        from .checkpoint import write_json_atomic

        self._summarize()
        self.data["seconds"] = round(time.perf_counter() - self._t0, 2)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, _plain(self.data))
        return self.path


# ------------------------------------------------------------------------------------------------------- serve
def sglang_command(family: str | Family, model_path: str | os.PathLike, checkpoints: dict[str, str | os.PathLike], *,
                   prompt: str, height: int | None = None, width: int | None = None, num_frames: int | None = None,
                   steps: int | None = None, guidance_scale: float | None = None, seed: int | None = None,
                   output_path: str | os.PathLike | None = None) -> str:
    """The `sglang generate` command that serves `checkpoints` ({"transformer": dir[, "transformer_2": dir]}) on top
    of the base pipeline `model_path`, one flag group per line.

    FP8 transformers need `--dit-cpu-offload false --dit-layerwise-offload false` (offload loses the column-major FP8
    weight view); Wan2.2 A14B gets its second expert through `--transformer-2-path` and runs on 4 GPUs with
    Ulysses sequence parallelism.
    """
    fam = get_family(family) if isinstance(family, str) else family
    unknown = sorted(set(checkpoints) - set(fam.experts))
    if unknown or "transformer" not in checkpoints:
        raise Fp8CookbookError(f"{fam.title} checkpoints are {', '.join(fam.experts)}; got {', '.join(checkpoints)}")
    q = shlex.quote
    parts = [f"sglang generate --model-path {q(str(model_path))}", f"--transformer-path {q(str(checkpoints['transformer']))}"]
    if "transformer_2" in checkpoints:
        parts.append(f"--transformer-2-path {q(str(checkpoints['transformer_2']))}")
    if fam.sglang_extra_flags:
        parts.append(" ".join(fam.sglang_extra_flags))
    parts.append(" ".join(("--dit-cpu-offload false", "--dit-layerwise-offload false") + fam.sglang_memory_flags))
    parts.append(f"--prompt {q(prompt)}")
    size = []
    if width is not None and height is not None:
        size.append(f"--width {int(width)} --height {int(height)}")
    if fam.is_video and num_frames is not None:
        size.append(f"--num-frames {int(num_frames)}")
    if steps is not None:
        size.append(f"--num-inference-steps {int(steps)}")
    if guidance_scale is not None:
        size.append(f"--guidance-scale {guidance_scale:g}")
    if seed is not None:
        size.append(f"--seed {int(seed)}")
    if size:
        parts.append(" ".join(size))
    parts.append("--save-output" + (f" --output-path {q(str(output_path))}" if output_path is not None else ""))
    return " \\\n  ".join(parts)
