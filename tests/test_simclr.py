"""SimCLR as a pretraining method: NT-Xent against a reference, negatives across ranks, the batched augmentations,
and `maecli pretrain` with `method = "simclr"` end to end (timm export, probe, init_from, visualize refusing)."""

import json
import math

import numpy as np
import pytest
import torch

from maecli.weights import read_metadata, read_weights
from maecli.cli import app
from maecli.methods.sections import SimclrConfig
from maecli.data import augment, crop_boxes
from maecli.model import MaskedAutoencoder
from maecli.methods.simclr import SimCLR, colour_jitter, draw_views, gaussian_blur, luma, nt_xent, two_views
from tests.conftest import TINY, write_project


def nt_xent_reference(z1, z2, t):
    """Straight from the SimCLR paper: for each of the 2N views, -log softmax of its partner among the other 2N - 1."""
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    losses = []
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        sims = [torch.dot(z[i], z[k]) / t for k in range(2 * n) if k != i]
        positive = torch.dot(z[i], z[partner]) / t
        losses.append(-(positive - torch.logsumexp(torch.stack(sims), 0)))
    return torch.stack(losses).mean()


def test_nt_xent_matches_the_reference_and_is_symmetric():
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 16), torch.randn(6, 16)
    for t in (0.1, 0.5):
        torch.testing.assert_close(nt_xent(z1, z2, t), nt_xent_reference(z1, z2, t), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(nt_xent(z1, z2, t), nt_xent(z2, z1, t), rtol=1e-6, atol=1e-6)
    aligned = nt_xent(z1, z1 + 1e-3 * torch.randn(6, 16), 0.1)
    assert aligned < nt_xent(z1, z2, 0.1)  # matching views score better than unrelated ones


RANKS = """
import json, sys, torch, torch.distributed as dist
from maecli.methods.simclr import nt_xent
dist.init_process_group("gloo"); rank, world = dist.get_rank(), dist.get_world_size()
g = torch.Generator().manual_seed(0)
z1, z2 = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)  # the global batch, the same on every rank
n = 8 // world
a, b = z1[rank * n:(rank + 1) * n].clone().requires_grad_(), z2[rank * n:(rank + 1) * n].clone().requires_grad_()
loss = nt_xent(a, b, 0.2)
loss.backward()
avg = loss.detach().clone(); dist.all_reduce(avg); avg /= world
grads = [torch.zeros_like(a.grad) for _ in range(world)]; dist.all_gather(grads, a.grad)
if rank == 0:
    json.dump({"loss": avg.item(), "grad": (torch.cat(grads) / world).tolist()}, open(sys.argv[1], "w"))
dist.destroy_process_group()
"""


def test_nt_xent_across_ranks_equals_one_process(tmp_path):
    import json
    import subprocess
    import sys

    (tmp_path / "ranks.py").write_text(RANKS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(tmp_path / "ranks.py"), str(tmp_path / "out.json")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads((tmp_path / "out.json").read_text())
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 16, generator=g).requires_grad_(), torch.randn(8, 16, generator=g)
    loss = nt_xent(z1, z2, 0.2)
    loss.backward()
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)  # every rank's negatives include the other rank's views
    torch.testing.assert_close(torch.tensor(got["grad"]), z1.grad, rtol=1e-4, atol=1e-6)


def test_views_with_identity_draws_are_the_plain_crop():
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (4, 40, 48, 3), dtype=torch.uint8, generator=g)
    crops = torch.from_numpy(np.stack([crop_boxes(np.random.default_rng(i), 4, (40, 48), (32, 32), (0.2, 1.0), True) for i in range(2)], axis=1))
    colour = torch.tensor([1.0, 1.0, 1.0, 0.0]).expand(4, 2, 4)
    v1, v2 = two_views(frames, crops, colour, torch.zeros(4, 2, dtype=torch.bool), torch.zeros(4, 2), (32, 32))
    torch.testing.assert_close(v1, augment(frames, crops[:, 0], (32, 32)), rtol=0, atol=1e-5)
    torch.testing.assert_close(v2, augment(frames, crops[:, 1], (32, 32)), rtol=0, atol=1e-5)
    assert not torch.allclose(v1, v2)


