"""scripts/attention_quality.py on the CPU: the Q/K outlier injection does what its help says, and a tiny run
records per-variant kernel choices (the GPU run of the full-size models is in docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread", "tiny_cache_env")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location(
        "attention_quality", Path(__file__).parents[1] / "scripts" / "attention_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("shape", [(1, 3, 2 * 16), (1, 3, 2, 16)], ids=["across-heads", "per-head"])
def test_outliers_hit_the_same_four_channels_of_every_head_in_q_and_k(script, shape):
    q = script._OutlierHook("q", heads=2, seed=0)(None, None, torch.ones(shape))
    k = script._OutlierHook("k", heads=2, seed=0)(None, None, torch.zeros(shape))
    q, k = (t.unflatten(-1, (2, -1)) if t.dim() == 3 else t for t in (q, k))
    assert q.shape[-2:] == k.shape[-2:] == (2, 16)
    big = (k[0, 0] != 0)  # K: a bias constant over tokens, in 4 channels of each head
    assert big.sum().item() == 8 and torch.equal(big[0], big[1])
    assert torch.equal(k[0, 0], k[0, 2])
    assert sorted(k[0, 0, 0][big[0]].tolist()) == list(script.OUTLIER_FACTORS)
    assert torch.allclose(q[..., ~big[0]], torch.full_like(q[..., ~big[0]], 0.2))  # Q x 0.2 elsewhere
    assert sorted(q[0, 0, 0][big[0]].tolist()) == pytest.approx([0.2 * f for f in script.OUTLIER_FACTORS])


def test_tiny_run_with_outliers_changes_the_model_and_records_kernels(script):
    plain = script.run("flux1", ["kernel"], size="tiny", device="cpu")
    spiked = script.run("flux1", ["kernel"], size="tiny", device="cpu", outliers=True)
    assert spiked["outliers"] is True and plain["outliers"] is False
    assert spiked["rows"]["fp8-gemm"]["cosine_vs_bf16"] != plain["rows"]["fp8-gemm"]["cosine_vs_bf16"]
    assert "kernel_choices" in spiked["rows"]["kernel"]
    assert abs(spiked["rows"]["kernel"]["gap_vs_fp8_gemm"]) < 0.01
