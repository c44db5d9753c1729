"""FP8 attention with static per-tensor Q/K/V scales: the lever FP8 linears leave untouched.

After FP8 GEMMs, attention is most of a Wan2.2 step (70% per shared/spec/anchors.md) and a fifth of FLUX.1's.
This module runs it with e4m3 inputs, as FlashAttention-3's FP8 mode does:

    S = (s_q·Q(q/s_q)) (s_k·Q(k/s_k))ᵀ · sm_scale,   P = exp(S − max S),
    O = (Q(P·256)/256) (s_v·Q(v/s_v)) / ΣP

Q is round-to-nearest e4m3 saturating at ±448; the scales s = amax/448 are the static ones ModelOpt calibrates
under `--quantize-mha` (`*.{q,k,v}_bmm_quantizer._amax`, the inputs of the attention matmuls, after norm and RoPE).
The converter keeps them in the side file `fp8cookbook_attention_scales.json`, which SGLang never reads; the
SGLang-format tensors and index do not change. P is scaled by 256 (exact, a power of two) before its e4m3 cast so
that small probabilities stay out of e4m3's subnormal range; the row sum uses the unquantised P.

On CUDA (compute capability ≥ 8.9) our Triton flash kernel does it, with Q quantised inside it and K/V by one pass
that also lays V out K-major, as FP8 tensor cores need; K/V tiles come in by TMA (tensor descriptors). Each key
tile's P·V product starts from a fresh accumulator and is added to the running output in float32: FP8 tensor cores accumulate with reduced precision, and summing all
256 key tiles of a Wan2.2 call in one MMA accumulator had shrunk O enough to cost 0.019 of cosine against BF16.
cuDNN's FP8 SDPA (optional `nvidia-cudnn-frontend` package) is faster but has that flaw, so it runs only when
asked for (the `kernel` argument, `pick_kernel`). In eager mode `fp8_attention` takes the BF16 Q/K/V; under torch.compile the
quantisation is left in torch ops, which Inductor fuses into the kernels that produce Q/K/V, and
`fp8_attention_fp8` takes the e4m3 tensors. Elsewhere `fp8_attention_reference` computes the same formula in
float32 (the CPU path, and the GPU kernels' test reference).

Measured on an H100 (docs/benchmarks.md): against BF16 its cosine stays within 0.00004 of the FP8-GEMM path on
full-size FLUX.1, FLUX.2 and Wan2.2 forwards, and it pays per call only on long sequences (Wan2.2's 32,760 tokens:
1.21x; FLUX's 4,608 tokens and 512-token cross-attention: slower than BF16). So the loader's default, "auto",
runs it for calls with at least `attention_mode.MIN_KV_TOKENS` keys on a GPU (`load_fp8_transformer(fp8_attention=)`).

The default CUDA kernel is now `sage` (`attention_kernel.py`, `pick_kernel`): it smooths K and V, balances Q/K
channels and computes its own per-token/per-block scales, so channel outliers in Q/K no longer break FP8 attention
(H200, Wan2.2 self-attention with outliers: relative error 0.038 against 2.44 for the static-scale kernel here, at
31.6 against 30.9 ms). It takes BF16 Q/K/V only (it must see them to smooth them), so under torch.compile it runs
as the opaque `fp8_attention` op rather than on Inductor-quantised inputs; the static scales still choose the
layers and remain the input of `kernel="triton"` (this module's kernel) and `"cudnn"`.

How it plugs into diffusers: `attention_diffusers.py`, the only module that touches diffusers' dispatch.
"""

from __future__ import annotations

import atexit
from dataclasses import dataclass, field
from typing import Any

import torch

from . import attention_kernel as sage
from .attention_mode import DEFAULT_KERNEL, KERNELS  # noqa: F401 - re-exported: the kernels this module has
from .numerics import fp8_gemm_supported, quantize_fp8, tl_quantize_fp8, triton, triton_quantize_fp8

__all__ = ["P_SCALE", "KERNELS", "AttentionScales", "fp8_attention_reference", "fp8_attention", "fp8_attention_fp8",
           "pick_kernel", "op_kernel", "triton_ok", "sage_ok", "cudnn_attention_available",
           "triton_attention_available", "cudnn_errors"]

P_SCALE = 256.0


