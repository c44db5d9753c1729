"""FP8 attention hook-up: the only module that touches diffusers' attention dispatch.

Each diffusers attention processor passes `backend=self._attention_backend` to `dispatch_attention_fn`.
`install_fp8_attention` sets that attribute to an `AttentionScales` holding the layer's scales, and points the
`dispatch_attention_fn` name of the processor's module at `fp8_dispatch_attention_fn`, which runs FP8 attention for
an `AttentionScales` backend and hands every other call to diffusers unchanged. Masked, causal, dropout or
context-parallel calls always go to diffusers' BF16 attention.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import Fp8CookbookError
from ..files import check_scale
from .attention import AttentionScales, cudnn_attention_available, op_kernel, pick_kernel, sage_ok, triton_ok
from .attention_mode import DEFAULT_KERNEL
from .numerics import FP8_DTYPE, cuda_fp8_ok, quantize_fp8

__all__ = ["bind_diffusers_dispatch", "fp8_dispatch_attention_fn", "attention_modules", "install_fp8_attention",
           "fp8_attention_modules", "remove_fp8_attention", "record_attention_amax", "recorded_key_lengths",
           "count_fp8_attention_calls", "kernel_choices"]

_DIFFUSERS_DISPATCH: Any = None  # diffusers' own dispatch_attention_fn, bound outside traced code (no import in it)


def bind_diffusers_dispatch() -> None:
    """Remember diffusers' `dispatch_attention_fn`; called before any forward goes through ours."""
    global _DIFFUSERS_DISPATCH
    if _DIFFUSERS_DISPATCH is None:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        _DIFFUSERS_DISPATCH = dispatch_attention_fn


def fp8_dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                              enable_gqa=False, attention_kwargs=None, *, backend=None, parallel_config=None):
    """`dispatch_attention_fn` with FP8 attention for processors whose backend is an `AttentionScales`."""
    if isinstance(backend, AttentionScales):
        st = backend
        plain = (attn_mask is None and not is_causal and dropout_p == 0.0 and parallel_config is None
                 and not attention_kwargs and query.shape[2] == key.shape[2] and query.shape[-1] == value.shape[-1])
        if plain and st.record is not None:
            st.kv_tokens = max(st.kv_tokens, key.shape[1])
            for n, t in (("q", query), ("k", key), ("v", value)):
                a = t.detach().abs().amax().float().reshape(1)
                st.record[n] = torch.maximum(st.record[n], a) if n in st.record else a
        elif plain and st.q is not None and (st.min_kv_tokens <= 0 or _pays(query, key, st)):
            if st.q.device != query.device:  # the model moved after the scales were installed: follow it once
                st.q, st.k, st.v = (t.to(query.device) for t in (st.q, st.k, st.v))
            sm_scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
            if torch.compiler.is_compiling():
                shapes = (tuple(query.shape), tuple(key.shape))
                if st.kernel == "sage" and sage_ok(query):  # it smooths and scales BF16 Q/K/V itself: opaque op
                    st.compiled_call = (*shapes, query.dtype, query.device, sm_scale, "sage")
                    return torch.ops.fp8cookbook.fp8_attention(query, key, value, st.q, st.k, st.v, sm_scale, "sage")
                # torch ops: Inductor fuses the quantisation into Q/K/V's producers
                st.compiled_call = (*shapes, FP8_DTYPE, query.device, sm_scale, st.kernel)
                return torch.ops.fp8cookbook.fp8_attention_fp8(quantize_fp8(query, st.q), quantize_fp8(key, st.k),
                                                               quantize_fp8(value, st.v), st.q, st.k, st.v,
                                                               sm_scale, query.dtype, st.kernel)
            st.calls += 1
            key_ = (tuple(query.shape), tuple(key.shape), query.dtype)
            if key_ not in st.ran and query.is_cuda and cuda_fp8_ok(query.device):
                chosen = pick_kernel(query, key, sm_scale, st.kernel)
                if chosen is not None:
                    st.ran[key_] = chosen
            return torch.ops.fp8cookbook.fp8_attention(query, key, value, st.q, st.k, st.v, sm_scale, st.kernel)
        elif not torch.compiler.is_compiling():
            st.bf16_calls += 1
        backend = st.fallback
    return _DIFFUSERS_DISPATCH(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                               attention_kwargs, backend=backend, parallel_config=parallel_config)


