"""benchmarks/gpu.sh, the one script a lent GPU runs, cannot come back empty: stopped at any moment, its summary has a
line for every stage that started. Here it runs at its CPU sizes (TINY=1, also on a machine with a GPU)."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_stopped_at_a_random_moment_has_a_line_for_every_stage_it_started(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "TINY": "1", "SUITE_ARGS": "tests/test_help.py -q",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # python3: this interpreter
    proc = subprocess.Popen(["bash", "benchmarks/gpu.sh"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    summary = tmp_path / "out" / "summary.txt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and "suite: started" not in (summary.read_text() if summary.exists() else ""):
        time.sleep(0.1)
    moment = random.uniform(0, 30)  # in the suite, the pretrain runs or the stop check, as the device tool's limit cuts a call
    try:
        proc.wait(timeout=moment)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the script and its stage, as `timeout` and schedulers send it
        proc.wait(timeout=60)
    lines = summary.read_text().splitlines()
    started = [line.split(":")[0] for line in lines if ": started at " in line]
    assert started and started[0] == "suite", lines
    for name in started:
        after = lines[lines.index(next(line for line in lines if line.startswith(f"{name}: started at "))) + 1:]
        assert any(line.startswith(f"{name}: ") and "started at" not in line for line in after), (name, moment, lines)
    if proc.returncode == 143:  # stopped: what came so far is packed
        assert (tmp_path / "out" / "results.tgz").exists()
    assert (tmp_path / "out" / f"{started[-1]}.log").exists()
    assert len(list((tmp_path / "out").iterdir())) <= 8  # what the device tool brings back


def test_gpu_script_stage_lines_name_the_compile_and_the_stop(tmp_path):
    """Run to its end at the CPU's sizes: the tiny runs' and the stop check's result lines say what a GPU run reports."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "TINY": "1", "STAGES": "tiny stop",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    t = time.monotonic()
    proc = subprocess.run(["bash", "benchmarks/gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    tiny = next(line for line in lines if line.startswith("tiny: exit 0"))
    assert "tiny-eager: eager; " in tiny and " img/s over steps " in tiny and "tiny-auto: eager; " in tiny  # auto: eager on a CPU
    stop = next(line for line in lines if line.startswith("stop: exit 0"))
    assert ": exit 143 after " in stop and stop.endswith("interrupted (SIGTERM) before the first step finished: nothing new to save; "
                                                         "run the same command again to start it"), stop
    assert lines[-1].startswith("total: ") and time.monotonic() - t < 300
