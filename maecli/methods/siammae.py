"""Siamese masked autoencoding of frame pairs (SiamMAE, Gupta, Wu, Deng and Fei-Fei 2023, arXiv 2305.14344): the one
method here that learns from time.

A sample is two frames of one video, the later one `gap` seconds after the earlier ([siammae] gap, a range: the later
frame is drawn uniformly among the video's frames in it), with the same random resized crop and flip. The encoder
(the MAE's, shared) sees the earlier frame whole and 5% of the later one; the decoder rebuilds the later frame's
hidden patches from its visible ones and mask tokens, each block attending first to the earlier frame's tokens
(cross-attention), then to the later frame's own (self-attention), then an MLP. Loss: MSE on the hidden patches of
the later frame (normalized per patch with `model.norm_pix_loss`, as the paper trains). With little of the later frame
left, the decoder must find where each part of the earlier frame went: what moves where.

`SiameseMAE` is also CropMAE's model (`maecli.methods.cropmae`). Its encoder keys are the MAE's, so export, probe,
finetune and compare read its encoder like any other; the decoder (`decoder*`, `mask_token`, with `.cross_attn.` in
its blocks) stays behind.
"""

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from maecli.config import MaecliConfig
from maecli.data import Samples, augment, crop_boxes, store_input
from maecli.errors import ConfigError
from maecli.inputs import evenly
from maecli.methods.mae import blocks_flops, PretrainRecipe
from maecli.model import MaskedAutoencoder, to_2tuple
from maecli.store import FrameStore


class CrossAttention(nn.Module):
    """Multi-head attention from x's tokens (queries) to ctx's (keys, values), fused (SDPA)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} must be divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        M, h = ctx.shape[1], self.num_heads
        q = self.q(x).view(B, N, h, D // h).transpose(1, 2)  # (B, h, N, d)
        k, v = self.kv(ctx).view(B, M, 2, h, D // h).permute(2, 0, 3, 1, 4)  # (B, h, M, d) each
        x = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class CrossSelfBlock(nn.Module):
    """SiamMAE's decoder block: cross-attention to the other frame, then a timm ViT block (self-attention, MLP), each
    pre-norm with a residual. Takes a timm Block's keyword arguments."""

    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, norm_layer: type[nn.Module]) -> None:
        super().__init__()
        self.norm_x = norm_layer(dim)
        self.norm_ctx = norm_layer(dim)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.block = Block(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, norm_layer=norm_layer)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        x = x + self.cross_attn(self.norm_x(x), self.norm_ctx(ctx))  # (N, 1 + L, Dd)
        return self.block(x)


