"""Where FP8 attention's error comes from, on one full-size random-weight forward (GPU).

Issue 5's rule keeps FP8 attention opt-in unless its cosine against BF16 stays within 0.002 of the FP8-GEMM-only
path. This script splits that error by source: it runs the first forward of `fp8cookbook bench` (same model, inputs
and calibration) once in BF16, once with FP8 linears only, and then with FP8 linears plus one attention variant each:

- `fake-*`: BF16 attention (torch SDPA) on inputs rounded to e4m3 and back (only the named inputs), so the softmax
  probabilities P and the output stay exact: which of Q, K, V costs what;
- `fake-qkv-token`: the same with a scale per token and head instead of the static per-tensor one (is the static
  scale the problem?);
- `fake-int8qk-token`: Q and K rounded to int8 with a scale per token and head, V to e4m3 (SageAttention's split);
- `kernel` (the default kernel, `sage`), `kernel-triton` (per-tensor static scales), `kernel-cudnn`: the real FP8
  op (P rounded to e4m3 too; cuDNN also rounds O);
- `kernel-self`, `kernel-cross`: the default kernel on self-attention (`attn1`) or cross-attention (`attn2`) only.

`--outliers` gives every attention module's Q and K the channel outliers of `attention_kernel_bench.py` (in 4
channels of each head Q is 20-50x the rest and K carries a 20-50 bias constant over tokens; Q x 0.2), after the
Q/K norms, in every pass, calibration included: real DiTs have such channels, random weights do not.

    python scripts/attention_quality.py --family wan22 --output wan22-attention-quality.json
    python scripts/attention_quality.py --family flux1 --variants kernel,kernel-triton --outliers
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from fp8cookbook.bench import environment
from fp8cookbook.fp8 import attention as fa
from fp8cookbook.fp8 import attention_diffusers as fd
from fp8cookbook.fp8 import fastpath
from fp8cookbook.fp8.attention_mode import DEFAULT_KERNEL
from fp8cookbook.fp8.quantize import StaticFP8Config, attention_scales, fp8_candidates, quantize_, record_input_amax
from fp8cookbook.families import build_transformer, get_family
from fp8cookbook.fp8.numerics import quantize_fp8

VARIANTS = ("fake-qk", "fake-v", "fake-qkv", "fake-qkv-token", "fake-int8qk-token",
            "kernel", "kernel-triton", "kernel-cudnn", "kernel-self", "kernel-cross")


def _fake(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (quantize_fp8(x, scale).to(torch.float32) * scale).to(x.dtype)


def _fake_token(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Round to e4m3 or int8 with one scale per (token, head): x is (batch, seq, heads, head_dim)."""
    amax = x.float().abs().amax(-1, keepdim=True).clamp_min(1e-12)
    if fmt == "int8":
        s = amax / 127.0
        return ((x.float() / s).round().clamp(-127, 127) * s).to(x.dtype)
    s = amax / 448.0
    return ((x.float() / s).to(torch.float8_e4m3fn).float() * s).to(x.dtype)


class Variant:
    """The dispatch function the script installs: FP8 attention as `name` says, BF16 for the layers it leaves out."""

    name = "kernel"

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False, attention_kwargs=None, *, backend=None, parallel_config=None):
        if not isinstance(backend, fa.AttentionScales) or backend.q is None:
            return fd.fp8_dispatch_attention_fn(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                enable_gqa, attention_kwargs, backend=backend,
                                                parallel_config=parallel_config)
        name, st = self.name, backend
        layer = st.name.rsplit(".", 1)[-1]
        if (name == "kernel-self" and layer != "attn1") or (name == "kernel-cross" and layer != "attn2"):
            name = "bf16"
        if name.startswith("kernel"):
            return fd.fp8_dispatch_attention_fn(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                enable_gqa, attention_kwargs, backend=backend,
                                                parallel_config=parallel_config)
        q, k, v = query, key, value
        if name in ("fake-qk", "fake-qkv"):
            q, k = _fake(q, st.q), _fake(k, st.k)
        if name in ("fake-v", "fake-qkv"):
            v = _fake(v, st.v)
        if name == "fake-qkv-token":
            q, k, v = _fake_token(q, "e4m3"), _fake_token(k, "e4m3"), _fake_token(v, "e4m3")
        if name == "fake-int8qk-token":
            q, k, v = _fake_token(q, "int8"), _fake_token(k, "int8"), _fake(v, st.v)
        return fd._DIFFUSERS_DISPATCH(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                      attention_kwargs, backend=st.fallback, parallel_config=parallel_config)


