"""fp8cookbook: FP8 inference of diffusion transformers with ModelOpt exports in SGLang's checkpoint format."""

from __future__ import annotations

from .errors import Fp8CookbookError
from .families import FAMILIES, Family, get_family
from .version import __version__


def __getattr__(name: str):
    # Heavy modules load on first use, so `import fp8cookbook` and the CLI's --help stay fast.
    if name in ("load_fp8_transformer", "LoadReport"):
        from . import loader

        return getattr(loader, name)
    if name in ("convert_checkpoint", "ConvertStats"):
        from . import convert

        return getattr(convert, name)
    if name in ("inspect_checkpoint",):
        from . import checkpoint

        return checkpoint.inspect_checkpoint
    if name in ("FP8Linear",):
        from .fp8 import linear

        return linear.FP8Linear
    if name in ("quantize_", "StaticFP8Config"):
        from .fp8 import quantize

        return getattr(quantize, name)
    if name in ("AttentionMode",):
        from .fp8 import attention_mode

        return attention_mode.AttentionMode
    if name in ("quantize_pipeline",):
        from . import quantize

        return quantize.quantize_pipeline
    if name in ("compare_trajectories",):
        from . import compare

        return compare.compare_trajectories
    if name in ("load_pipeline",):
        from . import pipelines

        return pipelines.load_pipeline
    raise AttributeError(name)


__all__ = ["Fp8CookbookError", "FAMILIES", "Family", "get_family", "load_fp8_transformer", "LoadReport",
           "convert_checkpoint", "ConvertStats", "inspect_checkpoint", "FP8Linear", "quantize_", "StaticFP8Config",
           "AttentionMode", "quantize_pipeline",
           "compare_trajectories", "load_pipeline", "__version__"]
