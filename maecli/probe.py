"""`maecli probe`: how good is the frozen encoder on a labeled set? A segmentation set (images/ + masks/) gets the
dense probe of `maecli.dense`; a classification folder (one sub-folder per class) what follows.

Features are computed once per encoder (the class token, as in the MAE linear-probing protocol, or the
mean patch token) and cached in memory; on them:
- a linear probe: BatchNorm1d without affine parameters, then one linear layer, trained with AdamW
  (no weight decay, cosine schedule to 0) for `epochs` over shuffled batches;
- a weighted k-NN: cosine similarity, the k nearest training features vote with exp(similarity / T).
Both report top-1 (top-5 with more than 5 classes), per-class accuracy and a confusion matrix. With
`--baseline random` the same probe runs on a randomly initialised encoder of the same shape.
"""

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from maecli.config import MaecliConfig
from maecli.data import to_input
from maecli.dense import Features, cached, encoder_features, pixel_tokens, probe_dense
from maecli.errors import ConfigError
from maecli.figures import plot_confusion, plot_iou, save_segmentations
from maecli.files import write_json
from maecli.inference import load_for_inference, pool_features, random_encoder
from maecli.labeled import Labeled, input_size, load_labeled, scores_report
from maecli.model import MaskedAutoencoder
from maecli.vit import segmenter


@torch.no_grad()
def embed(model: MaskedAutoencoder, images: torch.Tensor, pool: str, device: torch.device, batch: int = 256) -> torch.Tensor:
    """Pooled features (N, D) on the CPU of uint8 images (N, h, w, 3), computed once (`dense.cached`)."""
    model = model.to(device).eval()
    return cached(lambda x: pool_features(model.forward_features(x), pool), images, device, batch).cpu()


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, num_classes: int, *, epochs: int, lr: float,
                 batch_size: int, seed: int) -> torch.Tensor:
    """Trains BatchNorm1d(affine=False) + Linear on frozen features; returns validation logits (N, C)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Sequential(nn.BatchNorm1d(train_x.shape[1], affine=False, eps=1e-6), nn.Linear(train_x.shape[1], num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    total = epochs * steps_per_epoch
    head.train()
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(train_x), generator=gen)
        idx = order[(step % steps_per_epoch) * batch_size : (step % steps_per_epoch + 1) * batch_size]
        if len(idx) < 2:  # BatchNorm needs two samples
            continue
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
        loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        return head(val_x)


def knn_scores(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, num_classes: int, *, k: int, temperature: float) -> torch.Tensor:
    """Weighted k-NN votes (N, C): cosine similarity, the k nearest vote with exp(similarity / temperature)."""
    train_n, val_n = F.normalize(train_x, dim=1), F.normalize(val_x, dim=1)
    sims, idx = (val_n @ train_n.T).topk(min(k, len(train_x)), dim=1)  # (N, k)
    votes = torch.zeros(len(val_x), num_classes)
    votes.scatter_add_(1, train_y[idx], (sims / temperature).exp())
    return votes


BASELINES = ("random", "pixels")


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, h, w, 3) at the model's input size -> their normalized pixels, flattened (N, 3 * h * w): the
    floor an encoder has to beat (the probe's BatchNorm and linear layer, or k-NN, on the input itself)."""
    return to_input(images).flatten(1)


def probe_encoder(encoder: MaskedAutoencoder | None, arch: dict[str, Any], data: Labeled, cfg: MaecliConfig, device: torch.device) -> dict[str, Any]:
    """The frozen-encoder scores of one encoder (None: the raw pixels) on the labeled set: linear probe and k-NN
    reports for classification, the dense probe's for segmentation."""
    if data.dense:
        return probe_dense(dense_features(encoder, arch, data, cfg, device), data, cfg, device)[0]
    pc = cfg.probe
    if encoder is None:
        train_x, val_x = pixel_features(data.train_x), pixel_features(data.val_x)
    else:  # features computed once, cached
        train_x, val_x = embed(encoder, data.train_x, pc.pool, device), embed(encoder, data.val_x, pc.pool, device)
    linear = linear_probe(train_x, data.train_y, val_x, len(data.classes), epochs=pc.epochs, lr=pc.lr, batch_size=pc.batch_size, seed=cfg.project.seed)
    knn = knn_scores(train_x, data.train_y, val_x, len(data.classes), k=pc.k, temperature=pc.temperature)
    return {"linear": scores_report(linear, data.val_y, data.classes), "knn": scores_report(knn, data.val_y, data.classes)}


