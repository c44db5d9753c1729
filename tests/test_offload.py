"""Offload with FP8 transformers: DiT offload is turned off (with the reason), text-encoder offload stays, FP8 runs."""

from __future__ import annotations

import pytest
import torch

from fp8cookbook.fp8.linear import FP8Linear, count_fp8_calls
from fp8cookbook.offload import has_offload_hooks, place_pipeline
from fp8cookbook.pipelines import default_tiny_settings, generation_kwargs, load_pipeline


@pytest.fixture
def fp8_pipe():
    pipe = load_pipeline("flux1", dtype=torch.float32)
    name = "single_transformer_blocks.0.attn.to_q"
    parent, _, child = name.rpartition(".")
    linear = pipe.transformer.get_submodule(name)
    setattr(pipe.transformer.get_submodule(parent), child, FP8Linear.quantize(linear, 8.0))
    return pipe


def test_dit_offload_is_refused_and_fp8_layers_run(fp8_pipe):
    from accelerate import cpu_offload_with_hook

    cpu_offload_with_hook(fp8_pipe.transformer, "cpu")  # as if the user had enabled DiT offload already
    assert has_offload_hooks(fp8_pipe.transformer)
    with pytest.warns(UserWarning, match="DiT CPU offload disabled.*column-major"):
        off = place_pipeline(fp8_pipe, "cpu", dit_cpu_offload=True, dit_layerwise_offload=True, text_encoder_cpu_offload=True)
    assert off == ["DiT CPU offload (transformer)", "DiT layer-wise offload (transformer)", "offload hooks already on transformer"]
    assert not has_offload_hooks(fp8_pipe.transformer)
    assert has_offload_hooks(fp8_pipe.text_encoder) and has_offload_hooks(fp8_pipe.text_encoder_2)
    assert not has_offload_hooks(fp8_pipe.vae)
    kwargs = generation_kwargs("flux1", fp8_pipe, seed=0, output_type="latent", **default_tiny_settings("flux1"))
    with count_fp8_calls(fp8_pipe.transformer) as calls:
        fp8_pipe(**kwargs)
    assert calls == {"single_transformer_blocks.0.attn.to_q": default_tiny_settings("flux1")["num_inference_steps"]}


def test_bf16_pipeline_keeps_dit_offload():
    pipe = load_pipeline("flux1", dtype=torch.float32)
    assert place_pipeline(pipe, "cpu", dit_cpu_offload=True) == []
    assert has_offload_hooks(pipe.transformer)


def _track_moves(experts: dict[str, torch.nn.Module]) -> dict[str, str]:
    """Make each expert's `.to` record where it was sent instead of moving it (a CPU machine has one device), so
    the bookkeeping can be checked as if "cuda" existed; returns the recorded device per expert."""
    where = {name: "cpu" for name in experts}
    for name, module in experts.items():
        def to(device, *args, name=name, module=module, **kwargs):
            where[name] = str(torch.device(device))
            return module
        module.to = to
    return where


def test_one_expert_resident_holds_only_the_running_expert_of_wan22_a14b():
    from fp8cookbook.offload import one_expert_resident

    pipe = load_pipeline("wan22-a14b")
    experts = {"transformer": pipe.transformer, "transformer_2": pipe.transformer_2}
    where = _track_moves(experts)
    seen: list[tuple[str, dict[str, str]]] = []
    kwargs = generation_kwargs("wan22-a14b", pipe, seed=0, output_type="latent",
                               **{**default_tiny_settings("wan22-a14b"), "num_inference_steps": 4})
    with one_expert_resident(experts, "cuda") as moves:
        # registered after the context's own hooks, so they run after them: the state each forward sees
        handles = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.append((name, dict(where))))
                   for name, m in experts.items()]
        pipe(**kwargs)
        for h in handles:
            h.remove()
    called = [name for name, _ in seen]
    assert "transformer" in called and "transformer_2" in called, called
    for name, state in seen:  # at every forward: the called expert on the GPU, the other on the CPU
        other = "transformer_2" if name == "transformer" else "transformer"
        assert state[name] == "cuda" and state[other] == "cpu", (name, state)
    # one switch per generation: high-noise expert in, out, low-noise expert in; on exit back to the CPU
    assert moves == ["transformer->cuda", "transformer->cpu", "transformer_2->cuda", "transformer_2->cpu"], moves
    assert where == {"transformer": "cpu", "transformer_2": "cpu"}
    assert not experts["transformer"]._forward_pre_hooks and not experts["transformer_2"]._forward_pre_hooks


