"""ModelOpt's FP8 recipe for diffusion transformers: the quantizer config, which layers it skips, and one
calibration of a transformer (`quantize_transformer`). ModelOpt is imported lazily (`require_modelopt`).
"""

from __future__ import annotations

import contextlib
import glob
import io
import logging
import sys
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..errors import Fp8CookbookError
from ..families import Family, get_family


log = logging.getLogger(__name__)

ForwardLoop = Callable[[nn.Module], Any]

_E4M3 = {"num_bits": (4, 3), "axis": None}  # FP8 E4M3, one scale per tensor
INSTALL_HINT = "pip install 'fp8cookbook[modelopt]'"

# Shapes of the tiny calibration batches: small enough for a CPU test, large enough to reach every layer.
TINY_CALIB = dict(height=64, width=64, num_frames=5, text_len=8)


def require_modelopt() -> tuple[Any, Any]:
    """Import ModelOpt's quantization and opt packages, or say how to install them."""
    try:
        import modelopt.torch.opt as mto
        import modelopt.torch.quantization as mtq
    except ImportError as e:
        raise Fp8CookbookError(f"NVIDIA ModelOpt is needed for this ({e}); install it: {INSTALL_HINT}") from e
    return mtq, mto


@contextlib.contextmanager
def quiet_modelopt() -> Iterator[None]:
    """ModelOpt prints progress and warns about its internals, diffusers about dtypes: keep that at debug level."""
    from diffusers.utils import logging as diffusers_logging  # imported first: its import resets the level

    out = io.StringIO()
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32" on `.to(bf16)`
    with warnings.catch_warnings(), contextlib.redirect_stdout(out):
        warnings.filterwarnings("ignore", category=UserWarning, module=r"modelopt\.")
        try:
            yield
        finally:
            diffusers_logging.set_verbosity(level)
            if out.getvalue().strip():
                log.debug("modelopt: %s", out.getvalue().strip())


def fp8_diffusion_quant_cfg(quantize_mha: bool = False) -> dict:
    """ModelOpt 0.47 list-form config (last match wins): FP8 weights and static inputs of nn.Linear only.

    Unlike `mtq.FP8_DEFAULT_CFG` this leaves Conv (Wan's patch_embedding) and LayerNorm inputs alone, which
    calibration would otherwise spend amaxes on that never reach the checkpoint. `quantize_mha` adds FP8
    Q/K/V inputs of attention (ModelOpt's `--quantize-mha`); SGLang keeps attention in BF16 and ignores them.
    """
    quant_cfg: list[dict[str, Any]] = [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "parent_class": "nn.Linear", "cfg": dict(_E4M3)},
        {"quantizer_name": "*input_quantizer", "parent_class": "nn.Linear", "cfg": dict(_E4M3)},
        {"quantizer_name": "*output_quantizer", "enable": False},
    ]
    if quantize_mha:
        quant_cfg.append({"quantizer_name": "*[qkv]_bmm_quantizer", "cfg": dict(_E4M3)})
    return {"quant_cfg": quant_cfg, "algorithm": "max"}


def skip_entries(model: nn.Module, family: Family) -> list[dict[str, Any]]:
    """One `enable: False` entry per topmost skipped module; a skipped module takes its submodules with it."""
    config = dict(model.config)
    entries: list[dict[str, Any]] = []
    covered: list[str] = []
    for name, _ in model.named_modules():
        if not name or any(name.startswith(c + ".") for c in covered):
            continue
        if family.skip_in_calibration(name, config):
            covered.append(name)
            entries.append({"quantizer_name": glob.escape(name) + ".*", "enable": False})
    return entries


def tensor_quantizers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return ((n, m) for n, m in model.named_modules() if isinstance(m, TensorQuantizer))


def check_amaxes(model: nn.Module) -> None:
    """Every enabled quantizer needs a finite positive amax, or export fails (or writes garbage scales)."""
    bad = missing_amaxes(model)
    if bad:
        raise Fp8CookbookError(
            f"{len(bad)} enabled quantizer(s) got no usable amax from calibration: {', '.join(bad)}. "
            "The calibration data never reached these layers (or only produced zeros); calibrate with more "
            "steps/prompts (for Wan2.2 A14B, make sure the denoising steps reach this expert's timesteps)."
        )


def quantize_transformer(model: nn.Module, family: Family | str, forward_loop: ForwardLoop, *,
                         quantize_mha: bool = False, config: dict | None = None) -> nn.Module:
    """Insert FP8 quantizers, disable the family's sensitive layers, calibrate with `forward_loop`, check amaxes.

    The sensitive layers are disabled by config entries, before calibration, so they get no amax at all and the
    state file records why they are BF16. The model is changed in place and returned.
    """
    mtq, _ = require_modelopt()
    family = get_family(family) if isinstance(family, str) else family
    cfg = dict(config or fp8_diffusion_quant_cfg(quantize_mha))
    if not isinstance(cfg.get("quant_cfg"), list):
        raise Fp8CookbookError("quant_cfg must be ModelOpt's list form (>= 0.44); dict-form configs are re-ordered "
                               "and can end with no weight quantizer enabled")
    cfg["quant_cfg"] = cfg["quant_cfg"] + skip_entries(model, family)
    user_stdout = sys.stdout

    def loop(m: nn.Module) -> None:
        with contextlib.redirect_stdout(user_stdout):  # the caller's own progress output stays visible
            forward_loop(m)

    with quiet_modelopt(), torch.no_grad():
        model = mtq.quantize(model, cfg, loop)
    if quantize_mha and not any(n.endswith("_bmm_quantizer") and q.is_enabled for n, q in tensor_quantizers(model)):
        raise Fp8CookbookError("quantize_mha found no attention quantizers: ModelOpt's diffusers plugin did not "
                               f"load (it needs `onnx`); install it: {INSTALL_HINT}")
    check_amaxes(model)
    return model


def missing_amaxes(model: nn.Module) -> list[str]:
    """Enabled quantizers without a finite positive amax, by module name."""
    bad = []
    for name, q in tensor_quantizers(model):
        amax = q.amax
        if q.is_enabled and (amax is None or not bool(torch.isfinite(amax).all()) or not bool((amax > 0).all())):
            bad.append(name)
    return bad
