# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # FLUX.1-dev in FP8: quantize, check, time, serve
#
# This notebook takes FLUX.1-dev's transformer from BF16 to an FP8 checkpoint that SGLang serves with
# `--transformer-path`, and shows on the way that the FP8 model still makes the same pictures: ModelOpt calibrates
# FP8 scales on the real pipeline, the export is converted into SGLang's format, the checkpoint is inspected and
# loaded with fp8cookbook's own FP8 layers, BF16 and FP8 denoise the same noise side by side, and both are timed.
# By default it runs the tiny offline FLUX.1 pipeline (the real diffusers classes with random weights) on the CPU
# in about a minute; set `model_path` to run the real model on a GPU. Each step is one library call, and each has a
# CLI twin, shown as it comes (`SKILL.md` lists them for agents).

# %%
from pathlib import Path

from IPython.display import display

from fp8cookbook import notebook as nb
from fp8cookbook import bench as benchmark  # the parameter `run_bench` below is a switch, not this function
from fp8cookbook.checkpoint import inspect_checkpoint
from fp8cookbook.compare import Thresholds, compare_trajectories, write_outputs
from fp8cookbook.convert import convert_checkpoint
from fp8cookbook.fp8.attention_mode import AttentionMode
from fp8cookbook.offload import place_pipeline
from fp8cookbook.pipelines import load_pipeline, tiny_pipeline_dir
from fp8cookbook.plots import plot_images, plot_step_metrics
from fp8cookbook.quantize import quantize_pipeline

FAMILY = "flux1"

# %% tags=["parameters"]
model_path = None  # None: the tiny offline pipeline; or "black-forest-labs/FLUX.1-dev" or a local diffusers folder
device = "auto"  # "auto": cuda when available, else cpu
dtype = "auto"  # "auto": bfloat16 on CUDA, float32 on CPU (CPU bfloat16 matmuls are ~10x slower)
prompts = ["a photo of a red house by a lake at sunset"]  # each is denoised by BF16 and by FP8 and compared
calibration_prompts = None  # None: the shipped prompts; or a list, or a file with one prompt per line
num_calibration_prompts = None  # None: 4 (tiny) or 64 (real)
calibration_steps = None  # denoising steps per calibration prompt; None: 3 (tiny) or 20 (real)
height = None  # None: 64 (tiny) or 1024
width = None  # None: 64 (tiny) or 1024
steps = None  # denoising steps compared and timed; None: 3 (tiny) or 28 (real)
guidance_scale = None  # None: 3.5
seed = 0  # noise seed of the comparison; calibration prompt i uses seed + i
min_cosine = 0.98  # final latents: cosine(BF16, FP8) must be at least this
min_step_cosine = 0.95  # the same, after every step
max_rel_l2 = 0.2  # final latents: ||FP8 - BF16|| / ||BF16|| at most this
min_psnr = 22.0  # decoded image, dB
min_ssim = 0.8  # decoded image
keep_bf16 = []  # extra module regexes kept in BF16 (re-converts the export), e.g. ["single_transformer_blocks\\.0\\."]
text_encoder_cpu_offload = False  # park the text encoders on the CPU between uses (saves GPU memory)
output_dir = "outputs/flux1"  # checkpoint, comparison, bench.json and report.json
run_bench = True  # time BF16 vs FP8 denoising (section 7)
compile = False  # torch.compile both sides of the benchmark
fp8_attention = "auto"  # "auto": FP8 attention for long sequences on a GPU (Wan2.2); "on": every call; "off"

# %% [markdown]
# ## 1. Load the BF16 pipeline
#
# `load_pipeline` reads a local folder or hub id (or, with `model_path=None`, builds the tiny pipeline once and
# caches it). `place_pipeline` puts it on the device; text-encoder and VAE offload are fine at any time, DiT offload
# is not (section 5).

# %%
device, torch_dtype = nb.runtime(device, dtype, tiny=model_path is None)
output_dir = Path(output_dir).expanduser().resolve()
prompts = nb.as_prompts(prompts)
calibration_prompts = nb.as_prompts(calibration_prompts, optional=True, files=True)
base = str(model_path or tiny_pipeline_dir(FAMILY))  # the BF16 pipeline: SGLang's --model-path
gen = nb.generation_settings(FAMILY, model_path, height=height, width=width, steps=steps, guidance_scale=guidance_scale)
settings = dict(model_path=model_path, device=device, dtype=str(torch_dtype), prompts=prompts, seed=seed,
                keep_bf16=keep_bf16, fp8_attention=fp8_attention, **gen)
