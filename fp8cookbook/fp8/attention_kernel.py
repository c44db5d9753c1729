"""Attention kernel, version 2: 8-bit tensor cores with smoothing and fine scales, for SageAttention-level accuracy.

The first kernel (per-tensor static e4m3 scales for Q, K, V) has a relative L2 error of about 0.053 against float32 on
random inputs and above 1 when a few Q/K channels are 20-50x the rest, as in real DiTs. Per-block scales alone do not
help e4m3 on random data (its relative rounding error, about 2.6% per element, does not depend on the scale), so this
kernel changes what is quantised and to what:

* K is smoothed by its per-channel mean over the sequence (softmax is invariant to it: each query's scores shift by
  one constant), which removes DiT keys' channel bias.
* Q and K channels are balanced: channel c of Q is divided and of K multiplied by a_c = sqrt(amax_Q_c / amax_K_c)
  (scores unchanged), so an outlier channel of one no longer sets the scale of all others.
* Q·Kᵀ runs in INT8 (`qk="int8"`, default) with a scale per query token (computed inside the kernel from the Q tile
  it holds) and per block of 128 keys (computed by the K/V pass): about 0.01 relative error per score term against
  e4m3's 0.026. `qk="fp8"` keeps e4m3 with the same scales. The int32 scores become float32 by the magic-number trick
  (|score| < 2^22, exact), not by the slow integer-to-float conversion.
* V is smoothed by its per-channel mean (added back to O at the end: rows of P sum to one) and quantised with a scale
  per channel, applied to O's columns at the end (free).
* P (scaled by 256 into e4m3's normal range, folded into the exp2) is e4m3 (`pv="fp8"`); `pv="fp8x2"` adds a second
  e4m3 term for P's rounding residual (one more MMA per tile), removing P's share of the error. Each key tile's P·V
  starts from a fresh accumulator and is added to the running output in float32 (two-level accumulation: FP8 tensor
  cores accumulate with reduced precision, which had cost Wan2.2 0.019 of cosine).

Passes on CUDA: one statistics kernel over Q, K, V (per-block channel sum/max/min), one tiny kernel that reduces them
to the per-(batch, head, channel) means, balances and V scales, one K/V quantisation kernel (V laid out K-major, as
8-bit tensor cores need), and the attention kernel (K/V tiles by TMA). `attention_v2_reference` computes the same
quantised formula in float32 on any device, for the tests and the CPU path. Imports torch, Triton and the e4m3
quantisation every kernel shares (`numerics.py`).
"""

from __future__ import annotations

import torch

from ..errors import Fp8CookbookError
from ..files import check_scale
from .numerics import FP8_MAX, quantize_fp8

__all__ = ["fp8_attention_v2", "attention_v2_reference", "attention_v2_available", "QK_MODES", "PV_MODES",
           "BLOCK_N", "P_SCALE"]

QK_MODES = ("int8", "fp8")
PV_MODES = ("fp8", "fp8x2")
LAYOUTS = ("bshd", "bhsd")
BLOCK_N = 128  # keys per tile, and the granularity of K's scales
P_SCALE = 256.0  # P (<= 1) times 256 before its e4m3 cast: small probabilities stay out of the subnormals
P_RES_SCALE = 16.0  # the second P term (fp8x2): the rounding residual, at most 1/16 of P, times 16
_QMAX = {"int8": 127.0, "fp8": FP8_MAX}
HEAD_DIMS = (32, 64, 128)
_EPS = 1e-30


# ------------------------------------------------------------------------------------------ reference (float32)
def _bhsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.transpose(1, 2) if layout == "bshd" else t


