"""The steps of a cookbook notebook, one function each: the notebooks are narrative, parameters, and calls of these.

`start` checks every parameter (`params.validate_notebook_parameters`) and sets up a `NotebookRun`; the steps
then take the run and add to it, in the notebook's order:

    run = workflow.start("flux1", globals())     # parameters -> run; stale outputs removed; nothing slow yet
    workflow.load_bf16(run)                      # 1. the BF16 pipeline
    workflow.quantize(run)                       # 2. ModelOpt calibration, export, conversion
    workflow.convert(run)                        # 3. again with `keep_bf16`, when set
    workflow.inspect(run)                        # 4. the checkpoint's headers and scales
    workflow.load_fp8(run)                       # 5. fp8cookbook's loader, offload refused
    workflow.compare(run)                        # 6. BF16 and FP8 trajectories, figures
    workflow.bench(run)                          # 7. BF16 vs FP8 denoising time
    workflow.results(run)                        # 8. report.json, the table, the serve command

Each prints what it did and its CLI twin, so that a notebook and `fp8cookbook COMMAND` give the same numbers, and
runs as a measured stage (`fp8cookbook.stages`: wall time, peak GPU memory, peak host RSS, bytes written; one line
each, all of them under "stages" in report.json). An out-of-memory is one line naming the stage and the parameter
to change.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import Fp8CookbookError
from .families import Family, get_family
from .params import validate_notebook_parameters
from .offload import release_memory
from .report import OUTPUT_NAMES, NotebookReport, clear_outputs
from .stages import StageLog

if TYPE_CHECKING:
    import torch

    from .compare import Thresholds

# The names `start` reads from a notebook's namespace: every parameter any cookbook notebook has.
PARAMETER_NAMES = ("family", "model_path", "device", "dtype", "prompts", "calibration_prompts",
                   "num_calibration_prompts", "calibration_steps", "height", "width", "num_frames", "steps",
                   "guidance_scale", "seed", "min_cosine", "min_step_cosine", "max_rel_l2", "min_psnr", "min_ssim",
                   "keep_bf16", "text_encoder_cpu_offload", "output_dir", "run_bench", "compile", "fp8_attention",
                   "run_id")


# ---------------------------------------------------------------------------------------------------- runtime
def runtime(device: str | None = "auto", dtype: str = "auto", *, tiny: bool = False) -> tuple[str, "torch.dtype"]:
    """(device, torch dtype) for a notebook run, printed in one line.

    `device` "auto": CUDA when available, else CPU. `dtype` "auto": bfloat16 on CUDA, float32 on CPU (CPU bfloat16
    matmuls are about 10x slower than float32); `compare` on the command line resolves "auto" the same way. With
    `tiny`, loading progress bars are off, and on CPU torch runs on one thread: the matrices are so small that waking
    a thread pool costs more than the arithmetic.
    """
    import torch

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    threads = ""
    if tiny:  # loading a pipeline of a few MB needs no progress bars, nor advice about torchvision
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        if device == "cpu":
            torch.set_num_threads(1)
            threads = ", 1 CPU thread (tiny model)"
    print(f"device {device}, {str(torch_dtype).replace('torch.', '')}{threads}, torch {torch.__version__}")
    return device, torch_dtype


def resolve_device(device: str | None) -> str:
    """"auto"/None -> cuda when available, else cpu; a CUDA device where torch has none is refused in one line."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    from .params import require_device

    return require_device(device, "device")


def resolve_dtype(dtype: str, device: str) -> "torch.dtype":
    """The one rule for `dtype` "auto" (notebooks and `fp8cookbook compare`): bfloat16 on CUDA, float32 on CPU."""
    import torch

    dtypes = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
              "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if dtype not in dtypes:
        raise Fp8CookbookError(f"dtype {dtype!r}: expected 'auto' or one of {', '.join(dtypes)}")
    return dtypes[dtype]