report = nb.NotebookReport("flux1", FAMILY, output_dir, settings)
pipe = load_pipeline(FAMILY, model_path, dtype=torch_dtype)
place_pipeline(pipe, device, text_encoder_cpu_offload=text_encoder_cpu_offload)
print(f"{type(pipe).__name__} from {base}; comparison settings {gen}")

# %% [markdown]
# ## 2. Quantize with ModelOpt
#
# `quantize_pipeline` inserts FP8 quantizers into the transformer (per-tensor E4M3 weights and static inputs on
# every `nn.Linear`, except ModelOpt's sensitive FLUX layers: embedders, `norm_out`, `proj_out`), runs the whole
# pipeline over the calibration prompts to record each layer's input range (amax), and writes the ModelOpt state,
# the ModelOpt export and the converted SGLang checkpoint.
# CLI twin: `fp8cookbook quantize --family flux1 --output-dir DIR`.

# %%
result = quantize_pipeline(FAMILY, pipe, output_dir / "checkpoint", prompts=calibration_prompts,
                           num_prompts=num_calibration_prompts, num_inference_steps=calibration_steps, seed=seed,
                           height=height, width=width, guidance_scale=guidance_scale, overwrite=True,
                           quantize_mha=AttentionMode.parse(fp8_attention).quantize_mha,
                           progress=model_path is not None)
report.quantize(result)
print("\n".join(result.lines()))

# %% [markdown]
# ## 3. Convert to SGLang's FP8 format
#
# The converter turned the export into the folder SGLang loads: FP8 weights with float32 `weight_scale` and
# `input_scale` (amax / 448), and FLUX.1's BF16 fallback layers (AdaLN modulation and the double blocks'
# feed-forwards, which hurt FLUX.1 quality in FP8) copied from the original transformer and listed in `ignore`.
# With `keep_bf16` set, the export is converted again with those extra layers in BF16 (what to try when the
# comparison below misses a threshold).

# %%
for name, p in result.paths.items():
    if keep_bf16:
        result.convert_stats[name] = convert_checkpoint(p["export"], p["fp8"], state_file=p["state"],
                                                        base_transformer=p["base"], family=FAMILY,
                                                        keep_bf16=keep_bf16, overwrite=True, progress=False)
    stats = result.convert_stats[name]
    print(f"{name}: {p['export']} -> {p['fp8']}")
    print("\n".join("  " + line for line in stats.lines()))
    print("  kept in BF16 (ignore):", ", ".join(stats.ignore))
    print(f"  CLI twin: fp8cookbook convert {p['export']} {p['fp8']} --state-file {p['state']} "
          f"--base-transformer {p['base']}" + "".join(f" --keep-bf16 '{k}'" for k in keep_bf16) + " --overwrite")
report.convert(result.convert_stats)

# %% [markdown]
# ## 4. Inspect the checkpoint
#
# `inspect_checkpoint` reads only the headers and scales: dtypes, FP8 layer count, which modules `ignore` keeps in
# BF16, and scale ranges. "consistent" means SGLang and fp8cookbook's loader agree on every layer.
# CLI twin: `fp8cookbook inspect DIR` (exit status 1 when inconsistent).

# %%
for name, p in result.paths.items():
    info = inspect_checkpoint(p["fp8"])
    report.inspect(name, info)
    print("\n".join(info.lines()))

# %% [markdown]
# ## 5. Load the FP8 transformer, offload disabled
#
# Quantization left the pipeline's transformer holding export weights, so the BF16 pipeline is loaded again as the
# reference. The FP8 checkpoint is loaded into `FluxTransformer2DModel` with every non-ignored Linear an
# `FP8Linear`. It is asked for DiT CPU offload and layer-wise offload, as a serving config might: both are turned off,
# with the warning below, because offload rebuilds weights contiguously and loses the column-major FP8 weight view the
# FP8 GEMM needs. SGLang needs the same: `--dit-cpu-offload false --dit-layerwise-offload false`.
# Attention follows `fp8_attention`, with the Q/K/V scales the calibration wrote: "auto" runs it in FP8 where that
# pays (sequences of 16,384 tokens or more on a GPU: Wan2.2 video, not FLUX images, not the CPU), "on" everywhere,
# "off" nowhere. SGLang keeps attention in BF16 when it serves; compare below shows what FP8 attention changes.

# %%
del pipe
nb.release_memory()
pipe = load_pipeline(FAMILY, model_path, dtype=torch_dtype)
place_pipeline(pipe, device, text_encoder_cpu_offload=text_encoder_cpu_offload)
offload_idle = model_path is not None  # real models: the side not running waits on the CPU
fp8, load_reports, offload_warnings = nb.load_fp8_transformers(result.paths, device="cpu" if offload_idle else device,
                                                               dtype=torch_dtype, fp8_attention=fp8_attention)
