"""Weights in and out: maecli safetensors, official MAE .pth, Hugging Face folders; clear errors for misfits."""

import json
import pickle

import pytest
import torch

from maecli.errors import CheckpointError, ConfigError
from maecli.weights import hf_to_mae, load_model, load_state, mae_to_hf, read_metadata, read_weights, save_hf, save_official, save_weights
from tests.conftest import TINY

ARCH = {**TINY, "norm_pix_loss": False}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_maecli_weights_round_trip_exactly(tiny_mae, tmp_path):
    model = tiny_mae(img_size=(32, 64)).eval()
    arch = {**ARCH, "img_size": [32, 64]}
    save_weights(tmp_path / "w.safetensors", model.state_dict(), arch, {"step": "12"})
    meta = read_metadata(tmp_path / "w.safetensors")
    assert meta["format"] == "maecli" and meta["step"] == "12" and json.loads(meta["arch"]) == arch
    loaded, loaded_arch = load_model(tmp_path / "w.safetensors")
    assert_same_weights(model.state_dict(), loaded.state_dict())
    imgs, noise = torch.randn(2, 3, 32, 64), torch.rand(2, 32)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(imgs, noise=noise), loaded.eval()(imgs, noise=noise), strict=True))
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_official_pth_round_trip(tiny_mae, tmp_path):
    model = tiny_mae()
    save_official(tmp_path / "mae.pth", model.state_dict())
    assert torch.load(tmp_path / "mae.pth", weights_only=True).keys() == {"model"}
    state_dict, arch = read_weights(tmp_path / "mae.pth")
    assert arch is None  # official files record no architecture: it comes from the [model] section
    assert_same_weights(model.state_dict(), state_dict)
    loaded, _ = load_model(tmp_path / "mae.pth", ARCH)
    assert_same_weights(model.state_dict(), loaded.state_dict())


def test_official_training_checkpoint_with_args_namespace_loads(tiny_mae, tmp_path):
    import argparse

    torch.save({"model": tiny_mae().state_dict(), "epoch": 3, "args": argparse.Namespace(lr=1e-3)}, tmp_path / "checkpoint-3.pth")
    state_dict, _ = read_weights(tmp_path / "checkpoint-3.pth")
    assert "blocks.0.attn.qkv.weight" in state_dict


class Payload:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_pickle_with_code_is_refused(tmp_path):
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": Payload()}, f)
    with pytest.raises(CheckpointError, match=r"evil\.pth: cannot read as an official MAE checkpoint \(UnpicklingError"):
        read_weights(tmp_path / "evil.pth")


def test_encoder_only_official_release_loads_encoder(tiny_mae, tmp_path):
    model = tiny_mae()
    encoder = {k: v for k, v in model.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    save_official(tmp_path / "mae_pretrain.pth", encoder)
    with pytest.raises(CheckpointError, match="missing key 'mask_token'"):
        load_model(tmp_path / "mae_pretrain.pth", ARCH)
    loaded, _ = load_model(tmp_path / "mae_pretrain.pth", ARCH, encoder_only_ok=True)
    assert torch.equal(loaded.blocks[1].attn.qkv.weight, model.blocks[1].attn.qkv.weight)


def test_hugging_face_folder_round_trips(tiny_mae, tmp_path):
    from transformers import ViTMAEForPreTraining

    model = tiny_mae()
    save_hf(tmp_path / "hf", model.state_dict(), ARCH)
    hf = ViTMAEForPreTraining.from_pretrained(tmp_path / "hf")
    assert hf.config.hidden_size == 32 and hf.config.layer_norm_eps == 1e-6
    state_dict, arch = read_weights(tmp_path / "hf")
    assert_same_weights(model.state_dict(), state_dict)
    assert arch == {**ARCH, "img_size": (32, 32), "in_chans": 3}
    # what transformers itself saves (its own naming) reads back the same
    hf.save_pretrained(tmp_path / "hf2")
    state_dict2, _ = read_weights(tmp_path / "hf2")
    assert_same_weights(model.state_dict(), state_dict2)


def test_hf_key_conversion_is_invertible(tiny_mae):
    sd = tiny_mae().state_dict()
    for v5 in (False, True):
        assert_same_weights(hf_to_mae(mae_to_hf(sd, v5=v5)), sd)


def test_mismatches_name_the_first_key(tiny_mae, tmp_path):
    model = tiny_mae()
    sd = model.state_dict()
    with pytest.raises(CheckpointError, match=r"^x: missing key 'blocks\.1\.norm1\.weight' \(1 missing in all\)$"):
        load_state(model, {k: v for k, v in sd.items() if k != "blocks.1.norm1.weight"}, "x")
    with pytest.raises(CheckpointError, match=r"^x: 'pos_embed' has shape \(1, 5, 32\) in the file, the model expects \(1, 17, 32\)$"):
        load_state(model, {**sd, "pos_embed": torch.zeros(1, 5, 32)}, "x")
    with pytest.raises(CheckpointError, match=r"^x: unexpected key 'head\.weight' \(1 unexpected in all\)$"):
        load_state(model, {**sd, "head.weight": torch.zeros(1)}, "x")
    other = tiny_mae(embed_dim=64)  # another architecture
    save_weights(tmp_path / "big.safetensors", other.state_dict(), {**ARCH, "embed_dim": 64})
    big_sd, _ = read_weights(tmp_path / "big.safetensors")
    with pytest.raises(CheckpointError, match=r"'cls_token' has shape \(1, 1, 64\) in the file, the model expects \(1, 1, 32\)"):
        load_state(model, big_sd, tmp_path / "big.safetensors")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("broken.safetensors", b"not really weights", "broken.safetensors: not a readable safetensors file"),
        ("empty.pth", b"", "empty.pth: cannot read as an official MAE checkpoint"),
        ("weights.bin", b"\0", "weights.bin: unknown weights format"),
    ],
)
def test_unreadable_files(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        read_weights(tmp_path / name)


def test_missing_path_and_incomplete_hf_folder(tmp_path):
    with pytest.raises(ConfigError, match="nope.safetensors: no such file or folder"):  # a wrong path: exit 2
        read_weights(tmp_path / "nope.safetensors")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"hf: not a Hugging Face ViTMAE folder \(config.json is missing\)"):
        read_weights(tmp_path / "hf")


def test_file_without_architecture_needs_one(tiny_mae, tmp_path):
    save_official(tmp_path / "mae.pth", tiny_mae().state_dict())
    with pytest.raises(CheckpointError, match="records no architecture"):
        load_model(tmp_path / "mae.pth")
