"""Load an FP8 checkpoint (SGLang's format) into the real diffusers transformer class, with our FP8 layers.

The model is built with empty weights, every Linear that `ignore` does not name becomes an FP8Linear (SGLang's
rule, so both runtimes agree on which layers are FP8), and tensors are read one at a time from the shards.
"""

from __future__ import annotations

import functools
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .version import __version__
from .checkpoint import (ATTENTION_SCALES_NAME, FP8_DTYPE, INPUT_SCALE, WEIGHT_SCALE, QuantInfo, TensorReader,
                         inspect_checkpoint, keeps_float32, quant_config, read_attention_scales, read_config, read_quant_info)
from .errors import Fp8CookbookError
from .families import sglang_aliases_for
from .fp8.attention_diffusers import install_fp8_attention
from .fp8.attention_mode import DEFAULT_KERNEL, MIN_KV_TOKENS, AttentionMode
from .fp8.linear import FP8Linear, fp8_modules, swap_linears
from .offload import place_pipeline, refuse_dit_offload
from .repo import (FP8, FP8_UNMARKED, MODEL_INDEX, OTHER_QUANT, UNREADABLE, Layout, classify_folder, detect_layout,
                   local_pipeline_dir, pipeline_components, read_card_metadata, read_model_index, save_fp8_transformer)
from .sglang_names import bf16_decider

MAX_CONFIG_INT = 1 << 20  # above every dimension and token count of the supported families
MAX_LAYERS = 1024  # config keys naming layers or blocks: FLUX.2 has 56, Wan2.2 A14B 40


@dataclass
class LoadReport:
    """What was loaded: layer counts and bytes, so a caller can see the checkpoint really is FP8."""

    path: str
    class_name: str
    fp8_layers: int = 0
    bf16_linear_layers: int = 0
    fp8_bytes: int = 0
    other_bytes: int = 0
    seconds: float = 0.0
    offload_disabled: list[str] = field(default_factory=list)
    attention_scales_available: bool = False  # the folder has the --quantize-mha side file
    fp8_attention_layers: int = 0  # attention modules running FP8 attention
    fp8_attention_mode: str = "off"  # "auto" (long calls on a GPU only) or "on"

    def lines(self) -> list[str]:
        rule = (f", calls with >= {MIN_KV_TOKENS} keys on a GPU" if self.fp8_attention_mode == "auto"
                else ", every call")
        attention = (f"FP8 ({self.fp8_attention_layers} modules, static Q/K/V scales{rule})"
                     if self.fp8_attention_layers
                     else "BF16" + (" (Q/K/V scales present, not used)" if self.attention_scales_available
                                    else " (no Q/K/V scale file: quantize with --quantize-mha for FP8 attention)"))
        return [
            f"loaded           {self.path} ({self.class_name}) in {self.seconds:.2f} s",
            f"FP8 layers       {self.fp8_layers} ({self.fp8_bytes / 1e9:.3f} GB)",
            f"BF16 Linear      {self.bf16_linear_layers}",
            f"other tensors    {self.other_bytes / 1e9:.3f} GB",
            f"attention        {attention}",
        ] + [f"offload off      {w}" for w in self.offload_disabled]


def has_attention_scales(path: str | Path) -> bool:
    """The folder has the Q/K/V scale side file of a --quantize-mha calibration."""
    return os.path.lexists(Path(path) / ATTENTION_SCALES_NAME)  # a non-file there is refused when read, not skipped


def enable_fp8_attention(model: nn.Module, path: str | Path, *, min_kv_tokens: int = 0, kernel: str = DEFAULT_KERNEL) -> int:
    """Run the model's attention in FP8 with the Q/K/V scales of the checkpoint's side file; returns the module count.

    The side file comes from a `--quantize-mha` calibration (ModelOpt's q/k/v bmm amaxes, kept by the converter).
    `min_kv_tokens` > 0 limits it to the calls where it pays (`AttentionMode.min_kv_tokens`, the "auto" mode).
    Call it after anything that sets diffusers' attention backend (`set_attention_backend` replaces it).
    """
    scales = read_attention_scales(path)
    if scales is None:
        raise Fp8CookbookError(f"{Path(path) / ATTENTION_SCALES_NAME} not found: FP8 attention needs the Q/K/V scales "
                               "of a --quantize-mha calibration (fp8cookbook quantize --quantize-mha)")
    try:
        return len(install_fp8_attention(model, scales, min_kv_tokens=min_kv_tokens, kernel=kernel))
    except Fp8CookbookError as e:
        raise Fp8CookbookError(f"{Path(path) / ATTENTION_SCALES_NAME}: {e}") from None


