"""What one notebook run found, by name: `NotebookReport`, written to `output_dir/report.json`.

A run's outputs are all from that run: `clear_outputs` removes what an earlier run left in the output folder
before any work starts, and the report lists every file in the folder with the id of the run that wrote it
(`run_id`), so a reader can tell a stale file from a fresh one even after copying the folder around.
"""

from __future__ import annotations

import datetime
import secrets
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .files import to_jsonable

if TYPE_CHECKING:
    from .families import Family

REPORT_NAME = "report.json"
REPORT_SCHEMA = "fp8cookbook.notebook/2"  # 2: run_id and files
# What a cookbook notebook writes into its output_dir (beside the executed notebook that papermill writes there).
OUTPUT_NAMES = ("checkpoint", "compare", "bench.json", REPORT_NAME, "sglang")


def new_run_id() -> str:
    """A run's id: UTC start time and 6 random hex digits, e.g. 20261202T064000Z-3fa2c1 (sorts by time)."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{secrets.token_hex(3)}"


def clear_outputs(output_dir: str | Path, names: tuple[str, ...] = OUTPUT_NAMES) -> list[Path]:
    """Remove what an earlier run wrote into `output_dir` (only the names the notebooks write); returns them.

    Called before any work, so that a failed run cannot leave the previous good run's bench.json beside its own
    checkpoint and comparison.
    """
    out = Path(output_dir)
    removed = []
    for name in names:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(path)
    return removed


class NotebookReport:
    """The results of one notebook run, recorded by name and written to `output_dir/report.json`.

    Keys: schema, run_id, notebook, family, title, settings, quantize, convert, inspect, load, compare, bench,
    checkpoint, serve, serve_repo (the full repo served alone), stages (each step's wall time, peak GPU
    memory, peak host RSS and bytes written: `fp8cookbook.stages`), summary (rows of the results table), failures, passed, seconds, files (every file in
    output_dir, relative, -> the run_id that wrote it: this run's, since earlier outputs were cleared first). `passed` is False when a threshold was
    missed, a checkpoint is inconsistent, or an FP8 layer did not run.
    """

    def __init__(self, notebook: str, family: "str | Family", output_dir: str | Path, settings: dict[str, Any],
                 run_id: str | None = None):
        from .families import get_family

        fam = get_family(family) if isinstance(family, str) else family
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / REPORT_NAME
        self.run_id = run_id or new_run_id()
        self._t0 = time.perf_counter()
        self.data: dict[str, Any] = {
            "schema": REPORT_SCHEMA, "run_id": self.run_id, "notebook": notebook, "family": fam.name, "title": fam.title,
            "settings": to_jsonable(settings), "quantize": None, "convert": {}, "inspect": {}, "load": {},
            "compare": {"thresholds": None, "prompts": []}, "bench": None, "checkpoint": {}, "serve": None, "serve_repo": None,
            "stages": [], "summary": [], "failures": [], "notes": [], "passed": None, "seconds": None, "files": {},
        }

    def quantize(self, result) -> None:
        cal = result.calibration
        self.data["quantize"] = to_jsonable({
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
        self.data["convert"] = {name: to_jsonable(s) for name, s in stats.items()}

    def inspect(self, name: str, report) -> None:
        self.data["inspect"][name] = to_jsonable(report)

    def load(self, reports: dict[str, Any], warnings_shown: list[str]) -> None:
        self.data["load"] = {"components": {n: to_jsonable(r) for n, r in reports.items()}, "warnings": list(warnings_shown)}

    def compare(self, report, thresholds, paths: list[Path]) -> None:
        d = report.to_dict(thresholds)
        self.data["compare"]["thresholds"] = d["thresholds"]
        sets = d["decoded"]["frame_sets"]
        ran = {n: (c["fp8_layers_ran"], c["fp8_layers"]) for n, c in d["candidate"]["components"].items()}
        self.data["compare"]["prompts"].append({
            "prompt": d["settings"]["prompt"], "settings": d["settings"], "dtype": d["environment"].get("dtype"),
            "final_latents": d["final_latents"],
            "min_step_cosine": min(s["latents"]["cosine"] for s in d["steps"]),
            "psnr": sets["all"]["psnr"], "ssim": sets["all"]["ssim"],
            "fp8_layers_ran": ran, "failures": d["failures"],
            "files": [str(p) for p in paths],
        })

    def bench(self, report: dict[str, Any], path: str | Path | None) -> None:
        fp8 = next(s for s in report["sides"] if s["name"] == report["fp8"])
        bf16 = next(s for s in report["sides"] if s["name"] == report["bf16"])
        self.data["bench"] = to_jsonable({
            "path": path, "mode": report["mode"], "device": report["environment"].get("gpu") or "cpu",
            "bf16_loop_s": bf16["loop_s"]["median"], "fp8_loop_s": fp8["loop_s"]["median"],
            "speedup": report["speedup"], "peak_memory_ratio": report.get("peak_memory_ratio"),
            "fp8_layers_ran": report.get("fp8_layers_ran"), "fp8_layers": report.get("fp8_layers"),
            "steps": report["settings"]["steps"], "compile": report["settings"]["compile"],
        })

    def serve(self, command: str, repo_command: str | None = None) -> None:
        """Both serve forms: the base plus `--transformer-path` flags, and the full repo alone."""
        self.data["serve"] = command
        self.data["serve_repo"] = repo_command

    def stages(self, records: list[dict[str, Any]]) -> None:
        """The notebook's measured stages (`StageLog.as_dicts`): time, peak GPU and host memory, bytes written."""
        self.data["stages"] = to_jsonable(records)

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
        top = [r for r in d.get("stages", []) if r["outer"] is None]  # the notebook's steps, not quantize's parts
        if top:
            gpu = [r["peak_gpu_mb"] for r in top if r["peak_gpu_mb"] is not None]
            rss = [r["peak_rss_mb"] for r in top if r["peak_rss_mb"] is not None]
            rows.append({"what": "time and memory", "result": ", ".join(f"{r['name']} {r['seconds']:.1f} s" for r in top)
                         + (f"; peak GPU {max(gpu) / 1024:.1f} GiB" if gpu else "")
                         + (f", peak host RSS {max(rss) / 1024:.1f} GiB" if rss else "")})
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
        files = sorted(str(p.relative_to(self.output_dir)) for p in self.output_dir.rglob("*") if p.is_file())
        self.data["files"] = {f: self.run_id for f in files + [REPORT_NAME] if not f.startswith(".")}
        write_json_atomic(self.path, to_jsonable(self.data))
        return self.path
