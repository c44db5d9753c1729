"""Every stage of one family at full size from an in-memory stand-in pipeline, each measured; JSON to --out.

Why in memory: FLUX.2-dev (112.64 GB) and Wan2.2 T2V-A14B (69.14 GB) plus their outputs do not fit the GPU machine's
64 GB disk as a stand-in folder, but time, memory and disk of every stage depend only on the shapes. The pipeline
is `fp8cookbook.standin.build_standin_pipeline` (the real configs, seeded random weights, the same values a
`fp8cookbook standin` folder holds); each stage runs under `fp8cookbook.stages` (wall time, peak GPU memory, peak
host RSS, bytes written) and an out-of-memory ends the run with one line naming the stage and what to change.

Stages (pick with --stages, in this order):
  build     the pipeline in memory: transformer(s) on --device, text encoder(s) on --text-encoder-device
  quantize  first "base": each BF16 transformer saved as a download holds it (under --base-dir; an in-memory
            pipeline has no folder to point at), then quantize_pipeline on the pipeline's own transformers (no host
            copy), recorded as its steps: calibrate (ModelOpt through the pipeline: --calib-prompts prompts x
            --calib-steps steps at the family's size, or --height/--width/--frames), state, export, convert (per
            expert for A14B), then the whole as "quantize"; the base is removed after quantize and convert
  convert   the converter again on the export just written, as `fp8cookbook convert` in a child process (its own
            time and peak RSS, nothing else in that process), beside a `cp` + `sync` of the same files (the disk's
            plain copy speed, for the converter's read rate)
  load      each FP8 checkpoint from disk to --device, beside `cat` of its files (the disk's read speed)
  compare   BF16 (the same seeded weights, rebuilt) vs the FP8 checkpoints through the pipeline, --compare-steps
  e2e       end-to-end generation (text encoding, denoising, VAE decode), BF16 then the FP8 checkpoints, in one
            process: the pipeline benchmark (`bench --model-path`) on the in-memory pipeline, --e2e-steps (default:
            the family's); untimed generations (warm-up, FP8 call count) run --e2e-warmup-steps. Without
            checkpoints (no quantize, no --fp8) it quantises in process, nothing on disk, FP8 attention off: how
            FLUX.2 at full depth, whose export does not fit a 64 GB disk, is timed end to end
  bench     the transformer-only benchmark (`fp8cookbook bench --synthetic full`), --bench-steps

Disk: the BF16 base (1.0x the transformers' BF16 size) goes under --base-dir (default: --work); the ModelOpt state
(no weights), the export and the FP8 checkpoint under --work, about 0.6x each (FLUX.2 ~142 GB in all, A14B ~126 GB:
more than a 64 GB disk). --drop-export removes each export once converted, so --work holds one export at a time; a
tmpfs --base-dir (/dev/shm) takes the base off the disk. The script prints its estimate per folder first and refuses
when a folder's disk is too small. Calibration defaults here are short (2 prompts x 4 steps) because the stage's cost
scales linearly: the record holds seconds per prompt-step, and a real run (quantize's defaults: 64 image / 16 video
prompts x 20 steps) costs that times prompts x steps.

  python scripts/full_size.py --family flux2 --out flux2.json --work /data/fs-flux2
  python scripts/full_size.py --family wan22 --out a14b.json --work /data/fs-a14b --stages build,quantize,load
  python scripts/full_size.py --family wan22 --out a14b.json --work /data/a14b --base-dir /dev/shm/a14b-base \
      --drop-export --stages build,quantize,load,compare,e2e     # full depth on a 64 GB disk
  python scripts/full_size.py --family flux1 --size reduced --device cpu --out /tmp/f1.json   # CPU check, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from fp8cookbook.checkpoint import STATS_NAME
from fp8cookbook.errors import Fp8CookbookError
from fp8cookbook.families import get_family
from fp8cookbook.offload import release_memory
from fp8cookbook.quantize.pipeline import _named  # the stage names quantize gives per expert
from fp8cookbook.stages import StageLog, tree_bytes
from fp8cookbook.standin import build_component, build_standin_pipeline, recipe, size_table

STAGES = ("build", "quantize", "convert", "load", "compare", "e2e", "bench")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", required=True, help="flux1, flux2, wan22 (= wan22-a14b), wan22-ti2v-5b")
    p.add_argument("--out", required=True, type=Path, help="JSON of the stage records (written after every stage)")
    p.add_argument("--work", type=Path, default=Path("full-size-work"), help="folder for what the stages write")
    p.add_argument("--base-dir", type=Path, help="folder for the BF16 base quantize starts from (default: WORK/base; "
                                                 "e.g. a tmpfs when the disk is small); removed after quantize and convert")
    p.add_argument("--fp8", type=Path, metavar="DIR",
                   help="the FP8 checkpoints of an earlier run instead of quantize (DIR/<expert>, e.g. "
                        "WORK/quantize/fp8 of a run with --keep): splits a long run over two device calls")
    p.add_argument("--drop-export", action="store_true",
                   help="quantize: remove each ModelOpt export once its FP8 checkpoint is written (one export on "
                        "disk at a time); excludes the convert stage, which converts the export again")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--size", choices=["full", "reduced"], default="full", help="reduced: a CPU check of the script")
    p.add_argument("--layers", type=int, help="transformer blocks of each kind (default: the real count)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--text-encoder-device", default=None,
                   help="where the text encoder(s) live; 'cpu' = offloaded to the GPU only while encoding "
                        "(default: --device, except FLUX.2's 48 GB Mistral: cpu)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--frames", type=int, help="video frames, 4k+1 (default: the family's)")
    p.add_argument("--calib-prompts", type=int, default=2)
    p.add_argument("--calib-steps", type=int, default=4, help="Wan2.2 A14B needs >= 2 to reach both experts")
    p.add_argument("--compare-steps", type=int, default=4)
    p.add_argument("--e2e-steps", type=int, help="e2e: denoising steps (default: the family's)")
    p.add_argument("--e2e-runs", type=int, default=1, help="e2e: timed generations per side, after one warm-up")
    p.add_argument("--e2e-warmup-steps", type=int, default=2,
                   help="e2e: denoising steps of each untimed generation (warm-up, FP8 call count, in-process "
                        "calibration): the same kernels as a full one at a fraction of the time (default 2, which "
                        "reaches both A14B experts); 0 = the timed step count")
    p.add_argument("--bench-steps", type=int, default=4)
    p.add_argument("--offload-idle", action="store_true",
                   help="what is not running waits on the CPU: the pipeline's BF16 transformers after build (unless "
                        "quantize follows), each FP8 checkpoint after its load, and in compare the idle side and, "
                        "for A14B, the idle expert (one expert on the GPU at a time: fits an 80 GB card); in e2e, "
                        "for A14B, the idle expert on both sides (the transfers are in the times)")
    p.add_argument("--keep", action="store_true", help="keep --work afterwards (default: removed at the end)")
    args = p.parse_args(argv)
    args.stages = [s for s in args.stages.split(",") if s]
    bad = [s for s in args.stages if s not in STAGES]
    if bad:
        p.error(f"unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
    if args.drop_export and "convert" in args.stages:
        p.error("--drop-export removes the export that the convert stage converts again: drop one of them")
    if args.fp8 is not None and any(s in args.stages for s in ("quantize", "convert")):
        p.error("--fp8 takes checkpoints already made: leave quantize and convert out of --stages")
    return args


def disk_estimate(family_name: str, size: str, layers: int | None, stages: list[str],
                  drop_export: bool = False) -> tuple[int, int]:
    """Upper bounds of what the stages write as (base, work): the BF16 base (an in-memory pipeline has no folder to
    reuse), and export + FP8 checkpoint at a little over half of it each (one export at a time with
    `drop_export`: the largest expert's); the state file holds no weights."""
    plan = recipe(family_name, size, layers=layers)
    fam = get_family(family_name)
    sizes = [s.nbytes for s in size_table(plan, list(fam.experts))]
    bf16 = sum(sizes)
    base = work = 0
    if "quantize" in stages:
        base = bf16
        work = int(0.6 * bf16 + 0.6 * (max(sizes) if drop_export else bf16))
    if "convert" in stages:  # the second FP8 copy replaces the first; `cp` holds one shard at a time
        work += int(0.1 * bf16)
    return base, work


@torch.no_grad()
def save_base(model: torch.nn.Module, folder: Path) -> None:
    """The transformer as a download holds it (`save_pretrained`, its dtypes as loaded), and the model told so: its
    config's _name_or_path is what `from_pretrained` records, so quantize takes the folder as its base."""
    from fp8cookbook.files import plain_modes

    model.save_pretrained(folder)
    plain_modes(folder)
    model.register_to_config(_name_or_path=str(folder.resolve()))


def _existing(path: Path) -> Path:
    """The nearest folder of `path` that exists (where its disk is asked about)."""
    while not path.exists():
        path = path.parent
    return path


def _free(path: Path) -> int:
    return shutil.disk_usage(_existing(path)).free


def _timed_command(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0




def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fam = get_family(args.family)
    log = StageLog(printer=lambda line: print(line, flush=True))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    meta = dict(family=fam.name, size=args.size, layers=args.layers, gpu=gpu, torch=torch.__version__,
                argv=sys.argv[1:] if argv is None else argv)

    def save() -> None:
        log.write_json(args.out, **meta)

    base_dir = args.base_dir or args.work / "base"
    need_base, need_work = disk_estimate(fam.name, args.size, args.layers, args.stages, args.drop_export)
    free_base, free_work = _free(base_dir.absolute()), _free(args.work.absolute())
    same_disk = os.stat(_existing(base_dir.absolute())).st_dev == os.stat(_existing(args.work.absolute())).st_dev
    meta["disk"] = dict(estimate_bytes=need_base + need_work, estimate_base_bytes=need_base,
                        estimate_work_bytes=need_work, free_bytes=free_work, free_base_bytes=free_base)
    print(f"{fam.title} {args.size}: stages {','.join(args.stages)}; disk needed <= {need_work / 1e9:.1f} GB under "
          f"{args.work} ({free_work / 1e9:.1f} GB free), {need_base / 1e9:.1f} GB under {base_dir} "
          f"({free_base / 1e9:.1f} GB free)" + (", one disk" if same_disk else ""), flush=True)
    checks = [(args.work, need_base + need_work, free_work)] if same_disk else \
        [(args.work, need_work, free_work), (base_dir, need_base, free_base)]
    for folder, need, free in checks:
        if need > free:
            raise Fp8CookbookError(f"{folder}: these stages write up to {need / 1e9:.1f} GB there, {free / 1e9:.1f} GB "
                                   "free; drop quantize/convert from --stages, pass --layers, --drop-export or "
                                   "--base-dir on another disk, or use a bigger disk")
    for folder in (args.work, base_dir):
        if folder.exists() and any(folder.iterdir()):
            raise Fp8CookbookError(f"{folder}: not empty; pass a new folder")
    args.work.mkdir(parents=True, exist_ok=True)
    te_device = args.text_encoder_device or ("cpu" if fam.name == "flux2" and args.size == "full" else args.device)
    size = dict(height=args.height, width=args.width, num_frames=args.frames if fam.is_video else None)
    if args.size == "reduced":  # the tiny pipelines' small sizes, unless given
        from fp8cookbook.pipelines import default_tiny_settings

        tiny = default_tiny_settings(fam.name)
        size = {k: tiny[k] if v is None else v for k, v in size.items()}
    plan = recipe(fam.name, args.size, layers=args.layers)
    experts = list(fam.experts)
    pipe = None
    fp8_paths: dict[str, Path] = {}
    if args.fp8 is not None:
        fp8_paths = {n: args.fp8 / n for n in experts}
        missing = [str(f) for f in fp8_paths.values() if not (f / "config.json").is_file()]
        if missing:
            raise Fp8CookbookError(f"--fp8 {args.fp8}: no FP8 checkpoint in {', '.join(missing)}")
    try:
        if "build" in args.stages or any(s in args.stages for s in ("quantize", "compare", "e2e")):
            with log.stage("build", hint="pass --text-encoder-device cpu", text_encoder_device=te_device) as r:
                encoders = [c.name for c in plan.components if c.name.startswith("text_encoder")]
                pipe = build_standin_pipeline(fam.name, size=args.size, layers=args.layers, device=args.device,
                                              component_devices={n: te_device for n in encoders})
                if te_device == "cpu" and args.device != "cpu":
                    from fp8cookbook.offload import place_pipeline

                    place_pipeline(pipe, args.device, text_encoder_cpu_offload=True)
                r.extra["components"] = {s.name: s.nbytes for s in size_table(plan)}
                if args.offload_idle and "quantize" not in args.stages:  # quantize calibrates them on the GPU
                    for n in experts:
                        getattr(pipe, n).to("cpu")
                    release_memory()
            save()

        if "quantize" in args.stages:
            from fp8cookbook.quantize import quantize_pipeline

            out = args.work / "quantize"
            for n in experts:
                with log.stage(_named("base", n, experts), output=base_dir / n) as r:
                    save_base(getattr(pipe, n), base_dir / n)
            save()
            with log.stage("quantize", output=out, hint="calibrate with fewer --calib-prompts or a smaller size; "
                           "--text-encoder-device cpu") as r:
                # the pipeline's own transformers: they are rebuilt for compare and e2e, so no host copy meanwhile
                result = quantize_pipeline(fam.name, pipe, out, num_prompts=args.calib_prompts,
                                           num_inference_steps=args.calib_steps, quantize_mha=True, progress=False,
                                           stages=log, keep_pipeline=False, keep_export=not args.drop_export,
                                           **{k: v for k, v in size.items() if v is not None})
                calib = result.calibration
                r.extra.update(calibration={k: v for k, v in calib.items() if k != "prompts"},
                               prompt_steps=len(calib["prompts"]) * calib["num_inference_steps"],
                               disk={n: {k: tree_bytes([Path(p)]) for k, p in paths.items()}
                                     for n, paths in result.paths.items()})
            r.extra["seconds_per_prompt_step"] = r.seconds / r.extra["prompt_steps"]
            fp8_paths = {n: Path(p["fp8"]) for n, p in result.paths.items()}
            save()

        if "convert" in args.stages and fp8_paths:
            from fp8cookbook.convert import convert_checkpoint

            for n in experts:
                export, copy = args.work / "quantize" / "export" / n, args.work / "cp" / n
                again = args.work / "convert" / n
                # the quantize stage's checkpoint makes room for the copies; the one converted again replaces it
                if n in fp8_paths:
                    shutil.rmtree(fp8_paths[n])
                with log.stage(f"cp-{n}", output=copy) as r:
                    # one file at a time, each copy removed once timed: the disk never holds a third full copy
                    copy.mkdir(parents=True, exist_ok=True)
                    seconds = synced = 0.0
                    for f in sorted(p for p in export.iterdir() if p.is_file()):
                        seconds += _timed_command(["cp", str(f), str(copy / f.name)])
                        # the converter fsyncs every shard it writes; a copy deleted unsynced never reaches the disk
                        synced += _timed_command(["sync", str(copy / f.name)])
                        (copy / f.name).unlink()
                    r.extra["seconds_cp"] = seconds + synced  # as durable as the converter's output
                    r.extra["seconds_cp_unsynced"] = seconds
                    r.extra["read_gb_per_s"] = tree_bytes([export]) / 1e9 / max(seconds + synced, 1e-9)
                shutil.rmtree(copy)
                with log.stage(f"convert-{n}", output=again) as r:
                    # `fp8cookbook convert` alone in a child process: its VmHWM (fresh at exec, unlike ru_maxrss,
                    # which carries this script's footprint over) is the converter's, not the CUDA context's
                    seconds = _timed_command([sys.executable, "-m", "fp8cookbook", "convert", str(export),
                                                 str(again), "--state-file", str(args.work / "quantize" / f"{n}.pt"),
                                                 "--base-transformer", str(base_dir / n), "--family", fam.name,
                                                 "--quiet"])
                    stats = json.loads((again / STATS_NAME).read_text())
                    r.extra["read_gb_per_s"] = tree_bytes([export]) / 1e9 / max(stats["seconds"], 1e-9)
                    r.extra["converter_seconds"] = stats["seconds"]
                    r.extra["converter_peak_rss_mb"] = stats["peak_rss_mb"]  # the child's VmHWM, imports included
                    r.extra["child_seconds"] = seconds  # with the interpreter's start and imports
                fp8_paths[n] = again
                save()

        shutil.rmtree(base_dir, ignore_errors=True)  # the FP8 checkpoints hold their BF16 layers: the base has served
        loaded: dict[str, torch.nn.Module] = {}
        if "load" in args.stages and fp8_paths:
            from fp8cookbook.loader import load_fp8_transformer

            for n, path in fp8_paths.items():
                files = sorted(str(p) for p in path.glob("*.safetensors"))
                with log.stage(f"cat-{n}") as r:
                    r.extra["seconds_cat"] = _timed_command(["cat", *files])
                with log.stage(f"load-{n}", hint="load one expert at a time (--stages without compare)") as r:
                    model, report = load_fp8_transformer(path, device=args.device)
                    r.extra.update(fp8_bytes=report.fp8_bytes, other_bytes=report.other_bytes,
                                   fp8_layers=report.fp8_layers, report=report.lines())
                if args.offload_idle:  # the next expert loads onto a GPU without this one
                    model.to("cpu")
                    release_memory()
                loaded[n] = model
                save()

        if "compare" in args.stages and loaded and pipe is not None:
            from fp8cookbook.compare import compare_trajectories

            with log.stage("compare", hint="pass --offload-idle", steps=args.compare_steps) as r:
                # with --offload-idle the FP8 side already waits on the CPU (parked after each load)
                for n in experts:  # the BF16 reference: the build's, or after quantize the same seeded weights
                    if getattr(pipe, n) is None:
                        release_memory()  # what quantize dropped goes first
                        setattr(pipe, n, build_component(plan.component(n),
                                                         device="cpu" if args.offload_idle else args.device))
                report = compare_trajectories(pipe, {}, loaded, family=fam, steps=args.compare_steps,
                                              progress=False, offload_idle=args.offload_idle, **size)
                r.extra["summary"] = report.summary_lines()
                r.extra["final_latents"] = report.final_latents
            save()
        loaded.clear()
        release_memory()

        if "e2e" in args.stages and pipe is not None:
            # without FP8 checkpoints (no quantize, no --fp8) the benchmark quantises in process: our FP8 layers
            # with static scales from one calibration generation, no disk; FP8 attention then stays off (no Q/K/V
            # scales), which the record says
            from fp8cookbook.bench import BenchSettings, fold_side_peaks, run_bench, summary_lines

            with log.stage("e2e", hint="fewer --e2e-steps, or pass --text-encoder-device cpu",
                           text_encoder_device=te_device) as r:
                resident = args.offload_idle and len(experts) > 1  # A14B: one expert on the GPU at a time
                for n in experts:  # BF16 first: the same seeded weights the FP8 checkpoints were made from
                    if getattr(pipe, n) is None:
                        setattr(pipe, n, build_component(plan.component(n),
                                                         device="cpu" if resident else args.device))
                fp8_root = None
                if fp8_paths:
                    first = next(iter(fp8_paths.values()))
                    fp8_root = first if len(fp8_paths) == 1 else first.parent  # A14B: the folder of both experts
                steps = args.e2e_steps or (3 if args.size == "reduced" else fam.num_steps)
                warmup_steps = min(args.e2e_warmup_steps, steps) if args.e2e_warmup_steps > 0 else None
                report = run_bench(BenchSettings(family=fam.name, model_path="in-memory stand-in",
                                                 fp8_path=None if fp8_root is None else str(fp8_root),
                                                 runs=args.e2e_runs, steps=steps, warmup=1, warmup_steps=warmup_steps,
                                                 one_expert_resident=resident,
                                                 height=size["height"], width=size["width"],
                                                 num_frames=size["num_frames"], device=args.device), pipe=pipe)
                fold_side_peaks(r, report)
                r.extra["summary"] = summary_lines(report)
                r.extra.update({k: report[k] for k in ("speedup", "end_to_end_speedup", "peak_memory_ratio")})
                r.extra.update(fp8_source=report.get("fp8_source"), steps=steps, warmup_steps=warmup_steps,
                               one_expert_resident=resident,
                               fp8_attention=report["settings"]["fp8_attention"])
                r.extra["sides"] = [{k: x.get(k) for k in ("name", "call_s", "phase_s", "loop_s", "peak_memory_gb",
                                                           "ms_per_step", "expert_moves")} for x in report["sides"]]
            save()
        pipe = None
        release_memory()

        if "bench" in args.stages:
            from fp8cookbook.bench import BenchSettings, fold_side_peaks, run_bench, summary_lines

            synthetic = "full" if args.size == "full" else "tiny"
            with log.stage("bench", hint="fewer --bench-steps, or a smaller --height/--width") as r:
                report = run_bench(BenchSettings(family=fam.name, synthetic=synthetic, steps=args.bench_steps,
                                                 height=args.height, width=args.width, num_frames=size["num_frames"],
                                                 device=args.device))
                fold_side_peaks(r, report)
                r.extra["summary"] = summary_lines(report)
            save()
    finally:
        save()
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    print("summary\n" + "\n".join(log.lines()) + f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    from fp8cookbook.console import command_output

    try:
        with command_output():  # the CLI's rule: no third-party noise the user cannot act on
            code = main()
        sys.exit(code)
    except Fp8CookbookError as e:
        print(f"full_size: error: {e}", file=sys.stderr)
        sys.exit(2)
