import os

# Nothing in the tests may reach a model hub: transformers and timm are used with local weights only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

# A tiny MAE (the sizes the tests train and compare at): 32x32 px, patch 8 -> 16 patches.
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mlp_ratio=4.0)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def tiny_mae():
    from maecli.model import MaskedAutoencoder

    def make(**overrides):
        torch.manual_seed(0)
        return MaskedAutoencoder(**{**TINY, **overrides})

    return make