class SiameseMAE(MaskedAutoencoder):
    """The MAE with a cross-self decoder: forward(first, later, mask_ratio, noise) -> (loss, pred, mask), the later
    frame rebuilt from its visible patches and the whole first frame."""

    def __init__(self, **arch: Any) -> None:
        super().__init__(**arch, decoder_block=CrossSelfBlock)

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        x = self.decoder_tokens(x, ids_restore)  # (N, 1 + L, Dd) the later frame: visible tokens and mask tokens
        ctx = self.decoder_embed(ctx) + self.decoder_pos_embed  # (N, 1 + L, Dd) the first frame, every patch
        for blk in self.decoder_blocks:
            x = blk(x, ctx)
        x = self.decoder_pred(self.decoder_norm(x))  # (N, 1 + L, p*p*C)
        return x[:, 1:, :]

    def forward(self, first: torch.Tensor, later: torch.Tensor, mask_ratio: float = 0.95,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx = self.forward_features(first)  # (N, 1 + L, D) unmasked
        latent, mask, ids_restore = self.forward_encoder(later, mask_ratio, noise)  # (N, 1 + K, D)
        pred = self.forward_decoder(latent, ids_restore, ctx)  # (N, L, p*p*C)
        return self.forward_loss(later, pred, mask), pred, mask


def pair_flops(arch: dict[str, Any], mask_ratio: float) -> float:
    """FLOPs of one training sample of `SiameseMAE`, forward + backward: two patch embeddings (backward: their weight
    gradients only), the encoder on L + 1 and K + 1 tokens, both embedded into the decoder, whose blocks each add a
    cross-attention (queries from the later frame, keys and values from the first) to a ViT block."""
    h, w = to_2tuple(arch["img_size"])
    p, D, Dd, r = arch["patch_size"], arch["embed_dim"], arch["decoder_embed_dim"], arch["mlp_ratio"]
    L = (h // p) * (w // p)
    K, n = int(L * (1 - mask_ratio)), L + 1
    patch_embed = 2 * L * p * p * 3 * D
    cross = 2 * n * Dd * Dd * 2 + 2 * n * 2 * Dd * Dd + 4 * n * n * Dd  # q and proj, kv, q @ k and attn @ v
    forward = (
        2 * patch_embed
        + blocks_flops(arch["depth"], n, D, r) + blocks_flops(arch["depth"], K + 1, D, r)
        + 2 * (n + K + 1) * D * Dd  # decoder_embed of both frames
        + arch["decoder_depth"] * cross + blocks_flops(arch["decoder_depth"], n, Dd, r)
        + 2 * n * Dd * p * p * 3  # decoder_pred
    )
    return 3 * forward - 2 * patch_embed


# --- the pairs ------------------------------------------------------------------------------------


def pair_ranges(times: np.ndarray, video_offsets: np.ndarray, gap: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """For each frame i of a store (times (N,) in seconds, videos starting at `video_offsets` (V + 1,)), the store
    indices [lo_i, hi_i) of the frames of the same video between gap[0] and gap[1] seconds after it: (N,), (N,)."""
    lo, hi = np.zeros(len(times), dtype=np.int64), np.zeros(len(times), dtype=np.int64)
    for a, b in zip(video_offsets[:-1], video_offsets[1:]):  # one searchsorted per video: pairs never cross videos
        t = times[a:b]
        lo[a:b] = a + np.searchsorted(t, t + gap[0] - 1e-6, side="left")  # 1 us of slack: timestamps are rounded
        hi[a:b] = a + np.searchsorted(t, t + gap[1] + 1e-6, side="right")
    return lo, hi


def frame_pairs(store: FrameStore, gap: tuple[float, float]) -> tuple[Samples, list[str]]:
    """The store's frames that have a later frame in `gap`, with where it comes from; a video without any pair is
    named in a note, and a store without any pair (extracted too sparsely for the gap) is refused."""
    times = store.times()  # (N,)
    lo, hi = pair_ranges(times, store.video_offsets, gap)
    first = np.flatnonzero(hi > lo)
    notes, offsets = [], store.video_offsets
    without = [v["source"] for v, a, b in zip(store.videos, offsets[:-1], offsets[1:]) if not np.any(hi[a:b] > lo[a:b])]
    if len(first) == 0:
        steps = np.concatenate([np.diff(times[a:b]) for a, b in zip(offsets[:-1], offsets[1:])])
        settings = store.meta["settings"]
        sampling = f"extract.fps = {settings['fps']:g}" if settings.get("fps") else f"extract.every_n = {settings.get('every_n')}"
        spacing = f"its frames are {np.median(steps):.3g} s apart at {sampling}" if len(steps) else "one frame per video"
        raise ConfigError(f"siammae.gap: no two frames of one video in {store.root} are {gap[0]:g}-{gap[1]:g} s apart ({spacing}): "
                          f"extract the store at a higher fps, or widen the gap")
    if without:
        notes.append(f"{len(without)} of {len(store.videos)} videos have no frame pair {gap[0]:g}-{gap[1]:g} s apart, skipped: "
                     f"{', '.join(without[:3])}{' ...' if len(without) > 3 else ''}")
    return Samples(first=first, lo=lo[first], hi=hi[first]), notes


# --- the method -----------------------------------------------------------------------------------


class SiamMAE(PretrainRecipe):
    name, kind, label, loss_name = "siammae", "frame-pair", "siammae (frame pair)", "MSE on the later frame's masked patches"
    model_class, mae_decoder, head, key_marker = SiameseMAE, False, "cross-attending decoder", ".cross_attn."
    reconstructs, not_hf = "pairs", "its decoder attends to a second frame, which Hugging Face's ViTMAE has no place for"

    def __init__(self, cfg: MaecliConfig) -> None:
        self.cfg, self.arch, self.img_size, self.num_patches = cfg, cfg.model.mae_kwargs, cfg.model.img_size, cfg.model.num_patches
        self.crop_scale, self.hflip = cfg.pretrain.crop_scale, cfg.pretrain.hflip
        self.gap, self.mask_ratio = cfg.siammae.gap, cfg.siammae.mask_ratio

    def samples(self, store: FrameStore) -> tuple[Samples, list[str]]:
        return frame_pairs(store, self.gap)

    def build(self) -> SiameseMAE:
        return SiameseMAE(**self.arch)

    def draw(self, rng: np.random.Generator, n: int, frame_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        theta = crop_boxes(rng, n, frame_hw, self.img_size, self.crop_scale, self.hflip)  # (n, 2, 3): one crop for both frames
        noise = rng.random((n, self.num_patches), dtype=np.float32)  # (n, L) the later frame's mask
        return theta, noise

    def inputs(self, frames: torch.Tensor, theta: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B = frames.shape[0]
        x = augment(frames.flatten(0, 1), theta.repeat_interleave(2, dim=0), self.img_size).unflatten(0, (B, 2))  # (B, 2, 3, h, w)
        return x[:, 0], x[:, 1], noise  # first, later, mask noise

    def loss(self, model: torch.nn.Module, first: torch.Tensor, later: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return model(first, later, mask_ratio=self.mask_ratio, noise=noise)[0]

    def flops_per_image(self) -> float:
        return pair_flops(self.arch, self.mask_ratio)

    def shown(self, store: FrameStore, n: int, device: torch.device) -> tuple[str, torch.Tensor, torch.Tensor, list[str]]:
        """What `visualize` pictures: n pairs spread over the store, each later frame in the middle of its gap range,
        centred crops: ("earlier frame", first (n, 3, h, w), later (n, 3, h, w), a label per row)."""
        samples, _ = self.samples(store)
        pos = evenly(len(samples.first), n)
        idx = samples.frames(pos, np.full(len(pos), 0.5))  # (n, 2)
        times = store.times()
        labels = [f"{Path(store.provenance(int(i))['source']).name} {times[i]:.2f}s -> {times[j]:.2f}s" for i, j in idx]
        return "earlier frame", store_input(store, idx[:, 0], self.img_size, device), store_input(store, idx[:, 1], self.img_size, device), labels
