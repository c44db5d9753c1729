"""The benchmark's JSON report: its head (settings, environment, schedule), speedups, and the summary lines."""

from __future__ import annotations

import statistics
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch

from ..families import Family
from .measure import Step, environment
from .settings import SCHEMA, BenchSettings

if TYPE_CHECKING:
    from ..stages import StageRecord


def report_head(family: Family, s: BenchSettings, device: torch.device, steps: list[Step], cfg: int) -> dict:
    settings = asdict(s)
    settings["forwards_per_step"] = cfg
    settings["fp8_made"] = ("in place after the BF16 measurement (each BF16 Linear freed as its FP8 copy is made)"
                            if not s.fp8_path else "loaded from the FP8 checkpoint after freeing the BF16 transformer")
    return {
        "schema": SCHEMA,
        "family": family.name,
        "title": family.title,
        "mode": "synthetic" if s.synthetic else "pipeline",
        "synthetic": s.synthetic,
        "synthetic_note": ("random weights of the real transformer class; FP8 made in-process from one calibration "
                           "forward per expert" if s.synthetic else None),
        "settings": settings,
        "environment": environment(device),
        "schedule": [{"step": st.index, "timestep": round(st.timestep, 2), "expert": st.expert} for st in steps],
        "full_schedule_steps": family.num_steps,
    }


def finish(report: dict[str, Any], sides: list[dict[str, Any]], s: BenchSettings) -> dict[str, Any]:
    def base_for(side: dict[str, Any]) -> dict[str, Any] | None:
        graphs = side["levers"].get("cuda_graphs", False)
        return next((b for b in sides if b["precision"] == "bf16" and b["levers"].get("cuda_graphs", False) == graphs),
                    None)

    failed = [x for x in sides if "error" in x]
    sides_ok = [x for x in sides if "error" not in x]
    report["failed_sides"] = failed
    sides = sides_ok
    for side in sides:
        base = base_for(side)
        if base is not None:
            side["speedup_vs_bf16"] = base["loop_s"]["median"] / side["loop_s"]["median"]
            if side.get("peak_memory_gb") and base.get("peak_memory_gb"):
                side["peak_memory_vs_bf16"] = side["peak_memory_gb"] / base["peak_memory_gb"]
    report["sides"] = sides + failed
    bf16 = next(x for x in sides if x["precision"] == "bf16" and x["levers"].get("cuda_graphs", False) == s.cuda_graphs)
    fp8 = next((x for x in sides if x.get("headline")), None) or \
        [x for x in sides if x["precision"] == "fp8" and x["levers"].get("cuda_graphs", False) == s.cuda_graphs][-1]
    report["bf16"], report["fp8"] = bf16["name"], fp8["name"]
    report["speedup"] = bf16["loop_s"]["median"] / fp8["loop_s"]["median"]
    if "call_s" in bf16 and "call_s" in fp8:  # the pipeline mode: whole decoded generations
        report["end_to_end_speedup"] = bf16["call_s"]["median"] / fp8["call_s"]["median"]
    report["peak_memory_ratio"] = (fp8["peak_memory_gb"] / bf16["peak_memory_gb"]
                                   if fp8.get("peak_memory_gb") and bf16.get("peak_memory_gb") else None)
    report["fp8_layers"] = fp8.get("fp8_layers")
    report["fp8_layers_ran"] = fp8.get("fp8_layers_ran")
    for side in sides:
        side["ms_per_step"] = 1e3 * side["loop_s"]["median"] / len(side["step_s_median"])
    report["peers"] = _peers(sides, bf16, fp8)
    return report


