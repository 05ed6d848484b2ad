"""`maecli finetune`: end to end on a generated labeled set, partial fine-tuning, export to timm, exact resume after
kill -9, torchrun, the recipe's pieces, and bad input."""

import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from maecli.checkpoint import checkpoint_files
from maecli.cli import app
from maecli.data import to_input
from maecli.finetune import layer_groups
from maecli.tasks.classification import mix
from maecli.vit import classifier
from tests.conftest import TINY, write_project
from tests.test_probe import COLORS, make_set
from tests.test_segmentation import make_seg_set

FAST = dict(epochs=3, batch_size=16, warmup_epochs=1, blr=0.02)  # lr 1.25e-3 at batch 16


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    d = tmp_path_factory.mktemp("labeled")
    return make_set(d / "train", 32, 0), make_set(d / "val", 10, 1)


@pytest.fixture(scope="module")
def seg_labeled(tmp_path_factory):
    """A segmentation set with as many training frames as `labeled` has images (96: the same steps per epoch)."""
    d = tmp_path_factory.mktemp("seg-labeled")
    return make_seg_set(d / "train", 96, 0), make_seg_set(d / "val", 10, 1)


KINDS = {"classification": ("labeled", "classifier", dict(mixup=0.8, cutmix=1.0)), "segmentation": ("seg_labeled", "segmenter", {})}


def project(folder, trained, labeled, **finetune):
    """A project that fine-tunes the `trained` fixture's checkpoint on `labeled`."""
    folder.mkdir(exist_ok=True)
    weights = sorted((trained / "runs" / "pretrain" / "checkpoints").glob("step-*.safetensors"))[-1]
    return write_project(folder, trained, probe={"train": str(labeled[0]), "val": str(labeled[1])},
                         finetune={"checkpoint": str(weights), **FAST, **finetune})


def finetune(runner, config, *args):
    result = runner.invoke(app, ["finetune", "-c", str(config), *map(str, args)])
    return result, json.loads(result.stdout) if result.exit_code == 0 and "--json" in args else None


def test_finetunes_reports_and_exports_a_timm_classifier(runner, tmp_path, trained, labeled):
    result, report = finetune(runner, project(tmp_path, trained, labeled), "--baseline", "random", "--json")
    assert result.exit_code == 0, result.output
    assert report["classes"] == ["blue", "green", "red"] and report["train_images"] == 96 and report["val_images"] == 30
    assert list(report["results"]) == ["pretrained", "random init"]
    out = tmp_path / "runs" / "pretrain" / "finetune"
    for name, r in report["results"].items():
        assert r["top1"] >= 0.9, f"{name} did not learn a colour task: {r['top1']}"
        assert [row["epoch"] for row in r["curve"]] == [1, 2, 3] and r["steps"] == 3 * 6  # 96 images, batch 16
        assert r["curve"][-1]["train_loss"] < r["curve"][0]["train_loss"]
        assert sum(map(sum, r["confusion"])) == 30 and set(r["per_class"]) == set(COLORS)
        # off a terminal: the projected duration after the first steps, then a plain line per evaluation
        logged = [line for line in result.stderr.splitlines() if line.startswith(f"finetune {name}")]
        assert logged[0].startswith(f"finetune {name}: ") and " s a step over the first steps: 14 steps more take about " in logged[0]
        assert [re.search(r"  step (\d+)/18  epoch ", line)[1] for line in logged[1:]] == ["6", "12", "18"]
        assert all(f"loss {row['train_loss']:.4f}  " in line for line, row in zip(logged[1:], r["curve"], strict=True))
        folder = out / name.replace(" ", "-")
        assert (folder / "confusion.png").stat().st_size > 0 and json.loads((folder / "summary.json").read_text())["top1"] == r["top1"]
        board = EventAccumulator(str(folder / "tensorboard")).Reload()  # the curves for TensorBoard too
        assert [e.value for e in board.Scalars("val/top1")] == pytest.approx([row["val_top1"] for row in r["curve"]])
        assert [e.step for e in board.Scalars("train/loss")] == [row["step"] for row in r["curve"]]
        # the exported classifier, loaded by the line the tool prints, predicts what the report says
        namespace = {}
        exec(r["snippet"], namespace)  # no registered timm name has the tiny sizes: m = VisionTransformer(...); m.load_state_dict(...)
        files = sorted(labeled[1].rglob("*.png"))
        images = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files]))  # (N, h, w, 3)
        labels = torch.tensor([report["classes"].index(p.parent.name) for p in files])
        with torch.no_grad():
            top1 = (namespace["m"].eval()(to_input(images)).argmax(1) == labels).float().mean().item()
        assert top1 == pytest.approx(r["top1"])
    assert (out / "curves.png").stat().st_size > 0 and json.loads((out / "report.json").read_text())["results"]["pretrained"]["top1"] == report["results"]["pretrained"]["top1"]
    # a finished run, rerun, trains no more and reports the same
    again, rerun = finetune(runner, project(tmp_path, trained, labeled), "--baseline", "random", "--json")
    assert again.exit_code == 0 and rerun["results"]["pretrained"]["steps_this_run"] == 0
    assert rerun["results"]["pretrained"]["top1"] == report["results"]["pretrained"]["top1"]
    table = runner.invoke(app, ["finetune", "-c", str(project(tmp_path, trained, labeled))])
    assert table.exit_code == 0 and "fine-tuned (all blocks, 3 epochs)" in table.stderr and "load it with: import timm" in table.stderr