def test_colour_and_blur_do_what_they_say():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def jitter(b=1.0, c=1.0, s=1.0, h=0.0):
        return colour_jitter(x, torch.tensor([[b, c, s, h]]).expand(3, 4))

    assert torch.equal(jitter(b=0.0), torch.zeros_like(x))  # brightness 0: black
    flat = jitter(c=0.0)  # contrast 0: every pixel the image's mean grey
    torch.testing.assert_close(flat, luma(x).mean(dim=(2, 3), keepdim=True).expand_as(x), rtol=0, atol=1e-6)
    grey = jitter(s=0.0)  # saturation 0: grey, the same brightness
    torch.testing.assert_close(grey, luma(x).expand_as(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(jitter(h=1.0), x, rtol=0, atol=1e-5)  # a full turn of hue changes nothing
    muted = 0.4 + 0.2 * x  # colours a quarter turn keeps in gamut
    shifted = colour_jitter(muted, torch.tensor([[1.0, 1.0, 1.0, 0.25]]).expand(3, 4))
    assert (shifted - muted).abs().mean() > 0.02  # a quarter turn changes the colours ...
    torch.testing.assert_close(luma(shifted), luma(muted), rtol=0, atol=1e-5)  # ... not the brightness
    sigma = torch.tensor([0.0, 1.0, 2.0])
    blurred = gaussian_blur(x, sigma)
    assert torch.equal(blurred[0], x[0])  # sigma 0: unchanged
    assert blurred[1].var() < x[1].var() and blurred[2].var() < blurred[1].var()  # more blur, smoother
    torch.testing.assert_close(gaussian_blur(torch.full_like(x, 0.3), sigma), torch.full_like(x, 0.3))  # weights sum to 1


def test_draws_follow_the_probabilities_and_keep_one_stream():
    never = SimclrConfig(jitter_prob=0, grayscale_prob=0, blur_prob=0)
    always = SimclrConfig(jitter_prob=1, grayscale_prob=1, blur_prob=1)
    a = draw_views(np.random.default_rng(0), 500, (72, 128), (32, 32), never)
    b = draw_views(np.random.default_rng(0), 500, (72, 128), (32, 32), always)
    assert np.array_equal(a[0], b[0])  # the same crops whatever the probabilities
    assert (a[1] == [1, 1, 1, 0]).all() and not a[2].any() and (a[3] == 0).all()
    assert (b[1] != [1, 1, 1, 0]).all(axis=2).all() and b[2].all() and (b[3] >= 0.1).all() and (b[3] <= 2.0).all()
    assert b[1][..., :3].min() >= 0.2 and b[1][..., :3].max() <= 1.8 and np.abs(b[1][..., 3]).max() <= 0.2  # strength 1
    half = draw_views(np.random.default_rng(1), 4000, (72, 128), (32, 32), SimclrConfig())
    assert 0.75 < (half[1] != [1, 1, 1, 0]).any(axis=2).mean() < 0.85 and 0.17 < half[2].mean() < 0.23 and 0.45 < (half[3] > 0).mean() < 0.55


def test_simclr_learns_to_match_views_of_the_same_images():
    """Sixteen smooth images, fresh augmentations every step (crops, flips, colour, grey, blur): the loss falls well
    below its start, and every trainable tensor gets a gradient (the fixed position embedding excepted)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    frames = (F.interpolate(torch.rand(16, 3, 4, 4, generator=g), size=(40, 40), mode="bilinear") * 255).round().to(torch.uint8)
    frames = frames.permute(0, 2, 3, 1).contiguous()  # (16, 40, 40, 3): colour blobs, recognisable after a crop
    sc = SimclrConfig(crop_scale=(0.5, 1.0), jitter=0.5)
    torch.manual_seed(0)
    model = SimCLR(**TINY, proj_hidden=64, proj_dim=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(60):
        draws = [torch.from_numpy(a) for a in draw_views(np.random.default_rng(step), 16, (40, 40), (32, 32), sc)]
        loss = model(*two_views(frames, *draws, (32, 32)))
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.requires_grad), "a tensor got no gradient"
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, f"{first:.2f} -> {last:.2f}"  # measured: 3.9 -> 2.3


def simclr_project(folder, store, **pretrain):
    return write_project(folder, store, pretrain={"method": "simclr", **pretrain}, simclr={"proj_hidden": 64, "proj_dim": 16})


def test_simclr_pretrains_and_its_encoder_serves_every_command(runner, tmp_path, store):
    import timm
    from safetensors.torch import load_file

    config = simclr_project(tmp_path, store, steps=60, checkpoint_every=30)
    result = runner.invoke(app, ["pretrain", "-c", str(config), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["method"] == "simclr" and summary["steps"] == 60 and summary["snapshot"] is None
    rows = [json.loads(line) for line in (tmp_path / "runs" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 61)) and all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    assert not (tmp_path / "runs" / "pretrain" / "snapshots").exists()
    ckpt = tmp_path / "runs" / "pretrain" / "checkpoints" / "step-00000060.safetensors"
    weights, _ = read_weights(ckpt)
    assert read_metadata(ckpt)["method"] == "simclr"
    assert {k for k in weights if k.startswith("projector.")} == {"projector.0.weight", "projector.1.weight", "projector.1.bias", "projector.3.weight"}
    torch.manual_seed(0)  # the run's initialization (project.seed 0)
    fresh = SimCLR(**TINY, proj_hidden=64, proj_dim=16)
    assert all(not torch.equal(weights[k], v) for k, v in fresh.state_dict().items() if k != "pos_embed")  # every tensor trained
    assert not any(k.startswith(("decoder", "mask_token")) for k in weights)

    # export: the encoder loads strictly into timm and gives the class token SimCLR trained
    result = runner.invoke(app, ["export", "encoder", "-c", str(config), "--out", str(tmp_path / "export"), "--json"])
    assert result.exit_code == 0, result.output
    spec = json.loads((tmp_path / "export" / "encoder.json").read_text())
    vit = timm.models.VisionTransformer(**{**spec["kwargs"], "img_size": tuple(spec["kwargs"]["img_size"])})
    vit.load_state_dict(load_file(tmp_path / "export" / "encoder.safetensors"), strict=True)
    model = SimCLR(**TINY, proj_hidden=64, proj_dim=16)
    model.load_state_dict(weights)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit.eval()(x), model.eval().forward_features(x)[:, 0], rtol=0, atol=1e-5)

    # probe reads it as an encoder; visualize and the HF export, which need an MAE decoder, refuse in one line
    (tmp_path / "labels").mkdir()
    for k, colour in enumerate(["red", "blue"]):
        from PIL import Image

        (tmp_path / "labels" / colour).mkdir()
        for i in range(6):
            Image.new("RGB", (32, 32), (200 * (k == 0), 20 * i, 200 * (k == 1))).save(tmp_path / "labels" / colour / f"{i}.png")
    result = runner.invoke(app, ["probe", "-c", str(config), "--set", f"probe.train={tmp_path / 'labels'}", "--set", "probe.epochs=5", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["checkpoint"] == str(ckpt)
    for args in (["visualize"], ["export", "encoder", "--format", "hf"]):
        result = runner.invoke(app, [*args, "-c", str(config)])
        assert result.exit_code == 2
        assert result.stderr == (f"{ckpt}: a contrastive (simclr) checkpoint: an encoder without an MAE decoder, so there is nothing to "
                                 "reconstruct (probe, finetune and export --format timm use it)\n")

    # an MAE run can start from the SimCLR encoder (its decoder fresh); the SimCLR run folder refuses another method
    mae = tmp_path / "mae"
    mae.mkdir()
    mae_config = write_project(mae, store, pretrain={"steps": 1, "warmup_steps": 5, "checkpoint_every": 1, "init_from": str(ckpt)})
    result = runner.invoke(app, ["pretrain", "-c", str(mae_config), "--json"])
    assert result.exit_code == 0, result.output
    decoder = [k for k in MaskedAutoencoder(**TINY).state_dict() if k.startswith(("decoder", "mask_token"))]
    assert json.loads(result.stdout)["notes"] == [f"initialized from {ckpt} (encoder only: {len(decoder)} tensors of the decoder start fresh)"]
    started = read_weights(mae / "runs" / "pretrain" / "checkpoints" / "step-00000001.safetensors")[0]
    assert all(torch.equal(started[k], v) for k, v in weights.items() if not k.startswith("projector."))
    result = runner.invoke(app, ["pretrain", "-c", str(config), "--set", "pretrain.method=mae"])
    assert result.exit_code == 2
    assert result.stderr == (f"{tmp_path / 'runs' / 'pretrain'}: this run was trained with pretrain.method = 'simclr', not 'mae' "
                             "(use --restart to start over, or another pretrain.run)\n")


def test_collapse_is_named_and_simclr_may_have_its_own_learning_rate():
    import math

    from maecli.config import MaecliConfig
    from maecli.methods.simclr import collapse_note
    from maecli.methods import method_of

    note = collapse_note(4.89448, 64)  # measured: a run that collapsed at lr 1.5e-3, its last step's loss
    assert note.startswith("the SimCLR loss ended at 4.8945, chance level (ln(2 x 64 - 1) = 4.8442)") and "[simclr] blr" in note
    assert collapse_note(4.5, 64) is None and collapse_note(math.log(63) - 0.1, 32) is None
    cfg = MaecliConfig.model_validate({"pretrain": {"method": "simclr", "lr": 1e-3}, "simclr": {"blr": 1.5e-4}})
    assert method_of(cfg).lr(512) == pytest.approx(3e-4)  # [simclr] blr, scaled by the batch
    assert method_of(cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"method": "mae"})})).lr(512) == 1e-3  # MAE keeps [pretrain]'s
    assert method_of(MaecliConfig.model_validate({"pretrain": {"method": "simclr", "lr": 1e-3}})).lr(512) == 1e-3  # unset: [pretrain]'s
