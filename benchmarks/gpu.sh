#!/usr/bin/env bash
# One GPU session's measurements, in under 8 minutes on a bare H100/H200 machine; everything lands in $OUT
# (or ./gpu-out). Stages (STAGES="suite bench pretrain" by default, each with its own time limit):
#   suite     the whole test suite on CUDA, timed (issue: the suite passes where users are)
#   bench     `maecli bench` ViT-B/16, batch 256, eager and compiled: MFU against the spec peak, MAE vs mask tokens
#   pretrain  `maecli pretrain` ViT-B/16 at 224, norm-pix, batch 256, compiled, on a synthetic store: images/s and MFU
#
# Prepare here, once:  bash benchmarks/gpu_wheels.sh        (the image has no PyAV and no pydantic)
# Then, with the device tool:  run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=540)
# Without CUDA it runs every stage at a tiny size, to check the script itself.
set -uo pipefail
out=${OUT:-gpu-out}
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
if [ "$gpu" = 1 ]; then
  size=(--model vit_base --patch 16 --img 224); batch=256; steps=300; store=224
else
  size=(--model vit_tiny --patch 16 --img 64 --set model.depth=2); batch=8; steps=6; store=64
fi

for stage in ${STAGES:-suite bench pretrain}; do
  start=$(date +%s)
  case $stage in
  suite)
    timeout 180 python3 -m pytest -q -p no:cacheprovider --durations=10 2>&1 | tail -25 > "$out/suite.txt" ;;
  bench)
    for mode in --no-compile --compile; do
      limit=$([ $mode = --compile ] && echo 120 || echo 60)
      timeout $limit python3 -m maecli bench "${size[@]}" --batch $batch --steps 10 --warmup 3 $mode --json > "$out/bench$mode.json" 2> "$out/bench$mode.err"
    done ;;
  pretrain)
    p=/tmp/gpu-pretrain; rm -rf $p; mkdir -p $p
    python3 -c "from pathlib import Path; from maecli.synthetic import generate_clips; generate_clips(Path('$p/videos'), count=6, seconds=8.0, fps=10, size=($store, $((store * 16 / 9 / 2 * 2))))"
    printf '[project]\ndevice = "auto"\n[model]\npreset = "%s"\nimg_size = %s\npatch_size = 16\nnorm_pix_loss = true\n[extract]\ninputs = ["videos"]\nsize = %s\nfps = 10\ndedup = 0\n[pretrain]\nbatch_size = %s\nsteps = %s\nwarmup_steps = 10\ncheckpoint_every = 100000\nlog_every = 20\n' \
      "${size[1]}" $store $store $batch $steps > $p/maecli.toml
    python3 -m maecli extract -c $p > /dev/null 2>&1
    timeout 150 python3 -m maecli pretrain -c $p --json > "$out/pretrain.json" 2> "$out/pretrain.err"
    cp $p/runs/pretrain/metrics.jsonl "$out/pretrain-metrics.jsonl" 2>/dev/null ;;
  esac
  echo "$stage: $(( $(date +%s) - start )) s" | tee -a "$out/stages.txt"
done

python3 - "$out" <<'PY' | tee "$out/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
if (out / "suite.txt").exists():
    print("suite:", (out / "suite.txt").read_text().strip().splitlines()[-1])
for mode in ("--no-compile", "--compile"):
    f = out / f"bench{mode}.json"
    if f.exists() and f.stat().st_size:
        r = json.loads(f.read_text())
        print(f"bench {'compiled' if r['compiled'] else 'eager'} ({r['peak_source']}):")
        for name, v in r["variants"].items():
            mfu = f"{100 * v['mfu']:.1f}%" if v["mfu"] is not None else "unknown"
            print(f"  {name:<24} {v['images_per_s']:>9.1f} img/s  {v['achieved_gflops'] / 1000:>7.1f} TFLOP/s  MFU {mfu}  ({100 * v['of_matmul']:.0f}% of matmul)")
        for name, s in r["speedups"].items():
            print(f"  {name}: {s['measured']:.2f}x (analytic {s['analytic']:.2f}x, {s['measured'] / s['analytic']:.2f} of it)")
f = out / "pretrain-metrics.jsonl"
if f.exists():
    import torch
    from maecli.bench import device_peak
    from maecli.methods import analytic_flops
    from maecli.config import load_config
    cfg = load_config(Path("/tmp/gpu-pretrain"))
    rows = [json.loads(line) for line in f.read_text().splitlines()]
    steady = rows[len(rows) // 2:]  # after the compile and warm-up
    ips = sum(r["images_per_s"] for r in steady) / len(steady)
    flops = analytic_flops(cfg.model.mae_kwargs, cfg.model.mask_ratio) * ips
    peak, source = device_peak(torch.device("cuda" if torch.cuda.is_available() else "cpu"), None)
    mfu = f"MFU {100 * flops / peak:.1f}%" if peak else "MFU unknown"
    print(f"pretrain: {ips:,.0f} img/s over steps {steady[0]['step']}-{steady[-1]['step']}, {flops / 1e12:.2f} TFLOP/s, {mfu} ({source}), "
          f"data wait {100 * sum(r['data_wait'] for r in steady) / len(steady):.2f}%, peak memory {steady[-1]['peak_mem_mib']:,.0f} MiB")
PY
