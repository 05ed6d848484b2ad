#!/usr/bin/env bash
# One GPU session's checks and measurements, on a bare H100/H200 machine, inside one deadline (BUDGET_S, default 450 s
# from the start): each stage gets what is left, up to its own limit, and is skipped when too little is left.
#
# It cannot come back empty. $OUT/summary.txt gets a line when a stage starts and its result line the moment it ends;
# each stage streams its output to $OUT/<stage>.log as it runs. A stage past its limit, or the script stopped by a
# signal, says "cut at N s" with its log's last lines; a script killed outright (SIGKILL) leaves the "started" line of
# the stage it was in. Every `timeout` has -k. At most 8 files come back: summary.txt, the stages' logs, results.tgz.
#
#   suite       the test suite on CUDA, -v -rf (every failure named, even when cut), its own short limit
#   tiny        `maecli pretrain` of the CamVid recipe's ViT-Tiny x 6 (96x128, patch 8, batch 128), eager, then with
#               compile = auto: on CUDA, CUDA graphs (reduce-overhead) for a step this small
#   stop        a compiled ViT-B/16 pretrain stopped by SIGTERM during its compile: seconds to exit, exit code, last line
#   vitb        `maecli pretrain` ViT-B/16 at 224, batch 256, compile = auto (the blocks, default mode): the first step
#               (the compile) and images/s, MFU
#   compile     benchmarks/compile.py: ViT-B/16's cold start, whole model vs blocks (cut at 120 s a cell)
#   bench       `maecli bench` ViT-B/16 (MAE vs its baselines, compiled); PROFILE=1 adds a trace of the MAE step
# STAGES="suite tiny" runs a subset. Without CUDA every stage runs at a tiny size: that is how the script is
# tested (tests/test_gpu_script.py kills it at a random moment and reads the summary).
#
# Prepare here, once:  bash benchmarks/gpu_wheels.sh        (the image has no PyAV and no pydantic)
# Then, with the device tool:  run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=500)
set -uo pipefail
t0=$(date +%s)
deadline=$((t0 + ${BUDGET_S:-450}))
out=${OUT:-gpu-out}
w=${WORK:-/tmp/gpu-work}
rm -rf "$w" && mkdir -p "$out" "$w"
summary=$out/summary.txt
: > "$summary"
say() { echo "$*" | tee -a "$summary"; }
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ -d .whl ] && ! python3 -c "import av, pydantic" 2>/dev/null; then  # not under /tmp: the suite's full-disk tests mount their own tmpfs in a namespace of their own
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$PWD/.site" .whl/*.whl || exit 1
  export PYTHONPATH=$PWD/.site:$PWD
fi
gpu=$(python3 -c 'import torch; print(int(torch.cuda.is_available()))')
say "$( { [ "$gpu" = 1 ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import sys, torch, timm, av, pydantic; print("python", sys.version.split()[0], "torch", torch.__version__, "timm", timm.__version__, "av", av.__version__, "pydantic", pydantic.__version__)'
} 2>&1 | tr '\n' ';')"
if [ "$gpu" = 1 ] && [ -z "${TINY:-}" ]; then  # TINY=1: the CPU's sizes anywhere (the script's own test, in a CUDA suite too)
  tiny='preset = "vit_tiny"\ndepth = 6\nimg_size = [96, 128]\npatch_size = 8\ndecoder_embed_dim = 128\ndecoder_depth = 2\ndecoder_num_heads = 4\n'
  big='preset = "vit_base"\nimg_size = 224\npatch_size = 16\nnorm_pix_loss = true\n'
  tiny_size=[96,128]; big_size=224; tiny_batch=128; big_batch=256; tiny_steps=300; big_steps=200; stop_after=5
  sizes=(--sizes vit_b --batch 256 --limit 120 --no-cached); bench=(--model vit_base --patch 16 --img 224 --batch 256 --compile)
else
  tiny='preset = "vit_tiny"\nembed_dim = 32\ndepth = 2\nnum_heads = 2\nimg_size = 32\npatch_size = 8\ndecoder_embed_dim = 16\ndecoder_depth = 1\ndecoder_num_heads = 2\n'
  big=$tiny
  tiny_size=32; big_size=32; tiny_batch=8; big_batch=8; tiny_steps=20; big_steps=10; stop_after=1
  sizes=(--sizes tiny6 --batch 2 --steps 2 --limit 60 --no-cached); bench=(--model vit_tiny --patch 8 --img 32 --batch 4 --set model.depth=1 --set model.decoder_depth=1)
fi

left() { echo $((deadline - $(date +%s))); }
limit() { local l; l=$(left); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }  # the stage's limit, or what is left