@dataclass(eq=False)
class AttentionScales:
    """One attention layer's FP8 state, set as its processor's `_attention_backend`.

    `q`, `k`, `v` are dequantisation scales (amax/448, float32, shape [1]); `fallback` is the backend the processor
    had before (None: diffusers' default), used for calls FP8 attention does not cover. With `record` set, calls
    run the fallback and only record input amaxes (calibration). `kernel` is the preferred CUDA kernel; `ran`
    records which kernel ran per (query shape, key shape, input dtype), for reports. Compiled code cannot fill a
    dict without guarding on it (a recompile per call), so it sets `compiled_call` instead, one attribute store
    that torch.compile replays after each graph: (query shape, key shape, the op's input dtype, device, sm_scale,
    kernel asked for), resolved to the kernel by `attention_diffusers.kernel_choices`.
    """

    name: str
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    fallback: Any = None
    record: dict[str, torch.Tensor] | None = None
    min_kv_tokens: int = 0  # > 0: FP8 only for calls with that many keys that a CUDA kernel takes ("auto")
    kernel: str = DEFAULT_KERNEL
    kv_tokens: int = 0  # the longest key sequence seen while recording
    calls: int = 0
    bf16_calls: int = 0
    ran: dict[tuple, str] = field(default_factory=dict)
    compiled_call: tuple | None = None


# ------------------------------------------------------------------------------------------ the math
def fp8_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: torch.Tensor,
                            k_scale: torch.Tensor, v_scale: torch.Tensor,
                            sm_scale: float | None = None) -> torch.Tensor:
    """The module docstring's formula in float32. Layout (batch, seq, heads, head_dim) in and out, like diffusers."""
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    q8, k8, v8 = quantize_fp8(q, q_scale), quantize_fp8(k, k_scale), quantize_fp8(v, v_scale)
    return _reference_fp8_inputs(q8, k8, v8, q_scale, k_scale, v_scale, sm_scale, q.dtype)


def _reference_fp8_inputs(q8, k8, v8, q_scale, k_scale, v_scale, sm_scale: float, out_dtype: torch.dtype):
    s = torch.einsum("bqhd,bkhd->bhqk", q8.float(), k8.float()) * (q_scale.float() * k_scale.float() * sm_scale)
    p = torch.exp(s - s.amax(-1, keepdim=True))
    denom = p.sum(-1, keepdim=True)
    p8 = (p * P_SCALE).to(torch.float8_e4m3fn).float()
    o = torch.einsum("bhqk,bkhd->bhqd", p8, v8.float()) * (v_scale.float() / P_SCALE) / denom
    return o.transpose(1, 2).to(out_dtype).contiguous()


# ------------------------------------------------------------------------------------- Triton kernel
if triton is not None:  # CUDA builds of torch ship Triton; the CPU wheels do not, and then the reference math runs
    import triton.language as tl

_BLOCK_N = 128  # keys per tile; fixed, because the host builds the K/V tensor descriptors with it

