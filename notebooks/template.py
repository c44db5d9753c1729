# The one source of notebooks/flux1.ipynb, flux2.ipynb and wan22.ipynb: edit this file, then run
# `python -m fp8cookbook.template` (the tests run it with --check). `{{name}}` is filled in per notebook; a line
# `#@ flux2 wan22` starts text only those notebooks get, `#@ end` ends it. The steps are in fp8cookbook/workflow.py.

# %% [markdown]
#@ flux1 flux2
# # {{title}} in FP8: quantize, check, time, serve
#
# This notebook takes {{title}}'s transformer from BF16 to an FP8 checkpoint that SGLang serves with
# `--transformer-path`, and shows on the way that the FP8 model still makes the same pictures: ModelOpt calibrates
# FP8 scales on the real pipeline, the export is converted into SGLang's format, the checkpoint is inspected and
# loaded with fp8cookbook's own FP8 layers, BF16 and FP8 denoise the same noise side by side, and both are timed.
#@ flux1
# By default it runs the tiny offline FLUX.1 pipeline (the real diffusers classes with random weights) on the CPU
# in about a minute; set `model_path` to run the real model on a GPU.
#@ flux2
# By default it runs the tiny offline FLUX.2 pipeline (the real diffusers classes with random weights, a tiny Mistral
# text encoder included) on the CPU in about a minute; set `model_path` to run the real model on a GPU. The real
# FLUX.2-dev is a 32B transformer beside a 24B text encoder: on one 80 GB GPU the text encoder waits on the CPU
# between prompts, and the BF16 and FP8 transformers take turns on the GPU.
#@ wan22
# # Wan2.2 in FP8: quantize both experts, check, time, serve
#
# This notebook takes Wan2.2's video transformers from BF16 to FP8 checkpoints that SGLang serves. Wan2.2 T2V-A14B
# (the default) denoises with two experts: `transformer` takes the high-noise steps (timestep at or above the
# boundary, 0.875 x 1000) and `transformer_2` the low-noise ones; both are calibrated in the same pipeline runs, each
# on its own steps, and both become FP8. Set `family = "wan22-ti2v-5b"` for the single-transformer TI2V-5B (it then
# writes to `outputs/wan22-ti2v-5b`, unless you set `output_dir`). By default the tiny offline pipeline (the real
# diffusers classes with random weights, 64x64, 5 frames) runs on the CPU in about a minute; set `model_path` to run
# the real model on a GPU.
#@ end
#
# Each step is one call of `fp8cookbook.workflow`, which prints what it did and its CLI twin (`SKILL.md` lists
# them for agents). Every parameter is checked before the first slow step, so a typo costs seconds, not a
# calibration.

# %%
from fp8cookbook import workflow

