"""`maecli export`: timm and Hugging Face weights that load strictly, features equal to a direct forward pass."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from maecli.cli import app
from maecli.data import augment, center_crop
from maecli.model import MaskedAutoencoder
from maecli.store import FrameStore
from maecli.vit import encoder_state_dict, load_snippet, timm_spec
from maecli.weights import load_model, read_weights
from tests.conftest import write_project
from tests.videos import frame_image

LATEST = "runs/pretrain/checkpoints/step-00000020.safetensors"


def export(runner, config, *args):
    result = runner.invoke(app, ["export", *map(str, args), "-c", str(config), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_encoder_loads_strictly_in_timm_with_the_same_features(runner, trained, tmp_path):
    summary = export(runner, trained / "maecli.toml", "encoder", "--out", tmp_path)
    spec = json.loads((tmp_path / "encoder.json").read_text())
    assert summary["timm_model"] is None and spec["kwargs"]["embed_dim"] == 32  # not a registered size: built from kwargs
    model, _ = load_model(trained / LATEST)
    namespace = {}
    exec(summary["snippet"], namespace)  # the printed one-liner, as a user would paste it (strict load inside)
    from_json = timm.models.VisionTransformer(**{**spec["kwargs"], "img_size": tuple(spec["kwargs"]["img_size"])})
    from_json.load_state_dict(load_file(tmp_path / "encoder.safetensors"), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval().forward_features(x)[:, 0]
        torch.testing.assert_close(namespace["m"].eval()(x), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(from_json.eval()(x), expected, rtol=0, atol=1e-5)


def test_registered_timm_size_loads_through_create_model(tmp_path):
    arch = dict(img_size=32, patch_size=16, embed_dim=192, depth=12, num_heads=3, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mlp_ratio=4.0)
    model = MaskedAutoencoder(**arch).eval()
    path = tmp_path / "encoder.safetensors"
    from safetensors.torch import save_file

    save_file(encoder_state_dict(model), path)
    spec = timm_spec(arch)
    assert spec["timm_model"] == "vit_tiny_patch16_224"
    snippet = load_snippet(spec, path)
    assert snippet.startswith("timm.create_model('vit_tiny_patch16_224', num_classes=0, img_size=(32, 32), pretrained=True")
    vit = eval(snippet, {"timm": timm}).eval()  # offline: pretrained_cfg_overlay points at our file
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), model.forward_features(x)[:, 0], rtol=0, atol=1e-5)


def test_hf_export_round_trips(runner, trained, tmp_path):
    from transformers import ViTMAEForPreTraining

    summary = export(runner, trained / "maecli.toml", "encoder", "--format", "hf", "--out", tmp_path)
    assert summary["path"] == str(tmp_path / "hf")
    ViTMAEForPreTraining.from_pretrained(tmp_path / "hf")
    original, _ = read_weights(trained / LATEST)
    again, _ = read_weights(tmp_path / "hf")
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)


@pytest.mark.parametrize("pool", ["cls", "mean", "patch"])
def test_store_features_match_a_direct_forward_pass(runner, trained, tmp_path, pool):
    config = trained / "maecli.toml"
    summary = export(runner, config, "features", "--out", tmp_path, "--set", f"export.pool={pool}", "--set", "export.dtype=float32",
                     "--set", "export.batch_size=16")
    feats = load_file(tmp_path / "features.safetensors")["features"]
    store = FrameStore(_store_of(config))
    assert summary["rows"] == len(store) and list(feats.shape) == summary["shape"]
    model, _ = load_model(trained / LATEST)
    frames = torch.from_numpy(store.get_batch(np.arange(len(store))))
    with torch.no_grad():
        tokens = model.eval().forward_features(augment(frames, center_crop(len(store), store.size, (32, 32)), (32, 32)))
    expected = {"cls": tokens[:, 0], "mean": tokens[:, 1:].mean(1), "patch": tokens[:, 1:]}[pool]
    torch.testing.assert_close(feats, expected, rtol=0, atol=1e-5)
    index = [json.loads(line) for line in (tmp_path / "features.index.jsonl").read_text().splitlines()]
    assert [r["row"] for r in index] == list(range(len(store)))
    assert index[5]["source"] == store.provenance(5)["source"] and index[5]["time"] == store.provenance(5)["time"]
    assert not (tmp_path / "features.parts").exists()


def _store_of(config):
    from maecli.config import load_config

    return load_config(config).extract.store


def test_image_folder_features_carry_labels_and_resume_after_a_kill(runner, trained, tmp_path):
    images = tmp_path / "images"
    for c in ("cars", "trucks"):
        (images / c).mkdir(parents=True)
        for i in range(600):
            Image.fromarray(frame_image(i, 40, 40)).save(images / c / f"{i:04d}.png")
    config = trained / "maecli.toml"
    ref = export(runner, config, "features", images, "--out", tmp_path / "ref", "--set", "export.batch_size=4")
    assert ref["rows"] == 1200 and ref["notes"] == ["resized 1200 images from 40x40 to 32x32 (the model's input size)"]
    index = [json.loads(line) for line in (tmp_path / "ref" / "features.index.jsonl").read_text().splitlines()]
    assert index[0]["label"] == "cars" and index[-1]["label"] == "trucks"
    cmd = [sys.executable, "-m", "maecli", "export", "features", str(images), "-c", str(config), "--out", str(tmp_path / "cut"),
           "--set", "export.batch_size=4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "cut" / "features.parts"
    deadline = time.monotonic() + 120
    while not list(parts.glob("0*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "features.safetensors").exists(), "the export finished before it could be interrupted"
    summary = export(runner, config, "features", images, "--out", tmp_path / "cut", "--set", "export.batch_size=4")
    assert summary["chunks_reused"] >= 1
    assert torch.equal(load_file(tmp_path / "cut" / "features.safetensors")["features"], load_file(tmp_path / "ref" / "features.safetensors")["features"])


def test_export_of_an_official_checkpoint_needs_the_model_section(runner, trained, tmp_path):
    from maecli.weights import save_official

    save_official(tmp_path / "mae.pth", read_weights(trained / LATEST)[0])
    summary = export(runner, trained / "maecli.toml", "encoder", "--checkpoint", tmp_path / "mae.pth", "--out", tmp_path)
    assert summary["checkpoint"] == str(tmp_path / "mae.pth")
    wrong = write_project(tmp_path, _store_of(trained / "maecli.toml"), model={"embed_dim": 64})
    result = runner.invoke(app, ["export", "encoder", "-c", str(wrong), "--checkpoint", str(tmp_path / "mae.pth")])
    assert result.exit_code == 1
    assert result.stderr == f"{tmp_path / 'mae.pth'}: 'cls_token' has shape (1, 1, 32) in the file, the model expects (1, 1, 64)\n"


def test_unreadable_images_are_left_out_and_named(runner, trained, tmp_path):
    images = tmp_path / "images"
    (images / "cars").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(frame_image(i, 32, 32)).save(images / "cars" / f"{i}.png")
    (images / "cars" / "1.png").write_bytes(b"not an image")  # the middle one
    summary = export(runner, trained / "maecli.toml", "features", images, "--out", tmp_path / "out")
    assert summary["rows"] == 2 and summary["shape"][0] == 2
    assert summary["notes"] == [f"skipped {images / 'cars' / '1.png'}: not a readable image (UnidentifiedImageError)",
                                "1 of 3 inputs could not be read: left out"]
    index = [json.loads(line) for line in (tmp_path / "out" / "features.index.jsonl").read_text().splitlines()]
    assert [(r["row"], Path(r["source"]).name) for r in index] == [(0, "0.png"), (1, "2.png")]
