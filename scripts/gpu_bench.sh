#!/usr/bin/env bash
# GPU benchmark runs behind docs/benchmarks.md, one phase per device call (each fits in 10 minutes).
#
#   bash scripts/gpu_bench.sh PHASE [OUT]      PHASE: check | flux1 | flux2 | wan | graphs | attention | wan-attention | flux-attention | torchao | torchao-flux2
#
# Needs: python3 with CUDA torch and Triton; diffusers (and importlib_metadata) as wheels in .whl/ when the machine
# lacks them. Writes logs and JSON reports to OUT (default: $OUT, else ./outputs/bench).
set -uo pipefail
cd "$(dirname "$0")/.."
phase="${1:?phase: check | flux1 | flux2 | wan | graphs | attention | wan-attention | flux-attention | torchao | torchao-flux2}"
out="${2:-${OUT:-outputs/bench}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [[ "$phase" == torchao* ]] && ! python3 -c "import torchao" 2>/dev/null; then  # the [torchao] extra, from .whl/
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/torchao-*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
bench="python3 -m fp8cookbook.cli bench --synthetic full --verbose"
log="$out/$phase.log"
{
  nvidia-smi -L
  python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'diffusers', diffusers.__version__)"
  case "$phase" in
    check)
      timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fp8_linear.py tests/test_bench.py
      timeout 60 python3 scripts/gemm_levers.py --output "$out/gemm-levers.json"
      ;;
    flux1)
      timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fp8_linear.py tests/test_bench.py
      timeout 60 python3 scripts/gemm_levers.py --output "$out/gemm-levers.json"
      timeout 150 $bench --family flux1 --steps 10 --levers --cuda-graphs --output "$out/flux1-eager.json"
      timeout 220 $bench --family flux1 --steps 10 --compile --levers --output "$out/flux1-compiled.json"
      ;;
    flux2)
      timeout 60 python3 scripts/gemm_levers.py --output "$out/gemm-levers.json"
      timeout 170 $bench --family flux2 --steps 8 --levers --cuda-graphs --output "$out/flux2-eager.json"
      timeout 170 $bench --family flux2 --steps 8 --compile --levers --output "$out/flux2-compiled.json"
      timeout 60 python3 scripts/profile_step.py --family flux1 --output "$out/profile-flux1.json"
      timeout 70 $bench --family flux1 --steps 10 --compile --attention-backend _native_cudnn --output "$out/flux1-compiled-cudnn.json"
      timeout 60 $bench --family flux1 --steps 10 --compile --include-fallback --output "$out/flux1-compiled-allfp8.json"
      ;;
    wan)
      timeout 300 $bench --family wan22 --steps 2 --runs 2 --levers --fp8-attention off --output "$out/wan22-a14b-eager.json"
      timeout 260 $bench --family wan22 --steps 2 --runs 2 --compile --fp8-attention off --output "$out/wan22-a14b-compiled.json"
      ;;
    graphs)
      timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fp8_linear.py tests/test_bench.py
      timeout 200 $bench --family flux1 --steps 10 --compile --levers --cuda-graphs --output "$out/flux1-compiled-graphs.json"
      timeout 200 $bench --family flux2 --steps 8 --compile --cuda-graphs --output "$out/flux2-compiled-graphs.json"
      ;;
    attention)  # FP8 attention: kernel tests, per-call timing, FLUX with --fp8-attention
      timeout 150 python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/test_fp8_attention.py
      timeout 90 python3 scripts/attention_bench.py --output "$out/attention.json"
      timeout 90 $bench --family flux1 --steps 10 --fp8-attention on --output "$out/flux1-eager-attn.json"
      ;;
    wan-attention)  # Wan2.2 A14B, eager and compiled, FP8 attention in the default auto mode (self-attention only)
      timeout 235 $bench --family wan22 --steps 2 --runs 2 --output "$out/wan22-a14b-eager-attn.json"
      timeout 330 $bench --family wan22 --steps 2 --runs 2 --compile --output "$out/wan22-a14b-compiled-attn.json"
      ;;
    flux-attention)  # FLUX with FP8 attention on for every call (auto leaves FLUX's 4,608-token attention BF16)
      timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fp8_attention.py
      timeout 130 $bench --family flux1 --steps 10 --compile --fp8-attention on --output "$out/flux1-compiled-attn.json"
      timeout 170 $bench --family flux2 --steps 8 --compile --fp8-attention on --output "$out/flux2-compiled-attn.json"
      timeout 100 $bench --family flux2 --steps 8 --fp8-attention on --output "$out/flux2-eager-attn.json"
      ;;
    torchao)  # issue 13: torchao's float8 (dynamic activations; per-row and per-tensor weights) on our FP8 layers, FLUX.1
      python3 -c "import torchao; print('torchao', torchao.__version__)"
      timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_bench_peers.py
      timeout 150 $bench --family flux1 --steps 4 --runs 3 --peer torchao-rowwise,torchao-tensorwise --output "$out/flux1-eager-torchao.json"
      timeout 300 $bench --family flux1 --steps 4 --runs 3 --compile --peer torchao-rowwise,torchao-tensorwise --output "$out/flux1-compiled-torchao.json"
      ;;
    torchao-flux2)  # the same for FLUX.2
      python3 -c "import torchao; print('torchao', torchao.__version__)"
      timeout 200 $bench --family flux2 --steps 2 --runs 2 --peer torchao-rowwise,torchao-tensorwise --output "$out/flux2-eager-torchao.json"
      timeout 380 $bench --family flux2 --steps 2 --runs 2 --compile --peer torchao-rowwise,torchao-tensorwise --output "$out/flux2-compiled-torchao.json"
      ;;
    *) echo "unknown phase $phase"; exit 2 ;;
  esac
} 2>&1 | tee "$log"
