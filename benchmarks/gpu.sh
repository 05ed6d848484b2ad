#!/usr/bin/env bash
# One GPU session's measurements, on a bare H100/H200 machine, inside one deadline (BUDGET_S, default 460 s from
# the start; each stage gets what is left, up to its own limit, and is skipped when too little is left). In order:
#   bench     `maecli bench` ViT-B/16, batch 256, compiled as pretrain compiles it: MFU against the spec peak, MAE vs
#             mask tokens vs SimCLR, and a torch.profiler trace + top kernels of each variant (where the time goes)
#   pretrain  `maecli pretrain` ViT-B/16 at 224, norm-pix, batch 256, compiled, on a synthetic store: images/s, MFU
#   batch     the same run at batch 512 (the cheapest candidate: 13.6 GB of 141 are used at 256)
#   suite     the whole test suite on CUDA (pytest-xdist when the image has it)
#   sweep     the other candidates, one pretrain run each while time is left: CUDA graphs (reduce-overhead),
#             max-autotune-no-cudagraphs
# STAGES="bench pretrain" runs a subset. Everything lands in $OUT (or ./gpu-out) as three files, within the device
# tool's limit of 8: summary.txt (also printed), results.tgz (every JSON, log and metrics file, the top-kernel
# tables) and traces.tgz (the Chrome/Perfetto traces).
#
# Prepare here, once:  bash benchmarks/gpu_wheels.sh        (the image has no PyAV and no pydantic)
# Then, with the device tool:  run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=500)
# Without CUDA it runs every stage at a tiny size, to check the script itself.
set -uo pipefail
t0=$(date +%s)
deadline=$((t0 + ${BUDGET_S:-460}))
out=${OUT:-gpu-out}
w=/tmp/gpu-work
rm -rf "$w" && mkdir -p "$out" "$w"
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
gpu=$(python3 -c 'import torch; print(int(torch.cuda.is_available()))')
{ [ "$gpu" = 1 ] && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c 'import sys, torch, timm, av, pydantic; print("python", sys.version.split()[0], "torch", torch.__version__, "timm", timm.__version__, "av", av.__version__, "pydantic", pydantic.__version__)'
} > "$w/versions.txt" 2>&1
if [ "$gpu" = 1 ]; then
  size=(--model vit_base --patch 16 --img 224); model=vit_base; batch=256; steps=300; store=224
else
  size=(--model vit_tiny --patch 16 --img 64 --set model.depth=2); model=vit_tiny; batch=8; steps=6; store=64
fi

left() { echo $((deadline - $(date +%s))); }
limit() { local l; l=$(left); [ "$l" -lt 1 ] && l=1; [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }  # the stage's limit, or what is left

store_ready=0
make_store() {  # a synthetic store of 640 frames at the model's size (16:9 clips), all in train (batch 512 needs 512), made once
  [ $store_ready = 1 ] && return
  mkdir -p $w/p
  python3 -c "from pathlib import Path; from maecli.synthetic import generate_clips; generate_clips(Path('$w/p/videos'), count=8, seconds=8.0, fps=10, size=($store, $((store * 16 / 9 / 2 * 2))))"
  printf '[project]\ndevice = "auto"\n[model]\npreset = "%s"\nimg_size = %s\npatch_size = 16\nnorm_pix_loss = true\n%b[extract]\ninputs = ["videos"]\nsize = %s\nfps = 10\ndedup = 0\nval_fraction = 0\n' \
    $model $store "$([ "$gpu" = 1 ] || echo 'depth = 2\n')" $store > $w/p/maecli.toml
  python3 -m maecli extract -c $w/p > $w/extract.log 2>&1 && store_ready=1
}

run_pretrain() {  # tag batch steps compile_mode [limit]: one pretrain run, its summary and metrics kept as pretrain-<tag>.*
  local tag=$1 b=$2 n=$3 mode=$4 lim
  lim=$(limit "${5:-150}")
  make_store
  timeout "$lim" python3 -m maecli pretrain -c $w/p --restart --json --set pretrain.run=$tag --set pretrain.batch_size=$b \
    --set pretrain.steps=$n --set pretrain.warmup_steps=10 --set pretrain.checkpoint_every=100000 --set pretrain.log_every=$((n >= 30 ? n / 15 : 1)) \
    --set pretrain.compile=true --set pretrain.compile_mode=$mode > $w/pretrain-$tag.json 2> $w/pretrain-$tag.err
  echo "exit $? (limit ${lim} s)" >> $w/pretrain-$tag.err
  cp $w/p/runs/$tag/metrics.jsonl $w/pretrain-$tag.jsonl 2>/dev/null
}

for stage in ${STAGES:-bench pretrain batch suite sweep}; do
  start=$(date +%s)
  case $stage in
  bench)
    timeout "$(limit 240)" python3 -m maecli bench "${size[@]}" --batch $batch --steps 10 --warmup 3 --compile --profile $w/profile --json \
      > $w/bench.json 2> $w/bench.err ;;
  pretrain)
    run_pretrain b$batch $batch $steps default ;;
  batch)
    [ "$(left)" -gt 90 ] && run_pretrain b$((2 * batch)) $((2 * batch)) $((steps / 2)) default ;;
  suite)
    [ "$(left)" -lt 30 ] && { echo "skipped: $(left) s left" > $w/suite.txt; continue; }
    lim=$(limit 150)
    xdist=$(python3 -c 'import xdist' 2>/dev/null && echo "-n 8")  # 8 workers of 2 threads: more threads than cores slows every one
    OMP_NUM_THREADS=2 timeout "$lim" python3 -m pytest -v -p no:cacheprovider $xdist --durations=15 > $w/suite.txt 2>&1  # -v: a failure is named even if cut
    echo "exit $? (limit ${lim} s${xdist:+, $xdist})" >> $w/suite.txt ;;
  sweep)  # each while ~100 s are left
    [ "$(left)" -gt 100 ] && run_pretrain b$batch-graphs $batch $steps reduce-overhead
    [ "$(left)" -gt 150 ] && run_pretrain b$batch-autotune $batch $steps max-autotune-no-cudagraphs 200 ;;
  esac
  echo "$stage: $(( $(date +%s) - start )) s" >> $w/stages.txt
