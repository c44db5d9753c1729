"""fp8cookbook: FP8 inference of diffusion transformers with ModelOpt exports in SGLang's checkpoint format."""

from __future__ import annotations

from .errors import Fp8CookbookError
from .families import FAMILIES, Family, get_family
from .version import __version__


# Heavy modules load on first use, so `import fp8cookbook` and the CLI's --help stay fast: name -> its module.
_LAZY = {
    "load_fp8_transformer": "loader", "LoadReport": "loader",
    "convert_checkpoint": "convert", "ConvertStats": "convert",
    "inspect_checkpoint": "checkpoint",
    "FP8Linear": "fp8.linear",
    "quantize_": "fp8.quantize", "StaticFP8Config": "fp8.quantize",
    "AttentionMode": "fp8.attention_mode",
    "quantize_pipeline": "quantize",
    "compare_trajectories": "compare",
    "load_pipeline": "pipelines",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


__all__ = ["Fp8CookbookError", "FAMILIES", "Family", "get_family", "load_fp8_transformer", "LoadReport",
           "convert_checkpoint", "ConvertStats", "inspect_checkpoint", "FP8Linear", "quantize_", "StaticFP8Config",
           "AttentionMode", "quantize_pipeline",
           "compare_trajectories", "load_pipeline", "__version__"]
