"""Segmentation: a labeled set of `images/` + `masks/` (`maecli.masks` reads it), fed at [probe] input_size, scored by
mIoU and its kin from one confusion matrix over every validation pixel at its mask's own resolution.

Scoring (`evaluate`, for the probe and fine-tuning alike): a model's logits on the patch grid (or the input) are
upsampled bilinearly to each validation mask's own resolution, argmax, and counted into one confusion matrix over the
whole set (`masks.seg_scores`); the validation loss is the cross-entropy over every labeled pixel.

The frozen probe (DINOv2's linear protocol, scaled to small sets): the patch tokens of the last `[probe] layers`
blocks, each after the encoder's final norm, concatenated into a (layers x D, gh, gw) map; a head of BatchNorm2d and
a 1x1 convolution; logits upsampled bilinearly to the input size and trained with cross-entropy that skips the ignore
index; AdamW (lr `[probe] lr`, weight decay 1e-4), linear warmup over the first 10% of the steps then cosine to 0,
`[probe] batch_frames` frames a step for `[probe] epochs` epochs. Features are computed once and cached, unless
`hflip` or `crop_scale` augment the frames (then the frozen encoder runs every step on the augmented batch).
Baselines through the same head and recipe: a random-init encoder of the same shape, the raw pixels (each patch's
normalized pixels as its token), and the majority class of the training pixels (no head).

Fine-tuning: a linear head on every patch token (Segmenter's linear decoder, `vit.segmenter`) at the set's input
size; each mask is cropped (and flipped) with its image, the loss is the per-pixel cross-entropy over the labeled
pixels of all ranks (no label smoothing, no mixing).
"""

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from maecli.data import augment, crop_boxes, resized_crop_masks, to_input
from maecli.device import autocast_for
from maecli.errors import ConfigError
from maecli.figures import plot_iou, save_segmentations
from maecli.inference import cached
from maecli.inputs import evenly
from maecli.loop import get_lr
from maecli.masks import confusion_of, is_segmentation, load_segmentation, seg_scores
from maecli.model import MaskedAutoencoder
from maecli.tasks import Labeled
from maecli.vit import dense_logits, segmenter

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


def dense_features(encoder: MaskedAutoencoder | None, arch: dict[str, Any], data: Labeled, cfg: Any, device: torch.device) -> Features:
    """What the dense probe reads: the frozen encoder at the set's input size ([probe] layers blocks), or the pixels."""
    if encoder is None:
        return pixel_tokens(arch["patch_size"])
    if cfg.probe.layers > arch["depth"]:
        raise ConfigError(f"probe.layers: the encoder has {arch['depth']} blocks (got {cfg.probe.layers})")
    return encoder_features(segmenter(encoder, arch, 0, tuple(data.train_x.shape[1:3])).to(device), cfg.probe.layers)