def _peers(sides: list[dict[str, Any]], bf16: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """Each peer side against BF16 and against our headline FP8 side (and its GEMM-only side when that has FP8
    attention on top, since the peers change only the GEMMs): ms/step and ratios of loop medians."""
    gemm = next((x for x in sides if x["name"] == ours["name"].removesuffix("+fp8-attention")), ours)
    out = {}
    for peer in (x for x in sides if x["precision"] == "peer"):
        loop = peer["loop_s"]["median"]
        entry = {"ms_per_step": peer["ms_per_step"], "bf16_ms_per_step": bf16["ms_per_step"],
                 "ours": ours["name"], "ours_ms_per_step": ours["ms_per_step"],
                 "speedup_vs_bf16": bf16["loop_s"]["median"] / loop,
                 "ours_speedup_vs_peer": loop / ours["loop_s"]["median"],
                 "layers": peer.get("peer_layers")}
        if gemm is not ours:
            entry.update(ours_gemm_only=gemm["name"], ours_gemm_only_speedup_vs_peer=loop / gemm["loop_s"]["median"])
        out[peer["name"]] = entry
    return out


def summary_lines(report: dict[str, Any]) -> list[str]:
    s, env = report["settings"], report["environment"]
    size = f"{s['width']}x{s['height']}" + (f"x{s['num_frames']}f" if s.get("num_frames") else "")
    where = env.get("gpu") or f"CPU ({env.get('cpu')})"
    what = f"synthetic {report['synthetic']}" if report["synthetic"] else f"pipeline {s['model_path']}"
    lines = [f"{report['title']} {what}, {size}, {s['steps']} steps x {s['forwards_per_step']} forward(s), "
             f"{'compiled' if s['compile'] else 'eager'}{', CUDA graphs' if s['cuda_graphs'] else ''}"
             f"{', attention ' + s['attention_backend'] if s.get('attention_backend') else ''}"
             f"{', fallback layers in FP8' if s.get('include_fallback') else ''}, "
             f"{s['runs']} runs after {s['warmup']} warm-up"
             f"{' of ' + str(s['warmup_steps']) + ' steps' if s.get('warmup_steps') else ''}, on {where}",
             f"  {'side':30s} {'loop median':>11s} {'[min, max]':>19s} {'step':>8s} {'peak GB':>8s} "
             f"{'FP8 ran':>9s} {'speedup':>8s} {'cos vs BF16':>11s}"]
    for side in report["sides"]:
        if "error" in side:
            lines.append(f"  {side['name']:30s} failed: {side['error']}")
            continue
        loop = side["loop_s"]
        peak = "-" if side.get("peak_memory_gb") is None else f"{side['peak_memory_gb']:.1f}"
        ran = (f"{side['fp8_layers_ran']}/{side['fp8_layers']}" if "fp8_layers" in side else
               f"{side['peer_layers']}/{side['peer_layers_planned']}" if "peer_layers" in side else "-")
        speed = f"{side['speedup_vs_bf16']:.2f}x" if "speedup_vs_bf16" in side else "-"
        cos = f"{side['first_forward_cosine_vs_bf16']:.6f}" if "first_forward_cosine_vs_bf16" in side else "-"
        lines.append(f"  {side['name']:30s} {loop['median']:10.3f}s [{loop['min']:8.3f}, {loop['max']:8.3f}] "
                     f"{statistics.median(side['step_s_median']):7.3f}s {peak:>8s} {ran:>9s} {speed:>8s} {cos:>11s}")
    ratio = report.get("peak_memory_ratio")
    lines.append(f"  FP8 ({report['fp8']}) vs BF16 ({report['bf16']}): {report['speedup']:.2f}x"
                 + (f", peak memory {100 * ratio:.0f}% of BF16" if ratio else ""))
    if "end_to_end_speedup" in report:
        for side in (x for x in report["sides"] if "phase_s" in x):
            ph = side["phase_s"]
            lines.append(f"  {side['name']} end to end: {ph['call']:.3f} s = text encoding {ph['encode']:.3f} s "
                         f"+ denoising {ph['denoise']:.3f} s + VAE decode {ph['decode']:.3f} s")
        lines.append(f"  end to end (text encoding, denoising, VAE decode), FP8 vs BF16: "
                     f"{report['end_to_end_speedup']:.2f}x")
    for name, p in report.get("peers", {}).items():
        lines.append(f"  {name}: {p['ms_per_step']:.1f} ms/step, {p['speedup_vs_bf16']:.2f}x BF16 "
                     f"({p['bf16_ms_per_step']:.1f} ms/step); ours ({p['ours']}, {p['ours_ms_per_step']:.1f} ms/step) "
                     f"runs at {p['ours_speedup_vs_peer']:.3f}x its speed, on {where}")
    return lines


def fold_side_peaks(record: "StageRecord", report: dict[str, Any]) -> None:
    """Carry the highest side's GPU peak into the stage that ran the benchmark.

    The benchmark resets CUDA's peak counter for each side it times, so a stage around it would otherwise see only
    the last side's peak (FP8's, the smaller). Allocated only: a side reports no reserved peak."""
    peaks = [s["peak_memory_gb"] for s in report.get("sides", []) if s.get("peak_memory_gb")]
    if peaks:
        record.peak_gpu_mb = max(record.peak_gpu_mb or 0.0, max(peaks) * 1024)  # the sides' "GB" are GiB
