"""Measuring training steps: analytic FLOPs, the paper's "mask tokens through the encoder" baseline, a matmul
peak, and interleaved timing (A, B, C, A, B, C, ...) so ratios hold on a noisy machine."""

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from maecli.model import MaskedAutoencoder, to_2tuple


def analytic_flops(arch: dict[str, Any], mask_ratio: float, mask_tokens_in_encoder: bool = False) -> float:
    """FLOPs per image of one training step: forward + backward, where backward is 2x forward except for the patch
    embedding, whose input (the image) needs no gradient. A multiply-add is 2 FLOPs."""
    h, w = to_2tuple(arch["img_size"])
    p, D, Dd, r = arch["patch_size"], arch["embed_dim"], arch["decoder_embed_dim"], arch["mlp_ratio"]
    L = (h // p) * (w // p)
    K = L if mask_tokens_in_encoder else int(L * (1 - mask_ratio))

    def blocks(depth: int, n: int, d: int) -> float:  # qkv + proj + MLP matmuls, then q @ k and attn @ v
        return depth * (2 * n * (4 * d * d + 2 * r * d * d) + 4 * n * n * d)

    patch_embed = 2 * L * p * p * 3 * D  # all patches are embedded, then masked
    forward = (
        patch_embed
        + blocks(arch["depth"], K + 1, D)
        + 2 * (K + 1) * D * Dd  # decoder_embed
        + blocks(arch["decoder_depth"], L + 1, Dd)
        + 2 * (L + 1) * Dd * p * p * 3  # decoder_pred
    )
    return 3 * forward - patch_embed


class MaskTokensInEncoder(nn.Module):
    """The MAE paper's "w/ [M] in encoder" baseline (Table 1c): the same model, but the encoder sees every
    position, with a learned mask token where a patch was removed. Same loss, same decoder."""

    def __init__(self, mae: MaskedAutoencoder) -> None:
        super().__init__()
        self.mae = mae
        self.enc_mask_token = nn.Parameter(torch.zeros(1, 1, mae.pos_embed.shape[-1]))
        nn.init.normal_(self.enc_mask_token, std=0.02)

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.mae
        x = m.patch_embed(imgs)  # (N, L, D)
        _, mask, _ = m.random_masking(x, mask_ratio, noise)  # (N, L) 1 = removed
        x = torch.where(mask.bool().unsqueeze(-1), self.enc_mask_token.to(x.dtype), x) + m.pos_embed[:, 1:, :]  # (N, L, D)
        cls = (m.cls_token + m.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # (N, 1 + L, D)
        for blk in m.blocks:
            x = blk(x)
        x = m.decoder_embed(m.norm(x)) + m.decoder_pos_embed  # (N, 1 + L, Dd), already in patch order
        for blk in m.decoder_blocks:
            x = blk(x)
        pred = m.decoder_pred(m.decoder_norm(x))[:, 1:, :]  # (N, L, p*p*3)
        return m.forward_loss(imgs, pred, mask), pred, mask


def train_step_fn(model: nn.Module, imgs: torch.Tensor, mask_ratio: float, *, hf: bool = False) -> Callable[[], None]:
    """One full training step (forward, backward, fused AdamW step) on a fixed batch."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95), fused=True)
    autocast = torch.autocast(imgs.device.type, dtype=torch.bfloat16, enabled=imgs.device.type == "cuda")

    def step() -> None:
        with autocast:
            loss = model(pixel_values=imgs).loss if hf else model(imgs, mask_ratio=mask_ratio)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], None]], steps: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each function, measured A, B, C, A, B, C, ... after `warmup` rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + steps):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    return times


def matmul_peak(device: torch.device, n: int = 2048, dtype: torch.dtype = torch.float32, reps: int = 10) -> float:
    """Achievable FLOP/s of one square matmul on this device (median of `reps`)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = interleaved({"mm": lambda: a @ b}, reps, 2, device)["mm"]
    return 2 * n**3 / statistics.median(times)