class Segmentation:
    name, layout, score, head, per_token = "segmentation", "images/ and masks/", "miou", "segmenter", True

    @staticmethod
    def recognises(folder: str | Path) -> bool:
        return is_segmentation(folder)

    def input_size(self, cfg: Any, img_size: tuple[int, int]) -> tuple[int, int]:
        return tuple(cfg.probe.input_size or img_size)

    def load(self, cfg: Any, size: tuple[int, int], notes: list[str]) -> Labeled:
        train_x, train_y, val_x, val_y, classes = load_segmentation(cfg, size, notes)
        return Labeled(train_x, train_y, val_x, val_y, classes.names, self, seg=classes)

    # --- the frozen probe -------------------------------------------------------------------------

    def probe_one(self, encoder: MaskedAutoencoder | None, arch: dict[str, Any], data: Labeled, cfg: Any, device: torch.device) -> dict[str, Any]:
        return probe_dense(dense_features(encoder, arch, data, cfg, device), data, cfg, device)[0]

    def probe(self, encoders: dict[str, Any], arch: dict[str, Any], data: Labeled, cfg: Any, device: torch.device, out_dir: Path) -> dict[str, Any]:
        """The dense probe of each encoder and the majority class: scores, the per-class IoU chart and the picture of a
        few validation frames (image | truth | each prediction)."""
        pc, results, shown = cfg.probe, {}, {}
        for name, encoder in {**encoders, "majority class": "majority"}.items():
            features = None if encoder == "majority" else dense_features(encoder, arch, data, cfg, device)
            results[name], shown[name] = probe_dense(features, data, cfg, device)
        plot_iou({name: r["per_class_iou"] for name, r in results.items()}, data.classes, out_dir / "iou.png", f"{cfg.project.name}: frozen encoders, per-class IoU")
        save_segmentations(data, shown, out_dir / "predictions.png", f"{cfg.project.name}: val frames, frozen-encoder probes")
        return dict(input_size=list(data.train_x.shape[1:3]), layers=pc.layers, epochs=pc.epochs, ignore_index=data.seg.ignore_index, results=results,
                    iou_png=str(out_dir / "iou.png"), predictions_png=str(out_dir / "predictions.png"))

    def floors(self, data: Labeled, cfg: Any, device: torch.device) -> dict[str, Any]:
        return {"majority class": probe_dense(None, data, cfg, device)[0]}  # no encoder at all: the most frequent class everywhere

    def frozen_scores(self, probe: dict[str, Any]) -> dict[str, float]:
        return {"miou": probe["miou"]}

    # --- fine-tuning ------------------------------------------------------------------------------

    def check_recipe(self, fc: Any) -> None:
        if fc.mixup or fc.cutmix:
            raise ConfigError(f"finetune.{'mixup' if fc.mixup else 'cutmix'}: mixes whole images' labels; a segmentation set has per-pixel labels (set it to 0)")

    def settings(self, data: Labeled) -> dict[str, Any]:
        return dict(input_size=list(data.train_x.shape[1:3]), ignore_index=data.seg.ignore_index)

    def model(self, encoder: MaskedAutoencoder, arch: dict[str, Any], num_classes: int, size: tuple[int, int], *, drop_path: float) -> nn.Module:
        return segmenter(encoder, arch, num_classes, size, drop_path=drop_path)  # a linear head on every patch token, at the set's input size

    def loss(self, model: nn.Module, raw: nn.Module, data: Labeled, imgs: torch.Tensor, labels: torch.Tensor, theta: torch.Tensor,
             rng: np.random.Generator, fc: Any, world: int, autocast: Any) -> torch.Tensor:
        """Per-pixel cross-entropy at the input size, the masks cropped as their images, averaged over the labeled pixels
        of every rank."""
        size, ignore = tuple(imgs.shape[2:]), data.seg.ignore_index
        targets = resized_crop_masks(labels, theta, size).long()  # (B, h, w)
        with autocast:
            logits = F.interpolate(dense_logits(model(imgs), raw.patch_embed.grid_size), size=size, mode="bilinear", align_corners=False)  # (B, C, h, w)
        labeled = (targets != ignore).sum()  # pixels that count: the mean is over all ranks' labeled pixels
        if world > 1:  # DDP averages the ranks' gradients, so each rank's sum is scaled by world / the global count
            dist.all_reduce(labeled)
        return F.cross_entropy(logits.float(), targets, ignore_index=ignore, reduction="sum") * world / labeled.clamp(min=1)

    def validate(self, model: nn.Module, data: Labeled, device: torch.device, autocast: Any) -> tuple[dict[str, float], Any]:
        """val_loss and val_miou, and the confusion matrix with the pictured frames' predictions."""
        grid = model.patch_embed.grid_size
        confusion, loss, preds = evaluate(lambda x: dense_logits(model(x), grid), data, device, shown=shown_frames(len(data.val_x)))
        return dict(val_loss=round(loss, 6), val_miou=round(seg_scores(confusion, data.classes)["miou"], 6)), (confusion, preds)

    def final(self, val_result: Any, data: Labeled, run_dir: Path) -> tuple[dict[str, Any], dict[str, str]]:
        confusion, preds = val_result
        scores = seg_scores(confusion, data.classes)
        plot_iou({run_dir.name: scores["per_class_iou"]}, data.classes, run_dir / "iou.png", f"{run_dir.name}, fine-tuned: per-class IoU")
        save_segmentations(data, {f"{run_dir.name}, fine-tuned": preds}, run_dir / "predictions.png", f"{run_dir.name}, fine-tuned: val frames")
        return scores, dict(iou_png=str(run_dir / "iou.png"), predictions_png=str(run_dir / "predictions.png"))

    def usage(self, arch: dict[str, Any], size: list[int], num_classes: int) -> dict[str, str]:
        """Per-token logits -> a map -> each image's own resolution."""
        gh, gw = size[0] // arch["patch_size"], size[1] // arch["patch_size"]
        return {"predict": (f"logits = torch.nn.functional.interpolate(m(x)[:, 1:].transpose(1, 2).reshape(len(x), {num_classes}, {gh}, {gw}), "
                            f"size=(H, W), mode='bilinear')  # x: (N, 3, {size[0]}, {size[1]}) ImageNet-normalized, the frames resized to it")}

    # --- the quickstart's table -------------------------------------------------------------------

    def table(self, probed: dict[str, Any], tuned: dict[str, Any]) -> str:
        """mIoU of the frozen-encoder probe and after fine-tuning, one row per encoder (and the floors)."""
        lines = [f"| encoder (segmentation, {len(probed['classes'])} classes) | frozen probe mIoU | pixel accuracy | "
                 f"fine-tuned mIoU ({tuned['recipe']['epochs']} epochs) |", "|---|---:|---:|---:|"]
        for name, r in probed["results"].items():
            tuned_miou = f"{100 * tuned['results'][name]['miou']:.1f}%" if name in tuned["results"] else "-"
            lines.append(f"| {name} | {100 * r['miou']:.1f}% | {100 * r['pixel_acc']:.1f}% | {tuned_miou} |")
        return "\n".join(lines) + "\n"