def apply_attention_mode(model: nn.Module, path: str | Path, mode: "bool | str | AttentionMode") -> int:
    """The `fp8_attention` rule of `load_fp8_transformer` for a loaded model; returns the FP8 attention modules.

    "on": every call, the side file must exist; "auto": where the side file exists, only the calls where FP8 attention
    pays (`AttentionMode.threshold` keys on a GPU); "off": nothing. Call it after anything that sets diffusers'
    attention backend.
    """
    mode = AttentionMode.parse(mode)
    if mode.mode == "on" or (mode.mode == "auto" and has_attention_scales(path)):
        return enable_fp8_attention(model, path, min_kv_tokens=mode.min_kv_tokens, kernel=mode.kernel)
    return 0


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise KeyError(name)


def _checked_config(path: Path) -> tuple[dict, QuantInfo]:
    """config.json and its FP8 quantization_config, after the checkpoint passed `inspect` (before any slow work)."""
    config = read_config(path)
    info = read_quant_info(config, str(path / "config.json"))
    if info is None:
        comp = classify_folder(path)
        if comp.kind == FP8_UNMARKED:  # never read FP8 codes as BF16 weights
            raise Fp8CookbookError(f"{path}: {comp.note}; restore the quantization_config (or re-save it with "
                                   "an FP8 model's save_pretrained)")
        raise Fp8CookbookError(f"{path / 'config.json'}: no quantization_config; not an FP8 checkpoint")
    if info.quant_algo != "FP8":
        raise Fp8CookbookError(f"{path / 'config.json'}: quant_algo is {info.quant_algo!r}, expected 'FP8'")
    problems = inspect_checkpoint(path).problems
    if problems:
        more = f" (+{len(problems) - 1} more; run `fp8cookbook inspect {path}`)" if len(problems) > 1 else ""
        raise Fp8CookbookError(f"{path}: {problems[0]}{more}")
    return config, info


