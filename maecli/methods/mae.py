"""Masked autoencoding (He et al. 2021), the method of `maecli pretrain` by default: one random resized crop (+ flip)
per frame, patches removed by per-sample noise, MSE on the removed patches. The model is `maecli.model`'s."""

from typing import Any

import numpy as np
import torch

from maecli.config import MaecliConfig
from maecli.data import Samples, augment, crop_boxes
from maecli.model import MaskedAutoencoder, to_2tuple
from maecli.store import FrameStore


def blocks_flops(depth: int, n: int, d: int, mlp_ratio: float) -> float:
    """Forward FLOPs of `depth` ViT blocks on n tokens of width d: qkv + proj + MLP matmuls, then q @ k and attn @ v."""
    return depth * (2 * n * (4 * d * d + 2 * mlp_ratio * d * d) + 4 * n * n * d)


def analytic_flops(arch: dict[str, Any], mask_ratio: float, mask_tokens_in_encoder: bool = False) -> float:
    """FLOPs per image of one MAE training step: forward + backward, where backward is 2x forward except for the patch
    embedding, whose input (the image) needs no gradient."""
    h, w = to_2tuple(arch["img_size"])
    p, D, Dd, r = arch["patch_size"], arch["embed_dim"], arch["decoder_embed_dim"], arch["mlp_ratio"]
    L = (h // p) * (w // p)
    K = L if mask_tokens_in_encoder else int(L * (1 - mask_ratio))
    patch_embed = 2 * L * p * p * 3 * D  # all patches are embedded, then masked
    forward = (
        patch_embed
        + blocks_flops(arch["depth"], K + 1, D, r)
        + 2 * (K + 1) * D * Dd  # decoder_embed
        + blocks_flops(arch["decoder_depth"], L + 1, Dd, r)
        + 2 * (L + 1) * Dd * p * p * 3  # decoder_pred
    )
    return 3 * forward - patch_embed


class PretrainRecipe:
    """What a method without its own rule uses: [pretrain]'s peak learning rate (lr, else blr x effective batch / 256)
    and no notes after a run. Needs `self.cfg`."""

    def lr(self, batch: int) -> float:
        return self.cfg.pretrain.lr or self.cfg.pretrain.blr * batch / 256

    def after_run(self, loss: float, global_batch: int) -> list[str]:
        return []


class MAE(PretrainRecipe):
    name, kind, label, loss_name = "mae", "masked autoencoding", "mae", "MSE on masked patches"
    model_class, mae_decoder, head, key_marker = MaskedAutoencoder, True, "decoder", ""
    reconstructs, not_hf = "frames", ""

    def __init__(self, cfg: MaecliConfig) -> None:
        self.cfg, self.arch, self.mask_ratio, self.img_size = cfg, cfg.model.mae_kwargs, cfg.model.mask_ratio, cfg.model.img_size
        self.num_patches, self.crop_scale, self.hflip = cfg.model.num_patches, cfg.pretrain.crop_scale, cfg.pretrain.hflip

    def samples(self, store: FrameStore) -> tuple[Samples, list[str]]:
        return Samples.stills(len(store)), []

    def build(self) -> MaskedAutoencoder:
        return MaskedAutoencoder(**self.arch)

    def draw(self, rng: np.random.Generator, n: int, frame_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        theta = crop_boxes(rng, n, frame_hw, self.img_size, self.crop_scale, self.hflip)  # (n, 2, 3)
        noise = rng.random((n, self.num_patches), dtype=np.float32)  # (n, L)
        return theta, noise

    def inputs(self, frames: torch.Tensor, theta: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return augment(frames[:, 0], theta, self.img_size), noise  # (B, 3, h, w), (B, L)

    def loss(self, model: torch.nn.Module, imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return model(imgs, mask_ratio=self.mask_ratio, noise=noise)[0]

    def flops_per_image(self) -> float:
        return analytic_flops(self.arch, self.mask_ratio)
