"""`maecli pretrain` end to end on a tiny model and a generated frame store."""

import json
import math
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from maecli.bench import OperatorCount
from maecli.cli import app
from maecli.loop import CompileWatch, compiled_graphs, get_lr, param_groups, projection
from maecli.model import MaskedAutoencoder
from maecli.weights import read_weights, save_hf, save_official
from tests.conftest import TINY, write_project

def project(folder: Path, store: Path, **pretrain) -> Path:
    """The tiny project; the frame-pair methods hide less of the tiny model's 16 patches than their defaults would."""
    return write_project(folder, store, pretrain=pretrain, siammae={"mask_ratio": 0.75}, cropmae={"mask_ratio": 0.8})


def pretrain(runner, config, *args):
    result = runner.invoke(app, ["pretrain", "-c", str(config), "--json", *args])
    return result, (json.loads(result.stdout) if result.exit_code == 0 else None)


def final_weights(folder: Path, step: int) -> dict[str, torch.Tensor]:
    return read_weights(folder / "runs" / "pretrain" / "checkpoints" / f"step-{step:08d}.safetensors")[0]


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_loss_decreases_and_artifacts_are_written(runner, tmp_path, store):
    result, summary = pretrain(runner, project(tmp_path, store, steps=60, checkpoint_every=30, keep_last=1))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "runs" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 61))
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.9 * first, f"loss did not decrease: {first:.3f} -> {last:.3f}"  # measured: 1.40 -> 1.22 (0.87x)
    assert set(rows[0]) == {"step", "epoch", "loss", "lr", "images_per_s", "grad_norm", "data_wait", "peak_mem_mib"}
    assert all(math.isfinite(r["grad_norm"]) and r["images_per_s"] > 0 and r["peak_mem_mib"] > 0 for r in rows)
    run = tmp_path / "runs" / "pretrain"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000060.safetensors", "step-00000060.state.pt"]  # keep_last = 1
    for name in ("loss.png", "snapshots/step-00000030.png", "snapshots/step-00000060.png", "config.toml", "summary.json"):
        assert (run / name).stat().st_size > 0, name
    assert summary["steps"] == 60 and summary["final_loss"] == rows[-1]["loss"] and summary["checkpoint"].endswith("step-00000060.safetensors")
    assert summary["effective_batch"] == 8 and summary["device"] == "cpu"
    # a finished run re-run does no more steps
    again, summary = pretrain(runner, project(tmp_path, store, steps=60, checkpoint_every=30, keep_last=1))
    assert again.exit_code == 0 and summary["steps_this_run"] == 0 and summary["final_loss"] == rows[-1]["loss"]