@torch.no_grad()
def probe_layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, st: fa.AttentionScales, rows: int = 1024) -> dict:
    """One layer's captured Q/K/V: statistics, and the error of each rounding step against exact attention."""
    B, n_q, H, D = q.shape
    g = torch.Generator(device=q.device).manual_seed(0)
    idx = torch.randperm(n_q, generator=g, device=q.device)[:rows]
    sm = D ** -0.5
    q8, k8, v8 = (quantize_fp8(t, s).float() * s for t, s in ((q, st.q), (k, st.k), (v, st.v)))
    errs: dict[str, list[float]] = {}
    stats: dict[str, list[float]] = {}
    for h in range(H):
        qh, kh, vh = q[0, idx, h].float(), k[0, :, h].float(), v[0, :, h].float()
        s = qh @ kh.T * sm
        p = torch.exp(s - s.amax(-1, keepdim=True))
        exact = p @ vh / p.sum(-1, keepdim=True)
        s8 = q8[0, idx, h] @ k8[0, :, h].T * sm
        p_ = torch.exp(s8 - s8.amax(-1, keepdim=True))
        l_ = p_.sum(-1, keepdim=True)
        vh8 = v8[0, :, h]
        outs = {"qkv e4m3, P exact": p_ @ vh8 / l_}
        for mul in (256.0, 448.0):
            pq = (p_ * mul).to(torch.float8_e4m3fn).float() / mul
            outs[f"P e4m3 x{int(mul)}, sum of exact P"] = pq @ vh8 / l_
            outs[f"P e4m3 x{int(mul)}, sum of rounded P"] = pq @ vh8 / pq.sum(-1, keepdim=True)
        outs["P bf16"] = p_.bfloat16().float() @ vh8 / l_
        for name, o in outs.items():
            errs.setdefault(name, []).append(float((o - exact).norm() / exact.norm()))
            errs.setdefault(name + " (norm ratio)", []).append(float(o.norm() / exact.norm()))
        stats.setdefault("score std", []).append(float(s.std()))
        stats.setdefault("score row max - mean", []).append(float((s.amax(-1) - s.mean(-1)).mean()))
        stats.setdefault("P*256 < 2^-6 (subnormal) fraction", []).append(float(((p * 256) < 2 ** -6).float().mean()))
        stats.setdefault("|mean_j v_j| / rms(v)", []).append(float(vh.mean(0).norm() / vh.pow(2).mean(0).sum().sqrt()))
        stats.setdefault("|O| / rms(v)", []).append(float(exact.pow(2).mean(0).sum().sqrt() / vh.pow(2).mean(0).sum().sqrt()))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"errors_vs_exact": {k: mean(x) for k, x in errs.items()}, "stats": {k: mean(x) for k, x in stats.items()}}


OUTLIER_CHANNELS = 4
OUTLIER_FACTORS = (20.0, 30.0, 40.0, 50.0)
NORMS = {"norm_q": "q", "norm_added_q": "q", "norm_k": "k", "norm_added_k": "k"}


def inject_outliers(model: torch.nn.Module, seed: int = 0) -> list:
    """Forward hooks on each attention module's Q/K norms that add `attention_kernel_bench.py`'s channel outliers,
    in the same 4 channels of every head and module (Q and K must share them); returns the hook handles."""
    handles = []
    for name, attn in fd.attention_modules(model).items():
        norms = {n: getattr(attn, n) for n in NORMS if isinstance(getattr(attn, n, None), torch.nn.Module)}
        if not {"norm_q", "norm_k"} <= set(norms):
            raise SystemExit(f"--outliers: {name} has no norm_q/norm_k to hook ({type(attn).__name__})")
        for n, mod in norms.items():
            handles.append(mod.register_forward_hook(_OutlierHook(NORMS[n], attn.heads, seed)))
    return handles


class _OutlierHook:
    def __init__(self, role: str, heads: int, seed: int):
        self.role, self.heads, self.seed = role, heads, seed
        self._channels: torch.Tensor | None = None  # drawn at the first call, when the head dim is known

    def __call__(self, mod, args, out: torch.Tensor) -> torch.Tensor:
        x = out.unflatten(-1, (self.heads, -1)) if out.dim() == 3 else out  # Wan: across heads; FLUX: per head
        if self._channels is None:  # the same seed in every hook: Q and K (and every module) share the channels
            gen = torch.Generator().manual_seed(self.seed)
            self._channels = torch.randperm(x.shape[-1], generator=gen)[:OUTLIER_CHANNELS].to(x.device)
        ch = self._channels
        f = torch.tensor(OUTLIER_FACTORS, device=x.device, dtype=x.dtype)
        x = x.clone()
        if self.role == "q":
            x[..., ch] *= f
            x = x * 0.2
        else:
            x[..., ch] += f
        return x.flatten(-2) if out.dim() == 3 else x


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


