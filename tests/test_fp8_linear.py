"""FP8 linear: the CPU math is spec section 6, dtype casts do not de-quantize, and the GPU path matches the CPU."""

from __future__ import annotations

import pytest
import torch

from fp8cookbook.checkpoint import FP8_DTYPE
from fp8cookbook.fp8.linear import FP8Linear, count_fp8_calls
from fp8cookbook.fp8.numerics import fp8_gemm_supported, quantize_fp8


def _layer(seed: int = 0, k: int = 64, n: int = 48) -> tuple[torch.nn.Linear, FP8Linear, torch.Tensor]:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n).to(torch.bfloat16)
    x = torch.randn(3, 5, k, dtype=torch.bfloat16)
    return lin, FP8Linear.quantize(lin, x.abs().max()), x


def test_quantize_saturates_instead_of_nan():
    q = quantize_fp8(torch.tensor([1e6, -1e6, 1.0]), torch.tensor(1.0))
    assert q.dtype == FP8_DTYPE and q.float().tolist() == [448.0, -448.0, 1.0]


def test_forward_is_the_spec_formula():
    lin, fp8, x = _layer()
    sx, sw = fp8.input_scale.float(), fp8.weight_scale.float()
    xq = (x.float() / sx).clamp(-448, 448).to(FP8_DTYPE).float() * sx
    wq = (lin.weight.float() / sw).clamp(-448, 448).to(FP8_DTYPE).float() * sw
    expected = (xq @ wq.t() + lin.bias.float()).to(torch.bfloat16)
    out = fp8(x)
    assert out.shape == (3, 5, 48) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    ref = lin(x).float()
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0)
    assert cos > 0.998, f"FP8 vs BF16 cosine {cos:.5f}"


def test_dtype_cast_keeps_fp8_and_fp32_scales():
    _, fp8, x = _layer()
    before = fp8(x)
    fp8.to(torch.float16)
    assert fp8.weight.dtype == FP8_DTYPE and fp8.weight_scale.dtype == torch.float32
    assert fp8.bias.dtype == torch.float16
    fp8.to(torch.bfloat16)
    torch.testing.assert_close(fp8(x), before, atol=0, rtol=0)
    assert "float8_e4m3fn" in repr(fp8) and "input_scale=" in repr(fp8)


def test_rejects_shapes_the_gemm_cannot_take():
    with pytest.raises(ValueError, match="multiples of 16"):
        FP8Linear(20, 32)


def test_count_calls():
    _, fp8, x = _layer()
    model = torch.nn.Sequential(fp8)
    with count_fp8_calls(model) as calls:
        model(x)
        model(x)
    assert calls == {"0": 2}
    model(x)
    assert calls == {"0": 2}, "hooks must be removed on exit"


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and fp8_gemm_supported(torch.device("cuda"))),
                    reason="needs a CUDA GPU with compute capability >= 8.9")
def test_cuda_scaled_mm_matches_cpu_math():
    for seed, (k, n, m) in enumerate([(64, 48, 15), (3072, 3072, 4096), (3072, 12288, 333)]):
        torch.manual_seed(seed)
        lin = torch.nn.Linear(k, n).to(torch.bfloat16)
        x = torch.randn(m, k, dtype=torch.bfloat16)
        fp8 = FP8Linear.quantize(lin, x.abs().max())
        cpu = fp8(x).float()
        gpu = fp8.to("cuda")(x.cuda()).float().cpu()
        rel = (gpu - cpu).norm() / cpu.norm()
        assert rel < 4e-3, f"k={k} n={n}: relative L2 {rel:.2e}"