def _smoothing(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, v_scale: torch.Tensor | None):
    """Per (batch, head, channel): K's mean, the Q/K balance a, V's mean and V's dequantisation scale (float32).

    Inputs (B, H, S, D). With a static `v_scale` (the checkpoint's), V is neither smoothed nor scaled per channel.
    """
    qf, kf, vf = q.float(), k.float(), v.float()
    k_mu = kf.mean(2)
    k_amax = (kf - k_mu[:, :, None]).abs().amax(2)
    q_amax = qf.abs().amax(2)
    ok = (q_amax > 0) & (k_amax > 0)
    bal = torch.where(ok, (q_amax / k_amax.clamp_min(_EPS)).sqrt(), torch.ones_like(q_amax))
    if v_scale is None:
        v_mu = vf.mean(2)
        v_amax = (vf - v_mu[:, :, None]).abs().amax(2)
        v_sc = torch.where(v_amax > 0, v_amax / FP8_MAX, torch.ones_like(v_amax))
    else:
        v_mu = torch.zeros_like(k_mu)
        v_sc = v_scale.float().reshape(()).expand_as(k_mu).clone()
    return k_mu, bal, v_mu, v_sc


def _quant(x: torch.Tensor, scale: torch.Tensor, qk: str) -> torch.Tensor:
    """x / scale rounded to the 8-bit grid of `qk` (int8: round half to even, as rint; fp8: e4m3 RNE, the one
    `numerics.quantize_fp8`), as float32."""
    if qk == "int8":
        return (x / scale).round().clamp(-127, 127)
    return quantize_fp8(x, scale).float()