@torch.no_grad()
def run(family_name: str, variants: list[str], seed: int = 0, size: str = "full", device: str = "cuda",
        probe_layers: tuple[str, ...] = (), outliers: bool = False) -> dict:
    family = get_family(family_name)
    dev = torch.device(device)
    model = build_transformer(family, size, seed=seed, device=dev)
    if outliers:
        inject_outliers(model, seed)
    config = dict(model.config)
    g = torch.Generator().manual_seed(seed)
    small = size == "tiny"  # CPU smoke test: the tiny model at a small resolution
    inputs = family.make_inputs(config, height=64 if small else family.height, width=64 if small else family.width,
                                num_frames=5 if small and family.is_video else family.num_frames,
                                batch=1, text_len=16 if small else family.text_len, device=dev, generator=g)

    def forward() -> torch.Tensor:
        return model(**inputs)[0].float().flatten().cpu()

    ref = forward()
    names = fp8_candidates(model, family)
    with record_input_amax(model, names) as amax, fd.record_attention_amax(model) as attn:
        forward()
    amax = {n: (a if bool(torch.isfinite(a)) else torch.ones_like(a)) for n, a in amax.items()}
    scales = attention_scales(model, family, attn)
    report_probe = {}
    for layer in probe_layers:
        if layer not in scales:
            raise SystemExit(f"--probe {layer}: no FP8 attention scales; modules with scales: {sorted(scales)}")
        captured = {}
        st = fd._state(model.get_submodule(layer), layer)
        orig = sys.modules[type(model.get_submodule(layer).processor).__module__].dispatch_attention_fn

        def capture(query, key, value, *a, backend=None, **kw):
            if backend is st:
                captured.update(q=query, k=key, v=value)
            return orig(query, key, value, *a, backend=backend, **kw)

        mod = sys.modules[type(model.get_submodule(layer).processor).__module__]
        mod.dispatch_attention_fn = capture
        try:
            forward()
        finally:
            mod.dispatch_attention_fn = orig
        sc = scales[layer]
        probe_st = fa.AttentionScales(name=layer, q=torch.tensor([sc[0]], device=dev),
                                      k=torch.tensor([sc[1]], device=dev), v=torch.tensor([sc[2]], device=dev))
        report_probe[layer] = probe_layer(captured["q"], captured["k"], captured["v"], probe_st)
        print(f"  probe {layer}: {json.dumps(report_probe[layer], indent=1)}", flush=True)
        del captured
    fd.remove_fp8_attention(model)
    quantize_(model, StaticFP8Config(amax))
    fastpath.set_model_fast_path(model, fastpath.FastPathConfig(enabled=True))
    gemm = forward()
    rows = {"fp8-gemm": {"cosine_vs_bf16": cosine(gemm, ref)}}
    base = rows["fp8-gemm"]["cosine_vs_bf16"]
    print(f"{family.name}: fp8-gemm cosine {base:.6f} ({len(scales)} attention modules with scales)", flush=True)
    variant = Variant()
    for name in variants:
        fd.install_fp8_attention(model, scales,
                                 kernel={"kernel-triton": "triton", "kernel-cudnn": "cudnn"}.get(name, DEFAULT_KERNEL))
        for m in fd.attention_modules(model).values():
            sys.modules[type(m.processor).__module__].dispatch_attention_fn = variant
        variant.name = name
        t0 = time.perf_counter()
        try:
            out = forward()
        finally:
            choices = fd.kernel_choices(model)
            fd.remove_fp8_attention(model)
        c = cosine(out, ref)
        rows[name] = {"cosine_vs_bf16": c, "gap_vs_fp8_gemm": base - c, "wall_s": time.perf_counter() - t0,
                      "kernel_choices": choices}
        print(f"  {name:18s} cosine {c:.6f}  gap {base - c:+.6f}", flush=True)
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {"family": family.name, "outliers": outliers, "attention_modules_fp8": len(scales), "rows": rows,
            "probe": report_probe, "kernel_default": DEFAULT_KERNEL,
            "kernel_choices": choices if variants else {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", action="append", required=True, help="repeatable: flux1, flux2, wan22")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list from {', '.join(VARIANTS)}")
    ap.add_argument("--size", choices=("full", "tiny"), default="full", help="tiny: a CPU smoke test")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--probe", action="append", default=[], help="attention module whose captured inputs are "
                    "analysed (repeatable; the first --family only)")
    ap.add_argument("--outliers", action="store_true", help="Q/K channel outliers in every attention module")
    ap.add_argument("--output")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    report = {"environment": environment(torch.device(args.device)), "results": []}
    print(report["environment"].get("gpu"), torch.__version__, flush=True)
    for fam in args.family:
        probe = tuple(args.probe) if fam == args.family[0] else ()
        report["results"].append(run(fam, variants, size=args.size, device=args.device, probe_layers=probe,
                                      outliers=args.outliers))
        if args.output:
            with open(args.output, "w") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
