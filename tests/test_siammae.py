"""Frame-pair pretraining: SiamMAE's pairs (one video, earlier before later, within the gap), a decoder that really
reads the earlier frame, CropMAE's nested crops, and both methods through `maecli pretrain` end to end (visualize,
timm export, the Hugging Face export refusing, the too-sparse store refused)."""

import json

import numpy as np
import pytest
import torch

from maecli.cli import app
from maecli.data import Plan, Samples, crop_boxes, step_frames
from maecli.methods.cropmae import local_in_global
from maecli.methods.siammae import SiameseMAE, frame_pairs, pair_ranges
from maecli.store import FrameStore
from maecli.weights import read_metadata, read_weights
from tests.conftest import TINY, write_project
from tests.videos import frame_image, write_video


def random_times(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A store's frame times: 1-6 videos, each at its own rate (1-30 fps) with jitter and dropped frames."""
    times, offsets = [], [0]
    for _ in range(rng.integers(1, 7)):
        n = int(rng.integers(1, 60))
        t = np.sort(rng.uniform(0, 1, n) * 0.3 / rng.uniform(1, 30) + np.arange(n) / rng.uniform(1, 30))
        times.append(t)
        offsets.append(offsets[-1] + n)
    return np.concatenate(times), np.array(offsets)


@pytest.mark.parametrize("seed", range(20))
def test_pairs_come_from_one_video_earlier_before_later_within_the_gap(seed):
    rng = np.random.default_rng(seed)
    times, offsets = random_times(rng)
    gap = tuple(sorted(rng.uniform(0.05, 2.0, 2)))
    video = np.searchsorted(offsets, np.arange(len(times)), side="right") - 1  # (N,) each frame's video
    lo, hi = pair_ranges(times, offsets, gap)
    for i in range(len(times)):  # the range is exactly the frames a brute force finds
        valid = [j for j in range(len(times)) if video[j] == video[i] and gap[0] <= times[j] - times[i] <= gap[1]]
        assert list(range(lo[i], hi[i])) == valid, (i, gap)
    first = np.flatnonzero(hi > lo)
    samples = Samples(first=first, lo=lo[first], hi=hi[first])
    if len(first) < 4:
        return
    plan = Plan(num_frames=len(first), batch_size=4, world_size=1, rank=0, seed=seed)
    picked = np.concatenate([step_frames(plan, m, samples) for m in range(50)])  # (200, 2)
    a, b = picked[:, 0], picked[:, 1]
    assert np.all(video[a] == video[b]) and np.all(b > a)
    assert np.all(times[b] - times[a] >= gap[0] - 1e-6) and np.all(times[b] - times[a] <= gap[1] + 1e-6)
    # the later frame is drawn among all of its range, not always its first or last frame
    wide = samples.hi - samples.lo > 3
    if wide.any():
        laters = {tuple(samples.frames(np.flatnonzero(wide)[:1], np.array([u]))[0]) for u in np.linspace(0, 0.999, 40)}
        assert len(laters) == (samples.hi - samples.lo)[wide][0]


def test_pairs_of_a_real_store_and_the_two_ranks_split_one_batch(store):
    frames = FrameStore(store, split="train")
    samples, notes = frame_pairs(frames, (0.15, 0.55))  # the store's clips run at 10 fps: 2-5 frames later
    assert notes == [] and len(samples.first) == len(frames) - 2 * len(frames.videos)  # the last 2 frames of each video have no pair
    one = step_frames(Plan(num_frames=len(samples.first), batch_size=8, world_size=1, rank=0, seed=3), 7, samples)
    two = [step_frames(Plan(num_frames=len(samples.first), batch_size=4, world_size=2, rank=r, seed=3), 7, samples) for r in (0, 1)]
    assert np.array_equal(np.concatenate(two), one)
    for i, j in one:
        a, b = frames.provenance(int(i)), frames.provenance(int(j))
        assert a["source"] == b["source"] and 0.15 <= b["time"] - a["time"] <= 0.55 + 1e-6


def test_too_sparse_a_store_is_refused_and_a_video_without_pairs_is_noted(runner, tmp_path):
    for name, n in (("long.mp4", 20), ("short.mp4", 2)):  # 0.1 s of video: no pair 0.15 s apart
        write_video(tmp_path / name, images=[frame_image(3 * j, 48, 64) for j in range(n)], fps=10)
    (tmp_path / "maecli.toml").write_text('[extract]\nstore = "frames"\nsize = [32, 32]\nfps = 10\nworkers = 1\nval_fraction = 0\n')
    assert runner.invoke(app, ["extract", "-c", str(tmp_path / "maecli.toml"), str(tmp_path)]).exit_code == 0
    store = FrameStore(tmp_path / "frames", split="train")
    samples, notes = frame_pairs(store, (0.15, 0.55))
    assert notes == [f"1 of 2 videos have no frame pair 0.15-0.55 s apart, skipped: {tmp_path / 'short.mp4'}"]
    assert len(samples.first) == 18  # of long.mp4's 20 frames, all but the last two
    config = write_project(tmp_path, tmp_path / "frames", pretrain={"method": "siammae", "batch_size": 4, "steps": 2},
                           siammae={"gap": [0.02, 0.08], "mask_ratio": 0.75})
    result = runner.invoke(app, ["pretrain", "-c", str(config)])
    assert result.exit_code == 2
    assert result.stderr == (f"siammae.gap: no two frames of one video in {tmp_path / 'frames'} are 0.02-0.08 s apart (its frames are 0.1 s "
                             "apart at extract.fps = 10): extract the store at a higher fps, or widen the gap\n")


def test_a_mask_that_leaves_no_visible_patch_and_a_backward_gap_are_refused(runner, tmp_path, store):
    config = write_project(tmp_path, store, pretrain={"method": "cropmae"})  # 16 patches at 98.5%: none left
    result = runner.invoke(app, ["pretrain", "-c", str(config)])
    assert result.exit_code == 2
    assert result.stderr == f"{config}: cropmae.mask_ratio: leaves no visible patch out of the model's 16 (got 0.985)\n"
    result = runner.invoke(app, ["pretrain", "-c", str(config), "--set", "pretrain.method=siammae", "--set", "siammae.mask_ratio=0.5",
                                 "--set", "siammae.gap=[1.5, 0.5]"])
    assert result.exit_code == 2 and result.stderr == "--set: siammae.gap: must be [low, high] with 0 < low <= high (got [1.5, 0.5])\n"


def test_the_decoder_reads_the_earlier_frame():
    """A moving scene (each later frame is its earlier frame shifted by 8 pixels, one patch): after a short training
    the later frame is rebuilt far better from its own earlier frame than from another pair's, so the cross-attention
    carries what the earlier frame shows."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)

    def scenes(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        world = F.interpolate(torch.randn(n, 3, 6, 8, generator=g), size=(32, 48), mode="bilinear")  # (n, 3, 32, 48) smooth
        shift = torch.randint(0, 2, (n,), generator=g) * 8  # half move right, half don't
        first = world[:, :, :, 8:40]
        later = torch.stack([world[k, :, :, 8 - s : 40 - s] for k, s in enumerate(shift.tolist())])  # (n, 3, 32, 32)
        return first, later

    torch.manual_seed(0)
    model = SiameseMAE(**{**TINY, "decoder_embed_dim": 32})
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(300):
        first, later = scenes(32)
        loss = model(first, later, mask_ratio=0.9)[0]  # 1 of 16 patches visible
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.requires_grad), "a tensor got no gradient"
        optimizer.step()
    first, later = scenes(64)
    noise = torch.rand(64, 16, generator=g)
    with torch.no_grad():
        own = model(first, later, mask_ratio=0.9, noise=noise)[0].item()
        shuffled = model(first.roll(1, 0), later, mask_ratio=0.9, noise=noise)[0].item()
    assert own < 0.7 * shuffled, f"{own:.3f} with the true earlier frame, {shuffled:.3f} with another"  # measured: 0.31 vs 0.67


def test_the_local_crop_lies_inside_the_global_crop_with_its_flip():
    rng = np.random.default_rng(0)
    theta = crop_boxes(rng, 200, (90, 160), (32, 32), (0.2, 1.0), hflip=True)  # (n, 2, 3) global crops, half flipped
    inner = crop_boxes(rng, 200, (32, 32), (32, 32), (0.3, 0.6), hflip=False)
    local = local_in_global(theta, inner)
    corners = np.array([[-1, -1, 1], [1, -1, 1], [-1, 1, 1], [1, 1, 1]], dtype=np.float32).T  # (3, 4) output corners
    g, lc = theta @ corners, local @ corners  # (n, 2, 4) in the frame's coordinates
    lo, hi = g.min(axis=2, keepdims=True), g.max(axis=2, keepdims=True)
    assert np.all(lc >= lo - 1e-5) and np.all(lc <= hi + 1e-5)
    area = np.prod(lc.max(2) - lc.min(2), axis=1) / np.prod(g.max(2) - g.min(2), axis=1)
    assert np.all(area >= 0.3 * 0.99) and np.all(area <= 0.6 * 1.01)
    assert np.array_equal(np.sign(local[:, 0, 0]), np.sign(theta[:, 0, 0]))  # flipped together
    assert (theta[:, 0, 0] < 0).any() and (theta[:, 0, 0] > 0).any()


@pytest.mark.parametrize("method", ["siammae", "cropmae"])
def test_frame_pair_methods_pretrain_and_their_encoder_serves_every_command(runner, tmp_path, store, method):
    import timm
    from safetensors.torch import load_file

    config = write_project(tmp_path, store, pretrain={"method": method, "steps": 30, "checkpoint_every": 15},
                           siammae={"mask_ratio": 0.75}, cropmae={"mask_ratio": 0.8})
    result = runner.invoke(app, ["pretrain", "-c", str(config), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["method"] == method and summary["steps"] == 30 and summary["snapshot"] is None and summary["notes"] == []
    rows = [json.loads(line) for line in (tmp_path / "runs" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31)) and rows[-1]["loss"] < rows[0]["loss"]
    ckpt = tmp_path / "runs" / "pretrain" / "checkpoints" / "step-00000030.safetensors"
    weights, _ = read_weights(ckpt)
    assert read_metadata(ckpt)["method"] == method and "decoder_blocks.0.cross_attn.kv.weight" in weights

    # visualize: the frame seen whole, then the MAE figure of the other
    result = runner.invoke(app, ["visualize", "-c", str(config), "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["method"] == method and shown["rows"] == 8 and shown["mask_ratio"] == (0.75 if method == "siammae" else 0.8)
    from PIL import Image

    assert Image.open(shown["image"]).width > 5 * 160  # five columns of 160 px
    result = runner.invoke(app, ["visualize", "-c", str(config), str(store.parent / "v0.mp4")])
    assert result.exit_code == 2 and "is shown on pairs of store frames" in result.stderr

    # export: the encoder loads strictly into timm and gives what the trained encoder gives; HF's ViTMAE refuses
    result = runner.invoke(app, ["export", "encoder", "-c", str(config), "--out", str(tmp_path / "export"), "--json"])
    assert result.exit_code == 0, result.output
    spec = json.loads((tmp_path / "export" / "encoder.json").read_text())
    vit = timm.models.VisionTransformer(**{**spec["kwargs"], "img_size": tuple(spec["kwargs"]["img_size"])})
    vit.load_state_dict(load_file(tmp_path / "export" / "encoder.safetensors"), strict=True)
    model = SiameseMAE(**TINY)
    model.load_state_dict(weights)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit.eval().forward_features(x), model.eval().forward_features(x), rtol=0, atol=1e-5)
    result = runner.invoke(app, ["export", "encoder", "-c", str(config), "--format", "hf"])
    assert result.exit_code == 2
    assert result.stderr == (f"{ckpt}: a frame-pair (siammae or cropmae) checkpoint: its decoder attends to a second frame, which Hugging "
                             "Face's ViTMAE has no place for; export the encoder with --format timm\n")
