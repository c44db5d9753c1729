"""Peak memory and throughput of `fp8cookbook convert` on a synthetic multi-GB export.

Writes a FLUX.1-shaped export of Linear weights (BF16 flavour: weights plus a ModelOpt-style state file with
amaxes, so the converter quantizes every layer itself; or FP8 flavour with scales), then runs the converter in a
child process and reports its peak RSS (ru_maxrss of the child) and GB/s of output written.

    python scripts/convert_bench.py --gb 4 --flavour bf16 --work /tmp/convert-bench
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
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    t = time.perf_counter()
    paths = make_export(args.work, args.gb, args.flavour)
    export_bytes = sum(p.stat().st_size for p in paths["export"].glob("*.safetensors"))
    print(f"synthetic {args.flavour} export: {export_bytes / 1e9:.2f} GB in {time.perf_counter() - t:.1f} s")
    cmd = [sys.executable, "-m", "fp8cookbook.cli", "convert", str(paths["export"]), str(args.work / "out"), "--quiet",
           "--family", "none"] + (["--state-file", str(paths["state"])] if args.flavour == "bf16" else [])
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - t
    # the converter's own VmHWM (ru_maxrss of a child would include this parent's footprint at fork time)
    rss_mb = json.loads((args.work / "out" / "fp8cookbook_conversion.json").read_text())["peak_rss_mb"]
    out_bytes = sum(p.stat().st_size for p in (args.work / "out").glob("*.safetensors"))
    print(f"convert: {out_bytes / 1e9:.2f} GB written in {seconds:.1f} s = {out_bytes / 1e9 / seconds:.2f} GB/s "
          f"(read {export_bytes / 1e9 / seconds:.2f} GB/s), peak RSS of the converter {rss_mb:.0f} MB")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