if triton is not None:
    @triton.jit
    def _quant_kv_kernel(K, V, K8, VT8, ks_ptr, vs_ptr, skb, skh, skn, svb, svh, svn, s8b, s8h, s8n, stb, sth, std,
                         H, n_kv, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
        # K -> K8 (B, H, N, D); V -> VT8 (B, H, D, N): the P·V product needs V K-major in FP8.
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        rows = pid_n * BLOCK + tl.arange(0, BLOCK)
        d = tl.arange(0, HEAD_DIM)
        mask = rows[:, None] < n_kv
        ks = tl.load(ks_ptr)
        vs = tl.load(vs_ptr)
        k = tl.load(K + b * skb + h * skh + rows[:, None] * skn + d[None, :], mask=mask, other=0.0).to(tl.float32)
        k8 = tl_quantize_fp8(k, ks)
        tl.store(K8 + b * s8b + h * s8h + rows[:, None] * s8n + d[None, :], k8, mask=mask)
        v = tl.load(V + b * svb + h * svh + rows[:, None] * svn + d[None, :], mask=mask, other=0.0).to(tl.float32)
        v8 = tl.trans(tl_quantize_fp8(v, vs))
        tl.store(VT8 + b * stb + h * sth + d[:, None] * std + rows[None, :], v8, mask=rows[None, :] < n_kv)

    @triton.jit
    def _attn_tile(acc, l_i, m_i, q8, k_desc, vt_desc, k_row, k_head, vt_row, start_n, n_kv, qk_scale,
                   BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASK: tl.constexpr, P_MUL: tl.constexpr):
        # K and V come in by TMA (tensor descriptors): rows past the tensor read as zeros, and masked keys get -inf
        k = k_desc.load([k_row + start_n, k_head, 0]).reshape(BLOCK_N, HEAD_DIM)
        vt = vt_desc.load([vt_row, start_n])
        qk = tl.dot(q8, tl.trans(k))
        if MASK:
            cols = start_n + tl.arange(0, BLOCK_N)
            qk = tl.where(cols[None, :] < n_kv, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])  # one FMA per score
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        # A fresh accumulator per tile, added in float32: FP8 tensor cores accumulate with reduced precision, and
        # accumulating all key tiles in one MMA accumulator lost the small late terms (Wan2.2: cosine gap 0.019).
        acc = acc * alpha[:, None] + tl.dot((p * P_MUL).to(tl.float8e4nv), tl.trans(vt))
        return acc, l_i, m_new

    _ATTN_CONFIGS = [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=st)
                     for bm, w, st in ((128, 8, 3), (128, 8, 4), (128, 8, 2), (64, 4, 3), (128, 4, 3))]

    @triton.autotune(configs=_ATTN_CONFIGS, key=["n_q", "n_kv", "HEAD_DIM"])
    @triton.jit
    def _attn_fwd_kernel(Q, k_desc, vt_desc, O, qs_ptr, ks_ptr, vs_ptr, sm_scale, sqb, sqh, sqm, sob, soh, som,
                         H, n_q, n_kv, K_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, P_MUL: tl.constexpr,
                         Q_FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, HEAD_DIM)
        qs = tl.load(qs_ptr)
        ks = tl.load(ks_ptr)
        vs = tl.load(vs_ptr)
        q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + rows[:, None] * sqm + d[None, :],
                    mask=rows[:, None] < n_q, other=0.0)
        if Q_FP8:  # quantised by the caller (under torch.compile, fused into the op that produced Q)
            q8 = q
        else:
            q8 = tl_quantize_fp8(q.to(tl.float32), qs)
        qk_scale = qs * ks * sm_scale * 1.4426950408889634
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        # K is (rows, K_HEADS, D): (B·H·N, 1, D) as our quantisation pass writes it, or (B·N, H, D) as it comes
        if K_HEADS == 1:
            k_row, k_head = pid_bh * n_kv, 0
        else:
            k_row, k_head = b * n_kv, h
        vt_row = pid_bh * HEAD_DIM
        n_full = n_kv // BLOCK_N * BLOCK_N  # full key blocks, then one masked tail
        for start_n in range(0, n_full, BLOCK_N):
            acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q8, k_desc, vt_desc, k_row, k_head, vt_row, start_n, n_kv,
                                       qk_scale, BLOCK_N, HEAD_DIM, False, P_MUL)
        if n_full < n_kv:
            acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q8, k_desc, vt_desc, k_row, k_head, vt_row, n_full, n_kv,
                                       qk_scale, BLOCK_N, HEAD_DIM, True, P_MUL)
        o = acc * (vs / P_MUL) / l_i[:, None]
        tl.store(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + rows[:, None] * som + d[None, :],
                 o.to(O.dtype.element_ty), mask=rows[:, None] < n_q)

    @triton.jit
    def _dequant_kernel(x_ptr, out_ptr, scale_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (x * tl.load(scale_ptr)).to(out_ptr.dtype.element_ty), mask=mask)


def triton_attention_available() -> bool:
    """Triton importable (the kernels are defined at import)."""
    return triton is not None


def triton_ok(q: torch.Tensor) -> bool:
    """Triton's kernel takes this head size."""
    # FP8 tensor-core dots need K >= 32: head_dim 16 (the tiny test models) has no Triton kernel.
    return triton_attention_available() and q.shape[-1] in (32, 64, 128, 256)


# ---------------------------------------------------------------------------------- cuDNN FP8 SDPA
# cuDNN's own FP8 flash attention (the `nvidia-cudnn-frontend` package, optional) runs ~1.2x faster than the Triton
# kernel on an H100, but loses accuracy (`_pick_kernel`), so it runs only on request. On Hopper it must write O in FP8: O is a convex combination of V's rows, so |O| <= amax(V)
# and V's scale never saturates it; O is dequantised to BF16 right after. Q, K, V are quantised by the one-pass
# Triton kernel of the fast path. Graphs are built once per shape and layout and kept.
_CUDNN: dict[Any, Any] = {}
atexit.register(_CUDNN.clear)  # free cuDNN graphs and handles before the interpreter tears their bindings down