def generation_settings(family: str | Family, model_path: str | None, *, height: int | None = None,
                        width: int | None = None, num_frames: int | None = None, steps: int | None = None,
                        guidance_scale: float | None = None) -> dict[str, Any]:
    """height, width, num_frames, steps, guidance_scale for the comparison and the benchmark: the values given,
    else the tiny pipeline's small settings (model_path None) or the family's real defaults."""
    fam = get_family(family) if isinstance(family, str) else family
    if model_path is None:
        base = fam.tiny_settings.as_dict()
        base["steps"] = base.pop("num_inference_steps")
    else:
        base = dict(height=fam.height, width=fam.width, num_frames=fam.num_frames, steps=fam.num_steps,
                    guidance_scale=fam.guidance_scale)
    given = dict(height=height, width=width, num_frames=num_frames, steps=steps, guidance_scale=guidance_scale)
    if num_frames is not None and not fam.is_video:
        raise Fp8CookbookError(f"{fam.title} makes images: num_frames applies to the Wan2.2 families")
    return {k: (base[k] if v is None else v) for k, v in given.items()}


def variant_output_dir(output_dir: str, family: str, default_family: str, default_output_dir: str) -> str:
    """One folder per family variant: the notebook's default `output_dir` belongs to its default family; another
    family (`-p family wan22-ti2v-5b` on the wan22 notebook) writes to `outputs/<family>` instead."""
    if family != default_family and output_dir == default_output_dir:
        return str(Path(default_output_dir).parent / family)
    return output_dir


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


# ------------------------------------------------------------------------------------------------------ the run
_OFFLOAD_HINT = "-p text_encoder_cpu_offload true keeps the text encoders on the CPU between uses"
_SIZE_HINT = "a smaller -p height / -p width (-p num_frames)"


@dataclass
class NotebookRun:
    """One notebook run: the checked parameters, where things go, and what each step produced so far."""

    notebook: str
    family: Family
    params: dict[str, Any]
    device: str
    dtype: "torch.dtype"
    output_dir: Path
    base: str  # the BF16 pipeline: SGLang's --model-path
    gen: dict[str, Any]  # height, width, num_frames, steps, guidance_scale of the comparison and the benchmark
    prompts: list[str]
    calibration_prompts: list[str] | None
    report: NotebookReport
    text_encoder_cpu_offload: bool
    pipe: Any = None
    result: Any = None  # QuantizeResult
    fp8: dict[str, Any] | None = None
    offload_idle: bool = False
    comparisons: list[tuple[Any, Any]] = field(default_factory=list)  # (CompareReport, Trajectories) per prompt
    serve: str | None = None
    serve_repo: str | None = None  # the full repo (checkpoint/repo) served alone
    stages: StageLog = field(default_factory=StageLog)  # each step's time, peak memory and bytes written

    @property
    def model_path(self) -> str | None:
        return self.params["model_path"]

    @property
    def thresholds(self) -> "Thresholds":
        from .compare import Thresholds

        p = self.params
        return Thresholds(min_cosine=p["min_cosine"], min_step_cosine=p["min_step_cosine"],
                          max_rel_l2=p["max_rel_l2"], min_psnr=p["min_psnr"], min_ssim=p["min_ssim"])

    def _load_pipeline(self) -> None:
        from .offload import place_pipeline
        from .pipelines import load_pipeline

        self.pipe = load_pipeline(self.family.name, self.model_path, dtype=self.dtype)
        place_pipeline(self.pipe, self.device, text_encoder_cpu_offload=self.text_encoder_cpu_offload)


