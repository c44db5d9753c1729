"""Tiny offline pipelines: build, save, reload through load_pipeline, generate deterministically, on CPU."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from fp8cookbook.errors import Fp8CookbookError
from fp8cookbook.families import FAMILIES, get_family
from fp8cookbook.pipelines import (
    TINY_VERSION,
    default_tiny_settings,
    generation_kwargs,
    load_pipeline,
    tiny_pipeline_dir,
    transformer_names,
)

NAMES = sorted(FAMILIES)


pytestmark = pytest.mark.usefixtures("one_thread", "tiny_cache_env")


_PIPES: dict[str, object] = {}


def _pipe(name: str):
    """One float32 load per family for the module (float32: bf16 matmuls are ~10x slower on CPU)."""
    if name not in _PIPES:
        _PIPES[name] = load_pipeline(name, dtype=torch.float32)
    return _PIPES[name]


def _run(name: str, **overrides) -> torch.Tensor:
    pipe = _pipe(name)
    kwargs = generation_kwargs(name, pipe, **{**default_tiny_settings(name), **overrides})
    out = pipe(**kwargs)
    return out.frames if get_family(name).is_video else out.images


@pytest.mark.parametrize("name", NAMES)
def test_tiny_dir_is_built_once_under_env_cache(name, tiny_cache):
    path = tiny_pipeline_dir(name)
    assert path == tiny_cache / "tiny" / f"{name}-{TINY_VERSION}"
    index = json.loads((path / "model_index.json").read_text())
    family = get_family(name)
    assert index["_class_name"] == family.pipeline_class
    assert index["transformer"] == ["diffusers", family.class_name]
    stamp = (path / "model_index.json").stat().st_mtime_ns
    assert tiny_pipeline_dir(name) == path
    assert (path / "model_index.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp folders left behind


@pytest.mark.parametrize("name", NAMES)
def test_generation_is_deterministic_and_prompt_driven(name):
    family = get_family(name)
    settings = default_tiny_settings(name)
    first, second = _run(name, seed=3), _run(name, seed=3)
    h, w = settings["height"], settings["width"]
    expected = (1, settings["num_frames"], 3, h, w) if family.is_video else (1, 3, h, w)
    assert tuple(first.shape) == expected
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)
    assert not torch.equal(first, _run(name, seed=4))
    assert not torch.equal(first, _run(name, seed=3, prompt="a green tree under the sky"))


@pytest.mark.parametrize("name", NAMES)
def test_pipeline_matches_family(name):
    family = get_family(name)
    pipe = _pipe(name)
    assert type(pipe).__name__ == family.pipeline_class
    assert transformer_names(pipe) == list(family.experts)
    for attr in transformer_names(pipe):
        model = getattr(pipe, attr)
        assert type(model).__name__ == family.class_name
        assert {k: model.config[k] for k in family.tiny_config} == json.loads(json.dumps(family.tiny_config))
    if name == "wan22-a14b":
        assert pipe.config.boundary_ratio == family.boundary_ratio
        first = next(pipe.transformer.parameters())
        assert not torch.equal(first, next(pipe.transformer_2.parameters()))  # two experts, two seeds
    if name == "wan22-ti2v-5b":
        assert pipe.config.expand_timesteps
        assert pipe.vae.config.z_dim == family.tiny_config["in_channels"]
        assert pipe.vae.config.scale_factor_spatial == 16


def test_a14b_tiny_steps_use_both_experts():
    name = "wan22-a14b"
    pipe = _pipe(name)
    calls = {"transformer": 0, "transformer_2": 0}
    hooks = [getattr(pipe, n).register_forward_hook(lambda *a, n=n: calls.__setitem__(n, calls[n] + 1))
             for n in calls]
    try:
        _run(name, output_type="latent")
    finally:
        for h in hooks:
            h.remove()
    boundary = get_family(name).boundary_ratio * pipe.scheduler.config.num_train_timesteps
    high = sum(int(t >= boundary) for t in pipe.scheduler.timesteps)
    low = len(pipe.scheduler.timesteps) - high
    assert high > 0 and low > 0
    assert calls == {"transformer": 2 * high, "transformer_2": 2 * low}  # x2: classifier-free guidance


def test_generation_kwargs_are_uniform():
    for name in NAMES:
        family, pipe = get_family(name), _pipe(name)
        kwargs = generation_kwargs(name, pipe, prompt="p", seed=1, output_type="latent")
        assert kwargs["num_inference_steps"] == family.num_steps  # unset values: the real model's defaults
        assert ("num_frames" in kwargs) == family.is_video
        assert kwargs["max_sequence_length"] <= family.text_len
        assert kwargs["generator"].initial_seed() == 1
        tiny = generation_kwargs(family, pipe, **default_tiny_settings(name))
        assert tiny["num_inference_steps"] == default_tiny_settings(name)["num_inference_steps"]


def test_default_load_is_bf16_and_runs():
    pipe = load_pipeline("flux1")
    assert pipe.transformer.dtype == torch.bfloat16
    kwargs = generation_kwargs("flux1", pipe, **{**default_tiny_settings("flux1"), "num_inference_steps": 1},
                               output_type="latent")
    assert torch.isfinite(pipe(**kwargs).images.float()).all()


def test_bad_model_path_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(Fp8CookbookError, match="no-such-model"):
        load_pipeline("flux1", str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Fp8CookbookError, match="empty.*model_index.json"):
        load_pipeline("flux1", str(empty))
    with pytest.raises(Fp8CookbookError, match="FluxPipeline"):  # a FLUX.1 folder given as Wan
        load_pipeline("wan22-a14b", str(tiny_pipeline_dir("flux1")))


def test_concurrent_builds_and_stale_cache(tmp_path):
    name = "wan22-ti2v-5b"
    results, errors = [], []

    def build():
        try:
            results.append(tiny_pipeline_dir(name, tmp_path))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    path = results[0]
    assert [p.name for p in path.parent.iterdir()] == [path.name]

    # A cache built from an older tiny_config is rebuilt, not reused.
    config_file = path / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config["num_layers"] += 1
    config_file.write_text(json.dumps(config))
    assert tiny_pipeline_dir(name, tmp_path) == path
    assert json.loads(config_file.read_text())["num_layers"] == get_family(name).tiny_config["num_layers"]
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.fixture
def offline(monkeypatch) -> list:
    """No network, as on a cluster node: huggingface_hub's offline mode, and any name lookup recorded and refused."""
    import socket

    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: set it too
    lookups: list = []

    def refuse(*args, **kwargs):
        lookups.append(args)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return lookups


