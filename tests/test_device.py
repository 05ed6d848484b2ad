"""`project.device`: one rule for every command, checked on whatever machine runs the suite.

Every other test pins `device = "cpu"` (CPU semantics: bit-exact resume, float32 tolerances). The tests here
leave it at "auto" and check the path this machine takes: the GPU one (bf16 autocast, torch.compile) when
CUDA is present, the CPU one (float32, eager) when not.
"""

import json
import subprocess
import sys

import pytest
import torch

from maecli.bench import train_step_fn
from maecli.cli import app
from maecli.config import load_config
from maecli.device import pick_device
from maecli.errors import ConfigError
from maecli.methods import method_of
from tests.conftest import write_project
from tests.test_probe import make_set

GPUS = torch.cuda.device_count()


def test_device_rules(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert pick_device("auto", gpus=0) == torch.device("cpu")
    assert pick_device("cpu", gpus=8) == torch.device("cpu")
    with pytest.raises(ConfigError) as err:
        pick_device("cuda", gpus=0)
    assert err.value.lines == ("project.device: 'cuda' was asked for but torch sees no CUDA device",)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # torchrun --nproc_per_node=3 on a 2-GPU machine
    for choice in ("auto", "cuda"):
        with pytest.raises(ConfigError) as err:
            pick_device(choice, gpus=2)
        assert err.value.lines == ('project.device: torchrun started 3 processes on this machine but it has 2 GPUs: '
                                   'use --nproc_per_node=2, or set project.device = "cpu"',)
    assert pick_device("cpu", gpus=2) == torch.device("cpu")  # CPU processes need no GPU each


def test_auto_takes_this_machines_path(runner, tmp_path, store):
    config = write_project(tmp_path, store, project={"device": "auto"}, pretrain={"steps": 3, "checkpoint_every": 3})
    result = runner.invoke(app, ["pretrain", "-c", str(config), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    if GPUS:  # the GPU path is the point here: bf16 autocast and a compiled model, in CUDA graphs for a step this small
        assert (summary["device"], summary["precision"], summary["compiled"], summary["compile_mode"]) == ("cuda:0", "bfloat16", True, "reduce-overhead")
        assert "compiling the model for cuda:0 (torch.compile, mode reduce-overhead, the whole model)" in result.stderr
    else:
        assert (summary["device"], summary["precision"], summary["compiled"], summary["compile_mode"]) == ("cpu", "float32", False, None)
    features = runner.invoke(app, ["export", "features", "-c", str(config), "--json", "--out", str(tmp_path / "export")])
    assert features.exit_code == 0, features.output
    assert json.loads(features.stdout)["device"] == ("cuda:0" if GPUS else "cpu")
    train, val = make_set(tmp_path / "train", 16, 0), make_set(tmp_path / "val", 4, 1)
    tuned = runner.invoke(app, ["finetune", "-c", str(config), "--json", "--set", f"probe.train={train}", "--set", f"probe.val={val}",
                                "--set", "finetune.epochs=2", "--set", "finetune.batch_size=16"])
    assert tuned.exit_code == 0, tuned.output
    report = json.loads(tuned.stdout)
    compiled = report["results"]["pretrained"]["compiled"]
    assert (report["device"], report["precision"], compiled) == (("cuda:0", "bfloat16", True) if GPUS else ("cpu", "float32", False))
    simclr = runner.invoke(app, ["pretrain", "-c", str(config), "--json", "--set", "pretrain.method=simclr", "--set", "pretrain.run=simclr",
                                 "--set", "simclr.proj_hidden=64"])  # its views, blur and gathered loss on this machine's path too
    assert simclr.exit_code == 0, simclr.output
    summary = json.loads(simclr.stdout)
    assert (summary["device"], summary["precision"], summary["compiled"]) == (("cuda:0", "bfloat16", True) if GPUS else ("cpu", "float32", False))
    pairs = runner.invoke(app, ["pretrain", "-c", str(config), "--json", "--set", "pretrain.method=siammae", "--set", "pretrain.run=siammae",
                                "--set", "siammae.mask_ratio=0.75"])  # frame pairs, cross-attention
    assert pairs.exit_code == 0, pairs.output
    summary = json.loads(pairs.stdout)
    assert (summary["device"], summary["precision"], summary["compiled"]) == (("cuda:0", "bfloat16", True) if GPUS else ("cpu", "float32", False))
    if GPUS:  # and on the GPU, the step of any method never makes the host wait for it (the GPU would idle)
        cfg = load_config(config, ["siammae.mask_ratio=0.75", "cropmae.mask_ratio=0.8", "simclr.proj_hidden=64"])
        frames = torch.randint(0, 256, (8, 48, 64, 3), dtype=torch.uint8, device="cuda")
        for name in ("mae", "simclr", "siammae", "cropmae"):
            method = method_of(cfg, name)
            step = train_step_fn(method.build().cuda(), method, frames, compile="default")
            step()  # compiles (compiling may wait for the GPU)
            torch.cuda.set_sync_debug_mode("error")  # raises at any synchronizing call: .item(), a copy from pageable memory...
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")


def test_bench_rates_this_devices_step(runner):
    """`maecli bench` on this machine's device: on a GPU the matmul peak in bf16 and the MFU against the spec peak (an
    H100/H200's, which the table knows), on a CPU float32 and no MFU (test_bench has the rest)."""
    args = ["bench", "--model", "vit_tiny", "--patch", "8", "--img", "32", "--batch", "4", "--steps", "2", "--warmup", "1", "--no-compile",
            "--set", "model.depth=1", "--set", "model.decoder_depth=1", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert r["device"] == ("cuda:0" if GPUS else "cpu") and r["matmul_gflops"] > 0
    if GPUS:
        name = torch.cuda.get_device_name(0)
        assert r["matmul_source"] == "bfloat16 8192x8192 matmul"
        if "H100" in name or "H200" in name:
            assert r["peak_source"].endswith("dense bf16 spec, 989 TFLOP/s") or "H100" in name
            assert all(0 < v["mfu"] < 1 for v in r["variants"].values())
    else:
        assert r["matmul_source"] == "float32 2048x2048 matmul" and all(v["mfu"] is None for v in r["variants"].values())


def test_torchrun_with_more_processes_than_gpus_stops_with_one_line(tmp_path, store):
    """More processes than GPUs with device auto: the message names both counts. Without a GPU, device "cuda" is
    the mistake that stops every rank the same way, before any collective."""
    config = write_project(tmp_path, store, project={"device": "auto" if GPUS else "cuda"}, pretrain={"steps": 2})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={GPUS + 1}", "-m", "maecli", "pretrain", "-c", str(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    expected = (f"project.device: torchrun started {GPUS + 1} processes on this machine but it has {GPUS} GPU" if GPUS
                else "project.device: 'cuda' was asked for but torch sees no CUDA device")
    assert any(line.startswith(expected) for line in proc.stderr.splitlines()), proc.stderr[-2000:]
    assert "CUDA error" not in proc.stderr and "device-side assert" not in proc.stderr
