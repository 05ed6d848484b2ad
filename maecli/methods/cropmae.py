"""Siamese cropped masked autoencoding (CropMAE, Eymael, Vandeghen, Cioppa, Giancola, Ghanem and Van Droogenbroeck
2024, arXiv 2403.17823): SiamMAE's model fed two crops of one frame instead of two frames, the control that says
whether time helps beyond cropping.

A sample is one frame: a global crop ([pretrain] crop_scale, flip) seen whole, and a local crop taken inside it
([cropmae] local_scale of the global crop's area, the same flip) with 98.5% of its patches hidden; the decoder
rebuilds the local crop from its few visible patches and the global crop (`maecli.methods.siammae.SiameseMAE`).
Both crops are sampled at the model's input size in one batched resample of the frame.
"""

from pathlib import Path

import numpy as np
import torch

from maecli.config import MaecliConfig
from maecli.data import Samples, augment, center_crop, crop_boxes
from maecli.inputs import evenly
from maecli.methods.mae import PretrainRecipe
from maecli.methods.siammae import SiameseMAE, pair_flops
from maecli.store import FrameStore


def local_in_global(theta: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """Compose crops given as affine maps from output to input coordinates: `inner` (n, 2, 3) maps the local crop
    into the global crop's coordinates, `theta` (n, 2, 3) the global crop into the frame's; returns the local crop
    in the frame's (n, 2, 3)."""
    A, t = theta[:, :, :2], theta[:, :, 2:]  # (n, 2, 2), (n, 2, 1)
    return np.concatenate([A @ inner[:, :, :2], A @ inner[:, :, 2:] + t], axis=2).astype(np.float32)


class CropMAE(PretrainRecipe):
    name, kind, label, loss_name = "cropmae", "frame-pair", "cropmae (2 crops)", "MSE on the local crop's masked patches"
    model_class, mae_decoder, head, key_marker = SiameseMAE, False, "cross-attending decoder", ""  # its checkpoints always record it
    reconstructs, not_hf = "pairs", "its decoder attends to a second frame, which Hugging Face's ViTMAE has no place for"

    def __init__(self, cfg: MaecliConfig) -> None:
        self.cfg, self.arch, self.img_size, self.num_patches = cfg, cfg.model.mae_kwargs, cfg.model.img_size, cfg.model.num_patches
        self.crop_scale, self.hflip = cfg.pretrain.crop_scale, cfg.pretrain.hflip
        self.local_scale, self.mask_ratio = cfg.cropmae.local_scale, cfg.cropmae.mask_ratio

    def samples(self, store: FrameStore) -> tuple[Samples, list[str]]:
        return Samples.stills(len(store)), []

    def build(self) -> SiameseMAE:
        return SiameseMAE(**self.arch)

    def draw(self, rng: np.random.Generator, n: int, frame_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        theta = crop_boxes(rng, n, frame_hw, self.img_size, self.crop_scale, self.hflip)  # (n, 2, 3) the global crop
        inner = crop_boxes(rng, n, self.img_size, self.img_size, self.local_scale, hflip=False)  # (n, 2, 3) inside it
        noise = rng.random((n, self.num_patches), dtype=np.float32)  # (n, L) the local crop's mask
        return theta, local_in_global(theta, inner), noise

    def inputs(self, frames: torch.Tensor, theta: torch.Tensor, local: torch.Tensor,
               noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B = frames.shape[0]
        crops = torch.stack([theta, local], dim=1).flatten(0, 1)  # (2B, 2, 3): global, local of each frame
        x = augment(frames[:, 0].repeat_interleave(2, dim=0), crops, self.img_size).unflatten(0, (B, 2))  # (B, 2, 3, h, w)
        return x[:, 0], x[:, 1], noise  # global, local, mask noise

    def loss(self, model: torch.nn.Module, first: torch.Tensor, later: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return model(first, later, mask_ratio=self.mask_ratio, noise=noise)[0]

    def flops_per_image(self) -> float:
        return pair_flops(self.arch, self.mask_ratio)

    def shown(self, store: FrameStore, n: int, device: torch.device) -> tuple[str, torch.Tensor, torch.Tensor, list[str]]:
        """What `visualize` pictures: n frames spread over the store, the global crop their centred crop and the local
        crop its centre at the middle of local_scale: ("global crop", global (n, 3, h, w), local (n, 3, h, w), labels)."""
        idx = evenly(len(store), n)
        frames = torch.from_numpy(store.get_batch(idx)).to(device)  # (n, H, W, 3) uint8
        theta = center_crop(len(idx), store.size, self.img_size).numpy()  # (n, 2, 3)
        side = (sum(self.local_scale) / 2) ** 0.5
        inner = np.tile(np.array([[side, 0, 0], [0, side, 0]], dtype=np.float32), (len(idx), 1, 1))  # (n, 2, 3) the centre
        local = torch.from_numpy(local_in_global(theta, inner))
        labels = [f"{Path(row['source']).name} {row['time']:.2f}s" for row in map(store.provenance, idx.tolist())]
        return "global crop", augment(frames, torch.from_numpy(theta), self.img_size), augment(frames, local, self.img_size), labels
