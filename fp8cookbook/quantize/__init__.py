"""Quantize a diffusers transformer to FP8 with NVIDIA ModelOpt, and export it.

The recipe is ModelOpt's diffusers `--format fp8` recipe restricted to what SGLang can serve: per-tensor E4M3
weight and static input quantizers on nn.Linear layers only, calibrated with `max`, the family's sensitive layers
left alone. ModelOpt is imported lazily so that the rest of the package works without it.

The package: `recipe` (ModelOpt config, `quantize_transformer`), `export` (state, HF export, fake-quant reference,
tiny exports), `calibration` (prompts, whole-pipeline calibration), `pipeline` (`quantize_pipeline`). The in-process
static FP8 of the benchmark and the tests is `fp8cookbook.fp8.quantize.quantize_` instead.
"""

from __future__ import annotations

from .calibration import DEFAULT_NUM_PROMPTS, PROMPTS_FILE, REAL_CALIB_STEPS, calibration_prompts
from .export import (export_transformer, load_fake_quant, make_tiny_export, save_modelopt_state,
                     tiny_calibration_inputs)
from .pipeline import QuantizeResult, quantize_pipeline
from .recipe import (TINY_CALIB, check_amaxes, fp8_diffusion_quant_cfg, quantize_transformer, require_modelopt,
                     tensor_quantizers)

__all__ = ["DEFAULT_NUM_PROMPTS", "PROMPTS_FILE", "REAL_CALIB_STEPS", "calibration_prompts", "export_transformer",
           "load_fake_quant", "make_tiny_export", "save_modelopt_state", "tiny_calibration_inputs", "QuantizeResult",
           "quantize_pipeline", "TINY_CALIB", "check_amaxes", "fp8_diffusion_quant_cfg", "quantize_transformer",
           "require_modelopt", "tensor_quantizers"]