def dense_features(encoder: MaskedAutoencoder | None, arch: dict[str, Any], data: Labeled, cfg: MaecliConfig, device: torch.device) -> Features:
    """What the dense probe reads: the frozen encoder at the set's input size ([probe] layers blocks), or the pixels."""
    if encoder is None:
        return pixel_tokens(arch["patch_size"])
    if cfg.probe.layers > arch["depth"]:
        raise ConfigError(f"probe.layers: the encoder has {arch['depth']} blocks (got {cfg.probe.layers})")
    return encoder_features(segmenter(encoder, arch, 0, tuple(data.train_x.shape[1:3])).to(device), cfg.probe.layers)


def run_probe(cfg: MaecliConfig, *, checkpoint: str | None = None, baselines: tuple[str, ...] = ()) -> dict[str, Any]:
    """The probes on the pretrained encoder and on each of `baselines`: "random" (a randomly initialised encoder of
    the same shape) and "pixels" (the input pixels themselves, no encoder); on a segmentation set the majority class
    is a floor too."""
    assert set(baselines) <= set(BASELINES), f"baselines must be among {BASELINES}, got {baselines}"
    notes: list[str] = []
    model, arch, path, device = load_for_inference(cfg, checkpoint or cfg.probe.checkpoint, notes)
    data = load_labeled(cfg, input_size(cfg, model.img_size, model.patch_size), notes)
    encoders: dict[str, MaskedAutoencoder | None] = {"pretrained": model}
    if "random" in baselines:
        encoders["random init"] = random_encoder(arch, cfg.project.seed)
    if "pixels" in baselines:
        encoders["raw pixels"] = None
    out_dir = cfg.run_dir / cfg.probe.run
    out_dir.mkdir(parents=True, exist_ok=True)
    report = dict(checkpoint=str(path), task="segmentation" if data.dense else "classification", classes=data.classes,
                  train_images=len(data.train_x), val_images=len(data.val_x), device=str(device), notes=notes, report=str(out_dir / "report.json"))
    if data.dense:
        report.update(probe_segmentation(encoders, arch, data, cfg, device, out_dir))
    else:
        results = {}
        for name, encoder in encoders.items():
            results[name] = probe_encoder(encoder, arch, data, cfg, device)
            slug = name.replace(" ", "-")
            plot_confusion(results[name]["linear"]["confusion"], data.classes, out_dir / f"confusion-{slug}.png", f"{name}, linear probe")
            results[name]["confusion_png"] = str(out_dir / f"confusion-{slug}.png")
        report.update(pool=cfg.probe.pool, epochs=cfg.probe.epochs, k=cfg.probe.k, results=results)
    write_json(out_dir / "report.json", report)
    return report


def probe_segmentation(encoders: dict[str, MaskedAutoencoder | None], arch: dict[str, Any], data: Labeled, cfg: MaecliConfig, device: torch.device,
                       out_dir: Path) -> dict[str, Any]:
    """The dense probe of each encoder and the majority class: scores, the per-class IoU chart and the picture of a few
    validation frames (image | truth | each prediction)."""
    pc, results, shown = cfg.probe, {}, {}
    for name, encoder in {**encoders, "majority class": "majority"}.items():
        features = None if encoder == "majority" else dense_features(encoder, arch, data, cfg, device)
        results[name], shown[name] = probe_dense(features, data, cfg, device)
    plot_iou({name: r["per_class_iou"] for name, r in results.items()}, data.classes, out_dir / "iou.png", f"{cfg.project.name}: frozen encoders, per-class IoU")
    save_segmentations(data, shown, out_dir / "predictions.png", f"{cfg.project.name}: val frames, frozen-encoder probes")
    return dict(input_size=list(data.train_x.shape[1:3]), layers=pc.layers, epochs=pc.epochs, ignore_index=data.seg.ignore_index, results=results,
                iou_png=str(out_dir / "iou.png"), predictions_png=str(out_dir / "predictions.png"))
