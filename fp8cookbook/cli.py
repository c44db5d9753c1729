"""`fp8cookbook` command line. `main(argv) -> int` is testable without a subprocess.

Errors a user can fix (bad file, tensor, option) print as one line on stderr and exit 2; no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from pathlib import Path
from typing import Callable

from .version import __version__
from .errors import Fp8CookbookError
from .fp8.attention_mode import MIN_KV_TOKENS, MODES

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}

# --fp8-attention on load, compare and bench: a mode; the bare flag (the opt-in of earlier versions) means "on"
_ATTENTION_ARG = dict(nargs="?", const="on", default="auto", choices=MODES, metavar="|".join(MODES))


def _command(name: str):
    def deco(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = fn
        return fn

    return deco


# ----------------------------------------------------------------------------------------------- convert
@_command("convert")
def _convert(args: argparse.Namespace) -> int:
    from .convert import base_from_quantize_report, convert_checkpoint, convert_repo, protect_inputs
    from .repo import MODEL_INDEX
    from .stages import StageLog

    # first, whatever the layout: an output that is, holds or lies in an input is refused before anything else
    protect_inputs(args.output_dir, [args.export_dir, args.state_file, args.base_transformer, args.base])
    if (args.export_dir / MODEL_INDEX).is_file() or args.full_repo:
        if args.dry_run:
            raise Fp8CookbookError("--dry-run works on one transformer export, not with a repo or --full-repo")
        if args.base_transformer is not None:
            raise Fp8CookbookError("with a repo or --full-repo, give the BF16 pipeline as --base (its component "
                                   "folders are the base transformers), not --base-transformer")
        with StageLog().stage("convert", output=args.output_dir):
            stats = convert_repo(args.export_dir, args.output_dir, base=args.base, component=args.component,
                                 state_file=args.state_file, full_repo=args.full_repo, link=args.link,
                                 family=args.family, keep_bf16=args.keep_bf16, overwrite=args.overwrite,
                                 progress=not args.quiet)
        print(f"wrote {args.output_dir}" + (" (full diffusers repo)" if args.full_repo else ""))
        for name, s in stats.items():
            print(f"  {name}:")
            for line in s.lines():
                print("    " + line)
        return 0
    if args.base is not None:
        raise Fp8CookbookError("--base goes with a repo input or --full-repo; for one export use --base-transformer")
    base = args.base_transformer
    if base is None and (base := base_from_quantize_report(args.export_dir)) is not None:
        print(f"base transformer {base} (from quantize.json)")
    with (contextlib.nullcontext() if args.dry_run else StageLog().stage("convert", output=args.output_dir)):
        stats = convert_checkpoint(args.export_dir, args.output_dir, state_file=args.state_file,
                                   base_transformer=base, family=args.family, keep_bf16=args.keep_bf16,
                                   overwrite=args.overwrite, dry_run=args.dry_run, progress=not args.quiet)
    head = "plan (dry run, nothing written)" if args.dry_run else f"wrote {args.output_dir}"
    print(head)
    for line in stats.lines():
        print("  " + line)
    if args.dry_run:
        print("  ignore: " + ", ".join(stats.ignore))
    return 0


# ----------------------------------------------------------------------------------------------- inspect
@_command("inspect")
def _inspect(args: argparse.Namespace) -> int:
    from .repo import inspect_path

    lines, data, ok = inspect_path(args.checkpoint)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print("\n".join(lines))
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------------- load
@_command("load")
def _load(args: argparse.Namespace) -> int:
    import torch

    from .families import family_for_class
    from .fp8.attention_diffusers import count_fp8_attention_calls
    from .fp8.linear import count_fp8_calls
    from .loader import load_fp8_transformer
    from .params import require_device
    from .stages import StageLog

    require_device(args.device, "--device")
    log = StageLog()
    with log.stage("load", hint="load with --device cpu, or free the GPU"):
        model, report = load_fp8_transformer(args.checkpoint, device=args.device, fp8_attention=args.fp8_attention)
    print("\n".join(report.lines()))
    family = family_for_class(report.class_name)
    if family is not None and args.forward:
        config = dict(model.config)
        inputs = family.make_inputs(config, height=64, width=64, num_frames=5 if family.is_video else None,
                                    text_len=8, device=args.device, generator=torch.Generator().manual_seed(0))
        with log.stage("forward"), torch.no_grad(), count_fp8_calls(model) as calls, \
                count_fp8_attention_calls(model) as attn:
            out = model(**inputs)[0]
        ran_attn = sum(1 for c in attn.values() if c["fp8"])
        print(f"forward          output {list(out.shape)}, {len(calls)}/{report.fp8_layers} FP8 layers ran"
              + (f", {ran_attn}/{report.fp8_attention_layers} FP8 attentions ran" if report.fp8_attention_layers else "")
              + f", finite={bool(torch.isfinite(out).all())}")
    return 0


# -------------------------------------------------------------------------------------------- families
@_command("families")
def _families(args: argparse.Namespace) -> int:
    from .families import FAMILIES

    for fam in FAMILIES.values():
        experts = "+".join(fam.experts)
        size = f"{fam.width}x{fam.height}" + (f"x{fam.num_frames}f" if fam.num_frames else "")
        print(f"{fam.name:15s} {fam.title:17s} {fam.class_name:24s} {experts:24s} {size:14s} {len(fam.bf16_fallback)} fallback rules")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fp8cookbook",
        description="FP8 inference of diffusion transformers (FLUX.1, FLUX.2, Wan2.2): quantize with ModelOpt, "
                    "convert to SGLang's FP8 checkpoint format, inspect, load, compare against BF16, benchmark.",
        epilog="Run `fp8cookbook COMMAND --help` for each command. Errors print as one line and exit 2.",
    )
    parser.add_argument("--version", action="version", version=f"fp8cookbook {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # `--help` lists the commands in the order a user runs them: quantize first, families last.
    for extra in _EXTRA_PARSERS:
        if extra.__name__ == "_quantize_parser":
            extra(sub)

    p = sub.add_parser("convert", help="ModelOpt export -> SGLang FP8 checkpoint folder",
                       description="Convert a ModelOpt diffusers export (FP8 weights with scales, or BF16 weights plus "
                                   "the amaxes of --state-file) into the FP8 checkpoint folder SGLang loads with "
                                   "--transformer-path. The family's BF16-fallback layers are taken from "
                                   "--base-transformer. Writes to a temporary folder and renames at the end.")
    p.add_argument("export_dir", type=Path,
                   help="ModelOpt export: a transformer folder, or a whole-pipeline export (model_index.json at the "
                        "top, e.g. nvidia/Wan2.2-T2V-A14B-Diffusers-FP8), whose FP8 components are all converted")
    p.add_argument("output_dir", type=Path, help="folder to create")
    p.add_argument("--state-file", type=Path, help="ModelOpt state (mto.save, e.g. transformer.pt): amaxes for a BF16 export")
    p.add_argument("--base-transformer", type=Path, help="original BF16 transformer folder (diffusers layout), for "
                                                          "fallback layers (default: the one `fp8cookbook quantize` "
                                                          "recorded in quantize.json beside the export)")
    p.add_argument("--family", default="auto", help="fallback profile: a family name, 'auto' (from _class_name) or 'none'")
    p.add_argument("--keep-bf16", action="append", default=[], metavar="REGEX",
                   help="also keep modules whose name matches REGEX (re.search, as SGLang's --keep-bf16-pattern) in BF16; repeatable")
    p.add_argument("--base", metavar="PIPELINE",
                   help="original BF16 pipeline (folder or cached hub id), for a repo input or --full-repo: its "
                        "component folders give the fallback layers, its model card the license")
    p.add_argument("--full-repo", action="store_true",
                   help="write a complete diffusers repo (model_index.json, every component, each FP8 transformer "
                        "in its folder, model card) that `sglang generate --model-path OUTPUT_DIR` serves alone")
    p.add_argument("--component", default="transformer",
                   help="which component one transformer export is, for --full-repo (default: transformer)")
    p.add_argument("--link", default="hardlink", choices=("hardlink", "symlink", "copy"),
                   help="how --full-repo takes the other components: hard links (default; copies across file "
                        "systems), symbolic links, or copies")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists")
    p.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("inspect", help="summarize an FP8 checkpoint or repo; exit 1 if inconsistent",
                       description="Summarize a checkpoint (dtypes, FP8 layer count, ignore coverage, scale ranges), "
                                   "or every component of a diffusers repo. `ignore` is read as SGLang reads it (its "
                                   "runtime names count). Exits 1 when a module in `ignore` holds FP8 tensors, an FP8 "
                                   "weight lacks a scale, a scale is not finite and positive, a folder holds FP8 "
                                   "weights or scales without a quantization_config, or a folder cannot be judged.")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("load", help="load an FP8 checkpoint with fp8cookbook's FP8 layers and run one forward",
                       description="Load a checkpoint into its diffusers transformer class with FP8 layers, print the "
                                   "load report, and run one forward on dummy inputs counting the FP8 layers that ran.")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-forward", dest="forward", action="store_false", help="load only")
    p.add_argument("--fp8-attention", **_ATTENTION_ARG,
                   help="attention in FP8 with the checkpoint's Q/K/V scales (fp8cookbook_attention_scales.json, "
                        "written by --quantize-mha calibrations): auto (default) = where the file exists, for calls "
                        f"with >= {MIN_KV_TOKENS} keys on a GPU (where it pays); on = every call (the file must exist; bare "
                        "--fp8-attention means on); off = BF16 attention, as SGLang runs it")

    for extra in _EXTRA_PARSERS:
        if extra.__name__ != "_quantize_parser":
            extra(sub)
    sub.add_parser("families", help="list the supported model families",
                   description="List the model families, their transformer class, experts, default size and profile.")
    return parser


_EXTRA_PARSERS: list[Callable[[argparse._SubParsersAction], None]] = []


# ------------------------------------------------------------------------------------------------- bench
@_command("bench")
def _bench(args: argparse.Namespace) -> int:
    from .bench import BenchSettings, fold_side_peaks, log_stderr, run_bench, summary_lines

    settings = BenchSettings(
        family=args.family, synthetic=args.synthetic, model_path=args.model_path, fp8_path=args.fp8,
        height=args.height, width=args.width, num_frames=args.frames, steps=args.steps, runs=args.runs,
        warmup=args.warmup, warmup_steps=args.warmup_steps, text_len=args.text_len, compile=args.compile,
        cuda_graphs=args.cuda_graphs,
        fast=False if args.plain else None, levers=args.levers, include_fallback=args.include_fallback,
        attention_backend=args.attention_backend, fp8_attention=args.fp8_attention, device=args.device,
        peers=tuple(args.peer.split(",")) if args.peer else (), one_expert_resident=args.one_expert_resident)
    from .stages import StageLog

    with StageLog().stage("bench", hint="time fewer --steps, or a smaller --height/--width (--frames)") as stage:
        report = run_bench(settings, output=args.output, log=log_stderr if args.verbose else (lambda m: None))
        fold_side_peaks(stage, report)
    print("\n".join(summary_lines(report)))
    if args.output:
        print(f"wrote {args.output}")
    return 0


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    import textwrap

    p = sub.add_parser(
        "bench", help="time BF16 vs FP8 denoising in one process (synthetic weights or a real pipeline)",
        description=textwrap.fill("Time the denoising loop in BF16 and in FP8 in one process, on the same inputs and with the same "
                    "compile setting: warm-up loops, then timed loops (median, min/max, quartiles, per-step times; "
                    "CUDA events on a GPU), peak GPU memory of each side, and the number of FP8 layers that really "
                    "ran. A loop is STEPS transformer forwards: one per step for FLUX (guidance-distilled), two for "
                    "Wan2.2 (classifier-free guidance), and Wan2.2 A14B runs its high-noise expert above the "
                    "boundary and its low-noise expert below it. BF16 is timed first, then the model is turned into "
                    "FP8 in place, so models whose BF16 and FP8 copies do not fit together are timed the same way. "
                    "The FP8 fast path (one-pass Triton activation quantisation, fast accumulation, fused Q/K/V) is "
                    "on by default on CUDA; --plain or FP8COOKBOOK_PLAIN=1 times the plain path.", 100),
        epilog="examples:\n"
               "  fp8cookbook bench --family flux1 --synthetic tiny --device cpu      # seconds, any machine\n"
               "  fp8cookbook bench --family flux1 --synthetic full --steps 10 --compile --output flux1.json\n"
               "  fp8cookbook bench --family wan22 --synthetic full --steps 2 --runs 2 --levers\n"
               "  fp8cookbook bench --family flux1 --synthetic full --steps 10 --peer torchao-rowwise,torchao-tensorwise\n"
               "  fp8cookbook bench --family flux1 --model-path black-forest-labs/FLUX.1-dev --fp8 flux1-fp8/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", required=True, help="model family: flux1, flux2, wan22 (= wan22-a14b), wan22-ti2v-5b")
    p.add_argument("--synthetic", choices=["full", "tiny"],
                   help="random weights of the family's transformer: 'full' size (timing) or 'tiny' (CPU, seconds)")
    p.add_argument("--model-path", help="instead of --synthetic: a BF16 diffusers pipeline (folder or hub id)")
    p.add_argument("--fp8", help="FP8 checkpoint folder (or one holding transformer/, transformer_2/) for the "
                                 "--model-path pipeline (default: the tiny test pipeline at its small settings, as "
                                 "quantize and compare); a --model-path without it is quantised in-process")
    p.add_argument("--height", help="image/video height (default: the family's, 64 with --synthetic tiny)")
    p.add_argument("--width", help="image/video width (default: the family's, 64 with --synthetic tiny)")
    p.add_argument("--frames", help="video frames, 4k+1 (Wan2.2 only; default 81 or 121, 5 with tiny)")
    p.add_argument("--steps", help="denoising steps per loop (default: the family's 28/50/40; 3 with tiny); a "
                                   "subset of the real count is fine, the report also extrapolates to the full count")
    p.add_argument("--runs", help="timed loops per side (default 3; 2 with tiny)")
    p.add_argument("--warmup", help="untimed warm-up loops per side (default 1)")
    p.add_argument("--warmup-steps", help="--model-path only: denoising steps of each untimed call (warm-up, the FP8 "
                                          "call count, in-process calibration; default --steps). A short warm-up "
                                          "warms the same kernels; Wan2.2 A14B needs >= 2 to reach both experts")
    p.add_argument("--text-len", help="text tokens (default 512; 8 with tiny)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile both sides (diffusers' compile_repeated_blocks(fullgraph=True))")
    p.add_argument("--cuda-graphs", action="store_true", help="replay each forward as a CUDA graph, on both sides")
    p.add_argument("--levers", action="store_true",
                   help="also time each fast-path lever as its own FP8 side (plain, +Triton quantisation, "
                        "+fast accumulation, +fused projections)")
    p.add_argument("--plain", action="store_true", help="time the plain FP8 path (no fast path)")
    p.add_argument("--include-fallback", action="store_true",
                   help="synthetic only: also put the family's BF16-fallback layers (e.g. FLUX.1's double-block "
                        "feed-forwards) in FP8, as measurements that quantise every block Linear do")
    p.add_argument("--attention-backend", metavar="NAME",
                   help="diffusers attention backend on both sides, e.g. _native_cudnn, _native_flash "
                        "(default: torch SDPA's own choice)")
    p.add_argument("--fp8-attention", **_ATTENTION_ARG,
                   help="FP8 attention (Triton kernel 'sage' with dynamic scales; FP8COOKBOOK_ATTENTION_KERNEL=triton for the "
                        "static Q/K/V scales) on top of the FP8 side, as its own "
                        f"headline side: auto (default; CUDA only) = calls with >= {MIN_KV_TOKENS} keys, as the loader does; "
                        "on = every call (bare --fp8-attention); off = none. Synthetic runs calibrate the scales, "
                        "--fp8 uses the checkpoint's --quantize-mha side file. Each side reports its first forward's "
                        "cosine against BF16")
    p.add_argument("--one-expert-resident", action="store_true",
                   help="--model-path, Wan2.2 A14B: keep only the running expert on the GPU and the other on the CPU, "
                        "on both sides, as an 80 GB card needs for BF16 (57 GB of experts); the transfers are timed")
    p.add_argument("--peer", metavar="PEER[,PEER]",
                   help="synthetic only: also time another library's FP8 on the layers our FP8 side quantises, each "
                        "on a fresh BF16 build after our sides, comma-separated: torchao-rowwise, torchao-tensorwise "
                        "(torchao's Float8DynamicActivationFloat8WeightConfig, PerRow or PerTensor; needs "
                        "pip install 'fp8cookbook[torchao]' and a CUDA GPU of compute capability >= 8.9). The "
                        "report gives each peer's ms/step and its ratio to ours and to BF16")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--output", type=Path, metavar="JSON", help="write the full report here (atomically)")
    p.add_argument("--verbose", action="store_true", help="progress on stderr")


_EXTRA_PARSERS.append(_bench_parser)


# ------------------------------------------------------------------------------------------------ compare
@_command("compare")
def _compare(args: argparse.Namespace) -> int:
    import torch

    from .compare import (Thresholds, compare_trajectories, default_prompt, default_thresholds, load_transformer,
                          write_outputs)
    from .families import get_family
    from .params import require_device
    from .pipelines import default_tiny_settings, load_pipeline
    from .stages import StageLog
    from .workflow import resolve_dtype

    family = get_family(args.family)
    if "transformer_2" not in family.experts and (args.candidate_2 or args.reference_2):
        raise Fp8CookbookError(f"{family.title} has one transformer; --candidate-2/--reference-2 apply to Wan2.2 A14B")
    device = require_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"), "--device")
    dtype = resolve_dtype(args.dtype, device)  # the notebooks' rule: float32 on CPU, bfloat16 on CUDA
    load_to = "cpu" if args.offload_idle else device
    log = StageLog()
    hint = "pass --offload-idle (the BF16 and FP8 copies never share the GPU)" if not args.offload_idle else (
        "compare at a smaller --height/--width (--frames for video)")
    # Transformers first: a bad path fails before the pipeline is loaded.
    with log.stage("load", hint=hint):
        candidate = {name: load_transformer(path, device=load_to, dtype=dtype, fp8_attention=args.fp8_attention)
                     for name, path in (("transformer", args.candidate), ("transformer_2", args.candidate_2)) if path}
        reference = {name: load_transformer(path, device=load_to, dtype=dtype)
                     for name, path in (("transformer", args.reference), ("transformer_2", args.reference_2)) if path}
        pipe = load_pipeline(family.name, args.model_path, dtype=dtype, device=device)
    tiny = default_tiny_settings(family.name) if args.model_path is None else {}
    pick = lambda value, key: tiny.get(key) if value is None else value  # noqa: E731
    with log.stage("compare", hint=hint, output=args.output_dir):
        report = compare_trajectories(
            pipe, reference, candidate, family=family, prompt=args.prompt or default_prompt(family), seed=args.seed,
            height=pick(args.height, "height"), width=pick(args.width, "width"),
            num_frames=pick(args.frames, "num_frames"), steps=pick(args.steps, "num_inference_steps"),
            guidance_scale=pick(args.guidance, "guidance_scale"), progress=not args.quiet and not tiny,
            offload_idle=args.offload_idle)
    defaults = default_thresholds(family)  # the notebooks' bounds, unless set here
    thresholds = Thresholds(**{k: (v if getattr(args, k) is None else getattr(args, k))
                               for k, v in defaults.as_dict().items()})
    paths = write_outputs(report, args.output_dir, thresholds)
    print("\n".join(report.summary_lines()))
    print("wrote   " + ", ".join(str(p) for p in paths))
    failures = report.failures(thresholds)
    for line in failures:
        print(f"fp8cookbook compare: threshold missed: {line}", file=sys.stderr)
    return 1 if failures else 0


def _compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="run reference and candidate transformers through one pipeline; compare",
                       description="Run the reference transformer(s) (default: the pipeline's own BF16 ones) and the "
                                   "candidate ones through the same pipeline with identical prompt, seed, scheduler, "
                                   "steps, guidance and size. Compares the latents after every step and the decoded "
                                   "frames; writes compare.json (docs/compare-report-schema.md), compare_metrics.png "
                                   "and compare_images.png. Exits 1 when a threshold is missed, naming it. Without "
                                   "--model-path the tiny test pipeline and its small settings are used.")
    p.add_argument("--family", required=True, help="model family (see `fp8cookbook families`)")
    p.add_argument("--model-path", help="base pipeline folder or hub id (default: the tiny test pipeline)")
    p.add_argument("--candidate", required=True, type=Path, help="transformer folder to test (FP8 checkpoint or BF16)")
    p.add_argument("--candidate-2", type=Path, help="Wan2.2 A14B: folder for transformer_2 (default: the pipeline's)")
    p.add_argument("--fp8-attention", **_ATTENTION_ARG,
                   help="the candidate's attention: auto (default) = FP8 where its --quantize-mha scale file exists, "
                        f"for calls with >= {MIN_KV_TOKENS} keys on a GPU; on = FP8 for every call (bare --fp8-attention; "
                        "checks FP8 attention on your own model and prompts, CPU included); off = BF16")
    p.add_argument("--reference", type=Path, help="transformer folder to compare against (default: the pipeline's)")
    p.add_argument("--reference-2", type=Path, help="Wan2.2 A14B: reference transformer_2 (default: the pipeline's)")
    p.add_argument("--prompt", help="default: the notebooks' (images: a red house by a lake; video: a fox in neon rain)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, help="default: the family's (tiny pipeline: its small size)")
    p.add_argument("--width", type=int)
    p.add_argument("--frames", type=int, help="video families: frame count")
    p.add_argument("--steps", type=int, help="denoising steps")
    p.add_argument("--guidance", type=float, help="guidance scale")
    p.add_argument("--min-cosine", type=float, help="fail if the final latents' cosine is below this (default: the "
                                                     "notebooks': 0.98 for images, 0.95 for video)")
    p.add_argument("--min-step-cosine", type=float, help="fail if any step's latent cosine is below this (0.95; 0.9)")
    p.add_argument("--max-rel-l2", type=float, help="fail if the final latents' relative L2 is above this (0.2; 0.3)")
    p.add_argument("--min-psnr", type=float, help="fail if the PSNR (dB) of any frame set is below this (22; 20)")
    p.add_argument("--min-ssim", type=float, help="fail if the SSIM of any frame set is below this (0.8; 0.7)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="dtype both sides run in; auto (default, as in the notebooks) = bfloat16 on CUDA, float32 on "
                        "CPU (CPU BF16 matmuls are slow and round more)")
    p.add_argument("--output-dir", required=True, type=Path)
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--offload-idle", action="store_true",
                   help="keep the side that is not running on the CPU (BF16 and FP8 copies of a big model never share the GPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


_EXTRA_PARSERS.append(_compare_parser)


# ----------------------------------------------------------------------------------------------- quantize
@_command("quantize")
def _quantize(args: argparse.Namespace) -> int:
    import torch

    from .families import get_family
    from .params import require_device
    from .pipelines import load_pipeline
    from .quantize import calibration_prompts, require_modelopt, quantize_pipeline
    from .stages import StageLog

    # Everything a user can get wrong is checked before the (possibly minutes-long) pipeline load.
    family = get_family(args.family)
    prompts = calibration_prompts(args.prompts_file) if args.prompts_file else None
    if args.frames is not None and not family.is_video:
        raise Fp8CookbookError(f"{family.title} makes images: --frames applies to the Wan2.2 families")
    if args.output_dir.exists() and not args.overwrite:
        raise Fp8CookbookError(f"{args.output_dir}: already exists (pass --overwrite to replace it)")
    device = require_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"), "--device")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script inside ModelOpt's import
        require_modelopt()
    dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
             "bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]

    log = StageLog()  # one line per step (time, peak memory, bytes written); also in quantize.json
    with log.stage("load", hint="load on --device cpu (--dtype bfloat16)"):
        pipe = load_pipeline(family.name, args.model_path, dtype=dtype, device=device)
    result = quantize_pipeline(
        family.name, pipe, args.output_dir, prompts=prompts, num_prompts=args.num_prompts,
        num_inference_steps=args.calib_steps, seed=args.seed, height=args.height, width=args.width,
        num_frames=args.frames, guidance_scale=args.guidance, quantize_mha=args.quantize_mha,
        overwrite=args.overwrite, progress=not args.quiet and args.model_path is not None, stages=log,
        full_repo=args.full_repo, link=args.link,
        keep_pipeline=False)  # the pipeline ends here: no host copy of the BF16 transformers meanwhile
    print("\n".join(result.lines()))
    fp8 = {name: p["fp8"] for name, p in result.paths.items()}
    for name, path in fp8.items():
        print(f"FP8 checkpoint   {name}: {path}")
    from .repo import serve_commands

    base = args.model_path or family.hub_id
    serve = serve_commands(repo=str(result.repo) if result.repo else None, base=base, transformer=str(fp8["transformer"]),
                           extra_flags=family.sglang_extra_flags)
    for line in serve:
        print(f"serve            {line}")
    flags = " ".join(f"--{'candidate' if n == 'transformer' else 'candidate-2'} {p}" for n, p in fp8.items())
    model = f" --model-path {args.model_path}" if args.model_path else ""
    print(f"next             fp8cookbook compare --family {family.name}{model} {flags} --output-dir compare/")
    if args.quantize_mha:
        print("FP8 attention    scales written; the loader uses them on a GPU (--fp8-attention on|off to choose)")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _device(text: str) -> str:
    import re

    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def _quantize_parser(sub: argparse._SubParsersAction) -> None:
    import textwrap

    p = sub.add_parser(
        "quantize", help="ModelOpt FP8 quantization calibrated on the real pipeline, then SGLang FP8 checkpoint(s)",
        description=textwrap.fill("Quantize the family's transformer(s) to FP8 with NVIDIA ModelOpt and write SGLang FP8 "
                    "checkpoints. Recipe: per-tensor E4M3 weights and static inputs on nn.Linear layers, `max` "
                    "calibration, the family's sensitive layers left in BF16, plus static attention Q/K/V scales "
                    "for fp8cookbook's FP8 attention (--no-quantize-mha skips them). Calibration runs the whole "
                    "pipeline (text encoders and every denoising step) over the prompts, prompt i with seed SEED+i. "
                    "Wan2.2 A14B: both experts are quantized in the same runs, each calibrated by the steps on its side of the boundary; a quantizer left without "
                    "an amax (e.g. too few steps to reach transformer_2) stops the run, naming it. Writes into a "
                    "temporary folder and renames it to OUTPUT_DIR at the end, so a failure leaves nothing behind. "
                    "Without --model-path the tiny test pipeline and its small settings are used.", 100),
        epilog="output layout (NAME = transformer, and transformer_2 for Wan2.2 A14B):\n"
               "  OUTPUT_DIR/NAME.pt        ModelOpt state: quantizer config, amaxes (weights only for a BF16-flavour export)\n"
               "  OUTPUT_DIR/export/NAME/   ModelOpt export (export_hf_checkpoint)\n"
               "  OUTPUT_DIR/fp8/NAME/      SGLang FP8 checkpoint: pass it to SGLang's --transformer-path\n"
               "  OUTPUT_DIR/base/NAME/     BF16 weights, only if the pipeline's own transformer folder is not local BF16\n"
               "  OUTPUT_DIR/repo/          with --full-repo: complete diffusers repo for SGLang's --model-path\n"
               "  OUTPUT_DIR/quantize.json  settings, calibration record, conversion stats, time, peak memory\n\n"
               "examples:\n"
               "  fp8cookbook quantize --family flux1 --output-dir /tmp/flux1-tiny     # tiny pipeline, seconds on CPU\n"
               "  fp8cookbook quantize --family flux1 --model-path black-forest-labs/FLUX.1-dev --output-dir flux1-fp8\n"
               "  fp8cookbook quantize --family wan22 --model-path Wan-AI/Wan2.2-T2V-A14B-Diffusers \\\n"
               "      --num-prompts 8 --calib-steps 20 --frames 33 --output-dir wan22-fp8",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", required=True, help="model family: flux1, flux2, wan22 (= wan22-a14b), wan22-ti2v-5b")
    p.add_argument("--model-path", help="BF16 diffusers pipeline: local folder or hub id (default: the tiny test pipeline)")
    p.add_argument("--prompts-file", type=Path, metavar="FILE",
                   help="calibration prompts, one per line ('#' lines and blank lines skipped); default: the "
                        "64 prompts shipped in fp8cookbook/data/calibration_prompts.txt")
    p.add_argument("--num-prompts", type=_positive_int, metavar="N",
                   help="use the first N prompts (default: all of --prompts-file; of the shipped file 64 for "
                        "images, 16 for video, 4 for the tiny pipeline)")
    p.add_argument("--calib-steps", type=_positive_int, metavar="N",
                   help="denoising steps per calibration run (default: 20; the tiny pipeline's 3 or 4). Wan2.2 "
                        "A14B needs enough steps for the schedule to cross the boundary")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt i uses SEED+i (default 0)")
    p.add_argument("--height", type=_positive_int, help="image/video height (default: the family's)")
    p.add_argument("--width", type=_positive_int, help="image/video width (default: the family's)")
    p.add_argument("--frames", type=_positive_int, help="video frames, 4k+1 (Wan2.2 only; default: the family's)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the family's)")
    p.add_argument("--quantize-mha", action=argparse.BooleanOptionalAction, default=True,
                   help="also calibrate attention Q/K/V inputs (ModelOpt --quantize-mha; needs `onnx`; on by "
                        "default). SGLang keeps attention in BF16 and never reads them: the scales go to a side file, "
                        "which fp8cookbook's loader uses for FP8 attention (--fp8-attention of load, compare, bench)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="dtype the pipeline runs calibration in; auto = bfloat16 on CUDA, float32 on CPU "
                        "(CPU BF16 matmuls are slow). The base and output checkpoints are BF16/FP8 either way")
    p.add_argument("--device", type=_device, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--output-dir", required=True, type=Path, help="folder to create (see the layout below)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists (only once all succeeded)")
    p.add_argument("--full-repo", action="store_true",
                   help="also write OUTPUT_DIR/repo: a complete diffusers repo (the pipeline's other components, "
                        "model_index.json, each FP8 transformer in its folder, model card) that `sglang generate "
                        "--model-path OUTPUT_DIR/repo` serves alone (both Wan2.2 A14B experts)")
    p.add_argument("--link", default="hardlink", choices=("hardlink", "symlink", "copy"),
                   help="how --full-repo takes the pipeline's other components (default: hard links, copies across "
                        "file systems)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


_EXTRA_PARSERS.append(_quantize_parser)


# ---------------------------------------------------------------------------------------------------- run
@_command("run")
def _run(args: argparse.Namespace) -> int:
    from .notebook import find_notebook, notebook_parameters, parse_value, run_notebook

    if args.help_notebook:
        path, preset = find_notebook(args.notebook)
        print(f"parameters of {path} (set with -p NAME VALUE):")
        for name, p in notebook_parameters(path).items():
            default = repr(preset[name]) if name in preset else p["default"]
            print(f"  {name:24s} {default!s:32s} {p.get('help') or ''}".rstrip())
        return 0
    params = {}
    for name, value in args.parameters:
        if not name.isidentifier():
            raise Fp8CookbookError(f"-p {name}: not a parameter name")
        params[name] = parse_value(value)
    result = run_notebook(args.notebook, params, progress=not args.quiet and sys.stderr.isatty())
    print("\n".join(result.lines()))
    if not result.passed:
        print(f"fp8cookbook run: checks missed (see {result.report_path})", file=sys.stderr)
        return 1
    return 0


def _run_parser(sub: argparse._SubParsersAction) -> None:
    import textwrap

    p = sub.add_parser(
        "run", help="run a cookbook notebook (quantize -> ... -> serve command) through papermill",
        description=textwrap.fill("Execute a cookbook notebook with papermill: quantize, convert, inspect, load with offload "
                    "disabled, compare BF16 and FP8 trajectories, time denoising, write report.json and print the "
                    "`sglang generate` command. The executed notebook, report.json and the FP8 checkpoint go to the "
                    "notebook's output_dir (default outputs/NAME under the current directory, one folder per family "
                    "variant), after the outputs of an earlier run there are removed; report.json lists every file "
                    "with the run's id. Every -p value is checked before the notebook starts. Without "
                    "-p model_path the tiny offline pipeline runs on the CPU in about a minute. Exits 1 when a "
                    "threshold was missed.", 100),
        epilog="examples:\n"
               "  fp8cookbook run flux1                                   # tiny FLUX.1, CPU, no network\n"
               "  fp8cookbook run flux1 -p seed 3 -p output_dir /tmp/f1  # papermill -p overrides\n"
               "  fp8cookbook run wan22 -p family wan22-ti2v-5b           # or: fp8cookbook run wan22-ti2v-5b\n"
               "  fp8cookbook run flux1 -p model_path black-forest-labs/FLUX.1-dev -p prompts '[\"a red fox\"]'\n"
               "  fp8cookbook run flux1 --help-notebook                   # list the parameters",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("notebook", metavar="NOTEBOOK",
                   help="flux1, flux2, wan22 (also wan22-a14b, wan22-ti2v-5b), or a path to an .ipynb / jupytext .py")
    p.add_argument("-p", "--parameter", dest="parameters", nargs=2, action="append", default=[],
                   metavar=("NAME", "VALUE"),
                   help="set a notebook parameter; VALUE reads like papermill's -p (True/False/None, numbers, "
                        "else text) and JSON/YAML for [lists] and {mappings}; repeatable")
    p.add_argument("--help-notebook", action="store_true", help="list the notebook's parameters and defaults, run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


_EXTRA_PARSERS.append(_run_parser)


# ------------------------------------------------------------------------------------------------ standin
@_command("standin")
def _standin(args: argparse.Namespace) -> int:
    from .families import get_family
    from .standin import write_standin

    family = get_family(args.family)
    components = [c for c in args.components.split(",") if c] if args.components else None
    if args.transformer_only:
        if components is not None:
            raise Fp8CookbookError("--transformer-only and --components exclude each other")
        components = list(family.experts)
    write_standin(family.name, args.output_dir, size=args.size, layers=args.layers, components=components,
                  seed=args.seed, overwrite=args.overwrite, dry_run=args.dry_run,
                  progress=False if args.quiet else None)
    if not args.dry_run:
        print(f"next             fp8cookbook run {family.name} -p model_path {args.output_dir} -p device cuda")
    return 0


def _standin_parser(sub: argparse._SubParsersAction) -> None:
    import textwrap

    p = sub.add_parser(
        "standin", help="write a full-size stand-in pipeline folder: the real configs with random weights",
        description=textwrap.fill("Write a complete diffusers pipeline folder of FAMILY's real configs with seeded random "
                    "weights: every component (transformer(s), text encoder(s) at their real sizes, VAE), tokenizers "
                    "built offline, scheduler and model_index.json, so that `model_path` takes it like a download. "
                    "Time, memory and disk behave as with the real weights (the images are noise): test a GPU, a disk "
                    "and a setup before a 60 GB download. Prints the size of each component first (from the "
                    "configs, nothing allocated), checks the free disk space, streams the weights in 64 MiB slices to "
                    "5 GB safetensors shards (never a whole model in memory) into a temporary folder, and renames it "
                    "to OUTPUT_DIR at the end. The same seed gives the same bytes.", 100),
        epilog="sizes (full): flux1 33.74 GB, flux2 112.64 GB, wan22 (T2V-A14B) 69.14 GB, wan22-ti2v-5b 24.20 GB\n\n"
               "examples:\n"
               "  fp8cookbook standin flux1 /data/flux1-standin --dry-run       # the size table only\n"
               "  fp8cookbook standin flux1 /data/flux1-standin                 # 33.74 GB\n"
               "  fp8cookbook standin wan22 /data/a14b --transformer-only       # both experts, nothing else\n"
               "  fp8cookbook standin flux2 /tmp/f2 --size reduced              # same classes, small, for CPU tests\n"
               "  fp8cookbook run flux1 -p model_path /data/flux1-standin -p device cuda",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("family", metavar="FAMILY", help="flux1, flux2, wan22 (= wan22-a14b), wan22-ti2v-5b")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", type=Path, help="pipeline folder to create")
    p.add_argument("--size", choices=["full", "reduced"], default="full",
                   help="full = the real configs (default); reduced = the same classes and config keys with small "
                        "widths and few layers (megabytes, for CPU tests)")
    p.add_argument("--layers", type=_positive_int, metavar="N",
                   help="transformer blocks of each kind (FLUX: double and single; Wan: blocks), e.g. 2 for a quick "
                        "full-width smoke test; default: the real count")
    p.add_argument("--components", metavar="LIST",
                   help="comma-separated weight components to write, e.g. transformer,vae; the others are listed as "
                        "absent in model_index.json and load as None (default: all)")
    p.add_argument("--transformer-only", action="store_true",
                   help="only the transformer(s) (Wan2.2 A14B: both experts), plus tokenizers and scheduler")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--dry-run", action="store_true", help="print the size table and write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists (once all is written)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (plain lines per component instead)")


_EXTRA_PARSERS.append(_standin_parser)


def _one_line(text: str) -> str:
    return " ".join(text.split("\n")).strip()


# Commands that import diffusers/transformers: their output goes through console.command_output (inspect and
# families stay fast and import neither). Loading bars are for long work: a real --model-path, a notebook, a stand-in.
_THIRD_PARTY = ("quantize", "compare", "bench", "load", "run", "standin")


def _output(args: argparse.Namespace):
    if args.command not in _THIRD_PARTY:
        return contextlib.nullcontext()
    from .console import command_output

    long_work = args.command in ("run", "standin") or getattr(args, "model_path", None) is not None
    return command_output(quiet=bool(getattr(args, "quiet", False)), bars=long_work)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            with _output(args):
                return COMMANDS[args.command](args)
    except Fp8CookbookError as e:
        print(f"fp8cookbook {args.command}: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system's own refusals (read-only, disk full, permissions) not caught nearer
        from .files import disk_error

        where = e.filename or "file system"
        print(f"fp8cookbook {args.command}: error: {_one_line(str(disk_error(e, where)))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fp8cookbook {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
