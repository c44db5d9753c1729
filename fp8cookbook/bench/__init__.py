"""Time BF16 against FP8 denoising in one process: same inputs, same compile setting, same GPU.

A *denoising loop* is `steps` transformer forwards with the family's inputs, fed back through an Euler update:
FLUX.1 and FLUX.2 (guidance-distilled) run one forward per step; Wan2.2 runs two (classifier-free guidance), and
A14B sends steps whose timestep is at or above the boundary to `transformer` (high noise) and the others to
`transformer_2` (low noise). Both experts are FP8 on the FP8 side.

Two sources of models:

- `synthetic="full"|"tiny"`: the family's real transformer class with random weights (timing needs no real
  weights; `tiny` runs on a CPU in seconds). The FP8 side is made in-process: every nn.Linear that
  `family.skip_in_calibration` keeps and whose K, N are multiples of 16 becomes `FP8Linear.quantize(linear, amax)`
  with input amaxes from one calibration forward per expert, taken with hooks before any timing.
- a real pipeline (`model_path`, optional `fp8_path`): `pipelines.load_pipeline`, step boundaries from
  `callback_on_step_end`; the FP8 transformer(s) come from an FP8 checkpoint folder, or are quantised in-process.

BF16 is measured first; then the model is converted to FP8 *in place*, layer by layer, each BF16 weight freed as its
FP8 copy is made, so models whose BF16 and FP8 copies do not fit together (FLUX.2 and Wan2.2 on an 80 GB card)
are measured the same way as the rest. Each side: warm-up loops (compilation and graph capture happen there),
then timed loops; the median loop time with min/max and quartiles, per-step medians, peak GPU memory
(`torch.cuda.max_memory_allocated`, reset between sides), and on FP8 sides the FP8 layers that actually ran
(`count_fp8_calls` over one untimed step per expert). GPU times come from CUDA events; CPU times from
`time.perf_counter` (CPU work is synchronous, so no synchronisation is needed there).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoint import write_json_atomic
from .measure import Step, environment, schedule, set_attention_backend
from .pipeline import run_pipeline
from .report import fold_side_peaks, summary_lines
from .settings import SCHEMA, BenchSettings, Side, plan_sides, resolve_settings
from .synthetic import SyntheticRun, run_synthetic

__all__ = ["SCHEMA", "BenchSettings", "Side", "Step", "plan_sides", "resolve_settings", "schedule", "environment",
           "set_attention_backend", "run_synthetic", "run_pipeline", "SyntheticRun", "summary_lines", "run_bench",
           "log_stderr", "fold_side_peaks"]


def run_bench(settings: BenchSettings, *, output: str | Path | None = None,
              log: Callable[[str], None] = lambda m: None, pipe: Any = None) -> dict[str, Any]:
    """Run the benchmark the settings describe; write the JSON report atomically when `output` is given.

    `pipe`: a pipeline already in memory for the pipeline mode (`s.model_path` then only names it)."""
    family, s = resolve_settings(settings)
    threads = torch.get_num_threads()
    if s.synthetic == "tiny" and torch.device(s.device).type == "cpu":
        torch.set_num_threads(1)  # tiny matrices: waking a thread pool costs more than the products themselves
    try:
        report = run_synthetic(family, s, log) if s.synthetic else run_pipeline(family, s, log, pipe=pipe)
    finally:
        torch.set_num_threads(threads)
    if output is not None:
        write_json_atomic(output, report)
    return report


def log_stderr(msg: str) -> None:
    """The CLI's progress log: one `[bench]` line per message on stderr."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)
