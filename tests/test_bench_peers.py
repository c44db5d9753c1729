"""`bench --peer`: torchao's float8 timed on the layers our FP8 path quantises, in the same process as BF16 and ours.

On CPU: the option parses, the side plan, the layer filter against our quantizer's choice, the refusals before any
work, and the peer machinery (rebuild from the seed, report block) with a stand-in peer. On an SM 8.9+ GPU with
torchao installed: the real peers run and the JSON has their timings.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from fp8cookbook.bench import BenchSettings, plan_sides, resolve_settings, run_synthetic, summary_lines
from fp8cookbook.bench import peers as peers_mod
from fp8cookbook.bench import synthetic as synthetic_mod
from fp8cookbook.bench.peers import PEERS, parse_peers, peer_filter
from fp8cookbook.bench.synthetic import SyntheticRun
from fp8cookbook.cli import build_parser, main
from fp8cookbook.errors import Fp8CookbookError
from fp8cookbook.fp8.linear import fp8_modules
from fp8cookbook.fp8.numerics import fp8_gemm_supported
from fp8cookbook.fp8.quantize import fp8_filter

BOTH = ("torchao-rowwise", "torchao-tensorwise")


# -------------------------------------------------------------------------------------------------- parsing
def test_peer_option_parses_into_settings():
    args = build_parser().parse_args(["bench", "--family", "flux1", "--synthetic", "full",
                                      "--peer", "torchao-rowwise,torchao-tensorwise"])
    assert args.peer == "torchao-rowwise,torchao-tensorwise"
    assert build_parser().parse_args(["bench", "--family", "flux1", "--synthetic", "tiny"]).peer is None
    assert parse_peers("torchao-tensorwise, torchao-rowwise,torchao-tensorwise") == ("torchao-tensorwise",
                                                                                      "torchao-rowwise")
    assert parse_peers(None) == parse_peers("") == ()
    with pytest.raises(Fp8CookbookError, match="unknown peer 'torchao-colwise'.*torchao-rowwise"):
        parse_peers("torchao-rowwise,torchao-colwise")
    _, s = resolve_settings(BenchSettings(family="flux1", synthetic="tiny", device="cpu"))
    assert s.peers == (), "no peer unless asked"


@pytest.mark.parametrize("extra", [{}, {"levers": True}, {"levers": True, "cuda_graphs": True, "compile": True},
                                   {"fp8_attention": "on"}])
def test_peer_sides_come_last_and_leave_ours_alone(extra):
    s = BenchSettings(family="flux1", synthetic="full", fast=True, **extra)
    ours = plan_sides(s)
    planned = plan_sides(replace(s, peers=BOTH))
    assert planned[:len(ours)] == ours, "adding peers must not change our sides"
    tail = planned[len(ours):]
    assert [x.name for x in tail] == list(BOTH) and all(x.precision == "peer" for x in tail)
    assert [x.peer for x in tail] == list(BOTH) and not any(x.headline for x in tail)
    assert all(x.cuda_graphs == s.cuda_graphs and x.fp8_attention == "off" and not x.fast for x in tail)
    assert sum(x.headline for x in planned) == 1


# ------------------------------------------------------------------------------------------- layer filter
@pytest.mark.parametrize("include_fallback", [False, True])
def test_peer_filter_picks_exactly_our_fp8_layers(one_thread, include_fallback):
    """On the tiny FLUX.1: the layers torchao's filter_fn accepts are the ones our quantizer swaps, no fallback."""
    family, s = resolve_settings(BenchSettings(family="flux1", synthetic="tiny", device="cpu", steps=1,
                                               include_fallback=include_fallback))
    run = SyntheticRun(family, s)
    run.calibrate()
    model = run.models["transformer"]
    config = dict(model.config)
    keep = peer_filter(run.fp8_layer_names["transformer"])
    picked = {name for name, m in model.named_modules() if keep(m, name)}
    ours_filter = fp8_filter(family, config, include_fallback=include_fallback)
    assert picked == {name for name, m in model.named_modules() if ours_filter(m, name)}
    fallback = {name for name, m in model.named_modules()
                if isinstance(m, nn.Linear) and family.skip_in_calibration(name, config)}
    assert fallback, "the tiny FLUX.1 has BF16-fallback layers to leave alone"
    if include_fallback:  # the fallback layers come in, the sensitive ones (embedders, final norm) still stay out
        assert set() < picked & fallback < fallback
    else:
        assert not picked & fallback, "the peer would quantise a layer the family keeps in BF16"
    assert run.to_fp8() == len(picked) > 0
    assert set(fp8_modules(model)) == picked, "our FP8 path swapped other layers than the peer would quantise"
    assert not keep(model, ""), "only nn.Linear layers"