def attention_v2_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str = "bshd",
                           scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                           sm_scale: float | None = None, qk: str = "int8", pv: str = "fp8") -> torch.Tensor:
    """The module docstring's quantised attention in float32 (the softmax max over the whole row, where the kernel
    keeps a running one: P's rounding then differs a little). Same layout and dtype out as `q`."""
    _check(q, k, v, layout, scales, qk, pv, need_cuda=False)
    qh, kh, vh = (_bhsd(t, layout) for t in (q, k, v))
    B, H, nq, D = qh.shape
    nkv = kh.shape[2]
    sm_scale = D ** -0.5 if sm_scale is None else float(sm_scale)
    k_mu, bal, v_mu, v_sc = _smoothing(qh, kh, vh, None if scales is None else scales[2])
    qmax = _QMAX[qk]
    qb = qh.float() / bal[:, :, None]
    q_s = (qb.abs().amax(-1, keepdim=True) / qmax).clamp_min(_EPS)  # per query token
    q8 = _quant(qb, q_s, qk)
    kb = (kh.float() - k_mu[:, :, None]) * bal[:, :, None]
    nblk = -(-nkv // BLOCK_N)
    pad = nblk * BLOCK_N - nkv
    kp = torch.nn.functional.pad(kb, (0, 0, 0, pad)).reshape(B, H, nblk, BLOCK_N, D)
    k_s = (kp.abs().amax((-1, -2), keepdim=True) / qmax).clamp_min(_EPS)  # per block of BLOCK_N keys
    k8 = _quant(kp, k_s, qk).reshape(B, H, nblk * BLOCK_N, D)[:, :, :nkv]
    k_s = k_s.reshape(B, H, nblk).repeat_interleave(BLOCK_N, -1)[:, :, :nkv]
    s = torch.einsum("bhqd,bhkd->bhqk", q8, k8) * (q_s * k_s[:, :, None, :] * sm_scale)
    p = torch.exp(s - s.amax(-1, keepdim=True))
    denom = p.sum(-1, keepdim=True)
    p8 = (p * P_SCALE).to(torch.float8_e4m3fn).float()
    if pv == "fp8x2":
        res = (p * P_SCALE - p8) * P_RES_SCALE
        p8 = p8 + res.to(torch.float8_e4m3fn).float() / P_RES_SCALE
    v8 = _quant(vh.float() - v_mu[:, :, None], v_sc[:, :, None], "fp8")
    o = torch.einsum("bhqk,bhkd->bhqd", p8, v8) / (denom * P_SCALE) * v_sc[:, :, None] + v_mu[:, :, None]
    o = o.to(q.dtype)
    return (o.transpose(1, 2) if layout == "bshd" else o).contiguous()


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, scales, qk: str, pv: str,
           need_cuda: bool) -> None:
    """One-line errors naming the argument at fault, before any work."""
    if layout not in LAYOUTS:
        raise Fp8CookbookError(f"fp8_attention_v2: layout={layout!r}; use one of {', '.join(LAYOUTS)}")
    if qk not in QK_MODES:
        raise Fp8CookbookError(f"fp8_attention_v2: qk={qk!r}; use one of {', '.join(QK_MODES)}")
    if pv not in PV_MODES:
        raise Fp8CookbookError(f"fp8_attention_v2: pv={pv!r}; use one of {', '.join(PV_MODES)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise Fp8CookbookError(f"fp8_attention_v2: {name} has shape {tuple(t.shape)}; want 4 dims ({layout})")
        if t.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise Fp8CookbookError(f"fp8_attention_v2: {name} is {t.dtype}; want bfloat16, float16 or float32")
    s_ax, h_ax = (1, 2) if layout == "bshd" else (2, 1)
    if k.shape != v.shape:
        raise Fp8CookbookError(f"fp8_attention_v2: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if (q.shape[0], q.shape[h_ax], q.shape[3]) != (k.shape[0], k.shape[h_ax], k.shape[3]):
        raise Fp8CookbookError(f"fp8_attention_v2: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, "
                               f"heads or head_dim ({layout})")
    if q.shape[s_ax] == 0 or k.shape[s_ax] == 0:
        raise Fp8CookbookError(f"fp8_attention_v2: empty sequence (q {tuple(q.shape)}, k {tuple(k.shape)})")
    if scales is not None:
        if len(scales) != 3:
            raise Fp8CookbookError("fp8_attention_v2: scales must be (q_scale, k_scale, v_scale)")
        for name, s in zip("qkv", scales):
            check_scale(f"scales[{name}]", s, "fp8_attention_v2")  # the one scale rule: one value, finite, > 0
    if need_cuda and q.shape[3] not in HEAD_DIMS:
        raise Fp8CookbookError(f"fp8_attention_v2: head_dim {q.shape[3]} has no kernel (have {HEAD_DIMS})")


# ------------------------------------------------------------------------------------------ Triton kernels
try:  # CUDA builds of torch ship Triton; the CPU wheels do not, and then the reference runs
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    from .numerics import TL_FP8_MAX, tl_quantize_fp8  # e4m3 quantisation: the IEEE quotient, saturated, RNE
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

_STAT_ROWS = 128  # rows per program of the statistics pass
# int32 -> float32 in the attention kernel: x + 0x4B400000, read as a float, is 1.5·2^23 + x exactly for |x| < 2^22


def attention_v2_available() -> bool:
    """Triton importable (the kernels are defined at import); the caller checks the device."""
    return triton is not None


if triton is not None:
    @triton.jit
    def _stats_kernel(Q, K, V, QP, KP, VP, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, H, n_q, n_kv, nbq, nbk,
                      HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, DO_V: tl.constexpr):
        # Per block of ROWS tokens of one (batch, head): Q's channel max/min, K's (and V's) channel sum/max/min.
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        rows = pid * ROWS + tl.arange(0, ROWS)
        d = tl.arange(0, HEAD_DIM)
        if pid < nbq:
            m = rows[:, None] < n_q
            x = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + d[None, :], mask=m, other=0.0).to(tl.float32)
            base = QP + (bh * nbq + pid).to(tl.int64) * 2 * HEAD_DIM
            tl.store(base + d, tl.max(tl.where(m, x, -float("inf")), 0))
            tl.store(base + HEAD_DIM + d, tl.min(tl.where(m, x, float("inf")), 0))
        if pid < nbk:
            m = rows[:, None] < n_kv
            x = tl.load(K + b * skb + h * skh + rows[:, None] * skn + d[None, :], mask=m, other=0.0).to(tl.float32)
            base = KP + (bh * nbk + pid).to(tl.int64) * 3 * HEAD_DIM
            tl.store(base + d, tl.sum(x, 0))
            tl.store(base + HEAD_DIM + d, tl.max(tl.where(m, x, -float("inf")), 0))
            tl.store(base + 2 * HEAD_DIM + d, tl.min(tl.where(m, x, float("inf")), 0))
            if DO_V:
                x = tl.load(V + b * svb + h * svh + rows[:, None] * svn + d[None, :], mask=m,
                            other=0.0).to(tl.float32)
                base = VP + (bh * nbk + pid).to(tl.int64) * 3 * HEAD_DIM
                tl.store(base + d, tl.sum(x, 0))
                tl.store(base + HEAD_DIM + d, tl.max(tl.where(m, x, -float("inf")), 0))
                tl.store(base + 2 * HEAD_DIM + d, tl.min(tl.where(m, x, float("inf")), 0))

    @triton.jit
    def _finish_stats_kernel(QP, KP, VP, VS_STATIC, OUT, n_kv, nbq, nbk, HEAD_DIM: tl.constexpr,
                             CHUNK: tl.constexpr, DO_V: tl.constexpr):
        # One program per (batch, head): OUT[bh] = (K mean, balance a, V mean, V scale), each HEAD_DIM floats.
        bh = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, HEAD_DIM)
        c = tl.arange(0, CHUNK)
        qmax = tl.full([HEAD_DIM], -float("inf"), tl.float32)
        qmin = tl.full([HEAD_DIM], float("inf"), tl.float32)
        for start in range(0, nbq, CHUNK):
            m = (start + c)[:, None] < nbq
            base = QP + (bh * nbq + start + c[:, None]) * 2 * HEAD_DIM + d[None, :]
            qmax = tl.maximum(qmax, tl.max(tl.load(base, mask=m, other=-float("inf")), 0))
            qmin = tl.minimum(qmin, tl.min(tl.load(base + HEAD_DIM, mask=m, other=float("inf")), 0))
        ksum = tl.zeros([HEAD_DIM], tl.float32)
        kmax = tl.full([HEAD_DIM], -float("inf"), tl.float32)
        kmin = tl.full([HEAD_DIM], float("inf"), tl.float32)
        vsum = tl.zeros([HEAD_DIM], tl.float32)
        vmax = tl.full([HEAD_DIM], -float("inf"), tl.float32)
        vmin = tl.full([HEAD_DIM], float("inf"), tl.float32)
        for start in range(0, nbk, CHUNK):
            m = (start + c)[:, None] < nbk
            base = KP + (bh * nbk + start + c[:, None]) * 3 * HEAD_DIM + d[None, :]
            ksum += tl.sum(tl.load(base, mask=m, other=0.0), 0)
            kmax = tl.maximum(kmax, tl.max(tl.load(base + HEAD_DIM, mask=m, other=-float("inf")), 0))
            kmin = tl.minimum(kmin, tl.min(tl.load(base + 2 * HEAD_DIM, mask=m, other=float("inf")), 0))
            if DO_V:
                base = VP + (bh * nbk + start + c[:, None]) * 3 * HEAD_DIM + d[None, :]
                vsum += tl.sum(tl.load(base, mask=m, other=0.0), 0)
                vmax = tl.maximum(vmax, tl.max(tl.load(base + HEAD_DIM, mask=m, other=-float("inf")), 0))
                vmin = tl.minimum(vmin, tl.min(tl.load(base + 2 * HEAD_DIM, mask=m, other=float("inf")), 0))
        k_mu = ksum / n_kv
        k_amax = tl.maximum(kmax - k_mu, k_mu - kmin)
        q_amax = tl.maximum(qmax, -qmin)
        ok = (q_amax > 0) & (k_amax > 0)
        bal = tl.where(ok, tl.sqrt(q_amax / tl.maximum(k_amax, 1e-30)), 1.0)
        if DO_V:
            v_mu = vsum / n_kv
            v_amax = tl.maximum(vmax - v_mu, v_mu - vmin)
            v_sc = tl.where(v_amax > 0, v_amax / TL_FP8_MAX, 1.0)
        else:
            v_mu = tl.zeros([HEAD_DIM], tl.float32)
            v_sc = tl.zeros([HEAD_DIM], tl.float32) + tl.load(VS_STATIC)
        out = OUT + bh * 4 * HEAD_DIM + d
        tl.store(out, k_mu)
        tl.store(out + HEAD_DIM, bal)
        tl.store(out + 2 * HEAD_DIM, v_mu)
        tl.store(out + 3 * HEAD_DIM, v_sc)

    @triton.jit
    def _quant_kv_kernel(K, V, STATS, K8, KS, VT8, skb, skh, skn, svb, svh, svn, H, n_kv, nbk, n_pad,
                         HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, QK_INT8: tl.constexpr):
        # K -> K8 (B·H·N, D), smoothed, balanced, one scale per BLOCK keys in KS; V -> VT8 (B·H·D, n_pad), K-major.
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        rows = pid * BLOCK + tl.arange(0, BLOCK)
        d = tl.arange(0, HEAD_DIM)
        m = rows[:, None] < n_kv
        st = STATS + bh.to(tl.int64) * 4 * HEAD_DIM + d
        k_mu = tl.load(st)
        bal = tl.load(st + HEAD_DIM)
        v_mu = tl.load(st + 2 * HEAD_DIM)
        v_sc = tl.load(st + 3 * HEAD_DIM)
        k = tl.load(K + b * skb + h * skh + rows[:, None] * skn + d[None, :], mask=m, other=0.0).to(tl.float32)
        k = tl.where(m, (k - k_mu[None, :]) * bal[None, :], 0.0)
        amax = tl.max(tl.max(tl.abs(k), 1), 0)
        if QK_INT8:
            ks = tl.maximum(amax / 127.0, 1e-30)
            k8 = tl.clamp(libdevice.rint(k / ks), -127.0, 127.0).to(tl.int8)
        else:
            ks = tl.maximum(amax / TL_FP8_MAX, 1e-30)
            k8 = tl_quantize_fp8(k, ks)
        tl.store(KS + bh * nbk + pid, ks)
        krow = bh.to(tl.int64) * n_kv + rows
        tl.store(K8 + krow[:, None] * HEAD_DIM + d[None, :], k8, mask=m)
        v = tl.load(V + b * svb + h * svh + rows[:, None] * svn + d[None, :], mask=m, other=0.0).to(tl.float32)
        v = tl.where(m, v - v_mu[None, :], 0.0)  # padded keys: exact zeros (read by the last tile)
        v8 = tl.trans(tl_quantize_fp8(v, v_sc[None, :]))
        vrow = bh.to(tl.int64) * HEAD_DIM + d
        tl.store(VT8 + vrow[:, None] * n_pad + rows[None, :], v8, mask=rows[None, :] < n_pad)

    @triton.jit
    def _qk(q8, k_desc, row, QK_INT8: tl.constexpr):
        # the raw scores of one key tile: int32 (INT8) or float32 (e4m3), before any scale
        k = k_desc.load([row, 0])
        if QK_INT8:
            return tl.dot(q8, tl.trans(k), out_dtype=tl.int32)
        return tl.dot(q8, tl.trans(k))

    @triton.jit
    def _softmax_pv(acc, l_i, m_i, qk, row_scale, vt_desc, KS, vt_row, ks_base, start_n, n_kv,
                    BLOCK_N: tl.constexpr, MASK: tl.constexpr, QK_INT8: tl.constexpr, P_SPLIT: tl.constexpr):
        vt = vt_desc.load([vt_row, start_n])
        rs = row_scale * tl.load(KS + ks_base + start_n // BLOCK_N)  # log2-domain scale per query row
        if QK_INT8:
            # int32 -> float32 without the slow conversion: the bits of qk + 0x4B400000 are the float 1.5·2^23 + qk
            # (exact: |qk| <= 128·127² < 2^22); the bias is taken out in the FMA below, not by a subtraction.
            qk = (qk + 0x4B400000).to(tl.float32, bitcast=True)
            bias = 12582912.0
        else:
            bias = 0.0
        if MASK:
            cols = start_n + tl.arange(0, BLOCK_N)
            qk = tl.where(cols[None, :] < n_kv, qk, float("-inf"))
        m_new = tl.maximum(m_i, (tl.max(qk, 1) - bias) * rs)
        # P·256 in one FMA and exp2: log2(256) = 8 folded into the offset, with the int8 bias
        p = tl.math.exp2(qk * rs[:, None] - (bias * rs + m_new - 8.0)[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        p8 = p.to(tl.float8e4nv)
        # fresh accumulator per tile, added in float32 (two-level accumulation)
        pv = tl.dot(p8, tl.trans(vt))
        if P_SPLIT:
            r8 = ((p - p8.to(tl.float32)) * 16.0).to(tl.float8e4nv)
            pv += tl.dot(r8, tl.trans(vt)) * (1.0 / 16.0)
        acc = acc * alpha[:, None] + pv
        return acc, l_i, m_new

    @triton.jit
    def _attn_v2_kernel(Q, k_desc, vt_desc, KS, STATS, O, sm_scale, sqb, sqh, sqn, sob, soh, son, H, n_q, n_kv,
                        nbk, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        QK_INT8: tl.constexpr, P_SPLIT: tl.constexpr, WARP_SPEC: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, HEAD_DIM)
        st = STATS + bh.to(tl.int64) * 4 * HEAD_DIM + d
        bal = tl.load(st + HEAD_DIM)
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + d[None, :], mask=rows[:, None] < n_q,
                    other=0.0).to(tl.float32) / bal[None, :]
        amax = tl.max(tl.abs(q), 1)
        if QK_INT8:
            qs = tl.maximum(amax / 127.0, 1e-30)
            q8 = tl.clamp(libdevice.rint(q / qs[:, None]), -127.0, 127.0).to(tl.int8)
        else:
            qs = tl.maximum(amax / TL_FP8_MAX, 1e-30)
            q8 = tl_quantize_fp8(q, qs[:, None])
        row_scale = qs * (sm_scale * 1.4426950408889634)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        k_row = bh * n_kv
        vt_row = bh * HEAD_DIM
        ks_base = bh.to(tl.int64) * nbk
        n_full = n_kv // BLOCK_N * BLOCK_N
        for start_n in tl.range(0, n_full, BLOCK_N, warp_specialize=WARP_SPEC):
            qk = _qk(q8, k_desc, k_row + start_n, QK_INT8)
            acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, qk, row_scale, vt_desc, KS, vt_row, ks_base,
                                        start_n, n_kv, BLOCK_N, False, QK_INT8, P_SPLIT)
        if n_full < n_kv:
            qk = _qk(q8, k_desc, k_row + n_full, QK_INT8)
            acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, qk, row_scale, vt_desc, KS, vt_row, ks_base,
                                        n_full, n_kv, BLOCK_N, True, QK_INT8, P_SPLIT)
        v_mu = tl.load(st + 2 * HEAD_DIM)
        v_sc = tl.load(st + 3 * HEAD_DIM)
        o = acc / l_i[:, None] * v_sc[None, :] + v_mu[None, :]  # the 256 of P cancels against l_i's
        tl.store(O + b * sob + h * soh + rows[:, None] * son + d[None, :], o.to(O.dtype.element_ty),
                 mask=rows[:, None] < n_q)

    # (BLOCK_M, num_warps, num_stages). On an H200, (64, 4, 3) beat (128, 8, 2) and (128, 8, 3) at every bench
    # shape: with 128 rows the kernel spills (255 registers: the float32 output, the scores and the fresh P·V
    # accumulator of two-level accumulation are 64 registers each per thread); 64 rows leave room for two CTAs per SM.
    CONFIGS = [(64, 4, 2), (64, 4, 3), (64, 4, 4)]
    _ATTN = triton.autotune(
        configs=[triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s) for bm, w, s in CONFIGS],
        key=["n_q", "n_kv", "HEAD_DIM", "QK_INT8", "P_SPLIT", "WARP_SPEC"])(_attn_v2_kernel)