def test_one_expert_resident_restores_the_devices_on_failure():
    """A generation that fails below the boundary leaves the low-noise expert nowhere near the GPU."""
    from fp8cookbook.offload import one_expert_resident

    pipe = load_pipeline("wan22-a14b")
    experts = {"transformer": pipe.transformer, "transformer_2": pipe.transformer_2}
    where = _track_moves(experts)

    def fail_at_step_2(_pipe, i, t, tensors):
        if i == 2:
            raise RuntimeError("stopped at step 2")
        return tensors

    kwargs = generation_kwargs("wan22-a14b", pipe, seed=0, output_type="latent",
                               **{**default_tiny_settings("wan22-a14b"), "num_inference_steps": 4})
    with pytest.raises(RuntimeError, match="stopped at step 2"):
        with one_expert_resident(experts, "cuda") as moves:
            pipe(**kwargs, callback_on_step_end=fail_at_step_2)
    assert moves[-2:] == ["transformer_2->cuda", "transformer_2->cpu"], moves
    assert where == {"transformer": "cpu", "transformer_2": "cpu"}
    assert not experts["transformer_2"]._forward_pre_hooks


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_expert_resident_on_the_gpu_changes_no_result():
    """On a real GPU: each forward finds its expert on the GPU and the other on the CPU, and a comparison with
    offload_idle scores exactly as one with everything resident."""
    from fp8cookbook.compare import compare_trajectories
    from fp8cookbook.offload import module_device, one_expert_resident

    pipe = load_pipeline("wan22-a14b").to("cuda")
    experts = {"transformer": pipe.transformer, "transformer_2": pipe.transformer_2}
    seen = []
    kwargs = generation_kwargs("wan22-a14b", pipe, seed=0, output_type="latent",
                               **{**default_tiny_settings("wan22-a14b"), "num_inference_steps": 4})
    with one_expert_resident(experts, "cuda"):
        handles = [m.register_forward_pre_hook(
            lambda mod, args, name=name: seen.append((name, {n: module_device(e).type for n, e in experts.items()})))
            for name, m in experts.items()]
        pipe(**kwargs)
        for h in handles:
            h.remove()
    assert {name for name, _ in seen} == {"transformer", "transformer_2"}
    assert all(state[name] == "cuda" and list(state.values()).count("cuda") == 1 for name, state in seen), seen
    assert all(module_device(e).type == "cuda" for e in experts.values())  # back where they were

    import copy

    noisy = copy.deepcopy(pipe.transformer_2)
    with torch.no_grad():
        for prm in noisy.parameters():
            prm.mul_(1.01)
    settings = dict(height=32, width=32, num_frames=5, steps=4)
    resident = compare_trajectories(pipe, {}, {"transformer_2": noisy}, family="wan22-a14b", progress=False, **settings)
    offloaded = compare_trajectories(pipe, {}, {"transformer_2": noisy}, family="wan22-a14b", progress=False,
                                     offload_idle=True, **settings)
    assert [s["latents"]["cosine"] for s in offloaded.steps] == pytest.approx(
        [s["latents"]["cosine"] for s in resident.steps], abs=1e-6)
    assert offloaded.steps[-1]["latents"]["cosine"] < 1.0  # the perturbed expert ran
    assert module_device(pipe.transformer).type == "cuda" and module_device(pipe.transformer_2).type == "cuda"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pipeline_bench_one_expert_resident_on_the_gpu(tmp_path, monkeypatch):
    """`bench --model-path --one-expert-resident` on a real GPU: each side's generations move the experts between
    the GPU and the CPU (the pipeline's execution device stays the GPU) and both experts' FP8 layers run."""
    from fp8cookbook.bench import BenchSettings, run_bench
    from fp8cookbook.pipelines import tiny_pipeline_dir

    monkeypatch.setenv("FP8COOKBOOK_CACHE", str(tmp_path / "cache"))
    report = run_bench(BenchSettings(family="wan22-a14b", model_path=str(tiny_pipeline_dir("wan22-a14b")),
                                     device="cuda", runs=1, warmup=1, warmup_steps=2, steps=4, height=64, width=64,
                                     num_frames=5, text_len=8, one_expert_resident=True))
    for side in report["sides"]:
        moves = side["expert_moves"]
        assert any(m.endswith("cuda:0") for m in moves) and any(m.endswith("->cpu") for m in moves), moves
    fp8 = report["sides"][1]
    assert fp8["fp8_layers_ran"] == fp8["fp8_layers"] > 0