@pytest.mark.parametrize("blocks", [0, 1])
def test_partial_finetuning_trains_only_the_last_blocks(runner, tmp_path, trained, labeled, blocks):
    config = project(tmp_path, trained, labeled, blocks=blocks, epochs=1)
    result, report = finetune(runner, config, "--json")
    assert result.exit_code == 0, result.output
    before = load_file(report["checkpoint"])
    after = load_file(report["results"]["pretrained"]["classifier"])
    trained_keys = {k for k in before if k in after and not torch.equal(before[k], after[k])}
    expected_prefixes = ("blocks.1.", "norm.") if blocks == 1 else ()
    assert trained_keys == {k for k in before if k.startswith(expected_prefixes)} if expected_prefixes else trained_keys == set()
    assert "head.weight" in after and report["results"]["pretrained"]["trainable_params"] == sum(
        v.numel() for k, v in after.items() if k.startswith(("head.", *expected_prefixes)))
    assert report["recipe"]["blocks"] == blocks


def final_classifier(folder, kind="classification"):
    return load_file(folder / "runs" / "pretrain" / "finetune" / "pretrained" / f"{KINDS[kind][1]}.safetensors")


@pytest.mark.parametrize("kind,sig", [*((kind, signal.SIGKILL) for kind in KINDS), ("classification", signal.SIGTERM)])
def test_killed_run_resumes_bit_identical(runner, tmp_path, trained, request, kind, sig):
    labeled = request.getfixturevalue(KINDS[kind][0])
    kw = dict(epochs=12, drop_path=0.2, hflip=True, **KINDS[kind][2])  # every source of randomness on (mixing: whole images only)
    result, _ = finetune(runner, project(tmp_path / "ref", trained, labeled, **kw), "--json")
    assert result.exit_code == 0, result.output
    config = project(tmp_path / "cut", trained, labeled, **kw)
    proc = subprocess.Popen([sys.executable, "-m", "maecli", "finetune", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpts = tmp_path / "cut" / "runs" / "pretrain" / "finetune" / "pretrained" / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(ckpts.glob("step-*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(sig)
    _, stderr = proc.communicate()
    written = sorted(ckpts.glob("step-*.safetensors"))
    assert written and written[-1].name != checkpoint_files(ckpts, 72)[0].name, "the run finished before it could be killed"
    if sig == signal.SIGTERM:  # a checkpoint at the step it was stopped at, one line, exit 143
        assert proc.returncode == 143 and stderr.splitlines()[-1] == (f"interrupted (SIGTERM): checkpoint written at step "
                                                                      f"{int(written[-1].name[5:13])} ({written[-1]}); run the same command again to resume")
    result, report = finetune(runner, config, "--json")
    assert result.exit_code == 0, result.output
    r = report["results"]["pretrained"]
    assert r["notes"][0].startswith("resumed from step ") and 0 < r["steps_this_run"] < 72
    ref, cut = final_classifier(tmp_path / "ref", kind), final_classifier(tmp_path / "cut", kind)
    assert ref.keys() == cut.keys() and all(torch.equal(ref[k], cut[k]) for k in ref)
    assert [row["epoch"] for row in r["curve"]] == list(range(1, 13))  # nothing logged twice


@pytest.mark.parametrize("kind", list(KINDS))
def test_torchrun_two_processes_match_one(runner, tmp_path, trained, request, kind):
    labeled = request.getfixturevalue(KINDS[kind][0])
    kw = dict(epochs=1, drop_path=0.0, checkpoint_every=1)  # no mixing, no drop path: the global batch defines the step
    result, _ = finetune(runner, project(tmp_path / "one", trained, labeled, **kw), "--json")
    assert result.exit_code == 0, result.output
    config = project(tmp_path / "two", trained, labeled, **{**kw, "batch_size": 8})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "maecli", "finetune", "-c", str(config), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)  # printed once, by rank 0
    assert report["world_size"] == 2 and report["results"]["pretrained"]["steps"] == 6
    one, two = final_classifier(tmp_path / "one", kind), final_classifier(tmp_path / "two", kind)
    for k in one:
        a, b = one[k], two[k]
        if k.endswith("attn.qkv.bias"):  # the key bias gets a zero true gradient (see the pretrain test): compare q and v
            d = a.shape[0] // 3
            a, b = torch.cat([a[:d], a[2 * d :]]), torch.cat([b[:d], b[2 * d :]])
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=f"{k} differs between 1 and 2 processes")


def test_layer_decay_scales_and_weight_decay():
    from maecli.model import MaskedAutoencoder

    arch = {**TINY, "norm_pix_loss": False}
    model = classifier(MaskedAutoencoder(**arch), arch, 5, drop_path=0.0)
    groups = layer_groups(model, 0.05, 0.5)
    scale = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["head.weight"])] == (1.0, 0.05) and scale[id(named["head.bias"])] == (1.0, 0.0)
    assert scale[id(named["norm.weight"])] == (1.0, 0.0)
    assert scale[id(named["blocks.1.attn.qkv.weight"])] == (0.5, 0.05) and scale[id(named["blocks.0.mlp.fc1.weight"])] == (0.25, 0.05)
    assert scale[id(named["patch_embed.proj.weight"])] == (0.125, 0.05) and scale[id(named["pos_embed"])] == (0.125, 0.0)
    assert sum(len(g["params"]) for g in groups) == len(named)


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixed_targets_match_the_mixed_pixels(mixup, cutmix):
    """Each image is lam of itself and 1 - lam of its partner, and so is its target."""
    for step in range(8):
        rng = np.random.default_rng([0, step])
        imgs = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(4)])  # image i is all i
        targets = torch.eye(4)
        mixed, t = mix(rng, imgs, targets, mixup, cutmix)
        torch.testing.assert_close(t.sum(1), torch.ones(4))
        own = t.diagonal()  # the share of each image's own label
        # image i is i over the share it keeps and 3 - i (its partner's) elsewhere, for mixup and cutmix alike
        torch.testing.assert_close(mixed.mean((1, 2, 3)), torch.arange(4.0) * own + torch.arange(3.0, -1, -1) * (1 - own))


