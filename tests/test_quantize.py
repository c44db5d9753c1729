"""ModelOpt quantization and export of tiny transformers: the recipe, the skipped layers, the export layout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("modelopt.torch.quantization")

from fp8cookbook import quantize as q  # noqa: E402
from fp8cookbook.errors import Fp8CookbookError  # noqa: E402
from fp8cookbook.families import build_transformer, get_family  # noqa: E402

FAMILIES = ["flux1", "flux2", "wan22-a14b", "wan22-ti2v-5b"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("exports")
    return {name: q.make_tiny_export(name, root / name) for name in FAMILIES}


def _linears(name: str) -> tuple[set[str], set[str]]:
    """(quantized, skipped) nn.Linear module names of the family's tiny model."""
    family = get_family(name)
    config = family.tiny_config
    model = build_transformer(family, "tiny")
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    skipped = {n for n in linears if family.skip_in_calibration(n, config)}
    return linears - skipped, skipped


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def test_config_shape():
    mtq, _ = q.require_modelopt()
    cfg = q.fp8_diffusion_quant_cfg()
    entries = cfg["quant_cfg"]
    assert cfg["algorithm"] == "max"
    assert entries[0] == {"quantizer_name": "*", "enable": False}
    by_name = {e["quantizer_name"]: e for e in entries}
    for name in ("*weight_quantizer", "*input_quantizer"):
        assert by_name[name]["parent_class"] == "nn.Linear"
        assert by_name[name]["cfg"] == {"num_bits": (4, 3), "axis": None}
    assert by_name["*output_quantizer"]["enable"] is False
    assert not any("bmm" in e["quantizer_name"] for e in entries)
    mha = q.fp8_diffusion_quant_cfg(quantize_mha=True)["quant_cfg"]
    assert mha[-1] == {"quantizer_name": "*[qkv]_bmm_quantizer", "cfg": {"num_bits": (4, 3), "axis": None}}
    from modelopt.torch.quantization.config import QuantizeConfig

    QuantizeConfig(**q.fp8_diffusion_quant_cfg(True))  # ModelOpt accepts it as is


@pytest.mark.parametrize("name", FAMILIES)
def test_sensitive_layers_disabled(exports, name):
    quantized, skipped = _linears(name)
    assert quantized and skipped
    paths = exports[name]
    state = torch.load(paths["state"], weights_only=True, mmap=True)["model_state_dict"]
    amax_keys = {k for k in state if k.endswith("_amax")}
    assert amax_keys == {f"{n}.{kind}_quantizer._amax" for n in quantized for kind in ("weight", "input")}

    model = q.load_fake_quant(paths["base"], paths["state"])
    for qname, tq in q.tensor_quantizers(model):
        owner, kind = qname.rsplit(".", 1)
        expect = owner in quantized and kind in ("weight_quantizer", "input_quantizer")
        assert tq.is_enabled == expect, qname
        assert (tq.amax is not None) == expect, qname


@pytest.mark.parametrize("name", ["wan22-a14b", "wan22-ti2v-5b"])
def test_wan_patch_embedding_not_quantized(exports, name):
    tensors = _safetensors(exports[name]["export"])
    assert tensors["patch_embedding.weight"].dtype == torch.bfloat16
    assert tensors["patch_embedding.weight"].dim() == 5
    assert not [k for k in tensors if k.startswith("patch_embedding.") and k.endswith("_scale")]


@pytest.mark.parametrize("name", FAMILIES)
def test_export_layout(exports, name):
    paths = exports[name]
    quantized, skipped = _linears(name)
    config = json.loads((paths["export"] / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "FP8"
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert "kv_cache_scheme" not in qc
    tensors = _safetensors(paths["export"])
    base = _safetensors(paths["base"])
    state = torch.load(paths["state"], weights_only=True, mmap=True)["model_state_dict"]
    assert not [k for k in tensors if "_quantizer." in k]
    for n in quantized:
        w, ws, xs = tensors[f"{n}.weight"], tensors[f"{n}.weight_scale"], tensors[f"{n}.input_scale"]
        assert w.dtype == torch.float8_e4m3fn and w.shape == base[f"{n}.weight"].shape
        for s, kind in ((ws, "weight"), (xs, "input")):
            assert s.dtype == torch.float32 and s.dim() == 0 and s > 0
            amax = state[f"{n}.{kind}_quantizer._amax"].float()
            torch.testing.assert_close(s, amax / 448, rtol=1e-6, atol=0)
        amax = state[f"{n}.weight_quantizer._amax"]
        assert torch.equal(w.float(), _fake_quant_codes(base[f"{n}.weight"], amax))  # exact_weights=True
    scaled = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(("weight_scale", "input_scale"))}
    assert scaled == quantized
    for n in skipped:
        assert tensors[f"{n}.weight"].dtype == torch.bfloat16
    fp8 = {k.rsplit(".", 1)[0] for k, t in tensors.items() if t.dtype == torch.float8_e4m3fn}
    assert fp8 == quantized


def _fp8_emulated(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> int:
    """Swap each exported FP8 Linear for y = Q(x / s_x) s_x @ (W_fp8 s_w)^T + b in fp32 (spec section 6)."""
    count = 0
    for name, module in model.named_modules():
        if f"{name}.weight_scale" not in tensors:
            continue
        w = tensors[f"{name}.weight"].float() * tensors[f"{name}.weight_scale"]
        sx = tensors[f"{name}.input_scale"]

        def forward(x, w=w, sx=sx, bias=module.bias):
            xq = (x / sx).clamp(-448, 448).to(torch.float8_e4m3fn).float() * sx
            return torch.nn.functional.linear(xq, w, None if bias is None else bias.float())

        module.forward = forward
        count += 1
    return count


def test_export_reproduces_fake_quant(tmp_path):
    """The state file restores exactly the calibrated model, and the export replays its fake quant in fp32."""
    family = get_family("flux2")
    build_transformer(family, "tiny").save_pretrained(tmp_path / "base")
    model = build_transformer(family, "tiny")
    batches = q.tiny_calibration_inputs(family)
    model = q.quantize_transformer(model, family, lambda m: [m(**b) for b in batches])
    q.save_modelopt_state(model, tmp_path / "transformer.pt")
    with torch.no_grad():
        out = model(**batches[0])[0]
        restored = q.load_fake_quant(tmp_path / "base", tmp_path / "transformer.pt")
        assert torch.equal(restored(**batches[0])[0], out)
    q.export_transformer(model, tmp_path / "export")

    x = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batches[1].items()}
    ref32 = q.load_fake_quant(tmp_path / "base", tmp_path / "transformer.pt", dtype=torch.float32)
    emulated = q.load_fake_quant(tmp_path / "base", tmp_path / "transformer.pt", dtype=torch.float32)
    assert _fp8_emulated(emulated, _safetensors(tmp_path / "export")) == len(_linears("flux2")[0])
    with torch.no_grad():
        want, got = ref32(**x)[0], emulated(**x)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=5e-5)


