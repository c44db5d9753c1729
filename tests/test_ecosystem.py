"""Reading and writing what the ecosystem has: SGLang's own checkpoints, whole-pipeline ModelOpt repos, our full repo.

Every layout is built here from the tiny models, the way its real writer makes it (no SGLang or hub needed):

- an SGLang-converter FLUX.1 folder: `ignore` names the image feed-forward only by SGLang's runtime names
  (`transformer_blocks.N.ff.proj_in` / `ff.proj_out`), [1] scales, `quant_type`, no stats file (the form of
  lmsys/flux1-dev-modelopt-fp8-sglang-transformer);
- a whole-pipeline ModelOpt export, `export_hf_checkpoint(pipeline)` on the tiny Wan2.2 A14B pipeline with both
  experts quantized (the form of nvidia/Wan2.2-T2V-A14B-Diffusers-FP8);
- folders with FP8 weights or scales but no quantization_config, and folders that cannot be judged.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fp8cookbook.checkpoint import INDEX_NAME, STATS_NAME, ignored, shard_metadata
from fp8cookbook.convert import convert_checkpoint
from fp8cookbook.errors import Fp8CookbookError
from fp8cookbook.repo import (BF16, CONFIG_ONLY, FP8, FP8_UNMARKED, OTHER_QUANT, UNREADABLE, classify_folder,
                              detect_layout, license_fields, read_card_metadata, repo_problems, write_full_repo)
from fp8cookbook.families import get_family
from fp8cookbook.sglang_names import generic_runtime_names, keeps_bf16, names_checked

flux1_runtime_names = get_family("flux1").sglang_aliases
wan_runtime_names = get_family("wan22").sglang_aliases

from conftest import snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


class _Patterns:
    """The `.matches` interface over the project's pattern rule (spec section 4)."""

    def __init__(self, patterns: list[str]):
        self.patterns = list(patterns)

    def matches(self, name: str) -> bool:
        return ignored(name, self.patterns)


# ---------------------------------------------------------------------------------------------- builders
def sglang_converter_ignore(folder: Path, export_ignore: list[str]) -> list[str]:
    """`ignore` as SGLang's converter writes it: ModelOpt's list plus every non-FP8 weight under its *preferred*
    (last) runtime name, where `*.ff.net.0.proj` -> `*.ff.proj_in` and `*.ff.net.2` -> `*.ff.proj_out`."""
    # ModelOpt's FLUX filter never lists the feed-forward layers (our hand-made export does, because it skips the
    # fallback profile in calibration): keep only what ModelOpt's own export would list.
    names = {n for n in export_ignore if not generic_runtime_names(n)}
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                if key.endswith(".weight") and f.get_slice(key).get_dtype() != "F8_E4M3" \
                        and len(f.get_slice(key).get_shape()) == 2:
                    module = key.removesuffix(".weight")
                    names.add((generic_runtime_names(module) or [module])[-1])
    return sorted(names)


