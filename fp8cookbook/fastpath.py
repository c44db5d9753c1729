"""The FP8 fast path: the same math as the plain FP8 layer (spec section 6), with fewer bytes and launches.

Levers, each measured on its own by `fp8cookbook bench --levers` (docs/benchmarks.md has the numbers):

- **One-pass activation quantisation.** The plain CUDA path quantises an activation with separate element-wise
  ops (upcast, divide, clamp, cast: about 27 bytes moved per element). In eager mode the fast path does it in one
  Triton kernel (2 bytes read, 1 written, same division rounding). Under `torch.compile` the plain torch ops are
  kept on purpose, because Inductor fuses them into the kernel that produces the activation (LayerNorm+modulation).
- **Fast accumulation** (`torch._scaled_mm(..., use_fast_accum=True)`): Hopper's FP8 tensor-core accumulator
  without the periodic promotion to fp32.
- **Shared-input fusion.** Layers that read the same activation (Q/K/V; the FLUX.1 single block's Q/K/V and MLP
  input) become one FP8 GEMM. The shards' weights are requantised to one common scale (the largest of the shard
  scales, so nothing saturates) and the largest input scale is kept; SGLang does the same for its fused QKV.
- **CUDA graphs** (`CudaGraphForward`): one captured forward per input shape, replayed; removes the CPU launch
  cost. It is not FP8-specific, so the benchmark applies it to BF16 and FP8 alike.

The fast path is on by default on CUDA. Switch back to the plain path with the environment variable
`FP8COOKBOOK_PLAIN=1` (read at import), `set_fast_path(False)`, the `fast_path(False)` context manager,
`apply_fast_path(model, fast=False)`, or `fp8cookbook bench --plain`. On CPU the flags change nothing: the FP8 layer
runs its float32 reference math, and fusion (structural) computes the same function there too.
"""

from __future__ import annotations

import contextlib
import os
import types
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["FastPathConfig", "CONFIG", "set_fast_path", "restore_fast_path", "fast_path", "fast_path_enabled", "triton_available",
           "triton_quantize_fp8", "fuse_fp8_projections", "apply_fast_path", "FastPathReport", "CudaGraphForward"]