def test_bad_input(runner, tmp_path, trained, labeled):
    config = project(tmp_path, trained, labeled)
    cases = [
        (["--set", "finetune.blocks=5"], 2, "finetune.blocks: the encoder has 2 blocks (got 5)\n"),
        (["--set", "finetune.batch_size=200"], 2, "finetune.batch_size: 96 labeled train images, fewer than one step needs (200 x 1 devices)\n"),
        (["--baseline", "pixels"], 2, "--baseline: must be 'random' (got 'pixels')\n"),
        (["--set", "probe.train="], 2, "probe.train: no labeled images given (a folder with one sub-folder per class)\n"),
        (["--set", "finetune.crop_scale=[0.5, 0.1]"], 2, "--set: finetune.crop_scale: must be [low, high] with 0 < low <= high <= 1 (got [0.5, 0.1])\n"),
    ]
    one_class = make_set(tmp_path / "one", 4, 0, classes={"red": COLORS["red"]})
    cases.append((["--set", f"probe.train={one_class}"], 2, f"probe.train: {one_class} has only one class (red); a probe needs at least two\n"))
    for args, code, message in cases:
        result = runner.invoke(app, ["finetune", "-c", str(config), *args])
        assert (result.exit_code, result.stderr) == (code, message), args
    # weights of another size than [model], in a file that records none (an official .pth): one line, exit 1
    from maecli.model import MaskedAutoencoder

    torch.save({"model": MaskedAutoencoder(**{**TINY, "embed_dim": 64}).state_dict()}, tmp_path / "other.pth")
    result = runner.invoke(app, ["finetune", "-c", str(config), "--checkpoint", str(tmp_path / "other.pth")])
    assert result.exit_code == 1 and result.stderr == f"{tmp_path / 'other.pth'}: 'cls_token' has shape (1, 1, 64) in the file, the model expects (1, 1, 32)\n"
    # a fine-tuned classifier is not an MAE checkpoint
    save_file({"head.weight": torch.zeros(3, 32)}, tmp_path / "classifier.safetensors")
    result = runner.invoke(app, ["probe", "-c", str(config), "--checkpoint", str(tmp_path / "classifier.safetensors")])
    assert result.exit_code == 1 and "a fine-tuned classifier (from maecli finetune), not MAE weights" in result.stderr


def test_changed_recipe_does_not_resume_silently(runner, tmp_path, trained, labeled):
    config = project(tmp_path, trained, labeled, epochs=1)
    assert finetune(runner, config)[0].exit_code == 0
    result = runner.invoke(app, ["finetune", "-c", str(config), "--set", "finetune.label_smoothing=0.2"])
    run = tmp_path / "runs" / "pretrain" / "finetune" / "pretrained"
    assert result.exit_code == 2 and result.stderr == (f"{run}: fine-tuned with label_smoothing = 0.1, now 0.2; use --restart to start over, "
                                                        "or another finetune.run\n")
    assert runner.invoke(app, ["finetune", "-c", str(config), "--set", "finetune.label_smoothing=0.2", "--restart"]).exit_code == 0
