"""Shared fixtures: tiny checkpoints built on CPU with a fixed seed, copied per test so tests may damage them."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fp8cookbook.families import build_transformer, get_family
from fp8cookbook.fp8.numerics import quantize_fp8

warnings.filterwarnings("ignore", message=".*should be kept in float32.*")


def make_handmade_export(root: Path, family_name: str = "flux1", seed: int = 0) -> dict[str, Path]:
    """An export in ModelOpt's layout without ModelOpt: FP8 weights, 0-d fp32 scales, amaxes from one forward.

    Bad-input tests use it because it is fast and every byte of it is under our control; the ModelOpt round trip
    lives in test_roundtrip.py.
    """
    fam = get_family(family_name)
    model = build_transformer(fam, "tiny", seed=seed)
    config = dict(model.config)
    model.save_pretrained(root / "base")
    amax: dict[str, float] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not fam.skip_in_calibration(name, config):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, a, n=name: amax.__setitem__(n, max(amax.get(n, 0.0), float(a[0].abs().max())))))
    with torch.no_grad():
        model(**fam.make_inputs(config, height=64, width=64, num_frames=5 if fam.is_video else None, text_len=8,
                                generator=torch.Generator().manual_seed(seed)))
    for h in hooks:
        h.remove()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    state = {}
    for name, a in amax.items():
        w = sd[f"{name}.weight"]
        ws = (w.abs().max().float() / 448).reshape(())
        state[f"{name}.weight_quantizer._amax"] = w.abs().max().reshape(())
        state[f"{name}.input_quantizer._amax"] = torch.tensor(a, dtype=torch.bfloat16)
        sd[f"{name}.weight"] = quantize_fp8(w, ws)
        sd[f"{name}.weight_scale"] = ws
        sd[f"{name}.input_scale"] = torch.tensor(a / 448, dtype=torch.float32)
    (root / "export").mkdir(parents=True)
    save_file(sd, root / "export" / "diffusion_pytorch_model.safetensors")
    cfg = json.loads((root / "base" / "config.json").read_text())
    ignore = sorted({n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in amax})
    cfg["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "FP8", "ignore": ignore,
                                  "producer": {"name": "modelopt", "version": "test"}}
    (root / "export" / "config.json").write_text(json.dumps(cfg, indent=2))
    torch.save({"modelopt_state": {"format": "test"}, "model_state_dict": {**model.state_dict(), **state}},
               root / "transformer.pt")
    return {"base": root / "base", "export": root / "export", "state": root / "transformer.pt"}


@pytest.fixture(scope="session")
def _handmade_cache(tmp_path_factory) -> dict[str, Path]:
    return make_handmade_export(tmp_path_factory.mktemp("handmade"))


@pytest.fixture
def handmade(tmp_path, _handmade_cache) -> dict[str, Path]:
    """A fresh copy of the hand-made FLUX.1 export for one test."""
    out = {}
    for key, src in _handmade_cache.items():
        dst = tmp_path / "in" / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
        out[key] = dst
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core box two threads run 10-50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fp8cookbook-cache")


@pytest.fixture
def tiny_cache_env(monkeypatch, tiny_cache) -> Path:
    """Tiny pipelines built into a per-module cache, as on a new machine."""
    monkeypatch.setenv("FP8COOKBOOK_CACHE", str(tiny_cache))
    return tiny_cache


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes under a folder, to prove a command left its inputs alone."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
