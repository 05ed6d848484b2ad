"""SimCLR (Chen et al. 2020) on the MAE's encoder: the contrastive method of `maecli pretrain` (`method = "simclr"`,
knobs in [simclr]).

Two augmented views of every frame (SimCLR's list: random resized crop, flip, colour jitter, grayscale, Gaussian
blur, batched on the device), every patch of each view through the encoder, the class token through a 2-layer
projection head with batch norm (SimCLR v2's; statistics over the global batch), NT-Xent with every other view of
the global batch as a negative (gathered across ranks, with gradients). The encoder is `MaskedAutoencoder` built
without its decoder, so its modules and key names are the MAE's: export, probe, finetune and init_from read a
SimCLR checkpoint as an MAE's and leave the head (`projector.*`) behind.

Colour jitter applies brightness, contrast, saturation and hue in that fixed order (torchvision draws an order
per image); the hue shift is a rotation of the chroma plane in YIQ space, one 3x3 matrix per image, which
approximates HSV's hue shift without leaving the batched path.
"""

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from maecli.config import MaecliConfig
from maecli.methods.sections import SimclrConfig
from maecli.data import Samples, constant, crop_boxes, normalize, resized_crop
from maecli.methods.mae import blocks_flops, PretrainRecipe
from maecli.model import MaskedAutoencoder, to_2tuple
from maecli.store import FrameStore

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 grey, as torchvision's rgb_to_grayscale
RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
YIQ_TO_RGB = tuple(map(tuple, torch.linalg.inv(torch.tensor(RGB_TO_YIQ)).tolist()))  # once, here: inv on a GPU waits for it


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss. z1, z2: (N, d) projections of two views of the same N images.

    Each of the 2N views must pick its partner among every other view of the global batch: under
    torch.distributed the other ranks' views are gathered (with gradients) as negatives, so N processes
    compute the loss of one global batch. Mean over this rank's 2N views.
    """
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    if _distributed():
        from torch.distributed.nn.functional import all_gather

        rank = dist.get_rank()
        k1, k2 = torch.cat(all_gather(z1)), torch.cat(all_gather(z2))  # (G, d) each
    else:
        rank, k1, k2 = 0, z1, z2
    N, G = z1.shape[0], k1.shape[0]
    queries, keys = torch.cat([z1, z2]), torch.cat([k1, k2])  # (2N, d), (2G, d)
    logits = queries @ keys.T / temperature  # (2N, 2G)
    own = rank * N + torch.arange(N, device=z1.device)  # this rank's images in the global batch
    self_col = torch.cat([own, own + G])  # (2N,) where each view sits among the keys
    partner = torch.cat([own + G, own])  # (2N,) its other view
    is_self = self_col[:, None] == torch.arange(2 * G, device=z1.device)  # (2N, 2G); one_hot would check its input's range: a host sync
    logits = logits.masked_fill(is_self, float("-inf"))  # a view is not its own negative
    return F.cross_entropy(logits, partner)


def collapse_note(loss: float, global_batch: int) -> str | None:
    """A note when NT-Xent ends at chance, ln(2G - 1) for a global batch of G, or above: every view projects to
    (nearly) the same point, a known failure of contrastive ViTs at too large a learning rate; its gradients
    vanish, so it rarely recovers. A run that learns ends well below chance."""
    chance = math.log(2 * global_batch - 1)
    if loss < chance - 0.05:
        return None
    return (f"the SimCLR loss ended at {loss:.4f}, chance level (ln(2 x {global_batch} - 1) = {chance:.4f}): the views project to one "
            "point and the encoder learned little or nothing; train again with a lower learning rate ([simclr] blr)")


class GlobalBatchNorm(nn.Module):
    """BatchNorm over the global batch: (N, d) normalized with the mean and variance of every rank's rows (all-reduced
    with gradients, as SimCLR's global BN), so N processes compute what one process does with the whole batch. Batch
    statistics always, no running averages: the projection head only ever sees training batches."""

    def __init__(self, dim: int, *, affine: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _distributed():
            from torch.distributed.nn.functional import all_reduce

            count = x.shape[0] * dist.get_world_size()
            mean = all_reduce(x.sum(0)) / count  # (d,)
            var = all_reduce(((x - mean) ** 2).sum(0)) / count
        else:
            mean, var = x.mean(0), x.var(0, unbiased=False)
        x = (x - mean) / torch.sqrt(var + self.eps)  # (N, d)
        return x * self.weight + self.bias if self.weight is not None else x


class SimCLR(MaskedAutoencoder):
    """The MAE's encoder without a decoder, plus SimCLR's projection head (Linear, BN, ReLU, Linear, BN, as in SimCLR
    v2; BN over the global batch): forward(view1, view2) -> NT-Xent loss."""

    def __init__(self, *, proj_hidden: int = 2048, proj_dim: int = 128, temperature: float = 0.2, **arch: Any) -> None:
        super().__init__(**arch, decoder=False)
        width = self.pos_embed.shape[-1]
        self.projector = nn.Sequential(nn.Linear(width, proj_hidden, bias=False), GlobalBatchNorm(proj_hidden), nn.ReLU(),
                                       nn.Linear(proj_hidden, proj_dim, bias=False), GlobalBatchNorm(proj_dim, affine=False))
        self.projector.apply(self._init_weights)
        self.temperature = temperature

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        z = self.projector(self.forward_features(torch.cat([view1, view2]))[:, 0])  # (2N, proj_dim) from the class tokens
        z1, z2 = z.float().chunk(2)  # (N, proj_dim) each; the loss in float32
        return nt_xent(z1, z2, self.temperature)


# --- the two views --------------------------------------------------------------------------------


def draw_views(rng: np.random.Generator, n: int, frame_hw: tuple[int, int], out_hw: tuple[int, int],
               sc: SimclrConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The randomness of two views of n frames: crops (n, 2, 2, 3), colour factors (n, 2, 4) as (brightness, contrast,
    saturation, hue), grey flags (n, 2), blur sigmas (n, 2; 0 is no blur). Every array is drawn whatever the
    probabilities, so the stream of draws does not depend on them."""
    crops = np.stack([crop_boxes(rng, n, frame_hw, out_hw, sc.crop_scale, sc.hflip) for _ in range(2)], axis=1)
    spread = 0.8 * sc.jitter
    colour = np.concatenate([rng.uniform(max(0.0, 1 - spread), 1 + spread, (n, 2, 3)),
                             rng.uniform(-min(0.2 * sc.jitter, 0.5), min(0.2 * sc.jitter, 0.5), (n, 2, 1))], axis=2)
    colour = np.where((rng.random((n, 2)) < sc.jitter_prob)[..., None], colour, np.array([1.0, 1.0, 1.0, 0.0]))
    grey = rng.random((n, 2)) < sc.grayscale_prob
    sigma = np.where(rng.random((n, 2)) < sc.blur_prob, rng.uniform(sc.blur_sigma[0], sc.blur_sigma[1], (n, 2)), 0.0)
    return crops.astype(np.float32), colour.astype(np.float32), grey, sigma.astype(np.float32)


def luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) pixels -> (B, 1, H, W) grey."""
    return (x * constant(LUMA, x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)


def colour_jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [0, 1] and factors (B, 4): brightness, contrast, saturation (1: unchanged) and hue (a
    fraction of the colour circle, 0: unchanged), applied in that order, clamped to [0, 1] after each."""
    b, c, s = (factors[:, i].view(-1, 1, 1, 1) for i in range(3))
    x = (x * b).clamp(0, 1)
    x = (c * x + (1 - c) * luma(x).mean(dim=(2, 3), keepdim=True)).clamp(0, 1)
    x = (s * x + (1 - s) * luma(x)).clamp(0, 1)
    angle = 2 * math.pi * factors[:, 3]  # (B,)
    cos, sin, one, zero = angle.cos(), angle.sin(), torch.ones_like(angle), torch.zeros_like(angle)
    rotate = torch.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], dim=1).view(-1, 3, 3)  # (B, 3, 3) in YIQ
    matrix = constant(YIQ_TO_RGB, x.device) @ rotate @ constant(RGB_TO_YIQ, x.device)  # (B, 3, 3) on RGB
    return torch.einsum("bij,bjhw->bihw", matrix, x).clamp(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Pixels (B, 3, H, W), one sigma per image (B,) in pixels (0: unchanged); kernel a tenth of the short side (odd,
    at least 3), reflected borders; separable, one grouped convolution per direction."""
    B, C, H, W = x.shape
    k = max(3, int(0.1 * min(H, W)) // 2 * 2 + 1)
    t = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2  # (k,)
    weights = torch.exp(-(t**2) / (2 * sigma.clamp(min=1e-3).view(-1, 1) ** 2))  # (B, k); sigma ~0 -> a single 1
    weights = (weights / weights.sum(1, keepdim=True)).repeat_interleave(C, dim=0)  # (B * C, k)
    y = F.pad(x.reshape(1, B * C, H, W), (k // 2, k // 2, k // 2, k // 2), mode="reflect")
    y = F.conv2d(y, weights.view(B * C, 1, k, 1), groups=B * C)  # (1, B * C, H, W + k - 1)
    y = F.conv2d(y, weights.view(B * C, 1, 1, k), groups=B * C)  # (1, B * C, H, W)
    return y.view(B, C, H, W)


def two_views(frames: torch.Tensor, crops: torch.Tensor, colour: torch.Tensor, grey: torch.Tensor, sigma: torch.Tensor,
              out_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 frames (B, H, W, 3) and `draw_views`'s randomness -> two normalized views (B, 3, h, w), on the frames' device."""
    views = []
    for v in range(2):
        x = resized_crop(frames, crops[:, v], out_hw)  # (B, 3, h, w) in [0, 1]
        x = colour_jitter(x, colour[:, v].to(x.device))
        x = torch.where(grey[:, v].to(x.device).view(-1, 1, 1, 1), luma(x).expand_as(x), x)
        x = gaussian_blur(x, sigma[:, v].to(x.device))
        views.append(normalize(x))
    return views[0], views[1]


# --- the method -------------------------------------------------------------------------------------


def contrastive_flops(arch: dict[str, Any], hidden: int, out: int) -> float:
    """FLOPs per image of one SimCLR step: two views through the whole encoder and the projection head, fwd + bwd."""
    h, w = to_2tuple(arch["img_size"])
    p, D = arch["patch_size"], arch["embed_dim"]
    L = (h // p) * (w // p)
    patch_embed = 2 * L * p * p * 3 * D
    forward = patch_embed + blocks_flops(arch["depth"], L + 1, D, arch["mlp_ratio"]) + 2 * (D * hidden + hidden * out)
    return 2 * (3 * forward - patch_embed)


class Contrastive(PretrainRecipe):
    name, kind, label, loss_name = "simclr", "contrastive", "contrastive (2 views)", "NT-Xent"
    model_class, mae_decoder, head, key_marker = SimCLR, False, "projection head", "projector."
    reconstructs, not_hf = "", "an encoder without an MAE decoder"  # nothing to reconstruct

    def __init__(self, cfg: MaecliConfig) -> None:
        self.cfg, self.arch, self.img_size, self.sc = cfg, cfg.model.mae_kwargs, cfg.model.img_size, cfg.simclr

    def samples(self, store: FrameStore) -> tuple[Samples, list[str]]:
        return Samples.stills(len(store)), []

    def build(self) -> SimCLR:
        return SimCLR(**self.arch, proj_hidden=self.sc.proj_hidden, proj_dim=self.sc.proj_dim, temperature=self.sc.temperature)

    def draw(self, rng: np.random.Generator, n: int, frame_hw: tuple[int, int]) -> tuple[np.ndarray, ...]:
        return draw_views(rng, n, frame_hw, self.img_size, self.sc)

    def inputs(self, frames: torch.Tensor, *draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return two_views(frames[:, 0], *draws, self.img_size)  # (B, 3, h, w) each

    def loss(self, model: torch.nn.Module, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        return model(view1, view2)

    def flops_per_image(self) -> float:
        return contrastive_flops(self.arch, self.sc.proj_hidden, self.sc.proj_dim)

    def lr(self, batch: int) -> float:
        """[simclr] blr when set (contrastive ViTs often need a lower one), else [pretrain]'s rule."""
        return self.sc.blr * batch / 256 if self.sc.blr else super().lr(batch)

    def after_run(self, loss: float, global_batch: int) -> list[str]:
        note = collapse_note(loss, global_batch)
        return [note] if note else []
