"""`maecli probe`: linear probe and k-NN on a generated labeled set, the random baseline, and bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from maecli.cli import app
from maecli.tasks.classification import knn_scores, scores_report

COLORS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


def make_set(folder, per_class, seed, size=32, classes=COLORS):
    """Images whose class is their dominant colour, under strong per-pixel noise: linearly separable."""
    rng = np.random.default_rng(seed)
    for name, rgb in classes.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.clip(np.array(rgb) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / name / f"{i:03d}.png")
    return folder


def probe(runner, trained, *args):
    return runner.invoke(app, ["probe", "-c", str(trained / "maecli.toml"), *map(str, args)])


def test_separable_set_with_random_and_pixel_baselines(runner, trained, tmp_path):
    train, val = make_set(tmp_path / "train", 30, 0), make_set(tmp_path / "val", 10, 1, size=40)
    result = probe(runner, trained, "--set", f"probe.train={train}", "--set", f"probe.val={val}", "--set", "probe.epochs=30", "--baseline", "random",
                   "--baseline", "pixels", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["classes"] == ["blue", "green", "red"] and report["train_images"] == 90 and report["val_images"] == 30
    pre, rnd = report["results"]["pretrained"], report["results"]["random init"]
    assert pre["linear"]["top1"] >= 0.9 and pre["knn"]["top1"] >= 0.9
    assert 0 <= rnd["linear"]["top1"] <= 1 and 0 <= rnd["knn"]["top1"] <= 1  # reported side by side, whatever it is
    assert list(report["results"]) == ["pretrained", "random init", "raw pixels"]
    pixels = report["results"]["raw pixels"]  # the colour is in every pixel: the floor is high here
    assert pixels["linear"]["top1"] >= 0.9 and pixels["knn"]["top1"] >= 0.9 and sum(map(sum, pixels["knn"]["confusion"])) == 30
    assert "top5" not in pre["linear"] and "top-5 accuracy not reported: only 3 classes" in report["notes"]
    assert "resized 30 images from 40x40 to 32x32 (the model's input size)" in report["notes"]
    assert sum(map(sum, pre["linear"]["confusion"])) == 30 and set(pre["linear"]["per_class"]) == set(COLORS)
    assert (trained / "runs" / "pretrain" / "probe" / "confusion-pretrained.png").stat().st_size > 0
    assert json.loads((trained / "runs" / "pretrain" / "probe" / "report.json").read_text())["results"] == report["results"]
    table = probe(runner, trained, "--set", f"probe.train={train}", "--set", f"probe.val={val}", "--set", "probe.epochs=5")
    assert table.exit_code == 0 and "linear probe top-1" in table.stderr and "pretrained" in table.stderr and table.stdout == ""


def test_one_folder_is_split_by_class_and_bad_images_are_skipped(runner, trained, tmp_path):
    train = make_set(tmp_path / "train", 20, 0)
    (train / "red" / "broken.png").write_bytes(b"\x89PNG not really")
    result = probe(runner, trained, "--set", f"probe.train={train}", "--set", "probe.epochs=5", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["val_images"] + report["train_images"] == 60  # every readable image is used once; the broken one is skipped
    assert report["val_images"] in (11, 12)  # 0.2 of each class's files held out (4 each); the broken file is on one side
    assert f"skipped {train / 'red' / 'broken.png'}: not a readable image (UnidentifiedImageError)" in report["notes"]
    assert any(n.startswith("no val folder: held out 12 of 61 images") for n in report["notes"])


def test_top5_with_many_classes():
    scores = torch.tensor([[0.9, 0.1, 0, 0, 0, 0, 0], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]])
    report = scores_report(scores, torch.tensor([0, 0]), [str(i) for i in range(7)])
    assert report["top1"] == 0.5 and report["top5"] == 0.5  # the second sample's label ranks last


def test_knn_votes_by_weighted_neighbours():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    votes = knn_scores(train, torch.tensor([0, 0, 1]), torch.tensor([[1.0, 0.05], [0.05, 1.0]]), 2, k=2, temperature=0.1)
    assert votes.argmax(1).tolist() == [0, 1]


@pytest.mark.parametrize(
    "setup, message",
    [
        ("none", "probe.train: no labeled images given (a folder with one sub-folder per class)"),
        ("empty", "probe.train: {train} holds no images in class sub-folders"),
        ("one class", "probe.train: {train} has only one class (red); a probe needs at least two"),
        ("missing", "probe.train: {train} is not a folder"),
    ],
)
def test_bad_labeled_folders(runner, trained, tmp_path, setup, message):
    train = tmp_path / "train"
    if setup == "empty":
        (train / "red").mkdir(parents=True)
    if setup == "one class":
        make_set(train, 5, 0, classes={"red": COLORS["red"]})
    args = [] if setup == "none" else ["--set", f"probe.train={train}"]
    result = probe(runner, trained, *args)
    assert result.exit_code == 2
    assert result.stderr == message.format(train=train) + "\n"


def test_unknown_baseline(runner, trained, tmp_path):
    result = probe(runner, trained, "--baseline", "random", "--baseline", "imagenet")
    assert result.exit_code == 2 and result.stderr == "--baseline: must be 'random' or 'pixels' (got 'imagenet')\n"


def test_pixel_features_are_the_normalized_input():
    from maecli.data import IMAGENET_MEAN, IMAGENET_STD
    from maecli.tasks.classification import pixel_features

    images = torch.randint(0, 256, (2, 4, 6, 3), dtype=torch.uint8)  # (N, h, w, 3)
    x = pixel_features(images)
    assert x.shape == (2, 3 * 4 * 6)
    channel_first = images.permute(0, 3, 1, 2).float() / 255  # (N, 3, h, w)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, ((channel_first - mean) / std).reshape(2, -1))


def test_per_class_keeps_at_most_n_labels_of_each_class(runner, trained, tmp_path):
    train, val = make_set(tmp_path / "train", 12, 0), make_set(tmp_path / "val", 4, 1)
    args = ["--set", f"probe.train={train}", "--set", f"probe.val={val}", "--set", "probe.epochs=5", "--json"]
    result = probe(runner, trained, *args, "--set", "probe.per_class=5")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["train_images"] == 15 and report["val_images"] == 12
    assert "probe.per_class: training on 15 of 36 labeled images (at most 5 per class, seed 0)" in report["notes"]
    again = json.loads(probe(runner, trained, *args, "--set", "probe.per_class=5").stdout)
    assert again["results"] == report["results"]  # the same images for the same seed
