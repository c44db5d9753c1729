"""`fp8cookbook` command line. `main(argv) -> int` is testable without a subprocess.

Errors a user can fix (bad file, tensor, option) print as one line on stderr and exit 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Callable

from . import __version__
from .errors import Fp8CookbookError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def _command(name: str):
    def deco(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = fn
        return fn

    return deco


# ----------------------------------------------------------------------------------------------- convert
@_command("convert")
def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint

    stats = convert_checkpoint(args.export_dir, args.output_dir, state_file=args.state_file,
                               base_transformer=args.base_transformer, family=args.family, keep_bf16=args.keep_bf16,
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
    from dataclasses import asdict

    from .checkpoint import inspect_checkpoint

    report = inspect_checkpoint(args.checkpoint)
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print("\n".join(report.lines()))
    return 1 if report.problems else 0


# ------------------------------------------------------------------------------------------------- load
@_command("load")
def _load(args: argparse.Namespace) -> int:
    import torch

    from .families import family_for_class
    from .fp8linear import count_fp8_calls
    from .loader import load_fp8_transformer

    model, report = load_fp8_transformer(args.checkpoint, device=args.device)
    print("\n".join(report.lines()))
    family = family_for_class(report.class_name)
    if family is not None and args.forward:
        config = dict(model.config)
        inputs = family.make_inputs(config, height=64, width=64, num_frames=5 if family.is_video else None,
                                    text_len=8, device=args.device, generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), count_fp8_calls(model) as calls:
            out = model(**inputs)[0]
        print(f"forward          output {list(out.shape)}, {len(calls)}/{report.fp8_layers} FP8 layers ran, "
              f"finite={bool(torch.isfinite(out).all())}")
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

    p = sub.add_parser("convert", help="ModelOpt export -> SGLang FP8 checkpoint folder",
                       description="Convert a ModelOpt diffusers export (FP8 weights with scales, or BF16 weights plus "
                                   "the amaxes of --state-file) into the FP8 checkpoint folder SGLang loads with "
                                   "--transformer-path. The family's BF16-fallback layers are taken from "
                                   "--base-transformer. Writes to a temporary folder and renames at the end.")
    p.add_argument("export_dir", type=Path, help="ModelOpt export (the transformer folder, or a pipeline export holding one)")
    p.add_argument("output_dir", type=Path, help="folder to create")
    p.add_argument("--state-file", type=Path, help="ModelOpt state (mto.save, e.g. transformer.pt): amaxes for a BF16 export")
    p.add_argument("--base-transformer", type=Path, help="original BF16 transformer folder (diffusers layout), for fallback layers")
    p.add_argument("--family", default="auto", help="fallback profile: a family name, 'auto' (from _class_name) or 'none'")
    p.add_argument("--keep-bf16", action="append", default=[], metavar="REGEX",
                   help="also keep modules whose name matches REGEX (re.search, as SGLang's --keep-bf16-pattern) in BF16; repeatable")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists")
    p.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("inspect", help="summarize an FP8 checkpoint; exit 1 if inconsistent",
                       description="Summarize a checkpoint (dtypes, FP8 layer count, ignore coverage, scale ranges). "
                                   "Exits 1 when a module in `ignore` holds FP8 tensors, an FP8 weight lacks a scale, "
                                   "or a scale is not finite and positive.")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("load", help="load an FP8 checkpoint with fp8cookbook's FP8 layers and run one forward",
                       description="Load a checkpoint into its diffusers transformer class with FP8 layers, print the "
                                   "load report, and run one forward on dummy inputs counting the FP8 layers that ran.")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-forward", dest="forward", action="store_false", help="load only")

    sub.add_parser("families", help="list the supported model families",
                   description="List the model families, their transformer class, experts, default size and profile.")

    for extra in _EXTRA_PARSERS:
        extra(sub)
    return parser


_EXTRA_PARSERS: list[Callable[[argparse._SubParsersAction], None]] = []


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            return COMMANDS[args.command](args)
    except Fp8CookbookError as e:
        print(f"fp8cookbook {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fp8cookbook {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
