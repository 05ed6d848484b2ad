"""The measuring tools behind the benchmarks: analytic FLOPs and the "mask tokens in the encoder" baseline."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from maecli.bench import MaskTokensInEncoder, analytic_flops
from maecli.model import MaskedAutoencoder
from tests.conftest import TINY

BASE = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0)


@pytest.mark.parametrize("arch", [TINY, {**TINY, "img_size": (32, 64)}, BASE], ids=["tiny", "wide", "base"])
@pytest.mark.parametrize("mask_tokens", [False, True])
def test_analytic_flops_match_torch_counter(arch, mask_tokens):
    mae = MaskedAutoencoder(**arch)
    model = MaskTokensInEncoder(mae) if mask_tokens else mae
    imgs = torch.randn(2, 3, *mae.img_size)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:  # the math backend is made of matmuls the counter sees
        model(imgs, mask_ratio=0.75)[0].backward()
    counted = counter.get_total_flops() / 2
    assert analytic_flops(arch, 0.75, mask_tokens) == pytest.approx(counted, rel=0.01)


def test_mask_tokens_baseline_trains_every_parameter_on_the_same_mask():
    mae = MaskedAutoencoder(**TINY)
    baseline = MaskTokensInEncoder(mae)
    noise = torch.rand(2, mae.num_patches)
    loss, pred, mask = baseline(torch.randn(2, 3, 32, 32), mask_ratio=0.75, noise=noise)
    _, _, mae_mask = mae(torch.randn(2, 3, 32, 32), mask_ratio=0.75, noise=noise)
    assert torch.equal(mask, mae_mask) and pred.shape == (2, 16, 8 * 8 * 3)
    loss.backward()
    for name, p in baseline.named_parameters():
        if p.requires_grad and name != "mae.mask_token":  # the decoder's mask token is unused: the encoder fills every position
            assert p.grad is not None and p.grad.abs().sum() > 0, name
