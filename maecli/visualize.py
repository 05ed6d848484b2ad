"""Reconstructions as pictures: original | masked | reconstruction | reconstruction + visible (the MAE figure).

Models trained with `norm_pix_loss` predict each patch normalized by its own mean and variance. Showing
the prediction with the target patch's true statistics leaks the answer; `stats="visible"` (the honest
default) uses the mean and variance of the image's visible patches for every patch instead, and the
picture says which statistics were used.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from maecli.data import IMAGENET_MEAN, IMAGENET_STD
from maecli.files import atomic_write
from maecli.model import MaskedAutoencoder

COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")
STATS_LABELS = {"visible": "patch statistics: visible patches only", "target": "patch statistics: true target (leaks information)"}


@torch.no_grad()
def reconstruct(model: MaskedAutoencoder, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor,
                stats: str = "visible") -> dict[str, torch.Tensor]:
    """Normalized images (N, 3, H, W) -> the four columns as (N, 3, H, W) pixels in [0, 1]."""
    assert stats in STATS_LABELS, f"stats must be one of {list(STATS_LABELS)}, got {stats!r}"
    _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)  # (N, L, p*p*3), (N, L)
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
    mean_px = torch.tensor(IMAGENET_MEAN, device=imgs.device).view(1, 3, 1, 1)
    std_px = torch.tensor(IMAGENET_STD, device=imgs.device).view(1, 3, 1, 1)

    def pixels(x: torch.Tensor) -> torch.Tensor:
        return (x * std_px + mean_px).clamp(0, 1)

    recon = model.unpatchify(pred)
    removed = model.unpatchify(m)  # (N, 3, H, W) 1 where removed
    original = pixels(imgs)
    return {
        "original": original,
        "masked": original * (1 - removed) + 0.5 * removed,  # removed patches grey
        "reconstruction": pixels(recon),
        "reconstruction + visible": pixels(imgs * (1 - removed) + recon * removed),
    }


def grid_image(columns: dict[str, torch.Tensor], title: str, cell: int = 160) -> Image.Image:
    """One row per sample, one column per entry; small images are scaled up (nearest) to `cell` pixels high."""
    names = list(columns)
    n, _, h, w = columns[names[0]].shape
    scale = max(1, cell // h)
    ch, cw = h * scale, w * scale
    header, pad = 36, 4
    img = Image.new("RGB", (len(names) * (cw + pad) + pad, header + n * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, 2), title, fill="black")
    for c, name in enumerate(names):
        draw.text((pad + c * (cw + pad), 18), name, fill="black")
        arr = (columns[name].permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)  # (N, H, W, 3)
        for r in range(n):
            tile = Image.fromarray(arr[r]).resize((cw, ch), Image.NEAREST)
            img.paste(tile, (pad + c * (cw + pad), header + pad + r * (ch + pad)))
    return img


def save_reconstructions(model: MaskedAutoencoder, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor, path: Path,
                         title: str, stats: str = "visible") -> Path:
    columns = reconstruct(model, imgs, mask_ratio, noise, stats)
    label = f"{title} | mask ratio {mask_ratio:g}" + (f" | {STATS_LABELS[stats]}" if model.norm_pix_loss else "")
    with atomic_write(path) as tmp:
        grid_image(columns, label).save(tmp, format="PNG")
    return Path(path)