def _env_plain() -> bool:
    return os.environ.get("FP8COOKBOOK_PLAIN", "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class FastPathConfig:
    """Process-wide switches read by `FP8Linear.forward` on CUDA."""

    enabled: bool = True  # master switch; False is the plain path
    triton_quant: bool = True  # eager: quantise activations in one Triton kernel
    fast_accum: bool = True  # _scaled_mm(use_fast_accum=True)


CONFIG = FastPathConfig(enabled=not _env_plain())


def fast_path_enabled() -> bool:
    return CONFIG.enabled


def set_fast_path(enabled: bool | None = None, *, triton_quant: bool | None = None,
                  fast_accum: bool | None = None) -> FastPathConfig:
    """Change the process-wide switches; returns the previous settings (pass them to `restore`)."""
    old = replace(CONFIG)
    if enabled is not None:
        CONFIG.enabled = bool(enabled)
    if triton_quant is not None:
        CONFIG.triton_quant = bool(triton_quant)
    if fast_accum is not None:
        CONFIG.fast_accum = bool(fast_accum)
    return old


def restore_fast_path(old: FastPathConfig) -> None:
    """Put back the switches `set_fast_path` returned."""
    CONFIG.enabled, CONFIG.triton_quant, CONFIG.fast_accum = old.enabled, old.triton_quant, old.fast_accum


@contextlib.contextmanager
def fast_path(enabled: bool = True, *, triton_quant: bool | None = None,
              fast_accum: bool | None = None) -> Iterator[FastPathConfig]:
    """Temporarily switch the fast path on or off (`with fast_path(False): ...` runs the plain path)."""
    old = set_fast_path(enabled, triton_quant=triton_quant, fast_accum=fast_accum)
    try:
        yield CONFIG
    finally:
        restore_fast_path(old)


# --------------------------------------------------------------------------------- one-pass quantisation
_TRITON: dict[str, Any] = {}


def triton_available() -> bool:
    """Triton importable and the kernel built (checked once)."""
    if "ok" not in _TRITON:
        try:
            _TRITON["kernel"] = _build_kernel()
            _TRITON["ok"] = True
        except Exception as e:  # no triton (CPU wheels), or a Triton too old for the kernel
            _TRITON["ok"] = False
            _TRITON["error"] = f"{type(e).__name__}: {e}"
    return _TRITON["ok"]


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _quantize_fp8_kernel(x_ptr, out_ptr, scale_ptr, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.broadcast_to(tl.load(scale_ptr), [BLOCK])
        # IEEE round-to-nearest division, as torch's `x.float() / scale` (Triton's `/` is an approximation).
        y = tl.inline_asm_elementwise("div.rn.f32 $0, $1, $2;", "=r,r,r", [x, s], dtype=tl.float32,
                                      is_pure=True, pack=1)
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        tl.store(out_ptr + offs, y.to(tl.float8e4nv), mask=mask)

    return _quantize_fp8_kernel


_BLOCK = 4096


def triton_quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Q(x / scale) for a CUDA tensor in one pass: the same result as `fp8linear.quantize_fp8`, 3 bytes per element."""
    import triton

    if not triton_available():
        raise RuntimeError(f"Triton quantisation kernel unavailable: {_TRITON.get('error')}")
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    n = x.numel()
    if n:
        _TRITON["kernel"][(triton.cdiv(n, _BLOCK),)](x, out, scale, n, BLOCK=_BLOCK, num_warps=8)
    return out


# ------------------------------------------------------------------------------------ shared-input fusion
def _fuse_layers(layers: list[nn.Module]):
    """One FP8Linear computing all `layers` on a shared input: weights requantised to the largest weight scale."""
    from .fp8linear import FP8Linear, quantize_fp8

    first = layers[0]
    device = first.weight.device
    w_scale = torch.stack([m.weight_scale.float().reshape(()) for m in layers]).amax().reshape(1)
    in_scale = torch.stack([m.input_scale.float().reshape(()) for m in layers]).amax().reshape(1)
    has_bias = any(m.bias is not None for m in layers)
    dtype = next((m.bias.dtype for m in layers if m.bias is not None), torch.bfloat16)
    n_out = sum(m.out_features for m in layers)
    fused = FP8Linear(first.in_features, n_out, has_bias, device=device, dtype=dtype)
    with torch.no_grad():
        fused.weight_scale.copy_(w_scale)
        fused.input_scale.copy_(in_scale)
        row = 0
        for m in layers:
            rows = slice(row, row + m.out_features)
            if torch.equal(m.weight_scale.float().reshape(1), w_scale):
                fused.weight[rows].copy_(m.weight)  # already on the common scale: keep the bytes
            else:
                fused.weight[rows].copy_(quantize_fp8(m.weight.float() * m.weight_scale.float(), w_scale))
            if has_bias:
                fused.bias[rows].copy_(m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=dtype))
            row += m.out_features
    return fused


def _all_fp8(modules: list[Any]) -> bool:
    from .fp8linear import FP8Linear

    return bool(modules) and all(isinstance(m, FP8Linear) for m in modules) and \
        len({m.in_features for m in modules}) == 1


def _fuse_attention(attn: nn.Module, groups: list[tuple[str, tuple[str, ...]]]) -> list[str]:
    """Fuse each group into `attn.<fused name>` and turn on diffusers' own fused-projection path, or do nothing."""
    shards = [[getattr(attn, s, None) for s in names] for _, names in groups]
    if not groups or not all(_all_fp8(g) for g in shards):
        return []  # all or nothing: diffusers' fused path expects every fused projection of the module
    for (fused_name, names), layers in zip(groups, shards):
        setattr(attn, fused_name, _fuse_layers(layers))
        for s in names:
            delattr(attn, s)
    attn.fused_projections = True
    return [fused_name for fused_name, _ in groups]


def _flux1_single_block_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                                joint_attention_kwargs=None):
    """FluxSingleTransformerBlock.forward (diffusers 0.42) with Q, K, V and the MLP input as one FP8 GEMM."""
    from diffusers.models.embeddings import apply_rotary_emb

    from .fp8attention import fp8_dispatch_attention_fn as dispatch_attention_fn  # diffusers' own, + FP8 attention

    if joint_attention_kwargs:
        raise NotImplementedError("fused FLUX.1 single block: joint_attention_kwargs (IP-Adapter) are not supported; "
                                  "use the plain path (FP8COOKBOOK_PLAIN=1)")
    attn = self.attn
    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
    qkv_mlp = self.to_qkv_mlp(norm_hidden_states)
    query, key, value, mlp = qkv_mlp.split([attn.inner_dim] * 3 + [self.mlp_hidden_dim], dim=-1)
    mlp_hidden_states = self.act_mlp(mlp)

    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    value = value.unflatten(-1, (-1, attn.head_dim))
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    attn_output = dispatch_attention_fn(query, key, value, attn_mask=None, backend=attn.processor._attention_backend,
                                        parallel_config=attn.processor._parallel_config)
    attn_output = attn_output.flatten(2, 3).to(query.dtype)

    hidden_states = torch.cat([attn_output, mlp_hidden_states], dim=2)
    gate = gate.unsqueeze(1)
    hidden_states = gate * self.proj_out(hidden_states)
    hidden_states = residual + hidden_states
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    encoder_hidden_states, hidden_states = hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]
    return encoder_hidden_states, hidden_states


