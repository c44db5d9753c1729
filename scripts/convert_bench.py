"""Peak memory and throughput of `fp8cookbook convert` on a synthetic multi-GB export.

Writes a FLUX.1-shaped export of Linear weights (BF16 flavour: weights plus a ModelOpt-style state file with
amaxes, so the converter quantizes every layer itself; or FP8 flavour with scales), then runs the converter in a
child process and reports its peak RSS (the child's VmHWM) and GB/s of output written.

`--against-cp` also times a plain `cp` + `sync` of the same files, one at a time (the disk's durable copy speed: the
converter fsyncs what it writes), and runs the converter twice: with the shard writers' early writeback off
(`WRITEBACK_BYTES = 0`: the disk starts at each shard's closing fsync) and on (the default), each as a percentage of
`cp` + `sync`.

    python scripts/convert_bench.py --gb 4 --flavour bf16 --work /tmp/convert-bench
    python scripts/convert_bench.py --gb 8 --flavour fp8 --against-cp --work /data/convert-bench
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def make_export(root: Path, gb: float, flavour: str) -> dict[str, Path]:
    dim, layers_per_shard = 3072, 8
    per_layer = dim * dim * 4  # 4 matrices of dim x dim per block
    n_layers = max(1, int(gb * 1e9 / (per_layer * (1 if flavour == "fp8" else 2))))
    export, base = root / "export", root / "base"
    export.mkdir(parents=True)
    base.mkdir(parents=True)
    weight_map, base_map, amax = {}, {}, {}
    g = torch.Generator().manual_seed(0)
    shard, base_shard, idx = {}, {}, 0

    def flush():
        nonlocal shard, base_shard, idx
        if not shard:
            return
        idx += 1
        name = f"diffusion_pytorch_model-{idx:05d}.safetensors"
        save_file(shard, export / name, metadata={"format": "pt"})
        if flavour == "bf16":  # the FP8 flavour's converter needs no base
            save_file(base_shard, base / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        base_map.update({k: name for k in base_shard})
        shard, base_shard = {}, {}

    for i in range(n_layers):
        for j in range(4):
            m = f"blocks.{i}.linear_{j}"
            w = (torch.randn(dim, dim, generator=g) * 0.02).to(torch.bfloat16)
            a = float(w.abs().max())
            amax[f"{m}.weight_quantizer._amax"] = torch.tensor(a, dtype=torch.bfloat16)
            amax[f"{m}.input_quantizer._amax"] = torch.tensor(4.0, dtype=torch.bfloat16)
            if flavour == "fp8":
                s = torch.tensor(a / 448, dtype=torch.float32)
                shard[f"{m}.weight"] = (w.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn)
                shard[f"{m}.weight_scale"] = s
                shard[f"{m}.input_scale"] = torch.tensor(4.0 / 448)
            else:
                shard[f"{m}.weight"] = w
            base_shard[f"{m}.weight"] = w
        if (i + 1) % layers_per_shard == 0:
            flush()
    flush()
    for folder, wm in ((export, weight_map), (base, base_map)):
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    qc = {"quant_method": "modelopt", "quant_algo": "FP8", "ignore": [], "producer": {"name": "modelopt", "version": "0.47.0"}}
    (export / "config.json").write_text(json.dumps({"_class_name": "SyntheticTransformer", "quantization_config": qc}))
    (base / "config.json").write_text(json.dumps({"_class_name": "SyntheticTransformer"}))
    torch.save({"modelopt_state": {}, "model_state_dict": amax}, root / "transformer.pt")
    return {"export": export, "base": base, "state": root / "transformer.pt"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=4.0, help="size of the export's weights in GB")
    ap.add_argument("--flavour", choices=["bf16", "fp8"], default="bf16")
    ap.add_argument("--work", type=Path, default=Path("/tmp/fp8cookbook-convert-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the synthetic export and the output")
    ap.add_argument("--against-cp", action="store_true",
                    help="also time cp + sync of the export, and the converter with early writeback off and on")
    ap.add_argument("--output", type=Path, help="JSON of the figures")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    t = time.perf_counter()
    paths = make_export(args.work, args.gb, args.flavour)
    export_bytes = sum(p.stat().st_size for p in paths["export"].glob("*.safetensors"))
    print(f"synthetic {args.flavour} export: {export_bytes / 1e9:.2f} GB in {time.perf_counter() - t:.1f} s")
    out = args.work / "out"
    convert = ["convert", str(paths["export"]), str(out), "--quiet", "--family", "none"] + (
        ["--state-file", str(paths["state"])] if args.flavour == "bf16" else [])
    report = {"gpu_machine": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "flavour": args.flavour, "export_bytes": export_bytes, "runs": {}}
    if args.against_cp:
        copy = args.work / "cp"
        copy.mkdir()
        seconds = 0.0
        for f in sorted(paths["export"].glob("*.safetensors")):
            t = time.perf_counter()
            subprocess.run(["cp", str(f), str(copy / f.name)], check=True)
            subprocess.run(["sync", str(copy / f.name)], check=True)
            seconds += time.perf_counter() - t
            (copy / f.name).unlink()
        report["cp_sync_s"] = seconds
        print(f"cp + sync: {export_bytes / 1e9:.2f} GB in {seconds:.1f} s = {export_bytes / 1e9 / seconds:.2f} GB/s")
    variants = {"writeback off": 0, "writeback on": None} if args.against_cp else {"default": None}
    for i, (label, writeback) in enumerate(variants.items()):
        # the module constant set in the child before the converter runs: the A/B switch of this benchmark only
        setup = "" if writeback is None else f"import fp8cookbook.checkpoint as c; c.WRITEBACK_BYTES = {writeback}; "
        cmd = [sys.executable, "-c", f"import sys; {setup}from fp8cookbook.cli import main; sys.exit(main(sys.argv[1:]))",
               *convert]
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        seconds = time.perf_counter() - t
        stats = json.loads((out / "fp8cookbook_conversion.json").read_text())
        rss_mb = stats["peak_rss_mb"]  # the converter's own VmHWM
        out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        run = {"child_s": seconds, "converter_s": stats["seconds"], "peak_rss_mb": rss_mb, "out_bytes": out_bytes,
               "read_gb_per_s": export_bytes / 1e9 / stats["seconds"]}
        line = (f"convert ({label}): {out_bytes / 1e9:.2f} GB written in {stats['seconds']:.1f} s "
                f"({seconds:.1f} s with the interpreter's start) = read {run['read_gb_per_s']:.2f} GB/s, "
                f"peak RSS {rss_mb:.0f} MB")
        if "cp_sync_s" in report:
            run["of_cp_sync"] = report["cp_sync_s"] / stats["seconds"]
            line += f", {100 * run['of_cp_sync']:.0f}% of cp + sync"
        print(line, flush=True)
        report["runs"][label] = run
        if i < len(variants) - 1:  # room for the next run; the last output stays with --keep
            shutil.rmtree(out)
            subprocess.run(["sync"], check=True)
    if args.output:
        args.output.write_text(json.dumps(report, indent=1))
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
