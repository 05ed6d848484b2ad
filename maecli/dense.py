"""Dense prediction: how a segmentation model is scored, and the segmentation probe of a frozen encoder.

Scoring (`evaluate`, shared with `finetune`): a model's logits on the patch grid (or the input) are upsampled
bilinearly to each validation mask's own resolution, argmax, and counted into one confusion matrix over the whole
set (`segmentation.seg_scores`); the validation loss is the cross-entropy over every labeled pixel.

The probe (DINOv2's linear protocol, scaled to small sets): the patch tokens of the last `[probe] layers` blocks,
each after the encoder's final norm, concatenated into a (layers x D, gh, gw) map; a head of BatchNorm2d and a 1x1
convolution; logits upsampled bilinearly to the input size and trained with cross-entropy that skips the ignore
index; AdamW (lr `[probe] lr`, weight decay 1e-4), linear warmup over the first 10% of the steps then cosine to 0,
`[probe] batch_frames` frames a step for `[probe] epochs` epochs. Features are computed once and cached, unless
`hflip` or `crop_scale` augment the frames (then the frozen encoder runs every step on the augmented batch).
Baselines through the same head and recipe: a random-init encoder of the same shape, the raw pixels (each patch's
normalized pixels as its token), and the majority class of the training pixels (no head).
"""

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from maecli.data import augment, crop_boxes, resized_crop_masks, to_input
from maecli.device import autocast_for
from maecli.inputs import evenly
from maecli.labeled import Labeled
from maecli.loop import get_lr
from maecli.segmentation import confusion_of, seg_scores

WEIGHT_DECAY = 1e-4
WARMUP = 0.1  # of the steps
SHOWN = 4  # validation frames in the picture

Features = Callable[[torch.Tensor], torch.Tensor]  # normalized images (B, 3, h, w) -> (B, F, gh, gw)


@torch.no_grad()
def evaluate(predict: Callable[[torch.Tensor], torch.Tensor], data: Labeled, device: torch.device, batch: int = 32,
             shown: list[int] = ()) -> tuple[torch.Tensor, float, dict[int, torch.Tensor]]:
    """`predict`: normalized images (B, 3, h, w) -> logits (B, C, gh, gw) at any resolution. Returns the confusion
    matrix (C, C) over every validation pixel at its mask's resolution, the mean cross-entropy over the labeled
    pixels, and the predictions (H, W) of the frames `shown`."""
    C, ignore = len(data.classes), data.seg.ignore_index
    confusion = torch.zeros(C, C, dtype=torch.long)
    loss_sum, pixels, preds = 0.0, 0, {}
    autocast = autocast_for(device)
    for start in range(0, len(data.val_x), batch):
        with autocast:
            logits = predict(to_input(data.val_x[start : start + batch].to(device))).float()  # (B, C, gh, gw)
        for i, mask in enumerate(data.val_y[start : start + batch]):
            up = F.interpolate(logits[i : i + 1], size=tuple(mask.shape), mode="bilinear", align_corners=False).cpu()  # (1, C, H, W)
            truth = mask.long()[None]  # (1, H, W)
            loss_sum += F.cross_entropy(up, truth, ignore_index=ignore, reduction="sum").item()
            pixels += int((truth != ignore).sum())
            pred = up.argmax(1)[0]  # (H, W)
            confusion += confusion_of(pred, truth[0], C, ignore)
            if start + i in shown:
                preds[start + i] = pred.to(torch.uint8)
    return confusion, loss_sum / max(pixels, 1), preds


def shown_frames(n: int) -> list[int]:
    """The validation frames pictures show: `SHOWN` of them, evenly spaced."""
    return evenly(n, SHOWN).tolist()


def encoder_features(backbone: nn.Module, layers: int) -> Features:
    """The frozen encoder's map: the last `layers` blocks' patch tokens, each after the final norm, concatenated."""
    backbone.eval().requires_grad_(False)
    return lambda x: torch.cat(backbone.get_intermediate_layers(x, n=layers, reshape=True, norm=True), dim=1)  # (B, layers * D, gh, gw)


def pixel_tokens(patch_size: int) -> Features:
    """The floor: each patch's normalized pixels as its token, (B, 3 * p * p, gh, gw)."""
    return lambda x: F.pixel_unshuffle(x, patch_size)


