"""The pretraining methods, and what a step of each costs. The loop (`maecli.train`) is one for every method; a method
supplies the rest:

- `build()`: its model (the MAE, or the MAE's encoder with SimCLR's head: the same encoder keys either way);
- `draw(rng, n, frame_hw)`: each sample's randomness for n frames as numpy arrays (crops, masks, colours), drawn per
  (seed, micro-step) for the whole global batch by `data.Loader`;
- `inputs(frames, *draws)`: uint8 frames -> the model's inputs, augmented in batched ops on the device;
- `loss(model, *inputs)`: the scalar to minimise (under autocast);
- `flops_per_image()`: analytic training FLOPs, forward + backward (a multiply-add is 2 FLOPs).
"""

from typing import Any

import numpy as np
import torch

from maecli.config import MaecliConfig
from maecli.data import augment, crop_boxes
from maecli.model import MaskedAutoencoder, to_2tuple
from maecli.simclr import SimCLR, draw_views, two_views

METHODS = ("mae", "simclr")


def _blocks_flops(depth: int, n: int, d: int, mlp_ratio: float) -> float:
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
        + _blocks_flops(arch["depth"], K + 1, D, r)
        + 2 * (K + 1) * D * Dd  # decoder_embed
        + _blocks_flops(arch["decoder_depth"], L + 1, Dd, r)
        + 2 * (L + 1) * Dd * p * p * 3  # decoder_pred
    )
    return 3 * forward - patch_embed


def contrastive_flops(arch: dict[str, Any], hidden: int, out: int) -> float:
    """FLOPs per image of one SimCLR step: two views through the whole encoder and the projection head, fwd + bwd."""
    h, w = to_2tuple(arch["img_size"])
    p, D = arch["patch_size"], arch["embed_dim"]
    L = (h // p) * (w // p)
    patch_embed = 2 * L * p * p * 3 * D
    forward = patch_embed + _blocks_flops(arch["depth"], L + 1, D, arch["mlp_ratio"]) + 2 * (D * hidden + hidden * out)
    return 2 * (3 * forward - patch_embed)


class MAE:
    """Masked autoencoding: one random resized crop (+ flip) per frame, patches removed by per-sample noise, MSE on
    the removed patches."""

    name = "mae"

    def __init__(self, cfg: MaecliConfig) -> None:
        self.arch, self.mask_ratio, self.img_size = cfg.model.mae_kwargs, cfg.model.mask_ratio, cfg.model.img_size
        self.num_patches, self.crop_scale, self.hflip = cfg.model.num_patches, cfg.pretrain.crop_scale, cfg.pretrain.hflip

    def build(self) -> MaskedAutoencoder:
        return MaskedAutoencoder(**self.arch)

    def draw(self, rng: np.random.Generator, n: int, frame_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        theta = crop_boxes(rng, n, frame_hw, self.img_size, self.crop_scale, self.hflip)  # (n, 2, 3)
        noise = rng.random((n, self.num_patches), dtype=np.float32)  # (n, L)
        return theta, noise

    def inputs(self, frames: torch.Tensor, theta: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return augment(frames, theta, self.img_size), noise  # (B, 3, h, w), (B, L)

    def loss(self, model: torch.nn.Module, imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return model(imgs, mask_ratio=self.mask_ratio, noise=noise)[0]

    def flops_per_image(self) -> float:
        return analytic_flops(self.arch, self.mask_ratio)


class Contrastive:
    """SimCLR: two augmented views per frame, NT-Xent over the global batch (`maecli.simclr`, knobs in [simclr])."""

    name = "simclr"

    def __init__(self, cfg: MaecliConfig) -> None:
        self.arch, self.img_size, self.sc = cfg.model.mae_kwargs, cfg.model.img_size, cfg.simclr

    def build(self) -> SimCLR:
        return SimCLR(**self.arch, proj_hidden=self.sc.proj_hidden, proj_dim=self.sc.proj_dim, temperature=self.sc.temperature)

    def draw(self, rng: np.random.Generator, n: int, frame_hw: tuple[int, int]) -> tuple[np.ndarray, ...]:
        return draw_views(rng, n, frame_hw, self.img_size, self.sc)

    def inputs(self, frames: torch.Tensor, *draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return two_views(frames, *draws, self.img_size)  # (B, 3, h, w) each

    def loss(self, model: torch.nn.Module, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        return model(view1, view2)

    def flops_per_image(self) -> float:
        return contrastive_flops(self.arch, self.sc.proj_hidden, self.sc.proj_dim)


Method = MAE | Contrastive


def method_of(cfg: MaecliConfig, name: str | None = None) -> Method:
    """The method `name` (default: `pretrain.method`) with the project's settings."""
    name = name or cfg.pretrain.method
    assert name in METHODS, f"method must be one of {METHODS}, got {name!r}"
    return MAE(cfg) if name == "mae" else Contrastive(cfg)
