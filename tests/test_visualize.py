"""`maecli visualize`: the reconstruction picture and clip, deterministic for a seed, honest for norm_pix_loss."""

import json

import av
import numpy as np
import pytest
import torch
from PIL import Image

from maecli.cli import app
from maecli.model import MaskedAutoencoder
from maecli.inference import reconstruct
from tests.conftest import TINY
from tests.videos import frame_image, write_video


def differs(a, b) -> float:
    """Mean absolute difference of two uint8 pictures, in grey levels. The same seed gives the same masks and, up to
    the last bits of float arithmetic (BLAS results can depend on memory alignment), the same pixels: < 0.5 level on
    average. Other masks change whole patches by tens of levels."""
    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean())


def run(runner, trained, *args):
    result = runner.invoke(app, ["visualize", "-c", str(trained / "maecli.toml"), "--json", *map(str, args)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_picture_of_store_frames_is_seeded(runner, trained, tmp_path):
    a = run(runner, trained, "--out", tmp_path / "a.png")
    run(runner, trained, "--out", tmp_path / "b.png")
    assert a["checkpoint"].endswith("step-00000020.safetensors") and a["mask_ratio"] == 0.75 and a["rows"] == 8
    img = Image.open(tmp_path / "a.png")
    cell = 32 * (160 // 32)  # 32 px images scaled 5x
    assert img.size == (4 * (cell + 4) + 4, 36 + 8 * (cell + 4) + 4)  # 4 columns, 8 rows
    run(runner, trained, "--out", tmp_path / "c.png", "--set", "project.seed=1")
    run(runner, trained, "--out", tmp_path / "d.png", "--mask-ratio", "0.5")
    a, b, c, d = (Image.open(tmp_path / f"{n}.png") for n in "abcd")
    assert differs(a, b) < 0.5  # same seed, same masks, same picture
    assert differs(a, c) > 2 and differs(a, d) > 2  # another seed or mask ratio: other masks


def test_images_and_their_resize_notes(runner, trained, tmp_path):
    for i in range(3):
        Image.fromarray(frame_image(i, 48, 64)).save(tmp_path / f"img{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    result = runner.invoke(app, ["visualize", "-c", str(trained / "maecli.toml"), "--out", str(tmp_path / "out.png"),
                                 *[str(tmp_path / f"img{i}.png") for i in range(3)], str(tmp_path / "broken.png")])
    assert result.exit_code == 0, result.output
    assert f"skipped {tmp_path / 'broken.png'}: not a readable image (UnidentifiedImageError)" in result.stderr
    assert "resized 3 images from 48x64 to 32x32 (the model's input size)" in result.stderr
    assert Image.open(tmp_path / "out.png").size[1] == 36 + 3 * (160 + 4) + 4  # three rows


def test_clip_has_the_expected_size_and_frames(runner, trained, tmp_path):
    write_video(tmp_path / "in.mp4", n=40, fps=10)  # 4 s
    fps = ["--set", "extract.fps=5"]  # a video is sampled as extract samples it
    summary = run(runner, trained, tmp_path / "in.mp4", "--video", tmp_path / "a.mp4", "--start", "1", "--end", "3", *fps)
    assert summary["frames"] == 11 and summary["fps"] == 5  # 5 fps from 1.0 s to 3.0 s, played at that rate
    run(runner, trained, tmp_path / "in.mp4", "--video", tmp_path / "b.mp4", "--start", "1", "--end", "3", *fps)
    decoded = []
    for name in ("a.mp4", "b.mp4"):
        with av.open(str(tmp_path / name)) as c:
            assert (c.streams.video[0].width, c.streams.video[0].height) == (3 * 32, 32)  # original | masked | reconstruction
            decoded.append(np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]))
    # same seed, same clip: the same masks (original | masked, the model aside) and, up to float noise that the codec
    # spreads over whole blocks, the same reconstructions (measured: 0.67 grey levels on a 16-core machine)
    assert len(decoded[0]) == 11 and differs(decoded[0][:, :, :64], decoded[1][:, :, :64]) < 0.5 and differs(decoded[0], decoded[1]) < 1.5
    run(runner, trained, tmp_path / "in.mp4", "--video", tmp_path / "c.mp4", "--start", "1", "--end", "3", "--set", "project.seed=1", *fps)
    with av.open(str(tmp_path / "c.mp4")) as c:
        other = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert differs(decoded[0], other) > 2  # another seed, other masks


def test_bad_requests(runner, trained, tmp_path):
    config = str(trained / "maecli.toml")
    result = runner.invoke(app, ["visualize", "-c", config, "--video", str(tmp_path / "x.mp4")])
    assert result.exit_code == 2 and result.stderr == "--video: needs a video file as input (with --start/--end for a time range)\n"
    result = runner.invoke(app, ["visualize", "-c", config, "--checkpoint", str(tmp_path / "nope.safetensors")])
    assert result.exit_code == 2 and result.stderr == f"{tmp_path / 'nope.safetensors'}: no such file or folder\n"
    (tmp_path / "corrupt.safetensors").write_bytes(b"\0" * 64)
    result = runner.invoke(app, ["visualize", "-c", config, "--checkpoint", str(tmp_path / "corrupt.safetensors")])
    assert result.exit_code == 1 and result.stderr.startswith(f"{tmp_path / 'corrupt.safetensors'}: not a readable safetensors file")
    result = runner.invoke(app, ["visualize", "-c", config, "--mask-ratio", "1.2"])
    assert result.exit_code == 2 and result.stderr == "--mask-ratio: must be at least 0 and less than 1 (got 1.2)\n"


def test_no_checkpoint_yet(runner, tmp_path, store):
    from tests.conftest import write_project

    result = runner.invoke(app, ["visualize", "-c", str(write_project(tmp_path, store))])
    assert result.exit_code == 2
    assert result.stderr == f"{tmp_path / 'runs' / 'pretrain'}: no checkpoint yet (train with 'maecli pretrain', or name weights with --checkpoint)\n"


@pytest.mark.parametrize("stats, leaks", [("visible", False), ("target", True)])
def test_norm_pix_reconstruction_is_honest_only_with_visible_stats(stats, leaks):
    torch.manual_seed(0)
    model = MaskedAutoencoder(**TINY, norm_pix_loss=True).eval()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, model.num_patches)
    mask = model(imgs, noise=noise)[2]
    changed = imgs.clone()
    removed = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, 8 * 8 * 3)).bool()
    changed[removed] = torch.randn(int(removed.sum()))  # new content where the model cannot see
    a = reconstruct(model, imgs, 0.75, noise, stats)["reconstruction"]
    b = reconstruct(model, changed, 0.75, noise, stats)["reconstruction"]
    assert torch.equal(a, b) != leaks  # honest: hidden pixels cannot change what is shown as the model's guess