@torch.no_grad()
def cached(features: Features, images: torch.Tensor, device: torch.device, batch: int = 32) -> torch.Tensor:
    """Features of uint8 images (N, h, w, 3), computed once, float32 on `device`: (N, F, gh, gw)."""
    autocast = autocast_for(device)
    out = []
    for chunk in images.split(batch):
        with autocast:
            out.append(features(to_input(chunk.to(device))).float())
    return torch.cat(out)


def train_head(features: Features, data: Labeled, cfg: Any, device: torch.device) -> nn.Module:
    """BatchNorm2d + 1x1 conv trained on the frozen features of the training frames (see the module's docstring)."""
    pc, seed, C = cfg.probe, cfg.project.seed, len(data.classes)
    size, augmenting = tuple(data.train_x.shape[1:3]), pc.hflip or pc.crop_scale != (1.0, 1.0)
    train_y = data.train_y.to(device)  # (N, h, w) uint8
    train_f = None if augmenting else cached(features, data.train_x, device)  # (N, F, gh, gw)
    dim = (train_f if train_f is not None else cached(features, data.train_x[:1], device)).shape[1]
    torch.manual_seed(seed)
    head = nn.Sequential(nn.BatchNorm2d(dim), nn.Conv2d(dim, C, kernel_size=1)).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=pc.lr, weight_decay=WEIGHT_DECAY)
    n = len(train_y)
    batch = min(pc.batch_frames, n)
    steps_per_epoch = max(1, n // batch)  # the last incomplete batch of an epoch is dropped (BatchNorm wants no tiny batch)
    total = pc.epochs * steps_per_epoch
    head.train()
    for step in range(total):
        epoch, pos = divmod(step, steps_per_epoch)
        idx = torch.from_numpy(np.random.default_rng([seed, 9, epoch]).permutation(n)[pos * batch : (pos + 1) * batch]).to(device)  # (B,)
        if train_f is not None:
            f, y = train_f[idx], train_y[idx]  # (B, F, gh, gw), (B, h, w)
        else:
            theta = torch.from_numpy(crop_boxes(np.random.default_rng([seed, 10, step]), batch, size, size, pc.crop_scale, pc.hflip))  # (B, 2, 3)
            with torch.no_grad(), autocast_for(device):
                f = features(augment(data.train_x[idx.cpu()].to(device), theta, size)).float()
            y = resized_crop_masks(train_y[idx], theta, size)
        for group in opt.param_groups:
            group["lr"] = get_lr(step, total=total, warmup=round(WARMUP * total), lr=pc.lr, min_lr=0.0)
        logits = F.interpolate(head(f), size=size, mode="bilinear", align_corners=False)  # (B, C, h, w)
        loss = F.cross_entropy(logits, y.long(), ignore_index=data.seg.ignore_index)
        if not math.isfinite(loss.item()):  # every pixel of the batch is ignored: nothing to learn from
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head.eval()


def majority_class(data: Labeled) -> Callable[[torch.Tensor], torch.Tensor]:
    """The floor without features: the most frequent class of the training pixels, predicted everywhere."""
    counts = torch.bincount(data.train_y[data.train_y != data.seg.ignore_index].long(), minlength=len(data.classes))  # (C,)
    logits = F.one_hot(counts.argmax(), len(data.classes)).float().view(1, -1, 1, 1)  # (1, C, 1, 1)
    return lambda x: logits.to(x.device).expand(len(x), -1, -1, -1)


def probe_dense(features: Features | None, data: Labeled, cfg: Any, device: torch.device) -> tuple[dict[str, Any], dict[int, torch.Tensor]]:
    """Scores of one encoder's features through the probe (None: the majority class), and the predictions (H, W) of
    the pictured validation frames."""
    if features is None:
        predict = majority_class(data)
    else:
        head = train_head(features, data, cfg, device)
        predict = lambda x: head(features(x))  # noqa: E731
    confusion, loss, preds = evaluate(predict, data, device, shown=shown_frames(len(data.val_x)))
    return {**seg_scores(confusion, data.classes), "val_loss": round(loss, 6)}, preds