def cudnn_attention_available() -> bool:
    """The cuDNN frontend package is importable (the graphs are built on first use, per shape)."""
    if "module" not in _CUDNN:
        try:
            import cudnn

            _CUDNN["module"] = cudnn
        except Exception:  # noqa: BLE001 - not installed, or its libraries do not load
            _CUDNN["module"] = None
    return _CUDNN["module"] is not None


def _cudnn_graph(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, sm_scale: float):
    cudnn = _CUDNN["module"]
    key = (q8.device.index, tuple(q8.shape), tuple(k8.shape), q8.stride(), k8.stride(), v8.stride(), sm_scale)
    if key in _CUDNN:
        return _CUDNN[key]
    handle = _CUDNN.setdefault(("handle", q8.device.index), cudnn.create_handle())
    e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)

    def bhsd(name: str, t: torch.Tensor):  # diffusers' (B, S, H, D) tensors, described to cuDNN as (B, H, S, D)
        b, n, h, d = t.shape
        return graph.tensor(name=name, dim=(b, h, n, d), stride=(t.stride(0), t.stride(2), t.stride(1), t.stride(3)),
                            data_type=e4m3)

    tq, tk, tv = bhsd("q", q8), bhsd("k", k8), bhsd("v", v8)
    scalars = [graph.tensor(name=n, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=fp32)
               for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")]
    to, _, amax_s, amax_o = graph.sdpa_fp8(q=tq, k=tk, v=tv, descale_q=scalars[0], descale_k=scalars[1],
                                           descale_v=scalars[2], descale_s=scalars[3], scale_s=scalars[4],
                                           scale_o=scalars[5], is_inference=True, attn_scale=sm_scale,
                                           use_causal_mask=False)
    b, n, h, d = q8.shape
    to.set_output(True).set_dim((b, h, n, d)).set_stride((n * h * d, d, h * d, 1)).set_data_type(e4m3)
    for a in (amax_s, amax_o):
        a.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(fp32)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    dev = q8.device
    fixed = {"descale_s": torch.full((1, 1, 1, 1), 1.0 / P_SCALE, device=dev),
             "scale_s": torch.full((1, 1, 1, 1), P_SCALE, device=dev),
             "amax": torch.empty((2, 1, 1, 1, 1), device=dev),
             "workspace": torch.empty(max(1, graph.get_workspace_size()), dtype=torch.uint8, device=dev)}
    _CUDNN[key] = (graph, handle, tq, tk, tv, to, scalars, amax_s, amax_o, fixed)
    return _CUDNN[key]


def _cudnn_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qs: torch.Tensor, ks: torch.Tensor,
                         vs: torch.Tensor, sm_scale: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    if q.dtype == torch.float8_e4m3fn:  # already quantised (see fp8_attention_fp8)
        q8, k8, v8 = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    else:
        q8, k8, v8 = triton_quantize_fp8(q, qs), triton_quantize_fp8(k, ks), triton_quantize_fp8(v, vs)
    out_dtype = out_dtype or q.dtype
    graph, handle, tq, tk, tv, to, scalars, amax_s, amax_o, fixed = _cudnn_graph(q8, k8, v8, sm_scale)
    o8 = torch.empty(q.shape, dtype=torch.float8_e4m3fn, device=q.device)
    one = (1, 1, 1, 1)
    pack = {tq: q8, tk: k8, tv: v8, to: o8, amax_s: fixed["amax"][0], amax_o: fixed["amax"][1],
            scalars[0]: qs.reshape(one), scalars[1]: ks.reshape(one), scalars[2]: vs.reshape(one),
            scalars[3]: fixed["descale_s"], scalars[4]: fixed["scale_s"], scalars[5]: (1.0 / vs).reshape(one)}
    _CUDNN["module"].set_stream(handle=handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
    graph.execute(pack, fixed["workspace"], handle=handle)
    out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    n = out.numel()
    _dequant_kernel[(triton.cdiv(n, 4096),)](o8, out, vs, n, BLOCK=4096, num_warps=8)
    return out


def _triton_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qs: torch.Tensor, ks: torch.Tensor,
                          vs: torch.Tensor, sm_scale: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, n_q, H, D = q.shape
    n_kv = k.shape[1]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    fp8_in = q.dtype == torch.float8_e4m3fn
    n_pad = (n_kv + 15) // 16 * 16
    vt8 = torch.empty((B, H, D, n_pad), dtype=torch.float8_e4m3fn, device=q.device)
    if n_pad > n_kv:
        vt8[..., n_kv:].zero_()  # read by the last key block: zeros, not stale bytes (which may be e4m3 NaNs)
    cdiv = triton.cdiv
    if fp8_in:  # already quantised (see fp8_attention_fp8): K is used in place, V laid out K-major
        if k.stride(2) != D or k.stride(0) != n_kv * k.stride(1) or k.data_ptr() % 16 or k.stride(1) % 16:
            k = k.contiguous()
        k_desc = TensorDescriptor(k, [B * n_kv, H, D], [k.stride(1), D, 1], [_BLOCK_N, 1, D])
        vt8[..., :n_kv].copy_(v.permute(0, 2, 3, 1))
        k_heads = H
    else:
        k8 = torch.empty((B, H, n_kv, D), dtype=torch.float8_e4m3fn, device=q.device)
        _quant_kv_kernel[(cdiv(n_kv, 64), B * H)](
            k, v, k8, vt8, ks, vs, k.stride(0), k.stride(2), k.stride(1), v.stride(0), v.stride(2), v.stride(1),
            k8.stride(0), k8.stride(1), k8.stride(2), vt8.stride(0), vt8.stride(1), vt8.stride(2),
            H, n_kv, HEAD_DIM=D, BLOCK=64, num_warps=4)
        k_desc = TensorDescriptor(k8, [B * H * n_kv, 1, D], [D, D, 1], [_BLOCK_N, 1, D])
        k_heads = 1
    vt_desc = TensorDescriptor(vt8, [B * H * D, n_pad], [n_pad, 1], [D, _BLOCK_N])
    o = torch.empty((B, n_q, H, D), dtype=out_dtype or q.dtype, device=q.device)
    _attn_fwd_kernel[lambda meta: (cdiv(n_q, meta["BLOCK_M"]), B * H)](
        q, k_desc, vt_desc, o, qs, ks, vs, float(sm_scale), q.stride(0), q.stride(2), q.stride(1),
        o.stride(0), o.stride(2), o.stride(1), H, n_q, n_kv, K_HEADS=k_heads, HEAD_DIM=D, P_MUL=P_SCALE,
        Q_FP8=fp8_in, BLOCK_N=_BLOCK_N)
    return o


@torch.library.custom_op("fp8cookbook::fp8_attention", mutates_args=())
def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: torch.Tensor, k_scale: torch.Tensor,
                  v_scale: torch.Tensor, sm_scale: float, backend: str = "sage") -> torch.Tensor:
    """FP8 attention, (batch, seq, heads, head_dim) in and out; opaque to torch.compile (one custom op).

    On CUDA: the kernel named by `backend` when it takes the shape (`pick_kernel`), else Triton's; elsewhere, and
    for shapes neither kernel takes, the float32 reference. (The argument is not called `kernel`: Inductor's
    fallback lowering passes its own `kernel` argument and fails with "got multiple values for argument 'kernel'".)
    """
    args = (q, k, v, q_scale, k_scale, v_scale, sm_scale)
    chosen = op_kernel(q, k, sm_scale, backend)
    if chosen is None:
        return fp8_attention_reference(*args)
    return _CUDA_KERNELS[chosen](*args)


@fp8_attention.register_fake
def _(q, k, v, q_scale, k_scale, v_scale, sm_scale, backend="sage"):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@torch.library.custom_op("fp8cookbook::fp8_attention_fp8", mutates_args=())
def fp8_attention_fp8(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, q_scale: torch.Tensor,
                      k_scale: torch.Tensor, v_scale: torch.Tensor, sm_scale: float,
                      out_dtype: torch.dtype, backend: str = "sage") -> torch.Tensor:
    """`fp8_attention` on inputs already quantised (e4m3, the same scales): under torch.compile the quantisation is
    left to Inductor, which fuses it into the kernels that produce Q/K/V (RoPE, norms) instead of separate passes."""
    args = (q8, k8, v8, q_scale, k_scale, v_scale, sm_scale)
    chosen = op_kernel(q8, k8, sm_scale, backend)
    if chosen is None:
        return _reference_fp8_inputs(*args, out_dtype)
    return _CUDA_KERNELS[chosen](*args, out_dtype=out_dtype)


@fp8_attention_fp8.register_fake
def _(q8, k8, v8, q_scale, k_scale, v_scale, sm_scale, out_dtype, backend="sage"):
    return torch.empty(q8.shape, dtype=out_dtype, device=q8.device)


def _sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qs: torch.Tensor, ks: torch.Tensor,
                    vs: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """`attention_kernel.fp8_attention_v2` with its own dynamic scales: more accurate than the static ones, and free
    (computed in passes it makes anyway); the static scales only chose this layer."""
    return sage.fp8_attention_v2(q, k, v, layout="bshd", sm_scale=sm_scale)


_CUDA_KERNELS = {"sage": _sage_attention, "triton": _triton_fp8_attention, "cudnn": _cudnn_fp8_attention}


def sage_ok(q: torch.Tensor) -> bool:
    """The `sage` kernel takes this call: BF16/FP16 inputs (it smooths them before quantising) and its head sizes."""
    return (sage.attention_v2_available() and q.dtype in (torch.bfloat16, torch.float16)
            and q.shape[-1] in sage.HEAD_DIMS)


def pick_kernel(q: torch.Tensor, k: torch.Tensor, sm_scale: float, kernel: str = DEFAULT_KERNEL) -> str | None:
    """The CUDA kernel for this call: `sage` or cuDNN's when `kernel` asks for it and it takes the call, else
    Triton's (static scales) when it takes the shape, else None (then the reference runs). Already-quantised e4m3
    inputs (`fp8_attention_fp8`) go to Triton's kernel when `sage` is asked for.

    cuDNN's FP8 SDPA is about 1.2x faster than Triton's at Wan2.2's 32k tokens, but it accumulates P·V over all key
    tiles in the FP8 tensor cores' reduced-precision accumulator, as our kernel first did: on the full-size Wan2.2
    step that put its cosine against BF16 0.019 below the FP8-GEMM path (Triton now: 0.00004), far beyond issue 5's
    0.002. So it runs only when asked for (FP8COOKBOOK_ATTENTION_KERNEL=cudnn, read by `AttentionMode.parse`).
    """
    if kernel == "sage" and sage_ok(q):
        return "sage"
    if kernel == "cudnn" and cudnn_attention_available() and _cudnn_ok(q, k, sm_scale):
        return "cudnn"
    if triton_ok(q):
        return "triton"
    return None


def op_kernel(q: torch.Tensor, k: torch.Tensor, sm_scale: float, backend: str = DEFAULT_KERNEL) -> str | None:
    """The CUDA kernel `fp8_attention` (BF16/FP16 `q`) or `fp8_attention_fp8` (e4m3 `q`) runs for this call; None
    where the float32 reference runs (no FP8 GPU, float32 inputs, a shape no kernel takes). Reports ask it too."""
    if not fp8_gemm_supported(q.device) or q.dtype not in (torch.bfloat16, torch.float16, torch.float8_e4m3fn):
        return None
    return pick_kernel(q, k, sm_scale, backend)


def cudnn_errors() -> list[str]:
    """The shapes cuDNN refused so far, with its reasons (for benchmark reports)."""
    return list(_CUDNN.get("errors", []))


def _cudnn_ok(q: torch.Tensor, k: torch.Tensor, sm_scale: float) -> bool:
    """Whether cuDNN builds a graph for this shape (tried once per shape; a refusal falls back to Triton)."""
    key = ("ok", q.device.index, tuple(q.shape), tuple(k.shape), sm_scale)
    if key not in _CUDNN:
        try:
            z = [torch.zeros(t.shape, dtype=torch.float8_e4m3fn, device=q.device) for t in (q, k, k)]
            _cudnn_graph(*z, sm_scale)
            _CUDNN[key] = True
        except Exception as e:  # noqa: BLE001 - unsupported shape or cuDNN version: the Triton kernel runs instead
            _CUDNN[key] = False
            _CUDNN.setdefault("errors", []).append(f"{tuple(q.shape)}x{tuple(k.shape)}: {type(e).__name__}: {e}")
    return _CUDNN[key]


