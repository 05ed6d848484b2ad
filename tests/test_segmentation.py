"""Segmentation sets: reading (index and colour masks, classes.csv, bad input), the scores against a hand-computed
confusion matrix, the dense probe end to end, and fine-tuning's export reloaded in plain timm + torch."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from maecli.cli import app
from maecli.data import to_input
from maecli.masks import confusion_of, seg_scores
from tests.conftest import write_project

PALETTE = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
VOID = (0, 0, 0)


def make_seg_set(folder, n, seed, size=32, colour_masks=False, csv=True):
    """Frames of 4 x 4 blocks, each block one of three colours under per-pixel noise; the mask is the block's colour
    class (a function of colour), the top-left block unlabeled (255, or the void colour)."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    colours = np.array(list(PALETTE.values()))
    block = size // 4
    for i in range(n):
        classes = rng.integers(0, 3, (4, 4))
        mask = np.kron(classes, np.ones((block, block), dtype=np.int64)).astype(np.uint8)  # (size, size)
        img = np.clip(colours[mask] + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
        mask[:block, :block] = 255
        Image.fromarray(img).save(folder / "images" / f"f{i:03d}.png")
        if colour_masks:
            rgb = np.concatenate([colours, np.zeros((253, 3), np.int64), [VOID]])[mask].astype(np.uint8)  # 255 -> void colour
            Image.fromarray(rgb).save(folder / "masks" / f"f{i:03d}.png")
        else:
            Image.fromarray(mask).save(folder / "masks" / f"f{i:03d}.png")
    if csv:
        rows = ["class_id,name,r,g,b"] + [f"{k},{name},{r},{g},{b}" for k, (name, (r, g, b)) in enumerate(PALETTE.items())]
        (folder / "classes.csv").write_text("\n".join(rows + ["255,void,0,0,0"]) + "\n")
    return folder


@pytest.fixture(scope="module")
def seg_sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("seg")
    return make_seg_set(d / "train", 48, 0), make_seg_set(d / "val", 12, 1, size=40)


def test_scores_against_a_hand_computed_confusion_matrix():
    # classes 0, 1, 2, 3; 3 is absent from truth and predictions; 9 is ignored
    truth = torch.tensor([[0, 0, 1, 1], [2, 2, 9, 9]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])  # the ignored pixels' predictions do not count
    confusion = confusion_of(pred, truth, 4, 9)
    assert confusion.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    s = seg_scores(confusion, ["a", "b", "c", "d"])
    # IoU: a 1 / (2 + 2 - 1) = 1/3, b 2 / (2 + 3 - 2) = 2/3, c 1 / (2 + 1 - 1) = 1/2, d absent
    assert s["per_class_iou"] == pytest.approx({"a": 1 / 3, "b": 2 / 3, "c": 1 / 2, "d": None})
    assert s["per_class_iou"]["d"] is None
    assert s["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert s["pixel_acc"] == pytest.approx(4 / 6) and s["mean_class_acc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    # a class predicted but never true counts in the mean with IoU 0
    assert seg_scores(confusion_of(torch.tensor([3, 1]), torch.tensor([0, 1]), 4, 9), list("abcd"))["miou"] == pytest.approx((0 + 1 + 0) / 3)


def probe(runner, trained, train, val, *args):
    return runner.invoke(app, ["probe", "-c", str(trained / "maecli.toml"), "--set", f"probe.train={train}", "--set", f"probe.val={val}",
                               "--set", "probe.epochs=100", *map(str, args)])


def test_dense_probe_solves_masks_that_are_a_function_of_colour(runner, trained, seg_sets):
    result = probe(runner, trained, *seg_sets, "--baseline", "random", "--baseline", "pixels", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["task"] == "segmentation" and report["classes"] == list(PALETTE) and report["input_size"] == [32, 32]
    assert report["train_images"] == 48 and report["val_images"] == 12 and report["ignore_index"] == 255
    assert list(report["results"]) == ["pretrained", "random init", "raw pixels", "majority class"]
    r = report["results"]
    assert r["pretrained"]["miou"] >= 0.9 and r["raw pixels"]["miou"] >= 0.9, {k: v["miou"] for k, v in r.items()}
    assert r["majority class"]["miou"] < 0.3 and sum(v is not None for v in r["majority class"]["per_class_iou"].values()) == 3
    # scored at the masks' own resolution (40 x 40), without the 10 x 10 unlabeled corner
    assert sum(map(sum, r["pretrained"]["confusion"])) == 12 * (40 * 40 - 10 * 10)
    out = trained / "runs" / "pretrain" / "probe"
    assert (out / "iou.png").stat().st_size > 0 and (out / "predictions.png").stat().st_size > 0
    picture = Image.open(out / "predictions.png")
    assert picture.width > 5 * 160 and picture.height > 4 * 160  # image | truth | 4 predictions, 4 frames
    assert json.loads((out / "report.json").read_text())["results"] == r
    # the last 4 blocks of a 2-block encoder are refused; the last 2 work
    refused = probe(runner, trained, *seg_sets, "--set", "probe.layers=4")
    assert refused.exit_code == 2 and refused.stderr == "probe.layers: the encoder has 2 blocks (got 4)\n"
    table = probe(runner, trained, *seg_sets, "--set", "probe.layers=2", "--set", "probe.epochs=5", "--set", "probe.input_size=[32, 48]")
    assert table.exit_code == 0, table.output
    assert "segmentation, frozen encoders, last 2 blocks: 3 classes, 48 train / 12 val frames at 32x48" in " ".join(table.stderr.split())
    assert "IoU per class" in table.stderr and table.stdout == ""


def test_colour_masks_read_as_index_masks(runner, trained, seg_sets, tmp_path):
    train = make_seg_set(tmp_path / "train", 48, 0, colour_masks=True)
    val = make_seg_set(tmp_path / "val", 12, 1, size=40, colour_masks=True)
    index = json.loads(probe(runner, trained, *seg_sets, "--set", "probe.epochs=5", "--json").stdout)
    colour = json.loads(probe(runner, trained, train, val, "--set", "probe.epochs=5", "--json").stdout)
    assert colour["results"]["pretrained"]["confusion"] == index["results"]["pretrained"]["confusion"]


def test_augmented_probe_and_few_frames(runner, trained, seg_sets):
    result = probe(runner, trained, *seg_sets, "--set", "probe.hflip=true", "--set", "probe.crop_scale=[0.5, 1.0]", "--set", "probe.frames=10",
                   "--set", "probe.epochs=4", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["train_images"] == 10 and "probe.frames: training on 10 of 48 labeled frames (seed 0)" in report["notes"]
    assert 0 <= report["results"]["pretrained"]["miou"] <= 1


def test_bad_frames_are_skipped_one_line_each(runner, trained, seg_sets, tmp_path):
    train = make_seg_set(tmp_path / "train", 8, 0)
    (train / "images" / "lonely.png").write_bytes((train / "images" / "f000.png").read_bytes())
    (train / "masks" / "orphan.png").write_bytes((train / "masks" / "f000.png").read_bytes())
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(train / "masks" / "f001.png")  # another size than its image
    bad = np.zeros((32, 32), np.uint8)
    bad[5, 7] = 4  # neither a class (0-2) nor 255
    Image.fromarray(bad).save(train / "masks" / "f002.png")
    (train / "images" / "f003.png").write_bytes(b"\x89PNG not really")
    Image.fromarray(np.full((32, 32, 3), (1, 2, 3), np.uint8)).save(train / "masks" / "f004.png")  # a colour not in classes.csv
    result = probe(runner, trained, train, seg_sets[1], "--set", "probe.epochs=2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["train_images"] == 4
    assert report["notes"] == [
        f"skipped {train / 'images' / 'lonely.png'}: no mask {train / 'masks' / 'lonely'}.png",
        f"skipped {train / 'masks' / 'orphan.png'}: no image {train / 'images' / 'orphan'}.* for this mask",
        f"skipped {train / 'images' / 'f001.png'}: its mask f001.png is 16x16, the image 32x32",
        f"skipped {train / 'images' / 'f003.png'}: not a readable image (UnidentifiedImageError)",
        f"skipped {train / 'masks' / 'f004.png'}: colour (1, 2, 3) at row 0, column 0 is not in classes.csv",
        f"skipped {train / 'masks' / 'f002.png'}: mask value 4 at row 5, column 7 is neither a class (0-2) nor the ignore index 255",
    ]


def test_refused_sets(runner, trained, seg_sets, tmp_path):
    one = make_seg_set(tmp_path / "one", 4, 0, csv=False)
    for p in (one / "masks").glob("*.png"):
        Image.fromarray(np.full((32, 32), 1, np.uint8)).save(p)
    result = probe(runner, trained, one, seg_sets[1])
    assert result.exit_code == 2 and result.stderr == "probe.train: the training masks hold 1 class; a probe needs at least two\n"
    colour = make_seg_set(tmp_path / "colour", 4, 0, colour_masks=True, csv=False)
    result = probe(runner, trained, colour, seg_sets[1])
    reason = "an RGB mask, and no classes.csv with r,g,b colours to read it by"
    assert result.exit_code == 2 and result.stderr == "".join(f"skipped {colour / 'masks' / f'f00{i}.png'}: {reason}\n" for i in range(4)) + (
        f"probe.train: none of the 4 frames of {colour} could be used\n")
    bad_csv = make_seg_set(tmp_path / "csv", 4, 0)
    (bad_csv / "classes.csv").write_text("class_id,name\n0,road\n2,car\n")
    result = probe(runner, trained, bad_csv, seg_sets[1])
    assert result.exit_code == 2 and result.stderr == f"{bad_csv / 'classes.csv'}: class ids must be 0..1 besides the ignore index 255 (got [0, 2])\n"
    result = probe(runner, trained, seg_sets[0], tmp_path / "one" / "images")
    assert result.exit_code == 2 and result.stderr == f"probe.val: {tmp_path / 'one' / 'images'} is not a segmentation set (images/ and masks/) like probe.train\n"
    result = probe(runner, trained, seg_sets[0], seg_sets[1], "--set", "probe.input_size=[30, 32]")
    assert result.exit_code == 2 and result.stderr == "probe.input_size: must be divisible by the model's patch_size 8 (got [30, 32])\n"


def test_finetuned_segmenter_reloads_in_timm_and_reproduces_its_miou(runner, trained, seg_sets, tmp_path):
    weights = sorted((trained / "runs" / "pretrain" / "checkpoints").glob("step-*.safetensors"))[-1]
    config = write_project(tmp_path, trained, probe={"train": str(seg_sets[0]), "val": str(seg_sets[1])},
                           finetune={"checkpoint": str(weights), "epochs": 3, "batch_size": 16, "warmup_epochs": 1, "blr": 0.02, "hflip": True})
    result = runner.invoke(app, ["finetune", "-c", str(config), "--baseline", "random", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["task"] == "segmentation" and list(report["results"]) == ["pretrained", "random init"]
    files = sorted((seg_sets[1] / "images").glob("*.png"))
    images = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB").resize((32, 32), Image.BICUBIC)) for p in files]))  # the tool's resize
    masks = torch.from_numpy(np.stack([np.asarray(Image.open(seg_sets[1] / "masks" / p.name)) for p in files]))  # (N, 40, 40)
    for name, r in report["results"].items():
        assert [row["epoch"] for row in r["curve"]] == [1, 2, 3] and r["curve"][-1]["train_loss"] < r["curve"][0]["train_loss"]
        assert r["curve"][-1]["val_miou"] == pytest.approx(r["miou"], abs=1e-6) and (tmp_path / "runs" / "pretrain" / "finetune" / name.replace(" ", "-") / "predictions.png").exists()
        namespace = {"x": to_input(images), "H": 40, "W": 40}
        exec(r["snippet"], namespace)
        namespace["m"].eval()
        with torch.no_grad():
            exec(r["predict"], namespace)
        pred = namespace["logits"].argmax(1)  # (N, 40, 40)
        assert seg_scores(confusion_of(pred, masks, 3, 255), report["classes"])["miou"] == pytest.approx(r["miou"], abs=1e-6)
    assert report["results"]["pretrained"]["miou"] >= 0.8
    table = runner.invoke(app, ["finetune", "-c", str(config)])
    assert table.exit_code == 0 and "segmentation, fine-tuned (all blocks, 3 epochs)" in " ".join(table.stderr.split()) and "then logits = " in table.stderr
    mixed = runner.invoke(app, ["finetune", "-c", str(config), "--set", "finetune.mixup=0.8"])
    assert mixed.exit_code == 2 and mixed.stderr == "finetune.mixup: mixes whole images' labels; a segmentation set has per-pixel labels (set it to 0)\n"


def test_masks_are_cropped_and_flipped_with_their_images():
    """The same crops on a frame and its mask: where the crop lands inside one block, the pixel's colour (a block's
    class) and the cropped mask agree, flips included."""
    from maecli.data import crop_boxes, resized_crop, resized_crop_masks

    rng = np.random.default_rng(0)
    classes = rng.integers(0, 3, (8, 8))
    mask = torch.from_numpy(np.kron(classes, np.ones((8, 8), dtype=np.int64)).astype(np.uint8))  # (64, 64)
    frames = torch.from_numpy(np.array(list(PALETTE.values()), np.uint8)[mask.numpy()])[None].expand(16, -1, -1, -1)  # (16, 64, 64, 3)
    theta = torch.from_numpy(crop_boxes(np.random.default_rng(1), 16, (64, 64), (32, 32), (0.3, 1.0), hflip=True))
    assert (theta[:, 0, 0] < 0).any() and (theta[:, 0, 0] > 0).any()  # both flipped and unflipped crops
    pixels = resized_crop(frames, theta, (32, 32))  # (16, 3, 32, 32) in [0, 1]
    cropped = resized_crop_masks(mask[None].expand(16, -1, -1), theta, (32, 32))  # (16, 32, 32)
    colours = torch.tensor(list(PALETTE.values())).float().div(255)  # (3, 3)
    nearest = ((pixels[:, :, None] - colours.T.reshape(1, 3, 3, 1, 1)) ** 2).sum(1).argmin(1)  # (16, 32, 32): the closest class colour
    pure = ((pixels[:, :, None] - colours.T.reshape(1, 3, 3, 1, 1)) ** 2).sum(1).min(1).values < 1e-6  # pixels not blended across a border
    assert pure.float().mean() > 0.5 and torch.equal(nearest[pure], cropped[pure].long())