def start(notebook: str, namespace: dict[str, Any]) -> NotebookRun:
    """The parameters of a notebook's namespace (`globals()` after the parameters cell) -> a checked `NotebookRun`.

    Every parameter is checked before anything slow happens; the outputs of an earlier run in `output_dir` are
    removed (see `report.clear_outputs`), so everything there afterwards is this run's.
    """
    from .template import NOTEBOOKS

    spec = NOTEBOOKS.get(notebook)
    given = {name: namespace[name] for name in PARAMETER_NAMES if name in namespace}
    families = spec.families if spec else None
    p = validate_notebook_parameters({k: v for k, v in given.items() if k != "run_id"}, families=families)
    p.setdefault("num_frames", None)
    family = get_family(p.get("family") or (spec.families[0] if spec else notebook))
    out = str(p["output_dir"])
    if spec:
        out = variant_output_dir(out, family.name, spec.families[0], spec.output_dir)
    output_dir = Path(out).expanduser().resolve()
    run_id = given.get("run_id")
    # `fp8cookbook run` cleared the folder (and papermill is writing the executed notebook into it); in Jupyter, a
    # copy executed by an earlier `fp8cookbook run` is stale too
    clear_outputs(output_dir, OUTPUT_NAMES if run_id else OUTPUT_NAMES + (f"{notebook}.ipynb",))
    device, torch_dtype = runtime(p["device"], p["dtype"], tiny=p["model_path"] is None)
    offload = p.get("text_encoder_cpu_offload")
    if offload is None:  # on for a real model on a GPU: the text encoder waits on the CPU between prompts
        offload = p["model_path"] is not None and device != "cpu"
    from .pipelines import tiny_pipeline_dir

    base = str(p["model_path"] or tiny_pipeline_dir(family.name))
    gen = generation_settings(family, p["model_path"], height=p["height"], width=p["width"],
                              num_frames=p["num_frames"], steps=p["steps"], guidance_scale=p["guidance_scale"])
    prompts = p["prompts"]
    settings = dict(model_path=p["model_path"], device=device, dtype=str(torch_dtype), prompts=prompts,
                    seed=p["seed"], keep_bf16=p["keep_bf16"], fp8_attention=p["fp8_attention"], **gen)
    report = NotebookReport(notebook, family, output_dir, settings, run_id=run_id)
    print(f"{family.title}, run {report.run_id}, outputs in {output_dir}")
    return NotebookRun(notebook=notebook, family=family, params=p, device=device, dtype=torch_dtype,
                       output_dir=output_dir, base=base, gen=gen, prompts=prompts,
                       calibration_prompts=p["calibration_prompts"], report=report,
                       text_encoder_cpu_offload=offload)


# -------------------------------------------------------------------------------------------------- the steps
def load_bf16(run: NotebookRun) -> None:
    """1. The BF16 pipeline, placed on the device (text encoders on the CPU between uses, where asked)."""
    with run.stages.stage("load_bf16", hint=_OFFLOAD_HINT):
        run._load_pipeline()
    fam = run.family
    print(f"{fam.title}: {type(run.pipe).__name__} from {run.base}, experts {list(fam.experts)}"
          + (f", boundary {fam.boundary_ratio}" if fam.boundary_ratio else ""))
    print(f"comparison settings {run.gen}")


def quantize(run: NotebookRun) -> None:
    """2. ModelOpt calibration on the pipeline, export and conversion into `output_dir/checkpoint`."""
    from .fp8.attention_mode import AttentionMode
    from .quantize import quantize_pipeline

    p = run.params
    checkpoint = run.output_dir / "checkpoint"
    with run.stages.stage("quantize", hint="fewer -p num_calibration_prompts or -p calibration_steps; "
                                           + _OFFLOAD_HINT, output=checkpoint):  # base, calibrate, ... inside
        run.result = quantize_pipeline(
            run.family.name, run.pipe, checkpoint, prompts=run.calibration_prompts,
            num_prompts=p["num_calibration_prompts"], num_inference_steps=p["calibration_steps"], seed=p["seed"],
            height=p["height"], width=p["width"], num_frames=p["num_frames"], guidance_scale=p["guidance_scale"],
            overwrite=True, quantize_mha=AttentionMode.parse(p["fp8_attention"]).quantize_mha,
            progress=run.model_path is not None, stages=run.stages,
            full_repo=True, link="symlink",  # also checkpoint/repo, served alone; symbolic links: no disk, no copy
            keep_pipeline=False)  # load_fp8 reloads the BF16 reference: no host copy of the transformers meanwhile
    run.report.quantize(run.result)
    print("\n".join(run.result.lines()))
    if len(run.family.experts) > 1:
        print("calibration timesteps:", run.result.calibration["timesteps"])
    model = f" --model-path {run.model_path}" if run.model_path else ""
    print(f"CLI twin: fp8cookbook quantize --family {run.family.name}{model} --output-dir {run.output_dir / 'checkpoint'} "
          "--full-repo --link symlink")