def _pays(query: torch.Tensor, key: torch.Tensor, st: AttentionScales) -> bool:
    """The "auto" rule: enough keys, and a CUDA FP8 kernel for the call (the float32 reference never runs here)."""
    return (key.shape[1] >= st.min_kv_tokens and query.is_cuda and cuda_fp8_ok(query.device)
            and (triton_ok(query) or (st.kernel == "sage" and sage_ok(query))
                 or (st.kernel == "cudnn" and cudnn_attention_available())))


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Attention modules whose processor routes through `dispatch_attention_fn(backend=...)`, by module name."""
    out = {}
    for name, m in model.named_modules():
        proc = getattr(m, "processor", None)
        if proc is not None and hasattr(proc, "_attention_backend"):
            out[name] = m
    return out


def _patch_dispatch(proc: Any) -> None:
    bind_diffusers_dispatch()
    mod = sys.modules.get(type(proc).__module__)
    if mod is None or not hasattr(mod, "dispatch_attention_fn"):
        raise Fp8CookbookError(f"{type(proc).__name__}: its module does not call dispatch_attention_fn; "
                               "FP8 attention cannot be installed for this processor")
    if mod.dispatch_attention_fn is not fp8_dispatch_attention_fn:
        mod.dispatch_attention_fn = fp8_dispatch_attention_fn


def _state(m: nn.Module, name: str) -> AttentionScales:
    proc = m.processor
    st = proc._attention_backend
    if not isinstance(st, AttentionScales):
        st = AttentionScales(name=name, fallback=st)
        _patch_dispatch(proc)
        proc._attention_backend = st
    return st


def install_fp8_attention(model: nn.Module, scales: dict[str, tuple[float, float, float]], *,
                          min_kv_tokens: int = 0, kernel: str = DEFAULT_KERNEL) -> list[str]:
    """Give each named attention module its (q, k, v) dequantisation scales; returns the modules now FP8.

    Every name must be an attention module of `model`, and every scale positive and finite; modules without an
    entry keep BF16 attention. `min_kv_tokens` > 0 is the "auto" rule (`AttentionMode.min_kv_tokens`): shorter
    calls, and calls no CUDA kernel takes, stay BF16. `kernel` is the preferred CUDA kernel (`attention.KERNELS`).
    """
    mods = attention_modules(model)
    unknown = sorted(set(scales) - set(mods))
    if unknown:
        raise Fp8CookbookError(f"attention scales for modules the model does not have: {unknown[:5]}"
                               + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    done = []
    for name, (qs, ks, vs) in sorted(scales.items()):
        for what, val in (("q", qs), ("k", ks), ("v", vs)):
            check_scale(f"{name}.{what}", val, "attention scale")
        m = mods[name]
        dev = next((p.device for p in m.parameters()), torch.device("cpu"))
        st = _state(m, name)
        st.q, st.k, st.v = (torch.tensor([float(x)], dtype=torch.float32, device=dev) for x in (qs, ks, vs))
        st.record = None
        st.min_kv_tokens = min_kv_tokens
        st.kernel = kernel
        done.append(name)
    return done


def fp8_attention_modules(model: nn.Module) -> list[str]:
    """Names of the attention modules that run FP8 attention now (installed scales, not just recording)."""
    backends = {name: m.processor._attention_backend for name, m in attention_modules(model).items()}
    return [name for name, b in backends.items() if isinstance(b, AttentionScales) and b.q is not None]


def remove_fp8_attention(model: nn.Module) -> int:
    """Give every processor back the backend it had before; returns how many were FP8."""
    n = 0
    for m in attention_modules(model).values():
        st = m.processor._attention_backend
        if isinstance(st, AttentionScales):
            m.processor._attention_backend = st.fallback
            n += st.q is not None
    return n


@contextlib.contextmanager
def record_attention_amax(model: nn.Module) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
    """Record the amax of each attention module's Q/K/V inputs while the model runs BF16 attention.

    Yields {module: {"q": amax, "k": amax, "v": amax}}, filled as forwards run. Modules that already had FP8
    attention keep it afterwards.
    """
    mods = attention_modules(model)
    states = {}
    for name, m in mods.items():
        had = isinstance(m.processor._attention_backend, AttentionScales)
        st = _state(m, name)
        st.record, st.kv_tokens = {}, 0
        states[name] = (st, had)
    out: dict[str, dict[str, torch.Tensor]] = {name: st.record for name, (st, _) in states.items()}
    try:
        yield out
    finally:
        for name, (st, had) in states.items():
            st.record = None
            if not had:
                mods[name].processor._attention_backend = st.fallback


def recorded_key_lengths(model: nn.Module) -> dict[str, int]:
    """Inside `record_attention_amax`: the longest key sequence each attention module has seen so far."""
    backends = {name: m.processor._attention_backend for name, m in attention_modules(model).items()}
    return {name: b.kv_tokens for name, b in backends.items() if isinstance(b, AttentionScales) and b.record is not None}


@contextlib.contextmanager
def count_fp8_attention_calls(model: nn.Module) -> Iterator[dict[str, dict[str, int]]]:
    """Count, per attention module, the calls that ran FP8 and those that fell back to BF16 (eager only)."""
    states = {name: m.processor._attention_backend for name, m in attention_modules(model).items()
              if isinstance(m.processor._attention_backend, AttentionScales)}
    for st in states.values():
        st.calls = st.bf16_calls = 0
    counts: dict[str, dict[str, int]] = {}
    try:
        yield counts
    finally:
        for name, st in states.items():
            counts[name] = {"fp8": st.calls, "bf16": st.bf16_calls}


def kernel_choices(model: nn.Module) -> dict[str, str]:
    """Which CUDA kernel ran per (query shape, key shape, input dtype) in `model`'s FP8 attention, for reports:
    eager calls as they ran, compiled ones (the last per layer, `AttentionScales.compiled_call`) as the op picks
    for that call (`op_kernel`; e4m3 inputs where Inductor quantised them)."""
    out: dict[str, str] = {}
    for m in attention_modules(model).values():
        st = m.processor._attention_backend
        if not isinstance(st, AttentionScales):
            continue
        ran = dict(st.ran)
        if st.compiled_call is not None:
            q_shape, k_shape, dtype, device, sm_scale, kernel = st.compiled_call
            like = [torch.empty((1,) * len(s), dtype=dtype, device=device).expand(s) for s in (q_shape, k_shape)]
            chosen = op_kernel(*like, sm_scale, kernel)
            if chosen is not None:
                ran.setdefault((q_shape, k_shape, dtype), chosen)
        for key, kernel in ran.items():
            out.setdefault(f"q{list(key[0])} k{list(key[1])} {str(key[2]).removeprefix('torch.')}", kernel)
    return out