# ----------------------------------------------------------------------------------------------- refusals
def test_peer_refused_on_cpu_before_any_work(monkeypatch, capsys):
    def no_build(*a, **k):
        raise AssertionError("the refusal must come before any model is built")

    monkeypatch.setattr(synthetic_mod, "build_transformer", no_build)
    rc = main(["bench", "--family", "flux1", "--synthetic", "tiny", "--device", "cpu", "--peer", "torchao-rowwise"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1] == ("fp8cookbook bench: error: --peer torchao-rowwise: torchao's float8 needs a CUDA GPU with "
                       "compute capability >= 8.9; this run is on cpu")
    with pytest.raises(Fp8CookbookError, match="--peer is for --synthetic"):
        resolve_settings(BenchSettings(family="flux1", model_path="some/pipeline", device="cpu", peers=BOTH))


def test_peer_refused_without_torchao(monkeypatch):
    monkeypatch.setattr(peers_mod, "fp8_gemm_supported", lambda device: True)  # as on an H200
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(Fp8CookbookError, match=r"torchao is not installed \(pip install 'fp8cookbook\[torchao\]'\)"):
        resolve_settings(BenchSettings(family="flux1", synthetic="tiny", device="cpu", peers=("torchao-rowwise",)))


# ------------------------------------------------------------------- the peer machinery, with a stand-in peer
@pytest.mark.parametrize("family", ["flux1", "wan22-a14b"])
def test_peer_side_rebuilds_bf16_and_reports(one_thread, monkeypatch, family):
    """A stand-in peer that quantises nothing: its side must reproduce BF16's first forward exactly (the rebuild is
    the same weights), get exactly our FP8 layers' names, and appear in the report's peers block."""
    seen: dict[str, list[str]] = {}

    def fake_quantize(model, peer, names):
        seen[peer] = seen.get(peer, []) + list(names)
        return len(list(names))

    monkeypatch.setattr(synthetic_mod, "quantize_peer", fake_quantize)
    monkeypatch.setattr(synthetic_mod, "peer_info", lambda peer: {"library": "stand-in", "granularity": PEERS[peer]})
    fam, s = resolve_settings(BenchSettings(family=family, synthetic="tiny", device="cpu", steps=2, runs=2,
                                            warmup=0))
    report = run_synthetic(fam, replace(s, peers=BOTH))  # past check_peers: no GPU here
    names = [x["name"] for x in report["sides"]]
    assert names == ["bf16", "fp8", *BOTH] and not report["failed_sides"]
    for peer in BOTH:
        side = next(x for x in report["sides"] if x["name"] == peer)
        assert side["precision"] == "peer" and side["peer"]["granularity"] == PEERS[peer]
        assert side["first_forward_cosine_vs_bf16"] == pytest.approx(1.0, abs=1e-9), "rebuild changed the weights"
        assert side["peer_layers"] == side["peer_layers_planned"] == report["quantized_linears"]
        assert len(seen[peer]) == report["quantized_linears"], "the peer must get exactly our FP8 layers"
        assert "fp8_layers" not in side, "a peer has none of our FP8 layers"
        block = report["peers"][peer]
        assert block["ms_per_step"] == pytest.approx(1e3 * side["loop_s"]["median"] / 2)
        assert block["ours"] == report["fp8"] == "fp8"
        ours = next(x for x in report["sides"] if x["name"] == "fp8")
        assert block["ours_speedup_vs_peer"] == pytest.approx(side["loop_s"]["median"] / ours["loop_s"]["median"])
        assert block["speedup_vs_bf16"] == pytest.approx(side["speedup_vs_bf16"])
    assert list(report["settings"]["peers"]) == list(BOTH)
    text = "\n".join(summary_lines(report))
    for peer in BOTH:
        block = report["peers"][peer]
        assert f"{peer}: {block['ms_per_step']:.1f} ms/step" in text
        assert f"{block['ours_speedup_vs_peer']:.3f}x its speed, on CPU" in text
    json.dumps(report)  # the report stays JSON
    installed = importlib.util.find_spec("torchao") is not None
    assert (report["environment"]["torchao"] is not None) == installed


# ---------------------------------------------------------------------------------------------------- GPU
needs_torchao_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and fp8_gemm_supported(torch.device("cuda"))
         and importlib.util.find_spec("torchao") is not None),
    reason="needs torchao and a CUDA GPU with compute capability >= 8.9")


@pytest.mark.gpu
@needs_torchao_gpu
def test_gpu_tiny_bench_with_torchao_peers(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["bench", "--family", "flux1", "--synthetic", "tiny", "--device", "cuda", "--steps", "2",
                 "--runs", "2", "--peer", ",".join(BOTH), "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert not report["failed_sides"], report["failed_sides"]
    assert [x["name"] for x in report["sides"]][-2:] == list(BOTH)
    gpu = report["environment"]["gpu"]
    assert gpu and gpu in capsys.readouterr().out
    for peer in BOTH:
        side = next(x for x in report["sides"] if x["name"] == peer)
        assert side["peer"]["library"] == "torchao" and side["peer"]["version"]
        assert side["peer_layers"] == report["quantized_linears"] > 0, "torchao quantised other layers than ours"
        assert side["first_forward_cosine_vs_bf16"] > 0.99 and side["output_finite"]
        assert side["loop_s"]["n"] == 2 and side["peak_memory_gb"] > 0
        block = report["peers"][peer]
        assert block["ms_per_step"] > 0 and block["ours_speedup_vs_peer"] > 0 and block["speedup_vs_bf16"] > 0
    assert report["environment"]["torchao"] == report["sides"][-1]["peer"]["version"]