def convert(run: NotebookRun) -> None:
    """3. Print each conversion; with `keep_bf16`, convert the export again with those layers kept in BF16."""
    from .convert import convert_checkpoint

    keep = run.params["keep_bf16"]
    for name, p in run.result.paths.items():
        if keep:
            with run.stages.stage(f"convert {name} (keep_bf16)", output=p["fp8"]):
                run.result.convert_stats[name] = convert_checkpoint(
                    p["export"], p["fp8"], state_file=p["state"], base_transformer=p["base"],
                    family=run.family.name, keep_bf16=keep, overwrite=True, progress=False)
        stats = run.result.convert_stats[name]
        print(f"{name}: {p['export']} -> {p['fp8']}")
        print("\n".join("  " + line for line in stats.lines()))
        print("  kept in BF16 (ignore):", ", ".join(stats.ignore))
        print(f"  CLI twin: fp8cookbook convert {p['export']} {p['fp8']} --state-file {p['state']} "
              f"--base-transformer {p['base']}" + "".join(f" --keep-bf16 '{k}'" for k in keep) + " --overwrite")
    run.report.convert(run.result.convert_stats)


def inspect(run: NotebookRun) -> None:
    """4. Headers and scales of every checkpoint; "consistent" means SGLang and the loader agree on every layer."""
    from .checkpoint import inspect_checkpoint

    for name, p in run.result.paths.items():
        info = inspect_checkpoint(p["fp8"])
        run.report.inspect(name, info)
        print("\n".join(info.lines()))
        print(f"CLI twin: fp8cookbook inspect {p['fp8']}")


def load_fp8(run: NotebookRun) -> None:
    """5. A fresh BF16 pipeline as the reference (quantization used up the first's transformers), and the FP8
    checkpoints loaded with fp8cookbook's loader, asked for DiT offload so that the refusal shows."""
    run.pipe = None
    release_memory()
    with run.stages.stage("load_bf16 (reference)", hint=_OFFLOAD_HINT):
        run._load_pipeline()
    run.offload_idle = run.model_path is not None  # real models: the side not running waits on the CPU
    with run.stages.stage("load_fp8", hint="free the GPU: -p text_encoder_cpu_offload true"):
        run.fp8, reports, offload_warnings = load_fp8_transformers(
            run.result.paths, device="cpu" if run.offload_idle else run.device, dtype=run.dtype,
            fp8_attention=run.params["fp8_attention"])
    run.report.load(reports, offload_warnings)
    for message in offload_warnings:
        print("warning:", message)
    for load_report in reports.values():
        print("\n".join(load_report.lines()))


def compare(run: NotebookRun) -> None:
    """6. Each prompt denoised by BF16 and by FP8 through the same pipeline, compared after every step and decoded;
    compare.json and figures in `output_dir/compare/promptN`."""
    from .compare import compare_trajectories, write_outputs
    from .plots import record_latents

    g = run.gen
    for i, prompt in enumerate(run.prompts):
        folder = run.output_dir / "compare" / f"prompt{i}"
        with run.stages.stage(f"compare prompt{i}", hint=_SIZE_HINT, output=folder), \
                record_latents(run.pipe, g["height"], g["width"], steps=g["steps"]) as latents:
            comparison = compare_trajectories(run.pipe, {}, run.fp8, family=run.family, prompt=prompt,
                                              seed=run.params["seed"], **g, progress=False,
                                              offload_idle=run.offload_idle)
            files = write_outputs(comparison, folder, run.thresholds)
        run.report.compare(comparison, run.thresholds, files)
        run.comparisons.append((comparison, latents))
        print(f"prompt {i}: {prompt!r}")
        print("\n".join(comparison.summary_lines()))
        print("\n".join(f"MISSED: {line}" for line in comparison.failures(run.thresholds)) or "all thresholds met")
    flags = " ".join(f"--{'candidate' if n == 'transformer' else 'candidate-2'} {p['fp8']}"
                     for n, p in run.result.paths.items())
    model = f" --model-path {run.model_path}" if run.model_path else ""
    print(f"CLI twin: fp8cookbook compare --family {run.family.name}{model} {flags} --seed {run.params['seed']} "
          f"--output-dir DIR (same dtype rule, thresholds and sizes by default)")


