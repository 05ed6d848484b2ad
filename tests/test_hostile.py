"""Hostile conditions: a full disk, a damaged checkpoint, two runs on one folder, and folders with litter in them.

The full-disk tests run maecli on a real, small tmpfs. It is mounted inside a private user and mount namespace
(`unshare -rm`), which needs no root and vanishes with the process, so a test script does the whole job inside it:
copy a project in, fill the disk to a few KiB, run the command, and list the files before and after.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from maecli.cli import app
from tests.conftest import write_project
from tests.test_extract import project as extract_project
from tests.test_extract import store_state
from tests.videos import frame_image, write_video

ROOT = Path(__file__).resolve().parents[1]

ON_SMALL_DISK = """
import hashlib, json, os, shutil, subprocess, sys
from pathlib import Path
src, disk, out, free, inodes = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "no-inodes"
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,nr_inodes=2048", "tmpfs", str(disk)], check=True)
shutil.copytree(src, disk / "project", symlinks=True)
def files():
    return {str(p.relative_to(disk)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(disk.rglob("*"))
            if p.is_file() and p.name != "filler" and p.parent.name != "inodes"}
before = files()
with open(disk / "filler", "wb") as f:  # leave `free` bytes
    f.write(b"\\0" * (shutil.disk_usage(disk).free - free))
if inodes:  # and no inode: no new file or folder
    (disk / "inodes").mkdir()
    try:
        for i in range(4096):
            (disk / "inodes" / str(i)).touch()
    except OSError:
        pass
proc = subprocess.run([sys.executable, "-m", "maecli", *sys.argv[6:]], cwd=disk / "project", capture_output=True, text=True)
(out / "result.json").write_text(json.dumps({"code": proc.returncode, "stderr": proc.stderr, "before": before, "after": files()}))
"""


def on_small_disk(tmp_path: Path, project: Path, free: int, *args: str, inodes: bool = True) -> dict:
    """Run `maecli ARGS` in a copy of `project` on a 16 MiB tmpfs with `free` bytes left (and, `inodes=False`, no
    inode for a new file or folder); what it printed and did."""
    (tmp_path / "disk").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    script = tmp_path / "on_small_disk.py"
    script.write_text(ON_SMALL_DISK)
    cmd = ["unshare", "-rm", sys.executable, str(script), str(project), str(tmp_path / "disk"), str(tmp_path / "out"), str(free),
           "inodes" if inodes else "no-inodes", *args]
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])  # packages installed by PYTHONPATH too (the GPU machine's)
    subprocess.run(cmd, check=True, timeout=300, env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    return json.loads((tmp_path / "out" / "result.json").read_text())


def test_extract_on_a_full_disk_says_so_and_keeps_the_store(runner, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    for i in range(3):
        write_video(project / f"v{i}.mp4", n=60, fps=30, images=[frame_image(100 * i + j, 96, 128) for j in range(60)])
    config = extract_project(project, fps=0, every_n=1, dedup=0, size=[96, 128], shard_frames=16)
    result = runner.invoke(app, ["extract", "-c", str(config), str(project / "v0.mp4")])  # one video in the store already
    assert result.exit_code == 0, result.output
    r = on_small_disk(tmp_path, project, 64 << 10, "extract", "-c", "maecli.toml", "v1.mp4", "v2.mp4")  # a shard is 576 KiB
    assert r["code"] == 1, r["stderr"]
    line = r["stderr"].strip()
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith("/") and "/project/frames/shards/" in line and ": no space left on the device (" in line and "bytes free" in line
    assert r["after"] == r["before"]  # the store as it was: no partial video, no temporary file


def test_pretrain_on_a_full_disk_says_so_and_keeps_the_run(runner, tmp_path, store):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(store, project / "frames")
    config = write_project(project, "frames", pretrain={"steps": 10, "checkpoint_every": 5, "log_every": 100})
    assert runner.invoke(app, ["pretrain", "-c", str(config)]).exit_code == 0
    r = on_small_disk(tmp_path, project, 48 << 10, "pretrain", "-c", "maecli.toml", "--set", "pretrain.steps=20")
    assert r["code"] == 1, r["stderr"]
    last = r["stderr"].strip().splitlines()[-1]
    assert "Traceback" not in r["stderr"] and "/checkpoints/step-00000015." in last and ": no space left on the device (" in last
    checkpoints = sorted(name.rsplit("/", 1)[1] for name in r["after"] if "/checkpoints/" in name)
    assert checkpoints == ["step-00000005.safetensors", "step-00000005.state.pt", "step-00000010.safetensors", "step-00000010.state.pt"]
    assert all(r["after"][name] == r["before"][name] for name in r["before"] if "/checkpoints/" in name)


def test_a_full_disk_when_making_a_folder_or_a_lock_is_one_line_too(runner, tmp_path, store):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(store, project / "frames")
    config = write_project(project, "frames", pretrain={"steps": 2, "checkpoint_every": 2})
    assert runner.invoke(app, ["pretrain", "-c", str(config)]).exit_code == 0
    assert not list(project.rglob(".lock")) and not list((project / "frames").rglob("*.lock"))  # a clean exit leaves no lock file
    # a new run folder with no inode left: the folder cannot be made
    r = on_small_disk(tmp_path / "a", project, 1 << 20, "pretrain", "-c", "maecli.toml", "--set", "pretrain.run=other", inodes=False)
    assert r["code"] == 1 and "Traceback" not in r["stderr"], r["stderr"]
    assert r["stderr"].splitlines()[-1].endswith("/project/runs/other: no space left on the device (1,048,576 bytes free, but no inode for "
                                                 "another file or folder); free some space and run the same command again")
    # the run folder exists, but not a byte is left for the lock's line (pid, host, time)
    r = on_small_disk(tmp_path / "b", project, 0, "pretrain", "-c", "maecli.toml", "--set", "pretrain.steps=4")
    assert r["code"] == 1 and "Traceback" not in r["stderr"], r["stderr"]
    last = r["stderr"].splitlines()[-1]
    assert ": no space left on the device (" in last and last.endswith("; free some space and run the same command again")
    assert r["after"] == r["before"]  # nothing changed, no lock left behind


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a bad copy: the first half of the file


def test_a_damaged_latest_checkpoint_is_skipped_unless_named(runner, tmp_path, store):
    config = write_project(tmp_path, store, pretrain={"steps": 10, "checkpoint_every": 5, "log_every": 5})
    assert runner.invoke(app, ["pretrain", "-c", str(config)]).exit_code == 0
    ckpts = tmp_path / "runs" / "pretrain" / "checkpoints"
    truncate(ckpts / "step-00000010.safetensors")
    skipped = f"skipped {ckpts / 'step-00000010.safetensors'}: not a readable safetensors file"
    for args in (["visualize", "--out", str(tmp_path / "r.png")], ["export", "encoder", "--out", str(tmp_path / "e")], ["export", "features", "--out", str(tmp_path / "f")]):
        result = runner.invoke(app, [*args, "-c", str(config), "--json"])
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        assert summary["checkpoint"] == str(ckpts / "step-00000005.safetensors")
        assert summary["notes"][0].startswith(skipped) and summary["notes"][0].endswith("; using an older checkpoint")
    named = runner.invoke(app, ["visualize", "-c", str(config), "--checkpoint", str(ckpts / "step-00000010.safetensors")])
    assert named.exit_code == 1 and named.stderr.startswith(f"{ckpts / 'step-00000010.safetensors'}: not a readable safetensors file")
    # resuming skips it too, and trains the lost steps again
    result = runner.invoke(app, ["pretrain", "-c", str(config), "--json", "--set", "pretrain.steps=12"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["notes"][0].startswith("skipped step-00000010.safetensors and step-00000010.state.pt: unreadable (")
    assert summary["notes"][1].startswith("resumed from step 5 (") and summary["steps_this_run"] == 7


def test_a_run_folder_has_one_owner_and_a_killed_one_leaves_no_lock(runner, tmp_path, store):
    config = write_project(tmp_path, store, pretrain={"steps": 100000, "checkpoint_every": 100000, "log_every": 1})
    cmd = [sys.executable, "-m", "maecli", "pretrain", "-c", str(config)]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "runs" / "pretrain" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.stat().st_size) and time.monotonic() < deadline:  # training, so holding the folder
        time.sleep(0.01)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert second.returncode == 2 and "Traceback" not in second.stderr
    line = second.stderr.splitlines()[-1]  # old timm releases warn on import, above it
    host = __import__("socket").gethostname()
    assert line.startswith(f"{tmp_path / 'runs' / 'pretrain'}: in use by pid {first.pid} on {host} since ")
    assert line.endswith("; wait for it to finish, or use another pretrain.run")
    # the killed owner's lock is gone with it: the next run takes the folder over
    result = runner.invoke(app, ["pretrain", "-c", str(config), "--json", "--set", "pretrain.steps=3", "--restart"])
    assert result.exit_code == 0, result.output


def test_two_extracts_into_one_store_at_once_end_consistent(runner, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(6):
        write_video(videos / f"v{i}.mp4", n=150, fps=30, images=[frame_image(1000 * i + j, 48, 64) for j in range(150)])
    (tmp_path / "ref").mkdir()
    settings = dict(fps=0, every_n=1, dedup=0, shard_frames=32)
    assert runner.invoke(app, ["extract", "-c", str(extract_project(tmp_path / "ref", **settings)), str(videos)]).exit_code == 0
    config = extract_project(tmp_path, **settings)
    cmd = [sys.executable, "-m", "maecli", "extract", "-c", str(config), "--json", str(videos)]
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in runs]
    assert [p.returncode for p in runs] == [0, 0], outputs
    summaries = [json.loads(out) for out, _ in outputs]
    assert sum(s["videos_extracted"] for s in summaries) >= 6 and all(s["videos_failed"] == 0 for s in summaries)
    state = store_state(tmp_path / "frames")
    assert state["records"] == store_state(tmp_path / "ref" / "frames")["records"] and state["shards"] == store_state(tmp_path / "ref" / "frames")["shards"]
    assert not [n for n in state["hidden"] if ".tmp" in n]


def test_probe_says_what_it_ignored(runner, trained, tmp_path):
    train = tmp_path / "train"
    rng = np.random.default_rng(0)
    for name in ("cars", "trucks"):
        (train / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(train / name / f"{i}.png")
    (train / "bikes").mkdir()  # an empty class
    (train / "readme.txt").write_text("labels by hand, 2026")
    (train / "loose.png").write_bytes((train / "cars" / "0.png").read_bytes())
    result = runner.invoke(app, ["probe", "-c", str(trained / "maecli.toml"), "--json", "--set", f"probe.train={train}", "--set", "probe.epochs=2"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["classes"] == ["cars", "trucks"]
    assert report["notes"][:3] == [f"ignored {train / 'readme.txt'}: not an image file", f"ignored {train / 'bikes'}: a class folder with no images",
                                   f"ignored {train / 'loose.png'}: not in a class folder"]