def make_sglang_style(fp8_folder: Path, export_folder: Path, out: Path) -> Path:
    """Rewrite our converted FLUX.1 folder into SGLang's converter form (see the module docstring)."""
    shutil.copytree(fp8_folder, out)
    (out / STATS_NAME).unlink()
    (out / "README.md").unlink()
    export_qc = json.loads((export_folder / "config.json").read_text())["quantization_config"]
    config = json.loads((out / "config.json").read_text())
    qc = dict(config["quantization_config"])
    qc["ignore"] = sglang_converter_ignore(out, export_qc.get("ignore", []))
    config["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for shard in out.glob("*.safetensors"):
        tensors = load_file(shard)
        meta = dict(shard_metadata(qc))
        meta["config"] = json.dumps(config, sort_keys=True)
        save_file(tensors, shard, metadata=meta)
    return out


def strip_quant_config(folder: Path, out: Path) -> Path:
    """An FP8 folder whose config.json lost its quantization_config (what `save_pretrained` wrote before)."""
    shutil.copytree(folder, out)
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture(scope="module")
def flux1_folders(tmp_path_factory) -> dict[str, Path]:
    """Hand-made FLUX.1 export, our conversion of it, and SGLang's converter form of the same tensors."""
    from conftest import make_handmade_export

    root = tmp_path_factory.mktemp("flux1")
    paths = make_handmade_export(root / "in")
    ours = root / "ours"
    convert_checkpoint(paths["export"], ours, base_transformer=paths["base"], progress=False)
    return {**paths, "ours": ours, "sglang": make_sglang_style(ours, paths["export"], root / "sglang")}


@pytest.fixture(scope="module")
def wan_repo(tmp_path_factory) -> dict[str, Path]:
    """The tiny Wan2.2 A14B pipeline (`base`) and its whole-pipeline ModelOpt export (`modelopt`), both experts FP8."""
    from modelopt.torch.export import export_hf_checkpoint

    from fp8cookbook.families import get_family
    from fp8cookbook.pipelines import load_pipeline, tiny_pipeline_dir
    from fp8cookbook.quantize import quantize_transformer, tiny_calibration_inputs
    from fp8cookbook.quantize.export import _round_weights_to_fake_quant
    from fp8cookbook.quantize.recipe import quiet_modelopt as _quiet

    root = tmp_path_factory.mktemp("wan")
    family = get_family("wan22-a14b")
    base = tiny_pipeline_dir(family.name, cache_dir=root / "cache")
    pipe = load_pipeline(family.name, base)
    for name in family.experts:
        batches = tiny_calibration_inputs(family, expert=name)

        def loop(model, batches=batches):
            for inputs in batches:
                model(**inputs)

        model = quantize_transformer(getattr(pipe, name), family, loop)
        _round_weights_to_fake_quant(model)
    out = root / "modelopt"
    with _quiet(), torch.no_grad():
        export_hf_checkpoint(pipe, dtype=torch.bfloat16, export_dir=out)
    return {"base": base, "modelopt": out}


# ------------------------------------------------------------------------------------ SGLang's runtime names
def test_runtime_names_per_family():
    assert flux1_runtime_names("transformer_blocks.3.ff.net.0.proj") == ["transformer_blocks.3.ff.proj_in"]
    assert flux1_runtime_names("transformer_blocks.3.ff.net.2") == ["transformer_blocks.3.ff.proj_out"]
    assert flux1_runtime_names("transformer_blocks.3.ff_context.net.2") == ["transformer_blocks.3.ff_context.proj_out"]
    assert flux1_runtime_names("transformer_blocks.3.attn.to_q") == []
    assert wan_runtime_names("blocks.7.attn1.to_k") == ["blocks.7.to_k"]
    assert wan_runtime_names("blocks.7.attn1.to_out.0") == ["blocks.7.to_out"]
    assert wan_runtime_names("blocks.7.attn2.to_out.0") == ["blocks.7.attn2.to_out"]
    assert wan_runtime_names("blocks.7.attn2.to_q") == []  # cross-attention Q/K/V keep their names
    assert wan_runtime_names("blocks.7.ffn.net.0.proj") == ["blocks.7.ffn.fc_in"]
    assert wan_runtime_names("condition_embedder.time_proj") == ["condition_embedder.time_modulation.linear"]
    # SGLang's converter canonicalises `.ff.` feed-forwards of every class, but not Wan's `ffn`
    assert generic_runtime_names("x.ff.net.0.proj") == ["x.ff.proj_in"]
    assert generic_runtime_names("blocks.1.ffn.net.0.proj") == []
    assert names_checked("blocks.1.attn1.to_q", wan_runtime_names) == ["blocks.1.attn1.to_q", "blocks.1.to_q"]
    assert get_family("wan22-ti2v-5b").sglang_aliases is wan_runtime_names  # one class, one table
    assert get_family("flux2").sglang_aliases("x.ff.net.2") == ["x.ff.proj_out"]  # the converter's generic names


def test_keeps_bf16_checks_every_name_sglang_uses():
    sglang_ignore = _Patterns(["transformer_blocks.0.ff.proj_in", "transformer_blocks.0.ff.proj_out", "norm_out*"])
    assert keeps_bf16(sglang_ignore, "transformer_blocks.0.ff.net.0.proj", flux1_runtime_names)
    assert keeps_bf16(sglang_ignore, "transformer_blocks.0.ff.net.2", flux1_runtime_names)
    assert not keeps_bf16(sglang_ignore, "transformer_blocks.0.attn.to_q", flux1_runtime_names)
    assert keeps_bf16(sglang_ignore, "norm_out.linear", flux1_runtime_names)
    assert not keeps_bf16(sglang_ignore, "transformer_blocks.1.ff.net.0.proj", flux1_runtime_names)
    # a Wan ignore written in SGLang's runtime names, and one in ModelOpt's (diffusers) names
    assert keeps_bf16(_Patterns(["blocks.3.to_q"]), "blocks.3.attn1.to_q", wan_runtime_names)
    assert keeps_bf16(_Patterns(["blocks.3.attn1.to_q"]), "blocks.3.attn1.to_q", wan_runtime_names)
    assert not keeps_bf16(_Patterns(["blocks.3.to_q"]), "blocks.3.attn2.to_q", wan_runtime_names)
    # family unknown: the converter's canonical names still count
    assert keeps_bf16(sglang_ignore, "transformer_blocks.0.ff.net.0.proj")


# ------------------------------------------------------------------------------------------------ layouts
def test_layouts_of_single_folders(flux1_folders):
    ours = detect_layout(flux1_folders["ours"])
    assert ours.layout == "transformer" and ours.components[""].producer == "fp8cookbook"
    assert ours.fp8_components() == [""] and not ours.is_repo
    sglang = detect_layout(flux1_folders["sglang"])
    assert sglang.layout == "sglang-transformer" and sglang.components[""].kind == FP8
    qc = json.loads((flux1_folders["sglang"] / "config.json").read_text())["quantization_config"]
    assert "transformer_blocks.0.ff.proj_in" in qc["ignore"] and "transformer_blocks.0.ff.net.0.proj" not in qc["ignore"]
    export = detect_layout(flux1_folders["export"])
    assert export.layout == "transformer" and export.components[""].producer == "modelopt"
    base = detect_layout(flux1_folders["base"])
    assert base.components[""].kind == BF16 and base.fp8_components() == []


def test_whole_pipeline_modelopt_export(wan_repo):
    before = snapshot(wan_repo["modelopt"])
    layout = detect_layout(wan_repo["modelopt"])
    assert snapshot(wan_repo["modelopt"]) == before
    assert layout.layout == "modelopt-repo" and layout.is_repo and layout.pipeline_class == "WanPipeline"
    assert layout.fp8_components() == ["transformer", "transformer_2"]
    kinds = {n: c.kind for n, c in layout.components.items()}
    assert kinds == {"scheduler": CONFIG_ONLY, "text_encoder": BF16, "tokenizer": CONFIG_ONLY,
                     "transformer": FP8, "transformer_2": FP8, "vae": BF16}
    assert {layout.components[n].producer for n in ("transformer", "transformer_2")} == {"modelopt"}
    with safe_open(str(wan_repo["modelopt"] / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_slice("blocks.3.attn1.to_q.weight_scale").get_shape() == []  # ModelOpt's 0-d scales
    assert repo_problems(layout) == {n: [] for n in layout.components}
    assert detect_layout(wan_repo["base"]).layout == "pipeline"


def test_fp8_without_quantization_config_is_flagged(flux1_folders, wan_repo, tmp_path):
    bare = strip_quant_config(flux1_folders["ours"], tmp_path / "bare")
    comp = classify_folder(bare)
    assert comp.kind == FP8_UNMARKED and comp.fp8_weights == 13 and comp.scale_tensors == 26
    assert "no quantization_config" in comp.note
    # only scale tensors left (weights de-quantized by hand, scales forgotten)
    scales_only = tmp_path / "scales_only"
    shutil.copytree(flux1_folders["base"], scales_only)
    shard = next(scales_only.glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["transformer_blocks.0.attn.to_q.weight_scale"] = torch.ones(())
    save_file(tensors, shard, metadata={"format": "pt"})
    assert classify_folder(scales_only).kind == FP8_UNMARKED
    # the same inside a repo: its component is named
    repo = tmp_path / "repo"
    shutil.copytree(wan_repo["modelopt"], repo)
    strip_quant_config(repo / "transformer_2", tmp_path / "t2")
    shutil.rmtree(repo / "transformer_2")
    shutil.move(tmp_path / "t2", repo / "transformer_2")
    layout = detect_layout(repo)
    assert layout.components["transformer_2"].kind == FP8_UNMARKED
    assert layout.fp8_components() == ["transformer"]
    assert "no quantization_config" in repo_problems(layout)["transformer_2"][0]


def test_folders_that_cannot_be_judged_say_so(flux1_folders, wan_repo, tmp_path):
    bin_only = tmp_path / "bin_only"
    bin_only.mkdir()
    (bin_only / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    torch.save({"w": torch.zeros(2)}, bin_only / "diffusion_pytorch_model.bin")
    comp = classify_folder(bin_only)
    assert comp.kind == UNREADABLE and "not safetensors" in comp.note
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    shutil.copy(next(flux1_folders["base"].glob("*.safetensors")), no_config)
    assert classify_folder(no_config).kind == UNREADABLE and "config.json: missing" in classify_folder(no_config).note
    broken = tmp_path / "broken"
    shutil.copytree(flux1_folders["ours"], broken)
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 4)
    assert classify_folder(broken).kind == UNREADABLE and "safetensors" in classify_folder(broken).note
    nvfp4 = tmp_path / "nvfp4"
    shutil.copytree(flux1_folders["ours"], nvfp4)
    config = json.loads((nvfp4 / "config.json").read_text())
    config["quantization_config"]["quant_algo"] = "NVFP4"
    (nvfp4 / "config.json").write_text(json.dumps(config))
    assert classify_folder(nvfp4).kind == OTHER_QUANT and "NVFP4" in classify_folder(nvfp4).note
    repo = tmp_path / "repo"
    shutil.copytree(wan_repo["modelopt"], repo)
    shutil.rmtree(repo / "vae")
    layout = detect_layout(repo)
    assert layout.components["vae"].kind == UNREADABLE and "does not exist" in layout.components["vae"].note
    with pytest.raises(Fp8CookbookError, match="neither a model folder"):
        detect_layout(tmp_path)
    with pytest.raises(Fp8CookbookError, match="does not exist"):
        detect_layout(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------- full repo output
@pytest.fixture(scope="module")
def wan_fp8(wan_repo, tmp_path_factory) -> dict[str, Path]:
    """Our FP8 checkpoints of both experts, converted from the whole-pipeline export's folders."""
    root = tmp_path_factory.mktemp("wan_fp8")
    out = {}
    for name in ("transformer", "transformer_2"):
        convert_checkpoint(wan_repo["modelopt"] / name, root / name, base_transformer=wan_repo["base"] / name,
                           progress=False)
        out[name] = root / name
    return out


def test_write_full_repo(wan_repo, wan_fp8, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(wan_repo["base"], base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- video\n---\n# base\n")
    before = snapshot(base), snapshot(wan_fp8["transformer"])
    out = tmp_path / "repo"
    layout = write_full_repo(base, wan_fp8, out, base_model="Wan-AI/Wan2.2-T2V-A14B-Diffusers",
                             family_title="Wan2.2 T2V-A14B", video=True)
    assert (snapshot(base), snapshot(wan_fp8["transformer"])) == before, "inputs changed"
    assert layout.layout == "fp8cookbook-repo" and layout.fp8_components() == ["transformer", "transformer_2"]
    assert json.loads((out / "model_index.json").read_text()) == json.loads((base / "model_index.json").read_text())
    assert (out / "transformer" / INDEX_NAME).is_file()
    vae = next((out / "vae").glob("*.safetensors"))
    assert os.stat(vae).st_ino == os.stat(base / "vae" / vae.name).st_ino  # hard link, no copy
    assert repo_problems(layout) == {n: [] for n in layout.components}
    meta = read_card_metadata(out)
    assert meta["base_model"] == "Wan-AI/Wan2.2-T2V-A14B-Diffusers" and meta["library_name"] == "diffusers"
    assert {"fp8", "modelopt", "sglang"} <= set(meta["tags"]) and meta["license"] == "apache-2.0"
    card = (out / "README.md").read_text()
    assert "sglang generate --model-path" in card and "--transformer-path" not in card
    assert "fp8cookbook.load_pipeline(" in card
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "repo"]  # no staging folder left

    copied = write_full_repo(base, {"transformer": wan_fp8["transformer"]}, tmp_path / "copy", link="copy")
    vae = next((tmp_path / "copy" / "vae").glob("*.safetensors"))
    assert os.stat(vae).st_ino != os.stat(base / "vae" / vae.name).st_ino
    assert copied.fp8_components() == ["transformer"] and copied.components["transformer_2"].kind == BF16
    linked = write_full_repo(base, {"transformer": wan_fp8["transformer"]}, tmp_path / "sym", link="symlink")
    assert (tmp_path / "sym" / "vae" / vae.name).is_symlink() and linked.fp8_components() == ["transformer"]


def test_write_full_repo_refuses_before_writing(wan_repo, wan_fp8, flux1_folders, tmp_path):
    base = wan_repo["base"]
    out = tmp_path / "repo"
    cases = [
        (dict(fp8={"transformer_3": wan_fp8["transformer"]}), "has no component 'transformer_3'"),
        (dict(fp8={"transformer": flux1_folders["base"]}), "not an FP8 checkpoint"),
        (dict(fp8={"transformer": flux1_folders["ours"]}), "_class_name 'FluxTransformer2DModel'"),
        (dict(fp8={}), "no FP8 component"),
        (dict(fp8={"transformer": wan_fp8["transformer"]}, link="move"), "link must be one of"),
    ]
    for kwargs, message in cases:
        with pytest.raises(Fp8CookbookError, match=message):
            write_full_repo(base, output_dir=out, **kwargs)
        assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(Fp8CookbookError, match="outside the base"):
        write_full_repo(base, {"transformer": wan_fp8["transformer"]}, base / "fp8")
    with pytest.raises(Fp8CookbookError, match="not a diffusers pipeline folder"):
        write_full_repo(wan_fp8["transformer"], {"transformer": wan_fp8["transformer"]}, out)
    out.mkdir()
    with pytest.raises(Fp8CookbookError, match="already exists"):
        write_full_repo(base, {"transformer": wan_fp8["transformer"]}, out)


def test_license_from_base_card(tmp_path):
    assert license_fields(tmp_path) == {}
    (tmp_path / "README.md").write_text("---\nlicense: other\nlicense_name: flux-1-dev-non-commercial-license\n"
                                        "license_link: LICENSE.md\n---\nbody\n")
    assert license_fields(tmp_path) == {"license": "other", "license_name": "flux-1-dev-non-commercial-license",
                                        "license_link": "LICENSE.md"}
    (tmp_path / "README.md").write_text("no front matter\n")
    assert license_fields(tmp_path) == {}


def _modes(root: Path) -> dict[str, int]:
    """Permission bits of a folder and of every folder and file under it (symbolic links skipped)."""
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in [root, *sorted(root.rglob("*"))]
            if not p.is_symlink()}


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_folders_follow_the_umask(umask, wan_repo, wan_fp8, flux1_folders, tmp_path):
    """Every folder we write gets a plain mkdir's modes and every file we write a plain open's (0755/0644 under
    umask 022), so an SGLang container running as another user can read it; files linked or copied from an input
    keep that input's modes, which are readable by all here."""
    from fp8cookbook.loader import load_fp8_transformer
    from fp8cookbook.plots import save_figure
    from fp8cookbook.convert import convert_repo

    import matplotlib.pyplot as plt

    model, _ = load_fp8_transformer(flux1_folders["ours"])
    old = os.umask(umask)
    try:
        model.save_pretrained(tmp_path / "saved")
        write_full_repo(wan_repo["base"], wan_fp8, tmp_path / "repo")
        convert_repo(wan_repo["modelopt"], tmp_path / "converted", base=wan_repo["base"], full_repo=True,
                     progress=False)
        fig = plt.figure()
        save_figure(fig, tmp_path / "fig.png")
        plt.close(fig)
    finally:
        os.umask(old)
    dir_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask
    saved = _modes(tmp_path / "saved")
    assert saved["."] == dir_mode and set(saved.values()) == {dir_mode, file_mode}, saved  # all written here
    for repo in ("repo", "converted"):
        modes = _modes(tmp_path / repo)
        folders = {k: v for k, v in modes.items() if (tmp_path / repo / k).is_dir()}
        assert set(folders.values()) == {dir_mode}, (repo, folders)
        assert modes["README.md"] == file_mode
        if repo == "converted":  # written by the conversion; "repo" links the FP8 folders made at umask 022
            assert modes["transformer/config.json"] == modes["transformer_2/config.json"] == file_mode
        assert {k: oct(v) for k, v in modes.items() if v & 0o044 != 0o044} == {}, repo  # readable by all
    assert _modes(tmp_path / "fig.png") == {".": file_mode}


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_temporary_folders_and_third_party_files_get_plain_modes(umask, tmp_path):
    """files.temp_dir (not mkdtemp's 0700) and files.plain_modes (safetensors >= 0.8 writes 0600 files)."""
    from fp8cookbook import files

    old = os.umask(umask)
    try:
        temp = files.temp_dir(tmp_path)
        save_file({"w": torch.zeros(2)}, temp / "a.safetensors")
        (temp / "sub").mkdir(mode=0o700)
        os.link(temp / "a.safetensors", tmp_path / "input-link")  # a file with another link: not ours to change
        save_file({"w": torch.zeros(2)}, temp / "sub" / "b.safetensors")
        assert files.current_umask() == umask
        files.plain_modes(temp)
    finally:
        os.umask(old)
    dir_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask
    assert _modes(temp)["."] == dir_mode and _modes(temp)["sub"] == dir_mode
    assert _modes(temp)["sub/b.safetensors"] == file_mode
    assert _modes(temp)["a.safetensors"] == os.stat(tmp_path / "input-link").st_mode & 0o777


# -------------------------------------------------------------------------------------- save_pretrained
def _flux1_inputs(model, seed: int = 0):
    from fp8cookbook.families import get_family

    return get_family("flux1").make_inputs(dict(model.config), height=64, width=64, text_len=8,
                                           generator=torch.Generator().manual_seed(seed))


def test_save_pretrained_writes_a_complete_fp8_checkpoint(flux1_folders, tmp_path):
    from fp8cookbook.checkpoint import inspect_checkpoint
    from fp8cookbook.loader import load_fp8_transformer

    model, report = load_fp8_transformer(flux1_folders["ours"])
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    assert inspect_checkpoint(saved).problems == []
    qc = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert qc == json.loads((flux1_folders["ours"] / "config.json").read_text())["quantization_config"]
    with safe_open(str(saved / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["_quantization_metadata"]) == qc
    again, report2 = load_fp8_transformer(saved)
    assert report2.fp8_layers == report.fp8_layers == 13
    card, source_card = read_card_metadata(saved), read_card_metadata(flux1_folders["ours"])
    assert card["base_model"] == source_card["base_model"] == "black-forest-labs/FLUX.1-dev"  # the front matter
    assert {"fp8", "modelopt", "sglang"} <= set(card["tags"]) and card["library_name"] == "diffusers"
    assert "--model-path black-forest-labs/FLUX.1-dev --transformer-path" in (saved / "README.md").read_text()
    licensed = tmp_path / "licensed"  # a source card's license (and base_model) carries over
    shutil.copytree(flux1_folders["ours"], licensed)
    (licensed / "README.md").write_text("---\nbase_model: me/flux-finetune\nlicense: other\nlicense_name: "
                                        "flux-1-dev-non-commercial-license\n---\n")
    load_fp8_transformer(licensed)[0].save_pretrained(tmp_path / "licensed_saved")
    card = read_card_metadata(tmp_path / "licensed_saved")
    assert card["base_model"] == "me/flux-finetune" and card["license_name"] == "flux-1-dev-non-commercial-license"
    inputs = _flux1_inputs(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], again(**inputs)[0]), "reloaded forward differs"
    again.save_pretrained(tmp_path / "twice")  # and the reloaded model saves the same way
    assert snapshot(tmp_path / "twice") == snapshot(saved)
    with pytest.raises(Fp8CookbookError, match="not empty"):
        model.save_pretrained(saved)
    model.save_pretrained(saved, overwrite=True)
    with pytest.raises(Fp8CookbookError, match="push_to_hub"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)
    assert not (tmp_path / "hub").exists()


def test_no_path_reads_fp8_codes_as_bf16(flux1_folders, tmp_path):
    """diffusers on our saved folder, our loader and the pipeline loader on a folder that lost quantization_config."""
    import diffusers

    from fp8cookbook.loader import load_fp8_transformer

    model, _ = load_fp8_transformer(flux1_folders["ours"])
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    try:  # diffusers routes quant_method=modelopt to its own quantizer: it must fail or load real values
        plain = diffusers.FluxTransformer2DModel.from_pretrained(saved)
    except Exception:  # noqa: BLE001 - any loud failure is the wanted outcome
        plain = None
    if plain is not None:
        w = plain.transformer_blocks[0].attn.to_q.weight.float()
        ref = model.transformer_blocks[0].attn.to_q.dequantized_weight()
        assert torch.allclose(w, ref, atol=1e-2), "diffusers loaded FP8 codes as weights"
    bare = strip_quant_config(flux1_folders["ours"], tmp_path / "bare")
    with pytest.raises(Fp8CookbookError, match="13 FP8 weight.*no quantization_config.*read the FP8 codes as BF16"):
        load_fp8_transformer(bare)


# ------------------------------------------------------------------------------------------ loading pipelines
def _fp8_linear_count(module) -> int:
    from fp8cookbook.fp8.linear import fp8_modules

    return len(fp8_modules(module))


def test_load_pipeline_of_a_whole_pipeline_repo(wan_repo, wan_fp8, tmp_path):
    from fp8cookbook.loader import load_fp8_pipeline

    repo = tmp_path / "repo"
    write_full_repo(wan_repo["base"], wan_fp8, repo)
    for source, fp8 in ((repo, None), (wan_repo["modelopt"], None), (wan_repo["base"], repo),
                        (wan_repo["base"], {"transformer_2": wan_fp8["transformer_2"]})):
        pipe = load_fp8_pipeline(source, fp8)
        names = ["transformer", "transformer_2"] if fp8 is None or fp8 == repo else ["transformer_2"]
        for name in ("transformer", "transformer_2"):
            assert (_fp8_linear_count(getattr(pipe, name)) > 0) == (name in names), (source, fp8, name)
        assert sorted(pipe.fp8_load_reports) == names
    from fp8cookbook.pipelines import default_tiny_settings, generation_kwargs

    pipe = load_fp8_pipeline(repo)
    out = pipe(**generation_kwargs("wan22-a14b", pipe, **default_tiny_settings("wan22-a14b"), output_type="latent"))
    assert torch.isfinite(out.frames).all()


def test_load_pipeline_refuses_offload_and_unreadable_components(wan_repo, wan_fp8, flux1_folders, tmp_path):
    from fp8cookbook.loader import load_fp8_pipeline

    with pytest.warns(UserWarning, match="DiT CPU offload disabled"):
        pipe = load_fp8_pipeline(wan_repo["modelopt"], dit_cpu_offload=True)
    assert pipe.fp8_load_reports["transformer"].offload_disabled
    repo = tmp_path / "repo"
    shutil.copytree(wan_repo["modelopt"], repo)
    strip_quant_config(repo / "transformer_2", tmp_path / "t2")
    shutil.rmtree(repo / "transformer_2")
    shutil.move(tmp_path / "t2", repo / "transformer_2")
    with pytest.raises(Fp8CookbookError, match="transformer_2: .*no quantization_config"):
        load_fp8_pipeline(repo)
    load_fp8_pipeline(repo, {"transformer_2": wan_fp8["transformer_2"]})  # replaced, so fine
    with pytest.raises(Fp8CookbookError, match="no FP8 component"):
        load_fp8_pipeline(wan_repo["base"])
    with pytest.raises(Fp8CookbookError, match="not an FP8 checkpoint"):
        load_fp8_pipeline(wan_repo["base"], flux1_folders["base"])
    with pytest.raises(Fp8CookbookError, match="names 'WanTransformer3DModel'"):
        load_fp8_pipeline(wan_repo["base"], flux1_folders["ours"])
    with pytest.raises(Fp8CookbookError, match="has no component 'transformer_9'"):
        load_fp8_pipeline(wan_repo["base"], {"transformer_9": wan_fp8["transformer"]})


# -------------------------------------------------------------------------------------------- converting repos
def test_convert_whole_repo(wan_repo, tmp_path):
    from fp8cookbook.convert import convert_repo

    before = snapshot(wan_repo["modelopt"])
    stats = convert_repo(wan_repo["modelopt"], tmp_path / "each", progress=False)
    assert sorted(stats) == ["transformer", "transformer_2"]
    for name in stats:
        layout = detect_layout(tmp_path / "each" / name)
        assert layout.components[""].producer == "fp8cookbook" and repo_problems(layout) == {"": []}
        assert json.loads((tmp_path / "each" / name / STATS_NAME).read_text())["output_dir"] == str(tmp_path / "each" / name)
    convert_repo(wan_repo["modelopt"], tmp_path / "full", base=wan_repo["base"], full_repo=True, progress=False)
    full = detect_layout(tmp_path / "full")
    assert full.layout == "fp8cookbook-repo" and full.fp8_components() == ["transformer", "transformer_2"]
    assert read_card_metadata(tmp_path / "full")["base_model"] == "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
    assert snapshot(wan_repo["modelopt"]) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["each", "full"]  # no staging left


def test_convert_one_export_into_a_full_repo(flux1_folders, tmp_path):
    """One transformer export plus its BF16 pipeline -> the full repo (FLUX.1 fallback layers from the base)."""
    from fp8cookbook.pipelines import tiny_pipeline_dir
    from fp8cookbook.convert import convert_repo

    base = tiny_pipeline_dir("flux1", cache_dir=tmp_path / "cache")
    # the hand-made export is of a different random transformer: put its BF16 base into the pipeline copy
    pipeline = tmp_path / "pipeline"
    shutil.copytree(base, pipeline)
    shutil.rmtree(pipeline / "transformer")
    shutil.copytree(flux1_folders["base"], pipeline / "transformer")
    with pytest.raises(Fp8CookbookError, match="needs --base"):
        convert_repo(flux1_folders["export"], tmp_path / "repo", full_repo=True, progress=False)
    convert_repo(flux1_folders["export"], tmp_path / "repo", base=pipeline, full_repo=True, progress=False)
    layout = detect_layout(tmp_path / "repo")
    assert layout.layout == "fp8cookbook-repo" and layout.fp8_components() == ["transformer"]
    assert repo_problems(layout)["transformer"] == []


# ------------------------------------------------------------------------ SGLang's own checkpoints, end to end
def test_sglang_converter_folder_loads_with_sglangs_precision(flux1_folders):
    """SGLang builds BF16 exactly the layers its runtime names cover; so do our loader and inspect."""
    from fp8cookbook.checkpoint import inspect_checkpoint
    from fp8cookbook.fp8.linear import fp8_modules
    from fp8cookbook.loader import load_fp8_transformer

    assert inspect_checkpoint(flux1_folders["sglang"]).problems == []
    theirs, report = load_fp8_transformer(flux1_folders["sglang"])
    ours, _ = load_fp8_transformer(flux1_folders["ours"])
    assert set(fp8_modules(theirs)) == set(fp8_modules(ours)) and report.fp8_layers == 13
    qc = json.loads((flux1_folders["sglang"] / "config.json").read_text())["quantization_config"]
    rules = _Patterns(qc["ignore"])
    for name, module in theirs.named_modules():  # per layer: FP8 exactly where SGLang's rule says FP8
        if isinstance(module, torch.nn.Linear) or name in fp8_modules(theirs):
            assert (name in fp8_modules(theirs)) == (not keeps_bf16(rules, name, flux1_runtime_names)), name
    assert isinstance(theirs.transformer_blocks[0].ff.net[0].proj, torch.nn.Linear)
    inputs = _flux1_inputs(ours)
    with torch.no_grad():
        assert torch.equal(theirs(**inputs)[0], ours(**inputs)[0])


def test_inspect_cli_on_every_layout(flux1_folders, wan_repo, tmp_path, capsys):
    from fp8cookbook.cli import main

    assert main(["inspect", str(flux1_folders["sglang"])]) == 0
    out = capsys.readouterr().out
    assert "sglang-transformer" in out and "consistent" in out
    assert main(["inspect", str(wan_repo["modelopt"])]) == 0
    out = capsys.readouterr().out
    assert "modelopt-repo (WanPipeline)" in out
    assert all(f"  {n}" in out for n in ("transformer ", "transformer_2", "vae", "text_encoder", "scheduler"))
    bare = strip_quant_config(flux1_folders["ours"], tmp_path / "bare")
    assert main(["inspect", str(bare)]) == 1
    assert "PROBLEM" in capsys.readouterr().out
    assert main(["inspect", str(bare), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["components"]["."]["kind"] == FP8_UNMARKED
    assert main(["inspect", str(wan_repo["base"])]) == 1  # a BF16 pipeline: no FP8 component
    assert "no FP8 component" in capsys.readouterr().out
    assert main(["inspect", str(flux1_folders["base"])]) == 0  # a BF16 model folder: says so, nothing wrong
    assert "no FP8 tensors" in capsys.readouterr().out


def test_convert_cli_whole_repo(wan_repo, tmp_path, capsys):
    from fp8cookbook.cli import main

    assert main(["convert", str(wan_repo["modelopt"]), str(tmp_path / "repo"), "--full-repo", "--quiet",
                 "--base", str(wan_repo["base"]), "--link", "copy"]) == 0
    assert "full diffusers repo" in capsys.readouterr().out
    assert detect_layout(tmp_path / "repo").fp8_components() == ["transformer", "transformer_2"]
    assert main(["convert", str(wan_repo["modelopt"]), str(tmp_path / "x"), "--dry-run"]) == 2
    assert "--dry-run works on one transformer" in capsys.readouterr().err
    assert main(["convert", str(wan_repo["modelopt"]), str(tmp_path / "x"), "--base-transformer", "t"]) == 2
    assert not (tmp_path / "x").exists()


def test_one_call_load_pipeline(wan_repo, wan_fp8, tmp_path):
    """`fp8cookbook.load_pipeline(base, fp8=...)`, `load_pipeline(repo)` and the family form all give FP8 layers."""
    import fp8cookbook

    repo = tmp_path / "repo"
    write_full_repo(wan_repo["base"], wan_fp8, repo)
    for args, kwargs in (((wan_repo["base"],), dict(fp8=wan_fp8["transformer"])), ((repo,), {}),
                         (("wan22", repo), {}), (("wan22", wan_repo["modelopt"]), {}),
                         ((str(wan_repo["base"]),), dict(fp8=repo))):
        pipe = fp8cookbook.load_pipeline(*args, **kwargs)
        assert _fp8_linear_count(pipe.transformer) > 0, args
    bf16 = fp8cookbook.load_pipeline("wan22", wan_repo["base"])
    assert _fp8_linear_count(bf16.transformer) == 0 and not hasattr(bf16, "fp8_load_reports")
    with pytest.raises(Fp8CookbookError, match="apply to FP8 components only"):
        fp8cookbook.load_pipeline("wan22", wan_repo["base"], dit_cpu_offload=True)
    with pytest.raises(Fp8CookbookError, match="names WanPipeline, but FLUX.1-dev needs FluxPipeline"):
        fp8cookbook.load_pipeline("flux1", repo)
    with pytest.raises(Fp8CookbookError, match="not a family name"):
        fp8cookbook.load_pipeline(str(repo), repo)
    # a BF16 load of a folder whose transformer holds FP8 codes without quantization_config is refused
    unmarked = tmp_path / "unmarked"
    shutil.copytree(wan_repo["base"], unmarked)
    shutil.rmtree(unmarked / "transformer")
    strip_quant_config(wan_fp8["transformer"], unmarked / "transformer")
    with pytest.raises(Fp8CookbookError, match="transformer: .*no quantization_config"):
        fp8cookbook.load_pipeline("wan22", unmarked)


def test_inspect_checkpoint_flags_fp8_without_quantization_config(flux1_folders, tmp_path):
    from fp8cookbook.checkpoint import inspect_checkpoint

    report = inspect_checkpoint(strip_quant_config(flux1_folders["ours"], tmp_path / "bare"))
    assert report.problems[0].endswith("no quantization_config, but the folder holds 13 FP8 weight(s) and 26 "
                                       "scale tensor(s)")
    assert inspect_checkpoint(flux1_folders["base"]).problems == []  # a BF16 folder is not wrong


def test_convert_refuses_an_fp8_base_and_cards_carry_front_matter(flux1_folders, tmp_path):
    base = tmp_path / "pipeline" / "transformer"
    shutil.copytree(flux1_folders["base"], base)
    (tmp_path / "pipeline" / "README.md").write_text("---\nlicense: other\nlicense_name: flux-1-dev-non-commercial-"
                                                     "license\n---\n")
    out = tmp_path / "fp8"
    convert_checkpoint(flux1_folders["export"], out, base_transformer=base, progress=False)
    meta = read_card_metadata(out)
    assert meta["base_model"] == "black-forest-labs/FLUX.1-dev" and meta["library_name"] == "diffusers"
    assert {"fp8", "modelopt", "sglang"} <= set(meta["tags"])
    assert meta["license"] == "other" and meta["license_name"] == "flux-1-dev-non-commercial-license"
    card = (out / "README.md").read_text()
    assert "--model-path black-forest-labs/FLUX.1-dev --transformer-path" in card
    assert 'fp8cookbook.load_pipeline("black-forest-labs/FLUX.1-dev", fp8=' in card
    with pytest.raises(Fp8CookbookError, match="must be the original BF16 one, but it holds FP8"):
        convert_checkpoint(flux1_folders["export"], tmp_path / "bad", base_transformer=flux1_folders["ours"],
                           progress=False)
    assert not (tmp_path / "bad").exists()


def test_quantize_full_repo_serves_both_experts(tmp_path, capsys, monkeypatch):
    """`quantize --full-repo`: OUTPUT_DIR/repo holds both FP8 experts and loads as one FP8 pipeline."""
    import fp8cookbook
    from fp8cookbook.cli import main
    from fp8cookbook.pipelines import tiny_pipeline_dir

    monkeypatch.setenv("FP8COOKBOOK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "q"
    old = os.umask(0o022)
    try:
        base = tiny_pipeline_dir("wan22")
        assert main(["quantize", "--family", "wan22", "--num-prompts", "1", "--no-quantize-mha", "--output-dir",
                     str(out), "--full-repo", "--quiet"]) == 0
    finally:
        os.umask(old)
    # what a user with umask 022 gets from any write: another user (an SGLang container) can read all of it
    for root in (out, base):
        modes = _modes(root)
        assert {v for k, v in modes.items() if (root / k).is_dir()} == {0o755}, modes
        assert {v for k, v in modes.items() if (root / k).is_file()} == {0o644}, modes
    printed = capsys.readouterr().out
    assert f"serve            sglang generate --model-path {out / 'repo'} --num-gpus 4" in printed
    assert f"--transformer-path {out / 'fp8' / 'transformer'}" in printed
    layout = detect_layout(out / "repo")
    assert layout.layout == "fp8cookbook-repo" and layout.fp8_components() == ["transformer", "transformer_2"]
    assert json.loads((out / "quantize.json").read_text())["repo"] == "repo"
    vae = next((out / "repo" / "vae").glob("*.safetensors"))
    assert os.stat(vae).st_ino == os.stat(base / "vae" / vae.name).st_ino
    pipe = fp8cookbook.load_pipeline(out / "repo")
    assert _fp8_linear_count(pipe.transformer) > 0 and _fp8_linear_count(pipe.transformer_2) > 0
    # an in-memory pipeline has no folder to take the other components from: refused before calibrating
    from fp8cookbook.pipelines import build_tiny_pipeline
    from fp8cookbook.quantize import quantize_pipeline

    with pytest.raises(Fp8CookbookError, match="full_repo needs the pipeline's own folder"):
        quantize_pipeline("wan22", build_tiny_pipeline("wan22"), tmp_path / "mem", full_repo=True, progress=False)
    assert not (tmp_path / "mem").exists()
    with pytest.raises(Fp8CookbookError, match="already holds FP8 layers"):
        quantize_pipeline("wan22", pipe, tmp_path / "again", progress=False)