HUB_ID = "fp8cookbook-test/no-such-pipeline"


def _assert_one_short_hub_line(text: str) -> None:
    line = text.strip()
    assert "\n" not in line and len(line) < 220, f"{len(line)} characters: {line}"
    assert HUB_ID in line and "cannot be reached" in line and "local pipeline folder" in line, line
    assert "stacktrace" not in line, line


def test_hub_id_offline_is_one_short_line(offline):
    with pytest.raises(Fp8CookbookError) as info:
        load_pipeline("flux1", HUB_ID)
    _assert_one_short_hub_line(str(info.value))
    with pytest.raises(Fp8CookbookError) as info:  # the same through the repo path (a base for FP8 components)
        load_pipeline(HUB_ID, fp8="unused")
    _assert_one_short_hub_line(str(info.value))
    assert offline == [], "no network may be tried offline"


def test_cli_hub_id_offline_ends_in_one_short_line(offline, handmade, tmp_path, capsys):
    from fp8cookbook.cli import main

    rc = main(["compare", "--family", "flux1", "--model-path", HUB_ID, "--candidate", str(handmade["base"]),
               "--output-dir", str(tmp_path / "c"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fp8cookbook compare: error: "), err
    _assert_one_short_hub_line(last.removeprefix("fp8cookbook compare: error: "))
    assert not (tmp_path / "c").exists()
