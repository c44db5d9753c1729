"""GPU: one full-size stage per family (`pytest -m gpu tests/test_full_size_gpu.py` in a device call).

Each test builds the family's real transformer(s) from the stand-in configs on the GPU and runs one denoising
forward at the family's default size, under `stages.stage`, checking that the output is finite and that the stage
fits the card it must fit (80 GB for FLUX.1-dev and Wan2.2, the H200's 141 GB for FLUX.2-dev).
"""

from __future__ import annotations

import pytest
import torch

from fp8cookbook.families import get_family
from fp8cookbook.stages import StageLog
from fp8cookbook.standin import build_component, recipe

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BUDGET_GB = {"flux1": 80, "flux2": 141, "wan22-a14b": 80, "wan22-ti2v-5b": 80}


@pytest.mark.parametrize("family_name", sorted(BUDGET_GB))
def test_full_size_transformer_forward_fits(family_name):
    family = get_family(family_name)
    plan = recipe(family_name, "full")
    log = StageLog()
    outputs, models = [], []
    with log.stage(f"{family_name}-forward", hint="this family needs a bigger GPU") as record:
        for name in family.experts:  # Wan2.2 A14B: both experts resident, as calibration holds them
            model = build_component(plan.component(name), device="cuda")
            models.append(model)
            inputs = family.make_inputs(dict(model.config), height=family.height, width=family.width,
                                        num_frames=family.num_frames, text_len=family.text_len, device="cuda",
                                        generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                outputs.append(model(**inputs)[0].float().norm().item())
    assert all(torch.isfinite(torch.tensor(outputs))), outputs
    assert record.peak_gpu_mb / 1024 < BUDGET_GB[family_name] * 0.93, record.line()  # GiB vs GB and headroom