def _fuse_flux1_single_block(block: nn.Module) -> list[str]:
    attn = block.attn
    layers = [getattr(attn, "to_q", None), getattr(attn, "to_k", None), getattr(attn, "to_v", None),
              getattr(block, "proj_mlp", None)]
    if not _all_fp8(layers):
        return []
    block.to_qkv_mlp = _fuse_layers(layers)
    for name in ("to_q", "to_k", "to_v"):
        delattr(attn, name)
    del block.proj_mlp
    block.forward = types.MethodType(_flux1_single_block_forward, block)
    return ["to_qkv_mlp"]


def fuse_fp8_projections(model: nn.Module) -> list[str]:
    """Fuse FP8 layers that read the same input into one FP8 GEMM each, in place; returns the fused layers' names.

    FLUX.1/FLUX.2 joint attention: to_q/to_k/to_v -> to_qkv and add_q/k/v_proj -> to_added_qkv (diffusers' own
    fused path). FLUX.1 single blocks: to_q/to_k/to_v/proj_mlp -> to_qkv_mlp (FLUX.2 ships that one fused already).
    Wan: self-attention to_q/to_k/to_v -> to_qkv, cross-attention to_k/to_v -> to_kv. Groups with a BF16 member
    (fallback or sensitive layers) stay as they are.
    """
    from .fp8attention import bind_diffusers_dispatch

    bind_diffusers_dispatch()  # the fused FLUX.1 single-block forward calls fp8cookbook's dispatch
    fused: list[str] = []
    handled: set[int] = set()
    modules = list(model.named_modules())
    for name, module in modules:
        if type(module).__name__ == "FluxSingleTransformerBlock" and not hasattr(module, "to_qkv_mlp"):
            got = _fuse_flux1_single_block(module)
            if got:
                handled.add(id(module.attn))
                fused += [f"{name}.{g}" for g in got]
    for name, module in modules:
        if id(module) in handled or getattr(module, "fused_projections", False):
            continue
        cls = type(module).__name__
        groups: list[tuple[str, tuple[str, ...]]] = []
        if cls in ("FluxAttention", "Flux2Attention"):
            groups = [("to_qkv", ("to_q", "to_k", "to_v"))]
            if getattr(module, "added_kv_proj_dim", None) is not None:
                groups.append(("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")))
        elif cls == "WanAttention":
            groups = [("to_kv", ("to_k", "to_v"))] if module.is_cross_attention else \
                [("to_qkv", ("to_q", "to_k", "to_v"))]
            if getattr(module, "add_k_proj", None) is not None:
                groups.append(("to_added_kv", ("add_k_proj", "add_v_proj")))
        if groups:
            fused += [f"{name}.{g}" for g in _fuse_attention(module, groups)]
    return fused


