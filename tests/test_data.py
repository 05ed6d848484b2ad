"""The data path's guarantees: ranks split the same global batch, epochs cover the split, crops stay in range."""

import numpy as np
import torch

from maecli.data import Plan, augment, center_crop, crop_boxes, step_randomness, to_input


def test_ranks_split_one_global_batch_and_epochs_cover_the_split():
    def draw(rng, n, frame_hw):
        return crop_boxes(rng, n, frame_hw, (32, 32), (0.2, 1.0), True), rng.random((n, 16), dtype=np.float32)

    one = Plan(num_frames=50, batch_size=8, world_size=1, rank=0, seed=3)
    two = [Plan(num_frames=50, batch_size=4, world_size=2, rank=r, seed=3) for r in range(2)]
    for step in range(12):
        assert np.array_equal(one.indices(step), np.concatenate([p.indices(step) for p in two]))
        theta, noise = step_randomness(one, step, draw, (32, 32))
        parts = [step_randomness(p, step, draw, (32, 32)) for p in two]
        assert np.array_equal(theta, np.concatenate([t for t, _ in parts])) and np.array_equal(noise, np.concatenate([n for _, n in parts]))
    epoch = np.concatenate([one.indices(s) for s in range(one.micro_steps_per_epoch)])  # 6 batches of 8 from 50 frames
    assert len(set(epoch.tolist())) == 48  # no frame twice within an epoch
    assert not np.array_equal(one.indices(0), one.indices(one.micro_steps_per_epoch))  # each epoch reshuffles


def test_crop_boxes_respect_scale_aspect_and_frame():
    rng = np.random.default_rng(0)
    theta = crop_boxes(rng, 4000, (72, 128), (32, 64), (0.2, 1.0), True)
    sx, sy = np.abs(theta[:, 0, 0]), theta[:, 1, 1]  # crop width / frame width, crop height / frame height
    area = sx * sy
    assert area.min() >= 0.2 * 0.8 and area.max() <= 1.0 + 1e-6  # clamping to the frame can only shrink a crop
    assert (np.abs(theta[:, 0, 2]) + sx <= 1 + 1e-5).all() and (np.abs(theta[:, 1, 2]) + sy <= 1 + 1e-5).all()  # inside the frame
    aspect = (sx * 128) / (sy * 72) / 2.0  # crop aspect relative to the output's 2:1
    assert 0.85 < np.median(aspect) < 1.15
    assert 0.45 < (theta[:, 0, 0] < 0).mean() < 0.55  # half flipped
    assert (crop_boxes(rng, 100, (72, 128), (32, 64), (0.2, 1.0), False)[:, 0, 0] > 0).all()


def test_identity_crop_reproduces_the_frame():
    frames = torch.randint(0, 256, (2, 16, 24, 3), dtype=torch.uint8)
    out = augment(frames, center_crop(2, (16, 24), (16, 24)), (16, 24))  # same size and aspect: the frame itself
    torch.testing.assert_close(out, to_input(frames), rtol=0, atol=1e-5)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(out * std + mean, frames.permute(0, 3, 1, 2).float() / 255, rtol=0, atol=1e-5)
    flipped = center_crop(2, (16, 24), (16, 24))
    flipped[:, 0, 0] = -1
    torch.testing.assert_close(augment(frames, flipped, (16, 24)), out.flip(-1), rtol=0, atol=1e-5)


def test_center_crop_keeps_the_middle():
    frames = torch.zeros(1, 8, 32, 3, dtype=torch.uint8)
    frames[:, :, 12:20] = 255  # a white middle quarter of a 4:1 frame
    out = augment(frames, center_crop(1, (8, 32), (8, 8)), (8, 8))  # square crop of the middle: 8 of 32 columns
    assert (out > 2).all()  # all white after normalization
    tall = augment(frames.transpose(1, 2).contiguous(), center_crop(1, (32, 8), (8, 8)), (8, 8))  # same for a 1:4 frame
    assert (tall > 2).all()
