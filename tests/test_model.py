"""The MAE core against real references: Hugging Face ViTMAE (numerics) and timm's VisionTransformer (encoder)."""

from functools import partial

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.models.vision_transformer import VisionTransformer

from maecli.model import MaskedAutoencoder, sincos_pos_embed
from maecli.weights import mae_to_hf, save_hf


def hf_model(folder, mask_ratio):
    from transformers import ViTMAEForPreTraining

    hf = ViTMAEForPreTraining.from_pretrained(folder, attn_implementation="eager").eval()
    hf.config.mask_ratio = mask_ratio
    return hf


@pytest.mark.parametrize("norm_pix_loss", [False, True])
@pytest.mark.parametrize("mask_ratio", [0.75, 0.5])
def test_matches_hugging_face_vitmae(tiny_mae, tmp_path, norm_pix_loss, mask_ratio):
    from tests.conftest import TINY

    model = tiny_mae(norm_pix_loss=norm_pix_loss).eval()
    with torch.no_grad():  # random, non-trivial values in every parameter (biases and norms too)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02) if p.requires_grad else None
    save_hf(tmp_path, model.state_dict(), {**TINY, "norm_pix_loss": norm_pix_loss})
    hf = hf_model(tmp_path, mask_ratio)  # through from_pretrained: the file format users get

    torch.manual_seed(1)
    imgs = torch.randn(4, 3, 32, 32)
    noise = torch.rand(4, model.num_patches)
    with torch.no_grad():
        loss, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
        out = hf(pixel_values=imgs, noise=noise)
    assert torch.equal(mask, out.mask)
    torch.testing.assert_close(pred, out.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, out.loss, rtol=0, atol=1e-5)


def test_installed_transformers_names_load_strictly(tiny_mae):
    """The in-memory names of whichever transformers is installed: 4.x (`vit.encoder.layer.N...query`) or 5.x
    (`vit.layers.N...q_proj`). CI runs the suite with the newest 5.x and again with the 4.x floor."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    model = tiny_mae()
    hf = ViTMAEForPreTraining(ViTMAEConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=128, decoder_hidden_size=16, decoder_num_hidden_layers=1,
                                           decoder_num_attention_heads=2, decoder_intermediate_size=64, layer_norm_eps=1e-6))
    v5 = any(k.startswith("vit.layers.") for k in hf.state_dict())
    assert v5 or any(k.startswith("vit.encoder.layer.") for k in hf.state_dict()), "neither 4.x nor 5.x names"
    hf.load_state_dict(mae_to_hf(model.state_dict(), v5=v5), strict=True)


def test_pos_embed_matches_official_layout():
    from transformers.models.vit_mae import modeling_vit_mae as hf

    if hasattr(hf, "get_2d_sincos_pos_embed"):  # transformers 4.x: the official MAE's numpy code, same layout
        ref = torch.from_numpy(hf.get_2d_sincos_pos_embed(64, 14, add_cls_token=True)).float()
    else:  # 5.x: [sin_h | cos_h | sin_w | cos_w]; official MAE: [sin_w | cos_w | sin_h | cos_h]
        ref = hf.build_2d_sinusoidal_position_embedding(14, 14, embed_dim=64, cls_token=True).float()
        ref = torch.cat([ref[:, 32:], ref[:, :32]], dim=1)
    assert torch.equal(sincos_pos_embed(64, (14, 14)), ref)
    wide = sincos_pos_embed(64, (2, 3), cls_token=False)  # non-square: row-major, w then h
    assert torch.equal(wide[4], sincos_pos_embed(64, (5, 5), cls_token=False)[1 * 5 + 1])


@pytest.mark.parametrize("img_size", [32, (32, 64)])
def test_encoder_without_masking_matches_timm(tiny_mae, img_size):
    from tests.conftest import TINY

    model = tiny_mae(img_size=img_size).eval()
    vit = VisionTransformer(img_size=img_size, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0, qkv_bias=True,
                            num_classes=0, global_pool="token", norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    encoder = {k: v for k, v in model.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    vit.load_state_dict(encoder, strict=True)
    imgs = torch.randn(2, 3, *model.img_size)
    with torch.no_grad():
        ours = model.forward_features(imgs)
        theirs = vit.forward_features(imgs)
    assert ours.shape == (2, 1 + model.num_patches, TINY["embed_dim"])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("img_size", [32, (32, 64), (48, 16)])
def test_unpatchify_inverts_patchify(tiny_mae, img_size):
    model = tiny_mae(img_size=img_size)
    imgs = torch.randn(3, 3, *model.img_size)
    patches = model.patchify(imgs)
    assert patches.shape == (3, model.num_patches, 8 * 8 * 3)
    assert torch.equal(model.unpatchify(patches), imgs)
    assert torch.equal(patches[0, 1], imgs[0, :, 0:8, 8:16].permute(1, 2, 0).reshape(-1))  # patch 1 is row 0, column 1


MASKER = MaskedAutoencoder(img_size=8, patch_size=8, embed_dim=4, depth=1, num_heads=1, decoder_embed_dim=4, decoder_depth=1, decoder_num_heads=1)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5), length=st.integers(1, 80), dim=st.integers(1, 6), ratio=st.floats(0.01, 0.99), seed=st.integers(0, 2**31))
def test_masking_properties(n, length, dim, ratio, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, dim, generator=gen)
    noise = torch.rand(n, length, generator=gen)
    kept, mask, ids_restore = MASKER.random_masking(x, ratio, noise)
    keep = int(length * (1 - ratio))
    assert kept.shape == (n, keep, dim)
    assert torch.equal(mask.sum(1), torch.full((n,), float(length - keep)))
    # ids_restore inverts the shuffle: putting kept tokens back lands each one on its own position
    restored = torch.gather(torch.cat([kept, torch.zeros(n, length - keep, dim)], 1), 1, ids_restore[..., None].expand(-1, -1, dim))
    visible = mask == 0
    assert torch.equal(restored[visible], x[visible])
    assert torch.equal(torch.sort(ids_restore, 1).values, torch.arange(length).expand(n, -1))
    # same noise, same mask
    _, mask2, ids2 = MASKER.random_masking(x, ratio, noise.clone())
    assert torch.equal(mask, mask2) and torch.equal(ids_restore, ids2)


def test_samples_get_different_masks():
    torch.manual_seed(0)
    _, mask, _ = MASKER.random_masking(torch.zeros(16, 196, 8), 0.75)
    assert len({tuple(m.tolist()) for m in mask}) == 16


def test_every_trainable_parameter_gets_a_gradient(tiny_mae):
    model = tiny_mae(norm_pix_loss=True)
    loss, pred, mask = model(torch.randn(2, 3, 32, 32))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred).all()
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


def test_mask_ratio_zero_is_plain_reconstruction(tiny_mae):
    model = tiny_mae()
    imgs = torch.randn(2, 3, 32, 32)
    loss, pred, mask = model(imgs, mask_ratio=0.0)
    assert mask.sum() == 0
    torch.testing.assert_close(loss, ((pred - model.patchify(imgs)) ** 2).mean())


def test_state_dict_keys_are_the_official_ones(tiny_mae):
    keys = set(tiny_mae().state_dict())
    for key in ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.attn.qkv.weight", "blocks.0.mlp.fc2.bias", "norm.weight",
                "decoder_embed.weight", "mask_token", "decoder_pos_embed", "decoder_blocks.0.norm1.weight", "decoder_norm.bias", "decoder_pred.weight"]:
        assert key in keys, key
    assert len(keys) == 4 + 12 * 2 + 2 + 4 + 12 * 1 + 4
