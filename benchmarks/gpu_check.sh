#!/usr/bin/env bash
# One GPU session's checks, in under 8 minutes on a bare H100/H200 machine: the whole test suite on CUDA (timed),
# then `maecli bench` at ViT-B/16 (batch 256). Everything lands in $OUT (or ./gpu-check).
#
# Prepare here, once:  bash benchmarks/gpu_wheels.sh        (the image has no PyAV and no pydantic)
# Then, with the device tool:  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Without CUDA it runs the same steps at a tiny size, to check the script itself.
set -uo pipefail
out=${OUT:-gpu-check}
mkdir -p "$out"
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
gpu=$(python3 -c 'import torch; print(int(torch.cuda.is_available()))')
{ [ "$gpu" = 1 ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import sys, torch, timm, av, pydantic; print("python", sys.version.split()[0], "torch", torch.__version__, "timm", timm.__version__, "av", av.__version__, "pydantic", pydantic.__version__)'
} | tee "$out/versions.txt"

start=$(date +%s)
timeout 330 python3 -m pytest -q -p no:cacheprovider --durations=10 2>&1 | tee "$out/pytest.txt"
echo "suite: $(( $(date +%s) - start )) s wall" | tee -a "$out/pytest.txt"

if [ "$gpu" = 1 ]; then size=(--model vit_base --patch 16 --img 224 --batch 256); else size=(--model vit_tiny --patch 16 --img 64 --batch 8); fi
timeout 120 python3 -m maecli bench "${size[@]}" --steps 10 --warmup 3 2>&1 | tee "$out/bench.txt"