# %% tags=["parameters"]
#@ wan22
family = "wan22-a14b"  # "wan22-a14b" (T2V, two experts) or "wan22-ti2v-5b" (one transformer)
#@ end
model_path = None  # None: the tiny offline pipeline; or "{{hub_id}}" or a local diffusers folder
device = "auto"  # "auto": cuda when available, else cpu
dtype = "auto"  # "auto": bfloat16 on CUDA, float32 on CPU (CPU bfloat16 matmuls are ~10x slower)
prompts = [{{prompt}}]  # each is denoised by BF16 and by FP8 and compared
calibration_prompts = None  # None: the shipped prompts; or a list, or a file with one prompt per line
#@ flux1 flux2
num_calibration_prompts = None  # None: 4 (tiny) or 64 (real)
calibration_steps = None  # denoising steps per calibration prompt; None: 3 (tiny) or 20 (real)
height = None  # None: 64 (tiny) or 1024; a multiple of 16
width = None  # None: 64 (tiny) or 1024; a multiple of 16
#@ flux1
steps = None  # denoising steps compared and timed; None: 3 (tiny) or 28 (real)
guidance_scale = None  # None: 3.5
#@ flux2
steps = None  # denoising steps compared and timed; None: 3 (tiny) or 50 (real)
guidance_scale = None  # None: 4.0
#@ wan22
num_calibration_prompts = None  # None: 4 (tiny) or 16 (real)
calibration_steps = None  # steps per calibration prompt; None: 4 (tiny A14B), 3 (tiny 5B) or 20; A14B needs both sides
height = None  # None: 64 (tiny), 480 (A14B) or 704 (5B); a multiple of 16 (A14B) or 32 (5B)
width = None  # None: 64 (tiny), 832 (A14B) or 1280 (5B); a multiple of 16 (A14B) or 32 (5B)
num_frames = None  # 4k+1; None: 5 (tiny), 81 (A14B) or 121 (5B)
steps = None  # denoising steps compared and timed; None: 4 (tiny A14B), 3 (tiny 5B), 40 (A14B) or 50 (5B)
guidance_scale = None  # None: 4.0 (A14B) or 5.0 (5B)
#@ end
seed = 0  # noise seed of the comparison; calibration prompt i uses seed + i
min_cosine = {{min_cosine}}  # final latents: cosine(BF16, FP8) must be at least this
min_step_cosine = {{min_step_cosine}}  # the same, after every step
max_rel_l2 = {{max_rel_l2}}  # final latents: ||FP8 - BF16|| / ||BF16|| at most this
#@ flux1 flux2
min_psnr = {{min_psnr}}  # decoded image, dB
min_ssim = {{min_ssim}}  # decoded image
#@ wan22
min_psnr = {{min_psnr}}  # decoded frames (first, middle, all), dB
min_ssim = {{min_ssim}}  # decoded frames
#@ flux1
keep_bf16 = []  # extra module regexes kept in BF16 (re-converts the export), e.g. ["single_transformer_blocks\\.0\\."]
text_encoder_cpu_offload = False  # park the text encoders on the CPU between uses (saves GPU memory)
#@ flux2
keep_bf16 = []  # extra module regexes kept in BF16 (re-converts the export), e.g. ["single_transformer_blocks\\.0\\."]
text_encoder_cpu_offload = None  # park the text encoder on the CPU between uses; None: on for a real model
#@ wan22
keep_bf16 = []  # extra module regexes kept in BF16 (re-converts the exports), e.g. ["blocks\\.3\\.ffn"]
text_encoder_cpu_offload = None  # park the text encoder on the CPU between uses; None: on for a real model
output_dir = "{{output_dir}}"  # checkpoints, comparison, bench.json, report.json (another family: outputs/FAMILY)
#@ flux1 flux2
output_dir = "{{output_dir}}"  # checkpoint, comparison, bench.json and report.json
#@ end
run_bench = True  # time BF16 vs FP8 denoising (section 7)
compile = False  # torch.compile both sides of the benchmark
fp8_attention = "auto"  # "auto": FP8 attention for long sequences on a GPU (Wan2.2); "on": every call; "off"
run_id = None  # the id report.json gives this run's files; `fp8cookbook run` sets it, None: a new one

# %% [markdown]
# ## 1. Load the BF16 pipeline
#
# `workflow.start` checks every parameter above, picks the device and dtype, and removes what an earlier run left
# in `output_dir` (everything there afterwards is this run's). The pipeline comes from a local folder or hub id (or,
# with `model_path=None`, the tiny pipeline, built once and cached) and is placed on the device; text-encoder and
# VAE offload are fine at any time, DiT offload is not (section 5).

# %%
run = workflow.start("{{notebook}}", globals())
workflow.load_bf16(run)

# %% [markdown]
# ## 2. Quantize with ModelOpt
#
#@ flux1 flux2
# `quantize_pipeline` inserts FP8 quantizers into the transformer (per-tensor E4M3 weights and static inputs on
#@ flux1
# every `nn.Linear`, except ModelOpt's sensitive FLUX layers: embedders, `norm_out`, `proj_out`), runs the whole
# pipeline over the calibration prompts to record each layer's input range (amax), and writes the ModelOpt state,
# the ModelOpt export and the converted SGLang checkpoint.
#@ flux2
# every `nn.Linear`, except ModelOpt's sensitive FLUX layers: embedders, `norm_out`, `proj_out` and the shared
# `*_stream_modulation` linears), runs the whole pipeline over the calibration prompts to record each layer's input
# range (amax), and writes the ModelOpt state, the ModelOpt export and the converted SGLang checkpoint.
#@ wan22
# `quantize_pipeline` inserts FP8 quantizers into every transformer (per-tensor E4M3 weights and static inputs on
# every `nn.Linear`, except ModelOpt's sensitive Wan layers: the patch embedding, the condition embedders, `proj_out`
# and the first and last three blocks), runs the whole pipeline over the calibration prompts, and writes per expert
# the ModelOpt state, the ModelOpt export and the converted SGLang checkpoint. The forward calls below show that each
# A14B expert saw its own steps: an expert that never ran would stop the run, naming it.
#@ end
# With `fp8_attention` not "off" it also calibrates the attention Q/K/V inputs, for fp8cookbook's FP8 attention.