@dataclass
class FastPathReport:
    """What `apply_fast_path` did: whether the fast path is on, and which layers became fused FP8 GEMMs."""

    enabled: bool
    device: str
    fused: list[str] = field(default_factory=list)
    triton_quant: bool = False
    fast_accum: bool = False
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "device": self.device, "fused_layers": len(self.fused),
                "triton_quant": self.triton_quant, "fast_accum": self.fast_accum, "note": self.note}


def apply_fast_path(model: nn.Module, *, fast: bool | None = None, fuse: bool = False,
                    device: str | torch.device | None = None) -> FastPathReport:
    """Switch an FP8 model to the fast path (or, with `fast=False`, to the plain path).

    `fast=None` follows the process default (on, unless FP8COOKBOOK_PLAIN=1). The element-wise levers (Triton
    quantisation, fast accumulation) are process-wide switches read by `FP8Linear.forward`; this function sets the
    master switch to match `fast`. `fuse=True` also merges shared-input FP8 layers into one GEMM each (in place):
    pass it when the model will run under torch.compile, where it pays; in eager mode it measured slower
    (docs/benchmarks.md), because the fused output's strided Q/K/V views cost extra copies downstream.
    """
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    enabled = CONFIG.enabled if fast is None else bool(fast)
    set_fast_path(enabled)
    report = FastPathReport(enabled=enabled, device=str(device))
    if not enabled:
        report.note = "plain path"
        return report
    if fuse:
        report.fused = fuse_fp8_projections(model)
    cuda = device.type == "cuda"
    report.triton_quant = cuda and CONFIG.triton_quant and triton_available()
    report.fast_accum = cuda and CONFIG.fast_accum
    if cuda and CONFIG.triton_quant and not report.triton_quant:
        report.note = f"Triton unavailable ({_TRITON.get('error', '?')}): activations quantised by torch ops"
    return report


# ------------------------------------------------------------------------------------------- CUDA graphs
@dataclass
class _Captured:
    graph: Any
    inputs: dict[str, torch.Tensor]
    output: torch.Tensor


class CudaGraphForward:
    """Call a transformer through CUDA graphs: captured once per input signature, then replayed.

    `forward(**kwargs)` returns a fresh copy of the output (the captured buffer is reused by the next replay).
    Every tensor argument is copied into the graph's static input before a replay. Graphs of several models may
    share one memory pool (`pool=`) because outputs are copied out right after each replay.
    """

    def __init__(self, model: nn.Module, *, pool=None, warmup: int = 2):
        self.model = model
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        self.warmup = warmup
        self.graphs: dict[tuple, _Captured] = {}

    @staticmethod
    def _key(kwargs: dict[str, Any]) -> tuple:
        parts = []
        for k in sorted(kwargs):
            v = kwargs[k]
            parts.append((k, tuple(v.shape), v.dtype, str(v.device)) if isinstance(v, torch.Tensor) else (k, repr(v)))
        return tuple(parts)

    @staticmethod
    def _first(out):
        return out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)

    def _capture(self, kwargs: dict[str, Any]) -> _Captured:
        static = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(self.warmup):  # library handles, JIT and compile caches, before capture
                self.model(**static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self.pool):
            out = self._first(self.model(**static))
        return _Captured(graph, {k: v for k, v in static.items() if isinstance(v, torch.Tensor)}, out)

    def __call__(self, **kwargs: Any) -> torch.Tensor:
        key = self._key(kwargs)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(kwargs)
        for name, buf in entry.inputs.items():
            src = kwargs[name]
            if src.data_ptr() != buf.data_ptr():
                buf.copy_(src)
        entry.graph.replay()
        return entry.output.clone()

    def reset(self) -> None:
        self.graphs.clear()