def figures(run: NotebookRun) -> None:
    """The first prompt's per-step metrics and decoded output, as PNGs that stay in the saved notebook."""
    from .plots import plot_images, plot_step_metrics, show

    comparison, _ = run.comparisons[0]
    show(plot_step_metrics(comparison, run.thresholds))
    show(plot_images(comparison))


def step_viewer(run: NotebookRun):
    """The first prompt's BF16 and FP8 latents after every step: a slider in Jupyter, and the static strip."""
    from .plots import step_viewer as viewer

    comparison, latents = run.comparisons[0]
    return viewer(*latents.pair(), comparison, save_to=run.output_dir / "compare" / "prompt0" / "steps.png")


def bench(run: NotebookRun) -> None:
    """7. BF16 and FP8 denoising loops in one process (the comparison's models are released first)."""
    run.fp8 = run.pipe = None
    release_memory()
    if not run.params["run_bench"]:
        print("skipped (run_bench=False)")
        return
    from . import bench as benchmark

    g = run.gen
    settings = benchmark.BenchSettings(family=run.family.name, model_path=run.base,
                                       fp8_path=str(run.result.output_dir / "fp8"), height=g["height"],
                                       width=g["width"], num_frames=g["num_frames"], steps=g["steps"],
                                       compile=run.params["compile"], fp8_attention=run.params["fp8_attention"],
                                       device=run.device)
    path = run.output_dir / "bench.json"
    with run.stages.stage("bench", hint="fewer -p steps, or -p run_bench false; " + _SIZE_HINT) as stage:
        report = benchmark.run_bench(settings, output=path)
        benchmark.fold_side_peaks(stage, report)
    run.report.bench(report, path)
    print("\n".join(benchmark.summary_lines(report)))
    print(f"CLI twin: fp8cookbook bench --family {run.family.name} --model-path {run.base} "
          f"--fp8 {run.result.output_dir / 'fp8'}")


def results(run: NotebookRun):
    """8. The serve command and the notes recorded, the results table displayed, report.json written."""
    from IPython.display import display

    from .serve import sglang_command

    g, fam = run.gen, run.family
    settings = dict(prompt=run.prompts[0], height=g["height"], width=g["width"], num_frames=g["num_frames"],
                    steps=g["steps"], guidance_scale=g["guidance_scale"], seed=run.params["seed"],
                    output_path=run.output_dir / "sglang")
    run.serve = sglang_command(fam, run.base, run.report.data["checkpoint"], **settings)
    # the same FP8 transformers as one full repo (its other components linked from the base): --model-path alone
    run.serve_repo = sglang_command(fam, run.result.repo, None, **settings) if run.result.repo else None
    run.report.serve(run.serve, run.serve_repo)
    if run.model_path is None:
        family = f" -p family {fam.name}" if "family" in run.params else ""
        run.report.note(f"the tiny pipeline has random weights: it shows the workflow, not {fam.title} quality or "
                        f"speed; run `fp8cookbook run {run.notebook}{family} -p model_path {fam.hub_id}` on a GPU "
                        "for the real model")
    for note in fam.serve_notes:
        run.report.note(note)
    run.report.stages(run.stages.as_dicts())
    table = run.report.table()
    display(table)
    print("wrote", run.report.write())