done

python3 - "$w" <<'PY' > "$out/summary.txt" 2>&1
import json, sys
from pathlib import Path

import torch

from maecli.bench import device_peak
from maecli.config import load_config
from maecli.methods.mae import analytic_flops

w = Path(sys.argv[1])
print((w / "versions.txt").read_text().strip())
print("stages:", ", ".join((w / "stages.txt").read_text().split("\n")).strip(", "))
if (w / "suite.txt").exists():
    lines = (w / "suite.txt").read_text().strip().splitlines()
    failed = sorted({line.split("FAILED", 1)[1].strip().split(" ")[0] for line in lines if "FAILED" in line})
    print("suite:", " | ".join(lines[-2:]) + (f"; failed: {', '.join(failed)}" if failed else ""))
f = w / "bench.json"
if f.exists() and f.stat().st_size:
    r = json.loads(f.read_text())
    print(f"bench, batch {r['batch']}, {'compiled (' + r['compile_mode'] + ')' if r['compiled'] else 'eager'}; MFU against {r['peak_source']}:")
    for name, v in r["variants"].items():
        mfu = f"{100 * v['mfu']:.1f}%" if v["mfu"] is not None else "unknown"
        print(f"  {name:<24} {v['step_s_median'] * 1000:>7.1f} ms {v['images_per_s']:>9.1f} img/s {v['achieved_gflops'] / 1000:>7.1f} TFLOP/s  MFU {mfu:>6}"
              f"  ({100 * v['of_matmul']:.0f}% of matmul)  {v['peak_mem_mib'] or 0:,.0f} MiB")
    for name, s in r["speedups"].items():
        print(f"  {name}: {s['measured']:.2f}x (analytic {s['analytic']:.2f}x, {s['measured'] / s['analytic']:.2f} of it)")
elif (w / "bench.err").exists():
    print("bench failed:", " | ".join((w / "bench.err").read_text().strip().splitlines()[-3:]))
cfg = load_config(w / "p" / "maecli.toml") if (w / "p" / "maecli.toml").exists() else None
peak, source = device_peak(torch.device("cuda" if torch.cuda.is_available() else "cpu"), None)
for f in sorted(w.glob("pretrain-*.err"), key=lambda p: p.stat().st_mtime):
    tag = f.name.removeprefix("pretrain-").removesuffix(".err")
    metrics, summary = w / f"pretrain-{tag}.jsonl", w / f"pretrain-{tag}.json"
    if not metrics.exists() or not summary.stat().st_size:
        print(f"pretrain {tag}: failed:", " | ".join(f.read_text().strip().splitlines()[-3:]))
        continue
    s = json.loads(summary.read_text())
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    steady = rows[len(rows) // 2:]  # after the compile and warm-up
    ips = sum(r["images_per_s"] for r in steady) / len(steady)
    flops = analytic_flops(cfg.model.mae_kwargs, cfg.model.mask_ratio) * ips
    mfu = f"MFU {100 * flops / peak:.1f}%" if peak else "MFU unknown"
    print(f"pretrain {tag} (batch {s['effective_batch']}, {s['compile_mode'] or 'eager'}): {ips:,.0f} img/s over steps {steady[0]['step']}-{steady[-1]['step']}, "
          f"{flops / 1e12:.2f} TFLOP/s, {mfu}, data wait {100 * sum(r['data_wait'] for r in steady) / len(steady):.2f}%, "
          f"peak {steady[-1]['peak_mem_mib']:,.0f} MiB, run {s['seconds']:.0f} s, loss {s['final_loss']:.4f}")
ops = w / "profile" / "ops-mae.txt"
if ops.exists():
    print("top operators of the MAE step (3 steps, torch.profiler):")
    print("\n".join(line[:220] for line in ops.read_text().splitlines()[:22]))
PY
cat "$out/summary.txt"
tar czf "$out/results.tgz" -C "$w" --exclude='p' --exclude='trace-*.json' . 2>/dev/null
ls $w/profile/trace-*.json > /dev/null 2>&1 && tar czf "$out/traces.tgz" -C "$w/profile" $(cd $w/profile && ls trace-*.json)
echo "total: $(( $(date +%s) - t0 )) s"