def _strides(t: torch.Tensor, layout: str) -> tuple[int, int, int]:
    """(batch, head, token) strides."""
    return (t.stride(0), t.stride(2), t.stride(1)) if layout == "bshd" else (t.stride(0), t.stride(1), t.stride(2))


def fp8_attention_v2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str = "bshd",
                     scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                     sm_scale: float | None = None, qk: str = "int8", pv: str = "fp8",
                     warp_specialize: bool = False) -> torch.Tensor:
    """Attention with 8-bit tensor cores (module docstring); `layout` "bshd" is diffusers' (B, S, H, D).

    `scales` are a checkpoint's static (q, k, v) dequantisation scales: V then uses its static per-tensor scale and is
    not smoothed (Q and K keep their dynamic per-token/per-block scales, which cost nothing extra). Off CUDA, or
    without Triton, `attention_v2_reference` runs. Returns a new tensor in `q`'s layout and dtype.
    """
    on_cuda = q.is_cuda and attention_v2_available() and torch.cuda.get_device_capability(q.device) >= (8, 9)
    _check(q, k, v, layout, scales, qk, pv, need_cuda=on_cuda)
    if not on_cuda:
        return attention_v2_reference(q, k, v, layout=layout, scales=scales, sm_scale=sm_scale, qk=qk, pv=pv)
    from triton.tools.tensor_descriptor import TensorDescriptor

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    s_ax, h_ax = (1, 2) if layout == "bshd" else (2, 1)
    B, H, D = q.shape[0], q.shape[h_ax], q.shape[3]
    n_q, n_kv = q.shape[s_ax], k.shape[s_ax]
    sm_scale = D ** -0.5 if sm_scale is None else float(sm_scale)
    dev = q.device
    cdiv = triton.cdiv
    nbq, nbk_stat = cdiv(n_q, _STAT_ROWS), cdiv(n_kv, _STAT_ROWS)
    do_v = scales is None
    qp = torch.empty((B * H, nbq, 2, D), dtype=torch.float32, device=dev)
    kp = torch.empty((B * H, nbk_stat, 3, D), dtype=torch.float32, device=dev)
    vp = torch.empty((B * H, nbk_stat, 3, D) if do_v else (1,), dtype=torch.float32, device=dev)
    v_static = (scales[2].float().reshape(1).to(dev) if not do_v else torch.ones(1, device=dev))
    _stats_kernel[(max(nbq, nbk_stat), B * H)](
        q, k, v, qp, kp, vp, *_strides(q, layout), *_strides(k, layout), *_strides(v, layout), H, n_q, n_kv,
        nbq, nbk_stat, HEAD_DIM=D, ROWS=_STAT_ROWS, DO_V=do_v, num_warps=4)
    stats = torch.empty((B * H, 4, D), dtype=torch.float32, device=dev)
    _finish_stats_kernel[(B * H,)](qp, kp, vp, v_static, stats, n_kv, nbq, nbk_stat, HEAD_DIM=D, CHUNK=16,
                                   DO_V=do_v, num_warps=4)
    qk_int8 = qk == "int8"
    nbk = cdiv(n_kv, BLOCK_N)
    n_pad = nbk * BLOCK_N  # V is zero-padded to whole tiles: the last tile reads zeros, never stale bytes
    k8 = torch.empty((B * H * n_kv, D), dtype=torch.int8 if qk_int8 else torch.float8_e4m3fn, device=dev)
    ks = torch.empty((B * H, nbk), dtype=torch.float32, device=dev)
    vt8 = torch.empty((B * H * D, n_pad), dtype=torch.float8_e4m3fn, device=dev)
    _quant_kv_kernel[(nbk, B * H)](
        k, v, stats, k8, ks, vt8, *_strides(k, layout), *_strides(v, layout), H, n_kv, nbk, n_pad,
        HEAD_DIM=D, BLOCK=BLOCK_N, QK_INT8=qk_int8, num_warps=4)
    k_desc = TensorDescriptor(k8, [B * H * n_kv, D], [D, 1], [BLOCK_N, D])
    vt_desc = TensorDescriptor(vt8, [B * H * D, n_pad], [n_pad, 1], [D, BLOCK_N])
    o = torch.empty_like(q, dtype=q.dtype if q.dtype != torch.float32 else torch.float32,
                         memory_format=torch.contiguous_format)
    _ATTN[lambda meta: (cdiv(n_q, meta["BLOCK_M"]), B * H)](
        q, k_desc, vt_desc, ks, stats, o, sm_scale, *_strides(q, layout), *_strides(o, layout), H, n_q, n_kv, nbk,
        HEAD_DIM=D, BLOCK_N=BLOCK_N, QK_INT8=qk_int8, P_SPLIT=pv == "fp8x2", WARP_SPEC=bool(warp_specialize))
    return o


def flops(batch: int, heads: int, n_q: int, n_kv: int, head_dim: int) -> float:
    """Matmul FLOPs of one attention call (Q·Kᵀ and P·V), the figure TFLOP/s rates are quoted on."""
    return 4.0 * batch * heads * n_q * n_kv * head_dim