def test_modelopt_rounding_differs_from_fake_quant(tmp_path):
    """ModelOpt 0.47 divides BF16 weights by the scale in BF16: some FP8 codes land one step off fake quant."""
    family = get_family("flux2")
    model = build_transformer(family, "tiny")
    base = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    batches = q.tiny_calibration_inputs(family)
    model = q.quantize_transformer(model, family, lambda m: [m(**b) for b in batches])
    quantized = _linears("flux2")[0]
    amax = {n: model.get_submodule(n).weight_quantizer.amax.clone() for n in quantized}
    q.export_transformer(model, tmp_path, exact_weights=False)
    tensors = _safetensors(tmp_path)
    off = 0
    for name in quantized:
        scale, codes = tensors[f"{name}.weight_scale"], tensors[f"{name}.weight"].float()
        assert torch.equal((base[name] / scale).to(torch.float8_e4m3fn).float(), codes)  # BF16 quotient
        off += int((_fake_quant_codes(base[name], amax[name]) != codes).sum())
    assert off > 0


def _fake_quant_codes(weight: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """The FP8 codes of ModelOpt's fake quant (`_fp8_eager`): fp32 product with 448 / amax."""
    return (weight.float() * (448.0 / amax.float())).clamp(-448, 448).to(torch.float8_e4m3fn).float()


def test_missing_amax_raises_and_names_quantizers():
    family = get_family("wan22-a14b")
    model = build_transformer(family, "tiny")
    model.blocks[3].forward = lambda hidden_states, *args, **kwargs: hidden_states  # calibration never runs it
    batches = q.tiny_calibration_inputs(family)
    with pytest.raises(Fp8CookbookError) as err:
        q.quantize_transformer(model, family, lambda m: [m(**b) for b in batches])
    msg = str(err.value)
    assert "blocks.3.attn1.to_q.input_quantizer" in msg and "blocks.3.ffn.net.2.input_quantizer" in msg
    assert "weight_quantizer" not in msg  # weights are calibrated from the weights themselves
    assert "more steps/prompts" in msg


def test_quantize_mha(tmp_path):
    """ModelOpt leaves `*_bmm_quantizer._amax` and `kv_cache_scheme` in the export: the converter drops them."""
    paths = q.make_tiny_export("flux1", tmp_path, quantize_mha=True)
    state = torch.load(paths["state"], weights_only=True)["model_state_dict"]
    for kind in "qkv":
        assert f"transformer_blocks.0.attn.{kind}_bmm_quantizer._amax" in state
    assert "transformer_blocks.0.attn.softmax_quantizer._amax" not in state
    tensors = _safetensors(paths["export"])
    assert "transformer_blocks.0.attn.q_bmm_quantizer._amax" in tensors
    qc = json.loads((paths["export"] / "config.json").read_text())["quantization_config"]
    assert "kv_cache_scheme" in qc


def test_bf16_flavour_and_second_expert(tmp_path, exports):
    paths = q.make_tiny_export("wan22-a14b", tmp_path, expert="transformer_2", bf16_export=True)
    assert paths["state"].name == "transformer_2.pt"
    tensors = _safetensors(paths["export"])
    base = _safetensors(paths["base"])
    assert not [k for k in tensors if k.endswith("_scale")]
    assert all(t.dtype != torch.float8_e4m3fn for t in tensors.values())
    assert tensors.keys() == base.keys()
    assert all(torch.equal(tensors[k], base[k].to(tensors[k].dtype)) for k in tensors)
    qc = json.loads((paths["export"] / "config.json").read_text())["quantization_config"]
    assert qc["quant_algo"] == "FP8"
    state = torch.load(paths["state"], weights_only=True)["model_state_dict"]
    assert "blocks.3.attn1.to_q.input_quantizer._amax" in state
    # the low-noise expert has its own weights
    other = _safetensors(exports["wan22-a14b"]["base"])
    assert not torch.equal(base["blocks.3.attn1.to_q.weight"], other["blocks.3.attn1.to_q.weight"])


def test_unknown_expert(tmp_path):
    with pytest.raises(Fp8CookbookError, match="transformer_2"):
        q.make_tiny_export("flux1", tmp_path, expert="transformer_2")


def test_missing_modelopt_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "modelopt.torch.opt", None)
    with pytest.raises(Fp8CookbookError, match=r"pip install 'fp8cookbook\[modelopt\]'"):
        q.save_modelopt_state(torch.nn.Linear(2, 2), "unused.pt")