report.load(load_reports, offload_warnings)
for message in offload_warnings:
    print("warning:", message)
for load_report in load_reports.values():
    print("\n".join(load_report.lines()))

# %% [markdown]
# ## 6. Compare the BF16 and FP8 trajectories
#
# Each prompt is denoised twice through the same pipeline object, with the same noise, scheduler and settings: once
# with the BF16 transformer, once with the FP8 one. The latents are compared after every step (cosine, relative L2,
# absolute errors) and the decoded images at the end (PSNR, SSIM); the thresholds from the parameters decide pass or
# fail. CLI twin: `fp8cookbook compare --family flux1 --candidate DIR --output-dir DIR`.

# %%
thresholds = Thresholds(min_cosine=min_cosine, min_step_cosine=min_step_cosine, max_rel_l2=max_rel_l2,
                        min_psnr=min_psnr, min_ssim=min_ssim)
comparisons = []
for i, prompt in enumerate(prompts):
    with nb.record_latents(pipe, gen["height"], gen["width"], steps=gen["steps"]) as latents:
        comparison = compare_trajectories(pipe, {}, fp8, family=FAMILY, prompt=prompt, seed=seed, **gen,
                                          progress=False, offload_idle=offload_idle)
    files = write_outputs(comparison, output_dir / "compare" / f"prompt{i}", thresholds)
    report.compare(comparison, thresholds, files)
    comparisons.append((comparison, latents))
    print(f"prompt {i}: {prompt!r}")
    print("\n".join(comparison.summary_lines()))
    print("\n".join(f"MISSED: {line}" for line in comparison.failures(thresholds)) or "all thresholds met")

# %%
comparison, latents = comparisons[0]
nb.show(plot_step_metrics(comparison, thresholds))
nb.show(plot_images(comparison))

# %% [markdown]
# Step by step: the slider (live in Jupyter) shows the BF16 and FP8 latents after any step and where they differ;
# the strip below is the static view of the same, which is what an executed notebook keeps.

# %%
strip = nb.step_viewer(*latents.pair(), comparison, save_to=output_dir / "compare" / "prompt0" / "steps.png")

# %% [markdown]
# ## 7. Time denoising
#
# BF16 and FP8 denoising loops in one process, same inputs, same compile setting: the pipeline's BF16 transformer
# first, then the FP8 checkpoint in its place; median of several loops after warm-up, and how many FP8 layers ran.
# CPU numbers of the tiny model say nothing about GPU speed: run with a real `model_path` on an H100/H200 for
# those. CLI twin: `fp8cookbook bench --family flux1 --model-path PIPELINE --fp8 DIR`.

# %%
del fp8, pipe
nb.release_memory()
if run_bench:
    bench_settings = benchmark.BenchSettings(family=FAMILY, model_path=base, fp8_path=str(result.output_dir / "fp8"),
                                             height=gen["height"], width=gen["width"], steps=gen["steps"],
                                             compile=compile, fp8_attention=fp8_attention,
                                             device=device)
    bench = benchmark.run_bench(bench_settings, output=output_dir / "bench.json")
    report.bench(bench, output_dir / "bench.json")
    print("\n".join(benchmark.summary_lines(bench)))
else:
    print("skipped (run_bench=False)")

# %% [markdown]
# ## 8. Results
#
# The table sums up every step; `report.json` in `output_dir` holds the same by name (settings, calibration,
# conversion, inspection, load, per-prompt metrics, timing, the serve command, `passed`), for scripts and tests.

# %%
serve = nb.sglang_command(FAMILY, base, report.data["checkpoint"], prompt=prompts[0],
                          height=gen["height"], width=gen["width"], steps=gen["steps"],
                          guidance_scale=gen["guidance_scale"], seed=seed, output_path=output_dir / "sglang")
report.serve(serve)
if model_path is None:
    report.note("the tiny pipeline has random weights: it shows the workflow, not FLUX.1 quality or speed; "
                "run `fp8cookbook run flux1 -p model_path black-forest-labs/FLUX.1-dev` on a GPU for the real model")
display(report.table())
print("wrote", report.write())

# %% [markdown]
# ## 9. Serve with SGLang
#
# The FP8 transformer folder goes to `--transformer-path`; everything else (text encoders, VAE, scheduler) comes
# from the BF16 base in `--model-path`. DiT offload stays off for FP8. Run it where SGLang is installed
# (`pip install 'fp8cookbook[sglang]'`, a CUDA GPU with FP8: Ada, Hopper or newer):

# %%
print(serve)
