"""Trained weights at work, below every command that uses them: the preamble (which weights, the model they hold,
on which device), pooled features, and MAE reconstructions with fixed masks.

Models trained with `norm_pix_loss` predict each patch normalized by its own mean and variance. Showing the
prediction with the target patch's true statistics leaks the answer; `stats="visible"` (the honest default) uses
the mean and variance of the image's visible patches for every patch instead, and pictures say which was used.
"""

from pathlib import Path
from typing import Any

import numpy as np
import torch

from maecli.checkpoint import resolve_checkpoint
from maecli.config import MaecliConfig
from maecli.data import denormalize, to_input
from maecli.device import autocast_for, pick_device
from maecli.model import MaskedAutoencoder
from maecli.weights import canonical_arch, load_model

STATS_LABELS = {"visible": "patch statistics: visible patches only", "target": "patch statistics: true target (leaks information)"}


def load_for_inference(cfg: MaecliConfig, checkpoint: str | None, notes: list[str], *, decoder: bool = False,
                       ) -> tuple[MaskedAutoencoder, dict[str, Any], Path, torch.device]:
    """The weights named (else the run's newest readable checkpoint; skipped ones go into `notes`), as a model in
    eval mode on `project.device`, with its architecture, path and device. Files that record no architecture
    (official .pth) are sized by [model]. `decoder`: the caller reconstructs, so weights without a decoder are refused."""
    path = resolve_checkpoint(cfg.run_dir, checkpoint, notes)
    model, arch = load_model(path, canonical_arch(cfg.model.mae_kwargs), encoder_only_ok=not decoder)
    device = pick_device(cfg.project.device)
    return model.to(device).eval(), arch, path, device


def random_encoder(arch: dict[str, Any], seed: int) -> MaskedAutoencoder:
    """The floor a pretrained encoder is measured against: the same shape, initialised from the seed, never trained."""
    torch.manual_seed(seed)
    return MaskedAutoencoder(**arch)


def pool_features(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """Encoder output (N, 1 + L, D) -> (N, D) for 'cls' and 'mean', (N, L, D) for 'patch'."""
    if pool == "cls":
        return tokens[:, 0]
    if pool == "mean":
        return tokens[:, 1:].mean(dim=1)
    return tokens[:, 1:]


@torch.no_grad()
def cached(features: Any, images: torch.Tensor, device: torch.device, batch: int = 32) -> torch.Tensor:
    """`features` (normalized images (B, 3, h, w) -> a tensor per image) of uint8 images (N, h, w, 3), computed once in
    batches, float32 on `device`: what a frozen-encoder probe trains on."""
    autocast = autocast_for(device)
    out = []
    for chunk in images.split(batch):
        with autocast:
            out.append(features(to_input(chunk.to(device))).float())
    return torch.cat(out)


def fixed_noise(seed: int, n: int, num_patches: int, device: torch.device) -> torch.Tensor:
    """The same masks for the same seed: (n, L) in [0, 1)."""
    return torch.from_numpy(np.random.default_rng([seed, 3]).random((n, num_patches), dtype=np.float32)).to(device)


@torch.no_grad()
def reconstruct(model: MaskedAutoencoder, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor, stats: str = "visible",
                first: tuple[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Normalized images (N, 3, H, W) -> the MAE figure's four columns as (N, 3, H, W) pixels in [0, 1]:
    original, masked, reconstruction, reconstruction + visible. For a frame-pair model (`SiameseMAE`), `first` names
    and holds the frames (N, 3, H, W) it sees whole, shown as a first column."""
    assert stats in STATS_LABELS, f"stats must be one of {list(STATS_LABELS)}, got {stats!r}"
    pair = () if first is None else (first[1],)
    _, pred, mask = model(*pair, imgs, mask_ratio=mask_ratio, noise=noise)  # (N, L, p*p*3), (N, L)
    pred = pred.float()
    if model.norm_pix_loss:
        target = model.patchify(imgs)  # (N, L, p*p*3)
        if stats == "target":
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)  # (N, L, 1)
        else:
            keep = (1 - mask).unsqueeze(-1)  # (N, L, 1)
            n_keep = keep.sum(1, keepdim=True).clamp(min=1)  # (N, 1, 1)
            mean = (target.mean(-1, keepdim=True) * keep).sum(1, keepdim=True) / n_keep  # (N, 1, 1)
            var = (target.var(-1, keepdim=True) * keep).sum(1, keepdim=True) / n_keep
        pred = pred * (var + 1e-6) ** 0.5 + mean
    m = mask.unsqueeze(-1).expand_as(pred)  # (N, L, p*p*3): 1 where removed
    recon = model.unpatchify(pred)
    removed = model.unpatchify(m)  # (N, 3, H, W) 1 where removed
    original = denormalize(imgs)
    return {
        **({first[0]: denormalize(first[1])} if first is not None else {}),
        "original": original,
        "masked": original * (1 - removed) + 0.5 * removed,  # removed patches grey
        "reconstruction": denormalize(recon),
        "reconstruction + visible": denormalize(imgs * (1 - removed) + recon * removed),
    }
