import os

# Nothing in the tests may reach a model hub: transformers and timm are used with local weights only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

# torch is imported inside the fixtures that need it: the extraction tests run without torch (CI's Python 3.12 check).

# A tiny MAE (the sizes the tests train and compare at): 32x32 px, patch 8 -> 16 patches.
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mlp_ratio=4.0)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def tiny_mae():
    import torch

    from maecli.model import MaskedAutoencoder

    def make(**overrides):
        torch.manual_seed(0)
        return MaskedAutoencoder(**{**TINY, **overrides})

    return make


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    """A 32x32 frame store of ~120 frames from four generated clips, with frames in both train and val.

    The split is decided by the videos' content hashes, which an encoder version may change: the clips'
    content is shifted until both splits are non-empty (the first try, with this encoder).
    """
    from maecli.cli import app
    from maecli.store import FrameStore
    from tests.videos import frame_image, write_video

    for shift in range(20):
        d = tmp_path_factory.mktemp("store")
        for i in range(4):
            write_video(d / f"v{i}.mp4", images=[frame_image(11 * i + j + shift, 48, 64) for j in range(30)], fps=10)
        (d / "maecli.toml").write_text('[extract]\nstore = "frames"\nsize = [32, 32]\nfps = 10\nworkers = 1\nval_fraction = 0.3\n')
        result = CliRunner().invoke(app, ["extract", "-c", str(d / "maecli.toml"), str(d)])
        assert result.exit_code == 0, result.output
        if len(FrameStore(d / "frames", split="train")) and len(FrameStore(d / "frames", split="val")):
            return d / "frames"
    raise AssertionError("no content shift gave both a train and a val split")


def write_project(folder, store, **sections):
    """A project file for the tiny model on `store`; `sections` add or override keys, e.g. pretrain={"steps": 3}.

    It runs on the CPU, in float32, wherever the tests run: the tests that need the GPU path say so."""
    import json

    values = {
        "project": {"device": "cpu"},
        "model": {**TINY, "preset": "vit_tiny"},
        "extract": {"store": str(store), "size": [32, 32]},
        "pretrain": {"batch_size": 8, "steps": 20, "warmup_steps": 2, "lr": 1e-3, "checkpoint_every": 10, "log_every": 1},
    }
    for name, extra in sections.items():
        values[name] = {**values.get(name, {}), **extra}
    text = "".join(f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items()) for name, keys in values.items())
    (folder / "maecli.toml").write_text(text)
    return folder / "maecli.toml"


@pytest.fixture(scope="session")
def trained(tmp_path_factory, store):
    """A project folder whose tiny model was pretrained for 20 steps: checkpoints in runs/pretrain/checkpoints."""
    from maecli.cli import app

    d = tmp_path_factory.mktemp("trained")
    result = CliRunner().invoke(app, ["pretrain", "-c", str(write_project(d, store))])
    assert result.exit_code == 0, result.output
    return d