project() {  # folder model size: a synthetic store of 8 clips x 8 s at 10 fps (640 frames), all in train
  mkdir -p "$1"
  python3 -c "from pathlib import Path; from maecli.synthetic import generate_clips; generate_clips(Path('$1/videos'), count=8, seconds=8.0, fps=10, size=(144, 256))"
  printf '[project]\ndevice = "auto"\n[model]\n%b[extract]\ninputs = ["videos"]\nsize = %s\nfps = 10\ndedup = 0\nval_fraction = 0\n[pretrain]\nwarmup_steps = 10\ncheckpoint_every = 100000\n' \
    "$2" "$3" > "$1/maecli.toml"
  python3 -m maecli extract -c "$1" > "$1/extract.log" 2>&1
}

summarize() {  # stage exit seconds limit: the stage's result line, from its log and the files it wrote
  python3 - "$w" "$out" "$@" <<'PY' 2>&1 | tail -1
import json, re, sys
from pathlib import Path

w, out, stage, code, seconds, limit = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
log = (out / f"{stage}.log").read_text(errors="replace").splitlines() if (out / f"{stage}.log").exists() else []
tail = " | ".join(line.strip()[:160] for line in log[-3:])
if code in (124, 137):
    print(f"cut at {seconds} s (limit {limit} s); last lines: {tail}")
    sys.exit()
head = f"exit {code} in {seconds} s"
if stage == "suite":
    failed = sorted({line.split("FAILED", 1)[1].split()[0] for line in log if line.startswith("FAILED")})
    print(f"{head}: {log[-1].strip('= ') if log else ''}" + (f"; failed: {', '.join(failed)}" if failed else ""))
elif stage in ("tiny", "vitb"):
    def run_line(tag):
        """One pretrain run's figures: its mode, the first step (the compile), images/s past the first third, MFU."""
        s = json.loads((w / f"{tag}.json").read_text()) if (w / f"{tag}.json").exists() and (w / f"{tag}.json").stat().st_size else None
        rows = [json.loads(line) for line in (w / tag / "runs" / tag / "metrics.jsonl").read_text().splitlines()] if s else []
        if not s or not rows:
            return f"{tag}: no summary"
        first = (w / f"{tag}.err").read_text() if (w / f"{tag}.err").exists() else ""
        first = next((m.group(1) for line in first.splitlines() if (m := re.search(r"compiled; the first step took (.+)$", line))), None)
        steady = rows[len(rows) // 3:]  # past the compile and the CUDA graphs' recording
        ips = sum(r["images_per_s"] for r in steady) / len(steady)
        mfu = ""
        if s["device"].startswith("cuda"):
            import torch

            from maecli.bench import device_peak
            from maecli.config import load_config
            from maecli.methods import method_of
            peak = device_peak(torch.device(s["device"]), None)[0]
            flops = method_of(load_config(w / tag / "maecli.toml")).flops_per_image() * ips
            mfu = f", {flops / 1e12:.1f} TFLOP/s, MFU {100 * flops / peak:.1f}%" if peak else ""
        return (f"{tag}: {s['compile_mode'] or 'eager'}{', first step (compile) ' + first if first else ''}; {ips:,.0f} img/s over steps "
                f"{steady[0]['step']}-{steady[-1]['step']}{mfu}, data wait {100 * sum(r['data_wait'] for r in steady) / len(steady):.2f}%, "
                f"peak {steady[-1]['peak_mem_mib']:,.0f} MiB, loss {s['final_loss']:.4f}")

    print(f"{head}: " + " | ".join(run_line(tag) for tag in (("tiny-eager", "tiny-auto") if stage == "tiny" else ("vitb",))))
elif stage == "stop":
    print(f"{head}: " + (log[-1] if log else "no output"))
elif stage == "compile":
    print(f"{head}: " + " ; ".join(line for line in log if line.startswith("| vit") or line.startswith("| tiny")))
elif stage == "bench":
    r = json.loads((w / "bench.json").read_text()) if (w / "bench.json").exists() and (w / "bench.json").stat().st_size else None
    if r is None:
        print(f"{head}; no result: {tail}")
        sys.exit()
    print(f"{head}: batch {r['batch']}, {r['compile_mode'] or 'eager'}; " + "; ".join(
        f"{name} {v['step_s_median'] * 1000:.1f} ms {v['images_per_s']:.0f} img/s" + (f" MFU {100 * v['mfu']:.1f}%" if v["mfu"] else "")
        for name, v in r["variants"].items()))
else:
    print(f"{head}: {tail}")
PY
}

stage= pid= stage_t0=0
on_signal() {  # a signal: the running stage's line, then the files that came so far
  trap - TERM INT
  if [ -n "$stage" ]; then
    kill -TERM "$pid" 2>/dev/null; sleep 2; kill -KILL "$pid" 2>/dev/null
    say "$stage: cut at $(( $(date +%s) - stage_t0 )) s by a signal to the script; last lines: $(tail -n 3 "$out/$stage.log" 2>/dev/null | cut -c1-160 | tr '\n' '|')"
  fi
  pack
  exit 143
}
trap on_signal TERM INT

run_stage() {  # name limit command...: the command's output streams to $out/name.log; its result line comes when it ends
  local name=$1 lim rc
  lim=$(limit "$2")
  shift 2
  if [ "$lim" -lt 15 ]; then say "$name: skipped ($(left) s left of ${BUDGET_S:-450})"; return; fi
  say "$name: started at $(( $(date +%s) - t0 )) s (limit $lim s, log $name.log)"
  stage=$name stage_t0=$(date +%s)
  timeout -k 10 "$lim" "$@" > "$out/$name.log" 2>&1 &
  pid=$!
  wait "$pid"
  rc=$?
  stage=
  say "$name: $(summarize "$name" "$rc" $(( $(date +%s) - stage_t0 )) "$lim")"
}

pretrain() {  # tag folder batch steps [--set ...]: one `maecli pretrain` run in a copy of the folder's project
  local tag=$1 src=$2 b=$3 n=$4
  shift 4
  mkdir -p "$w/$tag" && sed "s|^\[extract\]|[extract]\nstore = \"$src/frames\"|" "$src/maecli.toml" > "$w/$tag/maecli.toml"  # its store, in place
  python3 -m maecli pretrain -c "$w/$tag" --json --set pretrain.run=$tag --set pretrain.batch_size=$b --set pretrain.steps=$n \
    --set pretrain.log_every=$((n >= 60 ? n / 30 : 1)) "$@" > "$w/$tag.json" 2> >(tee "$w/$tag.err" >&2)
}

pack() { tar czf "$out/results.tgz" -C "$w" --exclude='frames' --exclude='videos' --exclude='*.safetensors' --exclude='*.pt' . 2>/dev/null; }

cat > "$w/stop.py" <<'PY'
# A compiled pretrain, SIGTERM `after` seconds after it says it is compiling: how long it takes to stop, and how.
import signal, subprocess, sys, time
config, after = sys.argv[1], float(sys.argv[2])
proc = subprocess.Popen([sys.executable, "-m", "maecli", "pretrain", "-c", config, *sys.argv[3:]], stderr=subprocess.PIPE, text=True)
lines = []
for line in proc.stderr:
    print(line, end="", flush=True)
    lines.append(line.strip())
    if "compiling the model" in line:
        break
time.sleep(after)
t = time.perf_counter()
proc.send_signal(signal.SIGTERM)
_, rest = proc.communicate()
seconds = time.perf_counter() - t
print(rest, end="")
last = (lines + rest.strip().splitlines())[-1]
print(f"SIGTERM {after:g} s after 'compiling the model': exit {proc.returncode} after {seconds:.1f} s; its last line: {last}")
PY

export -f pretrain
export w
for s in ${STAGES:-suite tiny stop vitb compile bench}; do
  case $s in
  suite)
    xdist=$(python3 -c 'import xdist' 2>/dev/null && echo "-n 12")
    timeouts=$(python3 -c 'import pytest_timeout' 2>/dev/null && echo "--timeout 120")
    OMP_NUM_THREADS=1 run_stage suite 170 python3 -m pytest -v -rf -p no:cacheprovider $xdist $timeouts ${SUITE_ARGS:-} ;;
  tiny)
    [ -d "$w/p-tiny/frames" ] || project "$w/p-tiny" "$tiny" "$tiny_size"
    run_stage tiny 150 bash -c "pretrain tiny-eager $w/p-tiny $tiny_batch $tiny_steps --set pretrain.compile=false;
                               pretrain tiny-auto $w/p-tiny $tiny_batch $tiny_steps --set pretrain.compile=auto" ;;
  stop)
    [ -d "$w/p-big/frames" ] || project "$w/p-big" "$big" "$big_size"
    mkdir -p "$w/stop" && sed "s|^\[extract\]|[extract]\nstore = \"$w/p-big/frames\"|" "$w/p-big/maecli.toml" > "$w/stop/maecli.toml"
    run_stage stop 60 python3 "$w/stop.py" "$w/stop" "$stop_after" --set pretrain.compile=true --set pretrain.batch_size=$big_batch --set pretrain.steps=50 ;;
  vitb)
    [ -d "$w/p-big/frames" ] || project "$w/p-big" "$big" "$big_size"
    run_stage vitb 150 bash -c "pretrain vitb $w/p-big $big_batch $big_steps --set pretrain.compile=auto" ;;
  compile)
    run_stage compile 150 python3 benchmarks/compile.py "${sizes[@]}" --modes blocks model ;;
  bench)
    run_stage bench 120 bash -c "python3 -m maecli bench ${bench[*]} --steps 10 --warmup 3 --json $([ -n "${PROFILE:-}" ] && echo "--profile $w/profile") > $w/bench.json" ;;
  esac
done
pack
say "total: $(( $(date +%s) - t0 )) s"