# %%
workflow.quantize(run)

# %% [markdown]
# ## 3. Convert to SGLang's FP8 format
#
#@ flux1 flux2
# The converter turned the export into the folder SGLang loads: FP8 weights with float32 `weight_scale` and
#@ flux1
# `input_scale` (amax / 448), and FLUX.1's BF16 fallback layers (AdaLN modulation and the double blocks'
# feed-forwards, which hurt FLUX.1 quality in FP8) copied from the original transformer and listed in `ignore`.
#@ flux2
# `input_scale` (amax / 448), and FLUX.2's BF16 fallback layers (the timestep/guidance embedders, the modulation
# linears every block shares, `x_embedder`, `context_embedder` and `norm_out`: SGLang's validated profile) copied
# from the original transformer and listed in `ignore`.
#@ flux1 flux2
# With `keep_bf16` set, the export is converted again with those extra layers in BF16 (what to try when the
# comparison below misses a threshold).
#@ wan22
# The converter turned each export into the folder SGLang loads: FP8 weights with float32 `weight_scale` and
# `input_scale` (amax / 448), and the layers calibration left alone listed in `ignore` (Wan has no extra BF16
# fallback profile: ModelOpt's filter already keeps its sensitive layers in BF16). With `keep_bf16` set, the exports
# are converted again with those extra layers in BF16 (what to try when the comparison below misses a threshold).
#@ end

# %%
workflow.convert(run)

# %% [markdown]
# ## 4. Inspect the checkpoint
#
# `inspect_checkpoint` reads only the headers and scales: dtypes, FP8 layer count, which modules `ignore` keeps in
# BF16, and scale ranges. "consistent" means SGLang and fp8cookbook's loader agree on every layer; the CLI twin
# exits 1 when a checkpoint is not.

# %%
workflow.inspect(run)

# %% [markdown]
# ## 5. Load the FP8 transformer, offload disabled
#
#@ flux1 flux2
# Quantization used up the pipeline's transformer (quantized in place: no second copy waits in host memory), so the
# BF16 pipeline is loaded again as the reference. The FP8 checkpoint is loaded into `{{class_name}}` with every non-ignored Linear an
# `FP8Linear`. It is asked for DiT CPU offload and layer-wise offload, as a serving config might: both are turned off,
# with the warning below, because offload rebuilds weights contiguously and loses the column-major FP8 weight view the
# FP8 GEMM needs.
#@ wan22
# Quantization used up the pipeline's transformers (quantized in place: no second copy waits in host memory), so the
# BF16 pipeline is loaded again as the reference. Each FP8 checkpoint is loaded into `{{class_name}}` with every non-ignored Linear an
# `FP8Linear`. The loader is asked for DiT CPU offload and layer-wise offload, as a serving config might (SGLang may
# even turn layer-wise offload on by itself for Wan): both are turned off, with the warnings below, because offload
# rebuilds weights contiguously and loses the column-major FP8 weight view the FP8 GEMM needs.
#@ end
# SGLang needs the same: `--dit-cpu-offload false --dit-layerwise-offload false`.
# Attention follows `fp8_attention`, with the Q/K/V scales the calibration wrote: "auto" runs it in FP8 where that
# pays (sequences of 16,384 tokens or more on a GPU: Wan2.2 video, not FLUX images, not the CPU), "on" everywhere,
# "off" nowhere. SGLang keeps attention in BF16 when it serves; compare below shows what FP8 attention changes.

# %%
workflow.load_fp8(run)

