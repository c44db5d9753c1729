"""Round trip per family on tiny models: ModelOpt quantize -> export -> convert -> load -> forward == fake quant.

Tolerance: the converted checkpoint holds exactly ModelOpt's FP8 codes and scales, and our FP8 layer computes
(s_x Q(x/s_x)) (s_w Q(W/s_w))^T in float32 like ModelOpt's fake quant, so the two differ only by the order of
float32 accumulation: relative L2 ~1e-7 measured. 1e-4 leaves room for BLAS differences and is still far below
one E4M3 step (6%): a single wrong code or scale anywhere breaks it.
"""

from __future__ import annotations

import pytest
import torch

from fp8cookbook.checkpoint import inspect_checkpoint
from fp8cookbook.convert import convert_checkpoint
from fp8cookbook.families import get_family
from fp8cookbook.fp8.linear import count_fp8_calls
from fp8cookbook.loader import load_fp8_transformer
from fp8cookbook.quantize import load_fake_quant, make_tiny_export, tiny_calibration_inputs

CASES = [("flux1", "transformer"), ("flux2", "transformer"), ("wan22-a14b", "transformer"),
         ("wan22-a14b", "transformer_2"), ("wan22-ti2v-5b", "transformer")]


pytestmark = pytest.mark.usefixtures("one_thread")


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("family_name,expert", CASES, ids=[f"{f}-{e}" for f, e in CASES])
@pytest.mark.parametrize("flavour", ["fp8", "bf16"])
def test_modelopt_roundtrip(family_name, expert, flavour, tmp_path):
    paths = make_tiny_export(family_name, tmp_path / "mo", expert=expert, bf16_export=flavour == "bf16")
    out = tmp_path / "fp8"
    stats = convert_checkpoint(paths["export"], out, base_transformer=paths["base"], progress=False,
                               state_file=paths["state"] if flavour == "bf16" else None)
    assert inspect_checkpoint(out).problems == []
    model, report = load_fp8_transformer(out, dtype=torch.float32)
    reference = load_fake_quant(paths["base"], paths["state"], dtype=torch.float32)
    assert report.fp8_layers == stats.quantized_weights > 0
    inputs = tiny_calibration_inputs(get_family(family_name), seed=7, batches=1, expert=expert)[0]
    inputs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad(), count_fp8_calls(model) as calls:
        got = model(**inputs)[0]
        want = reference(**inputs)[0]
    assert len(calls) == report.fp8_layers, "some FP8 layers never ran"
    err = _rel_l2(got, want)
    assert err < 1e-4, f"{family_name}/{expert}/{flavour}: relative L2 vs ModelOpt fake quant {err:.2e}"