def _empty_model(path: Path, config: dict, info: QuantInfo, dtype: torch.dtype, report: LoadReport) -> nn.Module:
    """The config's diffusers class without weights, its non-ignored linears swapped for (meta) FP8 layers."""
    import diffusers
    from accelerate import init_empty_weights

    class_name = config.get("_class_name")
    cls = getattr(diffusers, str(class_name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):  # not a module, pipeline or function
        raise Fp8CookbookError(f"{path / 'config.json'}: unknown _class_name {class_name!r} (not a diffusers model class)")
    init_config = {k: v for k, v in config.items() if k != "quantization_config"}
    for key, value in init_config.items():  # a layer count of 10**6 would build for minutes before any check
        limit = MAX_LAYERS if ("layers" in key or "blocks" in key) else MAX_CONFIG_INT
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > limit:
            raise Fp8CookbookError(f"{path / 'config.json'}: {key} is {value}, above the {limit} any model here has")
    try:
        with init_empty_weights(include_buffers=False), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # from_config warns about keys it does not know (e.g. _diffusers_version)
            model = cls.from_config(init_config)
    except Exception as e:  # noqa: BLE001 - whatever a bad value makes the model's __init__ raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Fp8CookbookError(f"{path / 'config.json'}: cannot build {class_name} from it ({first})") from None

    def make(linear: nn.Linear, name: str) -> FP8Linear:
        with torch.device("meta"):
            return FP8Linear(linear.in_features, linear.out_features, linear.bias is not None, dtype=dtype)

    keep_bf16 = bf16_decider(info, sglang_aliases_for(class_name))  # SGLang's rule: its runtime names count too
    swap_linears(model, lambda m, name: not keep_bf16(name), make)
    report.bf16_linear_layers += sum(isinstance(m, nn.Linear) for m in model.modules())  # the ignored ones
    return model


def _load_tensors(model: nn.Module, path: Path, class_name: str, device, dtype: torch.dtype,
                  report: LoadReport) -> None:
    """Fill every parameter from the shards, checking names, dtypes and shapes; refuses a checkpoint that lacks any."""
    fp8 = fp8_modules(model)
    expected = dict(model.named_parameters())
    expected.update(dict(model.named_buffers()))
    loaded: set[str] = set()
    with TensorReader(path) as reader:
        for name, tinfo in reader.index.items():
            if name not in expected:
                raise Fp8CookbookError(f"{tinfo.file}: tensor {name} does not exist in {class_name}")
            module_name = name.rpartition(".")[0]
            t = reader.get(name)
            if module_name in fp8:
                if name.endswith(".weight") and t.dtype != FP8_DTYPE:
                    raise Fp8CookbookError(f"{tinfo.file}: {name} is {t.dtype}, but `ignore` does not cover it")
                if name.endswith((WEIGHT_SCALE, INPUT_SCALE)):
                    t = t.float().reshape(1)
                elif name.endswith(".bias"):
                    t = t.to(dtype)
            elif t.is_floating_point():
                t = t.to(torch.float32 if keeps_float32(model, name) else dtype)
            want = expected[name]
            if tuple(want.shape) != tuple(t.shape):
                raise Fp8CookbookError(f"{tinfo.file}: {name} has shape {list(t.shape)}, the model expects {list(want.shape)}")
            _set_tensor(model, name, t.to(device))
            loaded.add(name)
            if module_name in fp8:
                report.fp8_bytes += t.numel() * t.element_size()
            else:
                report.other_bytes += t.numel() * t.element_size()
    missing = [n for n, p in model.named_parameters() if n not in loaded]
    if missing:
        raise Fp8CookbookError(f"{path}: checkpoint lacks {len(missing)} tensor(s) of {class_name}, e.g. {missing[0]}")


def load_fp8_transformer(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    dit_cpu_offload: bool = False,
    dit_layerwise_offload: bool = False,
    fp8_attention: "bool | str | AttentionMode" = "auto",
) -> tuple[nn.Module, LoadReport]:
    """Build the transformer named by config.json and load the FP8 checkpoint into it; refuse inconsistent ones.

    `fp8_attention` runs attention in FP8 with the checkpoint's Q/K/V scales (`enable_fp8_attention`): "auto" (the
    default) where the side file exists and only for the calls where it pays (long sequences on a GPU,
    `attention_mode.MIN_KV_TOKENS`), "on" (or True) for every call (the side file must exist), "off" (or False) never.
    Its cosine against BF16 stays within 0.00004 of BF16 attention's on full-size models (docs/benchmarks.md).
    """
    from .params import require_device

    require_device(device)  # before the model is built: a CPU-only torch says so in one line
    mode = AttentionMode.parse(fp8_attention)
    t0 = time.perf_counter()
    path = Path(path)
    config, info = _checked_config(path)
    class_name = config.get("_class_name")
    report = LoadReport(str(path), class_name, offload_disabled=refuse_dit_offload(dit_cpu_offload, dit_layerwise_offload))
    model = _empty_model(path, config, info, dtype, report)
    _load_tensors(model, path, class_name, device, dtype, report)
    model.to(device)  # buffers built at init; FP8Linear keeps its dtypes through this
    model.eval().requires_grad_(False)
    report.fp8_layers = len(fp8_modules(model))
    report.attention_scales_available = has_attention_scales(path)
    report.fp8_attention_layers = apply_attention_mode(model, path, mode)
    if report.fp8_attention_layers:
        report.fp8_attention_mode = mode.mode
    report.seconds = time.perf_counter() - t0
    model.fp8_load_report = report
    # `save_pretrained` writes a complete FP8 checkpoint (diffusers' own would drop quantization_config, and every
    # reader would then take the FP8 codes for BF16 weights)
    qc = config.get("quantization_config")
    model.fp8_quantization_config = dict(qc) if isinstance(qc, dict) and "quant_algo" in qc else quant_config(
        info.ignore, __version__)  # the nested (hf_quant_config) form is saved flat
    side = path / ATTENTION_SCALES_NAME
    model.fp8_attention_scales_text = side.read_text() if side.is_file() else None
    model.fp8_card_metadata = read_card_metadata(path)  # base_model and license go into the saved card
    model.save_pretrained = functools.partial(save_fp8_transformer, model)
    return model, report


# -------------------------------------------------------------------------------------- loading a pipeline
def _fp8_overrides(base_layout: Layout, fp8: str | Path | dict[str, str | Path] | None) -> dict[str, Path]:
    """Component name -> FP8 folder: the base's own FP8 components, then those of `fp8` (a folder, a repo or a
    {name: folder} dict; a bare folder is the `transformer`)."""
    out = {n: c.path for n, c in base_layout.components.items() if c.is_fp8}
    if fp8 is None:
        return out
    if isinstance(fp8, dict):
        given = {n: Path(p) for n, p in fp8.items()}
    else:
        layout = detect_layout(fp8)
        if layout.is_repo:
            given = {n: layout.components[n].path for n in layout.fp8_components()}
            if not given:
                raise Fp8CookbookError(f"{fp8}: a diffusers repo with no FP8 component")
        else:
            given = {"transformer": Path(fp8)}
    for name, folder in given.items():
        if name not in base_layout.components:
            raise Fp8CookbookError(f"{base_layout.path / MODEL_INDEX}: has no component {name!r} for the FP8 folder "
                                   f"{folder} (components: {', '.join(base_layout.components)})")
        comp = classify_folder(folder, name)
        if comp.kind != FP8:
            raise Fp8CookbookError(f"{folder}: not an FP8 checkpoint ({comp.note})")
        out[name] = Path(folder)
    return out


def load_fp8_pipeline(source: str | Path, fp8: str | Path | dict[str, str | Path] | None = None, *,
                      dtype: Any = None, device: str = "cpu", dit_cpu_offload: bool = False,
                      dit_layerwise_offload: bool = False, text_encoder_cpu_offload: bool = False,
                      vae_cpu_offload: bool = False, fp8_attention: bool | str = "auto") -> Any:
    """A diffusers pipeline with every FP8 transformer loaded by fp8cookbook's FP8 layers.

    `source`: a pipeline folder or cached hub id: a base model, or a repo that already holds FP8 components (our
    full repo, a ModelOpt whole-pipeline export such as nvidia/Wan2.2-T2V-A14B-Diffusers-FP8). `fp8`: FP8
    components to put in, as a transformer folder, a repo, or {component: folder}. Components the base holds with
    FP8 codes but no quantization_config, or that cannot be read, are refused rather than loaded as BF16. DiT
    offload is refused for FP8 transformers (`offload.place_pipeline`); text-encoder and VAE offload are allowed.
    The load reports are kept as `pipe.fp8_load_reports`.
    """
    import diffusers

    dtype = torch.bfloat16 if dtype is None else dtype
    base_dir = local_pipeline_dir(source)
    layout = detect_layout(base_dir)
    overrides = _fp8_overrides(layout, fp8)
    bad = [f"{n}: {c.note}" for n, c in layout.components.items()
           if n not in overrides and c.kind in (FP8_UNMARKED, UNREADABLE, OTHER_QUANT)]
    if bad:
        raise Fp8CookbookError(f"{base_dir}: cannot load {bad[0]}" + (f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""))
    if not overrides:
        raise Fp8CookbookError(f"{source}: no FP8 component (pass fp8=<FP8 folder or repo>, or load a BF16 "
                               "pipeline with diffusers directly)")
    index = read_model_index(base_dir)
    cls = getattr(diffusers, str(index.get("_class_name")), None)
    if cls is None:
        raise Fp8CookbookError(f"{base_dir / MODEL_INDEX}: unknown pipeline class {index.get('_class_name')!r}")
    wanted = pipeline_components(index)
    models, reports = {}, {}
    for name, folder in overrides.items():
        model, report = load_fp8_transformer(folder, dtype=dtype, fp8_attention="off")
        if report.class_name != wanted[name][1]:
            raise Fp8CookbookError(f"{Path(folder) / 'config.json'}: _class_name {report.class_name!r}, but "
                                   f"{base_dir / MODEL_INDEX} names {wanted[name][1]!r} for {name}")
        models[name], reports[name] = model, report
    try:
        pipe = cls.from_pretrained(str(base_dir), dtype=dtype, **models)
    except Exception as e:  # noqa: BLE001 - say which folder failed, whatever diffusers raised
        raise Fp8CookbookError(f"cannot load the {cls.__name__} pipeline from {base_dir}: {e}") from e
    pipe.set_progress_bar_config(disable=True)
    turned_off = place_pipeline(pipe, device, dit_cpu_offload=dit_cpu_offload,
                                dit_layerwise_offload=dit_layerwise_offload,
                                text_encoder_cpu_offload=text_encoder_cpu_offload, vae_cpu_offload=vae_cpu_offload)
    for name, model in models.items():  # after placement: FP8 attention picks its kernel on the model's device
        reports[name].offload_disabled = list(turned_off)
        reports[name].fp8_attention_layers = apply_attention_mode(model, overrides[name], fp8_attention)
    pipe.fp8_load_reports = reports
    return pipe