# %% [markdown]
# ## 6. Compare the BF16 and FP8 trajectories
#
# Each prompt is denoised twice through the same pipeline object, with the same noise, scheduler and settings: once
#@ flux1 flux2
# with the BF16 transformer, once with the FP8 one. The latents are compared after every step (cosine, relative L2,
# absolute errors) and the decoded images at the end (PSNR, SSIM); the thresholds from the parameters decide pass or
# fail.
#@ wan22
# with the BF16 experts, once with the FP8 ones. The latents are compared after every step (the expert column shows
# the A14B handover) and the decoded frames at the end (first, middle, all: PSNR, SSIM); the thresholds from the
# parameters decide pass or fail.
#@ end
# The CLI twin uses the same defaults (dtype rule, prompt, thresholds, sizes), so it gives the same numbers.

# %%
workflow.compare(run)

# %%
workflow.figures(run)

# %% [markdown]
#@ flux1 flux2
# Step by step: the slider (live in Jupyter) shows the BF16 and FP8 latents after any step and where they differ;
# the strip below is the static view of the same, which is what an executed notebook keeps.
#@ wan22
# Step by step: the slider (live in Jupyter) shows the BF16 and FP8 latents of the middle latent frame after any
# step and where they differ; the strip below is the static view of the same, which is what an executed notebook
# keeps.
#@ end

# %%
strip = workflow.step_viewer(run)

# %% [markdown]
# ## 7. Time denoising
#
#@ flux1 flux2
# BF16 and FP8 denoising loops in one process, same inputs, same compile setting: the pipeline's BF16 transformer
# first, then the FP8 checkpoint in its place; median of several loops after warm-up, and how many FP8 layers ran.
#@ wan22
# BF16 and FP8 denoising loops in one process, same inputs, same compile setting: the pipeline's BF16 experts first,
# then the FP8 checkpoints in their place; median of several loops after warm-up, and how many FP8 layers ran. Wan2.2
# runs two forwards per step (classifier-free guidance).
#@ end
# CPU numbers of the tiny model say nothing about GPU speed: run with a real `model_path` on an H100/H200 for
# those.

# %%
workflow.bench(run)

# %% [markdown]
# ## 8. Results
#
# The table sums up every step; `report.json` in `output_dir` holds the same by name (settings, calibration,
# conversion, inspection, load, per-prompt metrics, timing, the serve command, `passed`), for scripts and tests,
# and lists every file of `output_dir` with the id of the run that wrote it.

# %%
workflow.results(run)

# %% [markdown]
# ## 9. Serve with SGLang
#
#@ flux1 flux2
# The FP8 transformer folder goes to `--transformer-path`; everything else (text encoders, VAE, scheduler) comes
#@ flux1
# from the BF16 base in `--model-path`. DiT offload stays off for FP8. Run it where SGLang is installed
# (`pip install 'fp8cookbook[sglang]'`, a CUDA GPU with FP8: Ada, Hopper or newer):
#@ flux2
# from the BF16 base in `--model-path`. DiT offload stays off for FP8; text-encoder and VAE offload are on, as in
# SGLang's own FLUX.2 FP8 example, so that the 24B text encoder and the FP8 transformer fit one 80 GB GPU. Run it
# where SGLang is installed (`pip install 'fp8cookbook[sglang]'`, a CUDA GPU with FP8: Ada, Hopper or newer):
#@ wan22
# The FP8 expert folders go to `--transformer-path` and, for A14B, `--transformer-2-path`; everything else (text
# encoder, VAE, scheduler) comes from the BF16 base in `--model-path`. A14B runs on 4 GPUs with Ulysses sequence
# parallelism (`--num-gpus 4 --ulysses-degree 4`), its text encoder parked on the CPU. DiT offload stays off for FP8.
# Run it where SGLang is installed (`pip install 'fp8cookbook[sglang]'`, CUDA GPUs with FP8: Ada, Hopper or newer):
#@ end
#
# Quantize also wrote `checkpoint/repo`: a complete diffusers repo in the form NVIDIA publishes its FP8 models (the
# FP8 transformers in their component folders, the other components symbolic links to the base), which
# `sglang generate --model-path` serves alone and `fp8cookbook.load_pipeline(...)` loads as one FP8 pipeline.

# %%
serve = run.serve
print(serve)
print("\n# or the full repo alone, no --transformer-path:")
print(run.serve_repo)