def test_off_a_terminal_a_run_says_its_projected_time_then_a_line_per_log_step(runner, tmp_path, store):
    """Under nohup, Slurm or `2> log` (CliRunner's stderr is no terminal either) the bar is hidden: the projected
    duration after the first steps, then one plain line per log step, as the official MAE's logger prints."""
    result, summary = pretrain(runner, project(tmp_path, store, steps=20, log_every=5, checkpoint_every=20))
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert re.fullmatch(r"pretrain: [0-9.e-]+ s a step over the first steps: 16 steps more take about \d+ s \(ends about "
                        r"\d{4}-\d\d-\d\d \d\d:\d\d; \d+ s so far\)", lines[0]), lines[0]
    logged = [line for line in lines if line.startswith("pretrain  step ")]
    assert [int(re.search(r"step (\d+)/20 ", line)[1]) for line in logged] == [5, 10, 15, 20]
    rows = [json.loads(line) for line in (tmp_path / "runs" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    for line, row in zip(logged, rows, strict=True):  # the numbers of metrics.jsonl
        assert f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  {row['images_per_s']:.1f} img/s  data wait {100 * row['data_wait']:.1f}%  elapsed " in line
        assert re.search(r"  ETA \d+ s$", line)
    # a CPU run projected past a few hours says what makes it fit (on a GPU, not)
    long = projection("pretrain", 100_000, 0.5, 3.0, torch.device("cpu"))
    assert long.startswith("pretrain: 0.5 s a step over the first steps: 100,000 steps more take about 13 h 53 min (ends about ")
    assert long.endswith("That is long for this CPU (the defaults are sized for a GPU): a smaller model or input, or fewer epochs/steps, make "
                         'it fit; the quickstart\'s CPU size is [model] preset = "vit_tiny", depth = 6, img_size = [48, 96], patch_size = 8 '
                         "with [pretrain] steps = 1000 (a few CPU-minutes)")
    assert "long for this" not in projection("pretrain", 100_000, 0.5, 3.0, torch.device("cuda"))


def test_lr_schedule_follows_the_formula(runner, tmp_path, store):
    assert get_lr(0, total=100, warmup=10, lr=1.0, min_lr=0.1) == 0.0
    assert get_lr(5, total=100, warmup=10, lr=1.0, min_lr=0.1) == 0.5
    assert get_lr(10, total=100, warmup=10, lr=1.0, min_lr=0.1) == 1.0
    assert get_lr(55, total=100, warmup=10, lr=1.0, min_lr=0.1) == pytest.approx(0.55)
    assert get_lr(100, total=100, warmup=10, lr=1.0, min_lr=0.1) == pytest.approx(0.1)
    # the run uses it every step, with lr = blr * effective batch / 256
    result, summary = pretrain(runner, project(tmp_path, store, lr=0, blr=0.0256, steps=12, warmup_steps=3, min_lr=1e-4, accum_iter=2))
    assert result.exit_code == 0, result.output
    assert summary["lr"] == pytest.approx(0.0256 * 16 / 256) and summary["effective_batch"] == 16
    rows = [json.loads(line) for line in (tmp_path / "runs" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([get_lr(s, total=12, warmup=3, lr=0.0016, min_lr=1e-4) for s in range(12)])


def test_weight_decay_groups():
    model = MaskedAutoencoder(**TINY)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert decayed == {n for n, p in model.named_parameters() if p.ndim >= 2 and n not in ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed")}
    assert {"blocks.0.attn.qkv.weight", "decoder_pred.weight", "patch_embed.proj.weight"} <= decayed
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "mask_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "decoder_norm.bias"} <= skipped
    assert "pos_embed" not in skipped | decayed  # fixed sin-cos: not trained at all


@pytest.mark.parametrize("sig,method,compiled", [(signal.SIGKILL, "mae", False), (signal.SIGINT, "mae", False), (signal.SIGTERM, "mae", False),
                                                 (signal.SIGTERM, "mae", True), (signal.SIGKILL, "simclr", False), (signal.SIGKILL, "siammae", False)])
def test_interrupted_run_resumes_bit_identical(runner, tmp_path, store, sig, method, compiled):  # cropmae: siammae's model and loop, other draws
    """Compiled too (the blocks, as on a GPU): a signal once steps run still ends in a checkpoint of that step."""
    (tmp_path / "ref").mkdir()
    (tmp_path / "cut").mkdir()
    kw = dict(steps=300, checkpoint_every=30, log_every=5, method=method, compile=compiled)  # seconds of work left after the first checkpoint
    result, _ = pretrain(runner, project(tmp_path / "ref", store, **kw))
    assert result.exit_code == 0, result.output
    config = project(tmp_path / "cut", store, **kw)
    proc = subprocess.Popen([sys.executable, "-m", "maecli", "pretrain", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpts = tmp_path / "cut" / "runs" / "pretrain" / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(ckpts.glob("step-*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(sig)
    _, stderr = proc.communicate()
    written = sorted(ckpts.glob("step-*.safetensors"))
    assert written and "step-00000300" not in written[-1].name, "the run finished before it could be interrupted"
    if sig != signal.SIGKILL:  # Ctrl-C, or SIGTERM as Slurm, Kubernetes and `timeout` send it: a checkpoint at the current step
        assert proc.returncode == 128 + sig, stderr
        step = int(written[-1].name[5:13])
        assert stderr.splitlines()[-1] == (f"interrupted ({signal.Signals(sig).name}): checkpoint written at step {step} ({written[-1]}); run the "
                                           "same command again to resume")
    else:  # a kill can land mid-append: the torn last line must not stop the resume
        with open(tmp_path / "cut" / "runs" / "pretrain" / "metrics.jsonl", "a") as f:
            f.write('{"step": 1, "epo')
    result, summary = pretrain(runner, config)
    assert result.exit_code == 0, result.output
    assert summary["notes"][0].startswith("resumed from step ") and 0 < summary["steps_this_run"] < 300
    assert_identical(final_weights(tmp_path / "cut", 300), final_weights(tmp_path / "ref", 300))
    metrics = [json.loads(line)["step"] for line in (tmp_path / "cut" / "runs" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert metrics == list(range(5, 301, 5))  # nothing logged twice


def test_sigterm_under_torchrun_stops_every_rank_at_one_step_and_resumes_bit_identical(runner, tmp_path, store):
    """torchrun forwards SIGTERM to both ranks; they agree at the next log step, rank 0 writes that step's checkpoint,
    and the resumed run ends with the weights of a run never stopped (2 processes both)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "maecli", "pretrain", "-c"]
    kw = dict(batch_size=4, steps=400, checkpoint_every=200, log_every=5)
    for name in ("ref", "cut"):
        (tmp_path / name).mkdir()
    ref = subprocess.run([*torchrun, str(project(tmp_path / "ref", store, **kw))], capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    config = project(tmp_path / "cut", store, **kw)
    proc = subprocess.Popen([*torchrun, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "cut" / "runs" / "pretrain" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(random.uniform(0, 1))  # a random moment of training, before the first periodic checkpoint (step 200)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    written = sorted((tmp_path / "cut" / "runs" / "pretrain" / "checkpoints").glob("step-*.safetensors"))
    assert len(written) == 1, stderr[-3000:]
    step = int(written[0].name[5:13])
    assert 0 < step < 200 and step % 5 == 0, step  # a log step, where the ranks agree
    assert f"interrupted (SIGTERM): checkpoint written at step {step} ({written[0]}); run the same command again to resume" in stderr
    resumed = subprocess.run([*torchrun, str(config)], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_identical(final_weights(tmp_path / "cut", 400), final_weights(tmp_path / "ref", 400))


def stderr_until(proc: subprocess.Popen, text: str, timeout: float = 120) -> list[str]:
    """The lines a process writes to stderr up to the first that contains `text` (all of them if it ends first)."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline and (line := proc.stderr.readline()):
        lines.append(line.rstrip("\n"))
        if text in line:
            break
    return lines


def test_a_signal_during_the_compile_ends_the_run_at_once(tmp_path, store):
    """Before the first step has finished there is nothing new to save: SIGTERM 1 s into the compile ends the run
    within seconds (the compile is unwound, not waited for), exit 143, one line, no checkpoint."""
    config = project(tmp_path, store, steps=300, checkpoint_every=30, compile=True)
    proc = subprocess.Popen([sys.executable, "-m", "maecli", "pretrain", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    said = stderr_until(proc, "compiling the model")
    assert said[-1] == "pretrain: compiling the model for cpu (torch.compile, mode default, its transformer blocks): the first step takes longer", said
    time.sleep(1)
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - t < 10 and proc.returncode == 143, stderr
    assert stderr.splitlines() == ["interrupted (SIGTERM) before the first step finished: nothing new to save; run the same command again to start it"]
    assert not list((tmp_path / "runs" / "pretrain").rglob("step-*")) and "compiled; the first step" not in stderr


def test_a_run_that_has_not_stopped_when_its_stop_timeout_ends_exits_without_a_checkpoint(tmp_path, store):
    """Under torchrun the ranks stop at an agreed (log) step; one that is far away, past project.stop_timeout, is not
    waited for: each rank says so in one line and exits 143, writing nothing new (a scheduler's SIGKILL would come)."""
    config = write_project(tmp_path, store, project={"device": "cpu", "stop_timeout": 2}, pretrain={"batch_size": 4, "steps": 5000, "log_every": 2500,
                                                                                                     "checkpoint_every": 2500})
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "maecli", "pretrain", "-c", str(config)]
    proc = subprocess.Popen(torchrun, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr_until(proc, "s a step over the first steps")  # steps run: a signal now waits for step 2500
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert time.monotonic() - t < 30, stderr[-3000:]
    gave_up = [line for line in stderr.splitlines() if "still running 2 s after the signal" in line]
    assert gave_up and gave_up[0] == ("interrupted (SIGTERM): still running 2 s after the signal (project.stop_timeout); stopped without a "
                                      "new checkpoint; run the same command again to resume from the last one"), stderr[-3000:]
    assert not list((tmp_path / "runs" / "pretrain").rglob("step-*.safetensors"))


# Measured for the tests' tiny model (torch 2.14, timm 1.0.31): 428.75-429 and 611.6 (a fraction varies with what the process ran
# before). Before (main at 172ee51), the same way: 13 and 17 more, from the gradients' norm on every step, the loss summed into
# a fresh tensor, and SimCLR's one_hot (which checks its input's range: two host syncs)
OPERATORS_PER_STEP = {"mae": 430, "simclr": 612}


@pytest.mark.parametrize("method", ["mae", "simclr"])
def test_a_step_dispatches_no_more_operators_than_recorded(runner, tmp_path, store, method):
    """The host's share of a step on a GPU is about one launch per operator outside a compiled graph: the real loop's
    plain step (runs of 7 and 15 steps, the difference / 8: the first steps' timing and the last step's log and checkpoint
    cancel out) stays within the recorded count (benchmarks/step_ops.py)."""
    counts = []
    for steps in (7, 15):
        (tmp_path / str(steps)).mkdir()
        config = project(tmp_path / str(steps), store, steps=steps, log_every=1000, checkpoint_every=1000, method=method)
        with OperatorCount() as ops:
            result, _ = pretrain(runner, config)
        assert result.exit_code == 0, result.output
        counts.append(ops.count)
    per_step = (counts[1] - counts[0]) / 8
    assert 100 < per_step <= OPERATORS_PER_STEP[method], per_step


def test_a_recompile_after_the_first_steps_is_said_once():
    said = []
    watch = CompileWatch("pretrain", "default", "blocks", torch.device("cpu"), said.append)
    double = torch.compile(lambda x: 2 * x, dynamic=False)
    double(torch.ones(3))
    watch.first_step(61.0)
    watch.steady()
    double(torch.ones(3))
    watch.check(20)  # the same shape: nothing new
    double(torch.ones(4))
    watch.check(40)
    double(torch.ones(5))
    watch.check(60)  # said once
    assert said == ["pretrain: compiling the model for cpu (torch.compile, mode default, its transformer blocks): the first step takes longer",
                    "pretrain: compiled; the first step took 1 min 01 s",
                    "pretrain: torch.compile compiled again by step 40 (1 graph more than after the first steps); each recompile stalls the run: "
                    "TORCH_LOGS=recompiles says why"]


def test_tensorboard_gets_the_scalars_and_snapshots_and_a_resume_drops_a_killed_runs_points(runner, tmp_path, store):
    result, _ = pretrain(runner, project(tmp_path, store, steps=20, checkpoint_every=10, log_every=2))
    assert result.exit_code == 0, result.output
    board = EventAccumulator(str(tmp_path / "runs" / "pretrain" / "tensorboard")).Reload()
    rows = [json.loads(line) for line in (tmp_path / "runs" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in board.Scalars("train/loss")] == [r["step"] for r in rows]
    assert [e.value for e in board.Scalars("train/loss")] == pytest.approx([r["loss"] for r in rows])
    assert {"train/lr", "train/grad_norm", "perf/images_per_s", "perf/data_wait"} <= set(board.Tags()["scalars"])
    assert "perf/mfu" not in board.Tags()["scalars"]  # rated against a GPU's spec peak only
    assert [e.step for e in board.Images("reconstructions")] == [10, 20]
    # a run resumed from step 10 (as after a kill at step 17): the points past 10 are written again, not twice
    ckpts = tmp_path / "runs" / "pretrain" / "checkpoints"
    for path in ckpts.glob("step-00000020.*"):
        path.unlink()
    result, summary = pretrain(runner, project(tmp_path, store, steps=20, checkpoint_every=10, log_every=2))
    assert result.exit_code == 0 and summary["steps_this_run"] == 10, result.output
    board = EventAccumulator(str(tmp_path / "runs" / "pretrain" / "tensorboard")).Reload()
    assert [e.step for e in board.Scalars("train/loss")] == list(range(2, 21, 2))


@pytest.mark.parametrize("method", ["mae", "simclr", "siammae"])
def test_torchrun_two_processes_match_one(runner, tmp_path, store, method):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    result, _ = pretrain(runner, project(tmp_path / "one", store, batch_size=8, steps=6, checkpoint_every=6, method=method))
    assert result.exit_code == 0, result.output
    config = project(tmp_path / "two", store, batch_size=4, steps=6, checkpoint_every=6, method=method)  # SimCLR: negatives from both ranks
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "maecli", "pretrain", "-c", str(config), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)  # printed once, by rank 0
    assert summary["world_size"] == 2 and summary["effective_batch"] == 8
    one, two = final_weights(tmp_path / "one", 6), final_weights(tmp_path / "two", 6)
    for k in one:
        if method == "simclr" and k == "norm.bias":
            continue  # a constant shift of the class token, removed by the head's batch norm: zero true gradient, as the key bias
        a, b = one[k], two[k]
        if k.endswith("attn.qkv.bias"):
            # The key bias shifts a whole row of attention logits, which softmax ignores: its true gradient is 0,
            # its float gradient is rounding noise, and Adam scales noise up to lr-sized steps. Compare q and v only.
            d = a.shape[0] // 3
            a, b = torch.cat([a[:d], a[2 * d :]]), torch.cat([b[:d], b[2 * d :]])
        if k.endswith("cross_attn.kv.bias"):  # the same for the key bias of the frame-pair decoder's cross-attention: compare v
            a, b = a[a.shape[0] // 2 :], b[b.shape[0] // 2 :]
        if method != "simclr":
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=f"{k} differs between 1 and 2 processes")
        else:  # SimCLR's batch norm and gathered logits sum in another order on two ranks; where a gradient is near 0,
            # Adam's first steps (about lr x its sign) turn that rounding into lr-sized moves of a few elements
            # (measured: up to 0.2% of a tensor, by 5e-4); all the others agree to 1e-5
            assert ((a - b).abs() <= 1e-5).float().mean() >= 0.99, f"{k} differs between 1 and 2 processes"
    losses = [[json.loads(line)["loss"] for line in (tmp_path / n / "runs" / "pretrain" / "metrics.jsonl").read_text().splitlines()] for n in ("one", "two")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)  # the same batches, negatives and statistics at every step
    fresh = MaskedAutoencoder(**TINY).state_dict()
    assert any(not torch.equal(one[k], fresh[k]) for k in one if k in fresh), "nothing trained"


@pytest.mark.parametrize("fmt", ["maecli", "official", "official-encoder-only", "hf"])
def test_init_from_each_format(runner, tmp_path, store, fmt):
    torch.manual_seed(123)
    source = MaskedAutoencoder(**TINY)
    sd = source.state_dict()
    arch = {**TINY, "norm_pix_loss": False}
    if fmt == "maecli":
        from maecli.weights import save_weights

        path = tmp_path / "init.safetensors"
        save_weights(path, sd, arch)
    elif fmt == "official":
        save_official(path := tmp_path / "mae.pth", sd)
    elif fmt == "official-encoder-only":
        save_official(path := tmp_path / "mae_pretrain.pth", {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))})
    else:
        save_hf(path := tmp_path / "hf", sd, arch)
    # one step at lr 0 (the first warmup step) leaves the weights exactly as loaded
    result, summary = pretrain(runner, project(tmp_path, store, steps=1, warmup_steps=5, checkpoint_every=1, init_from=str(path)))
    assert result.exit_code == 0, result.output
    assert summary["notes"][0].startswith(f"initialized from {path}")
    loaded = final_weights(tmp_path, 1)
    encoder = [k for k in sd if not k.startswith(("decoder", "mask_token"))]
    assert all(torch.equal(loaded[k], sd[k]) for k in encoder)
    decoder_same = all(torch.equal(loaded[k], sd[k]) for k in sd if k not in encoder)
    assert decoder_same == (fmt != "official-encoder-only")
    assert ("encoder only" in summary["notes"][0]) == (fmt == "official-encoder-only")


def test_init_from_another_shape_is_refused(runner, tmp_path, store):
    from maecli.weights import save_weights

    save_weights(tmp_path / "big.safetensors", MaskedAutoencoder(**{**TINY, "embed_dim": 64}).state_dict(), {**TINY, "embed_dim": 64, "norm_pix_loss": False})
    result, _ = pretrain(runner, project(tmp_path, store, init_from="big.safetensors"))
    assert result.exit_code == 2
    assert result.stderr == f"{tmp_path / 'big.safetensors'}: init_from has another model shape: model.embed_dim is 64 there, 32 in the config\n"


def test_changing_the_model_on_resume_is_refused(runner, tmp_path, store):
    config = project(tmp_path, store, steps=4, checkpoint_every=2)
    assert pretrain(runner, config)[0].exit_code == 0
    result = runner.invoke(app, ["pretrain", "-c", str(config), "--set", "pretrain.steps=8", "--set", "model.depth=3"])
    assert result.exit_code == 2
    assert result.stderr == (f"{tmp_path / 'runs' / 'pretrain'}: this run was trained with another model shape (use --restart to start over, "
                             "or another pretrain.run): model.depth is 2 there, 3 in the config\n")
    result, summary = pretrain(runner, config, "--set", "pretrain.steps=8", "--set", "model.depth=3", "--restart")
    assert result.exit_code == 0 and summary["steps_this_run"] == 8 and not summary["notes"]


def test_non_finite_loss_stops_with_the_step_named(runner, tmp_path, store):
    result, _ = pretrain(runner, project(tmp_path, store, steps=30, warmup_steps=0, lr=1e30, checkpoint_every=1, keep_last=30))
    assert result.exit_code == 1
    line = result.stderr.strip().splitlines()[-1]
    ckpts = sorted((tmp_path / "runs" / "pretrain" / "checkpoints").glob("*.safetensors"))
    bad_step = int(line.split("from step ")[1].split(";")[0])
    assert line == f"loss is nan (not finite) from step {bad_step}; stopped, the last good checkpoint is {ckpts[-1]}"
    assert int(ckpts[-1].name[5:13]) == bad_step - 1  # every checkpoint was written before the loss went bad
    assert "Traceback" not in result.output
    assert all(torch.isfinite(t).all() for t in read_weights(ckpts[-1])[0].values())  # intact and loadable


def test_checkpoint_gives_the_same_outputs_in_a_fresh_process(runner, tmp_path, store):
    assert pretrain(runner, project(tmp_path, store, steps=3, checkpoint_every=3))[0].exit_code == 0
    path = tmp_path / "runs" / "pretrain" / "checkpoints" / "step-00000003.safetensors"
    code = (
        "import sys, torch; from maecli.weights import load_model\n"
        "model, _ = load_model(sys.argv[1]); g = torch.Generator().manual_seed(0)\n"
        "x, noise = torch.randn(2, 3, 32, 32, generator=g), torch.rand(2, 16, generator=g)\n"
        "loss, pred, mask = model(x, noise=noise); torch.save({'loss': loss, 'pred': pred}, sys.argv[2])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "out.pt")], check=True)
    theirs = torch.load(tmp_path / "out.pt", weights_only=True)
    from maecli.weights import load_model

    model, _ = load_model(path)
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(2, 3, 32, 32, generator=g), torch.rand(2, 16, generator=g)
    loss, pred, _ = model(x, noise=noise)
    assert torch.equal(pred, theirs["pred"]) and torch.equal(loss, theirs["loss"])


def test_too_small_store_and_missing_store(runner, tmp_path, store):
    result, _ = pretrain(runner, project(tmp_path, store, batch_size=4096))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"pretrain.batch_size: the train split of {store} has ")
    (tmp_path / "empty").mkdir()
    result, _ = pretrain(runner, project(tmp_path / "empty", tmp_path / "nostore"))
    assert result.exit_code == 2 and "not a frame store" in result.stderr


def test_wide_model_trains_from_square_frames(runner, tmp_path, store):
    config = project(tmp_path, store, steps=3, checkpoint_every=3)
    config.write_text(config.read_text().replace("img_size = 32", "img_size = [32, 64]"))
    result, summary = pretrain(runner, config)
    assert result.exit_code == 0, result.output
    weights = final_weights(tmp_path, 3)
    assert weights["pos_embed"].shape == (1, 1 + 4 * 8, 32)  # 4 x 8 patches
    assert Path(summary["snapshot"]).stat().st_size > 0


def test_compiled_run_trains_as_eager_does(runner, tmp_path, store):
    """The path CUDA takes by default, on this CPU: torch.compile (here in a non-default mode, whose CUDA graphs a CPU
    skips) trains the same steps as eager, to float32 rounding; a mode torch does not have is one line."""
    runs = {}
    settings = {"eager": dict(compile=False), "model": dict(compile=True, compile_mode="reduce-overhead"), "blocks": dict(compile=True)}
    for name, kw in settings.items():  # reduce-overhead: the whole model; compile_mode "auto" on a CPU: the default mode, block by block
        (tmp_path / name).mkdir()
        config = project(tmp_path / name, store, steps=3, log_every=1, checkpoint_every=3, **kw)
        config.write_text(config.read_text().replace("depth = 2", "depth = 4"))  # 4 encoder blocks and 1 decoder block
        graphs = compiled_graphs()
        result, summary = pretrain(runner, config)
        assert result.exit_code == 0, result.output
        losses = [json.loads(line)["loss"] for line in (tmp_path / name / "runs" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
        runs[name] = summary, losses, final_weights(tmp_path / name, 3), result.stderr, compiled_graphs() - graphs
    eager = runs.pop("eager")
    assert (eager[0]["compiled"], eager[0]["compile_mode"]) == (False, None) and "compil" not in eager[3]
    for name, (summary, losses, weights, stderr, graphs) in runs.items():
        mode, what = ("reduce-overhead", "the whole model") if name == "model" else ("default", "its transformer blocks")
        assert (summary["compiled"], summary["compile_mode"]) == (True, mode)
        said = [line for line in stderr.splitlines() if line.startswith("pretrain")]  # torch's own warnings aside
        assert said[0] == f"pretrain: compiling the model for cpu (torch.compile, mode {mode}, {what}): the first step takes longer"
        assert [line for line in said if line.startswith("pretrain: compiled; ")][0].startswith("pretrain: compiled; the first step took ")
        if name == "blocks":  # the 4 encoder blocks share one graph (and the decoder's its own): one compile, whatever the depth
            assert graphs <= 2, graphs
        assert losses == pytest.approx(eager[1], rel=1e-4) and len(losses) == 3
        for k in eager[2]:
            a, b = weights[k], eager[2][k]
            if k.endswith("attn.qkv.bias"):  # a key bias has a zero gradient (softmax ignores a shift of every key): Adam
                d = len(a) // 3                 # turns its rounding noise into steps of ~lr, so compare the q and v thirds
                a, b = torch.cat([a[:d], a[2 * d:]]), torch.cat([b[:d], b[2 * d:]])
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=k)
    result, _ = pretrain(runner, project(tmp_path, store, compile_mode="fast"))
    assert result.exit_code == 2 and "pretrain.compile_mode" in result.stderr and "reduce-overhead" in result.stderr and "Traceback" not in result.output
