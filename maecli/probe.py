"""`maecli probe`: how good is the frozen encoder on a labeled image folder?

Features are computed once per encoder (the class token, as in the MAE linear-probing protocol, or the
mean patch token) and cached in memory; on them:
- a linear probe: BatchNorm1d without affine parameters, then one linear layer, trained with AdamW
  (no weight decay, cosine schedule to 0) for `epochs` over shuffled batches;
- a weighted k-NN: cosine similarity, the k nearest training features vote with exp(similarity / T).
Both report top-1 (top-5 with more than 5 classes), per-class accuracy and a confusion matrix. With
`--baseline random` the same probe runs on a randomly initialised encoder of the same shape.
"""

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from maecli.config import MaecliConfig
from maecli.data import to_input
from maecli.device import autocast_for
from maecli.figures import plot_confusion
from maecli.files import write_json
from maecli.inference import load_for_inference, pool_features, random_encoder
from maecli.labeled import labeled_split, load_images, scores_report
from maecli.model import MaskedAutoencoder


@torch.no_grad()
def embed(model: MaskedAutoencoder, images: torch.Tensor, pool: str, device: torch.device, batch: int = 256) -> torch.Tensor:
    model = model.to(device).eval()
    autocast = autocast_for(device)
    feats = []
    for chunk in images.split(batch):
        with autocast:
            feats.append(pool_features(model.forward_features(to_input(chunk.to(device))), pool).float().cpu())
    return torch.cat(feats)  # (N, D)


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


def probe_encoder(encoder: MaskedAutoencoder | None, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                  classes: list[str], cfg: MaecliConfig, device: torch.device) -> dict[str, Any]:
    """Linear-probe and k-NN reports of one encoder (None: the raw pixels) on uint8 images and labels at its input size."""
    pc = cfg.probe
    if encoder is None:
        train_x, val_x = pixel_features(train[0]), pixel_features(val[0])
    else:  # features computed once, cached
        train_x, val_x = embed(encoder, train[0], pc.pool, device), embed(encoder, val[0], pc.pool, device)
    linear = linear_probe(train_x, train[1], val_x, len(classes), epochs=pc.epochs, lr=pc.lr, batch_size=pc.batch_size, seed=cfg.project.seed)
    knn = knn_scores(train_x, train[1], val_x, len(classes), k=pc.k, temperature=pc.temperature)
    return {"linear": scores_report(linear, val[1], classes), "knn": scores_report(knn, val[1], classes)}


def run_probe(cfg: MaecliConfig, *, checkpoint: str | None = None, baselines: tuple[str, ...] = ()) -> dict[str, Any]:
    """The probes on the pretrained encoder and on each of `baselines`: "random" (a randomly initialised encoder of
    the same shape) and "pixels" (the input pixels themselves, no encoder)."""
    assert set(baselines) <= set(BASELINES), f"baselines must be among {BASELINES}, got {baselines}"
    pc = cfg.probe
    notes: list[str] = []
    model, arch, path, device = load_for_inference(cfg, checkpoint or pc.checkpoint, notes)
    train_items, val_items, classes = labeled_split(cfg, notes)
    if len(classes) <= 5:
        notes.append(f"top-5 accuracy not reported: only {len(classes)} classes")
    train_imgs, train_y = load_images(train_items, model.img_size, notes)
    val_imgs, val_y = load_images(val_items, model.img_size, notes)
    encoders: dict[str, MaskedAutoencoder | None] = {"pretrained": model}
    if "random" in baselines:
        encoders["random init"] = random_encoder(arch, cfg.project.seed)
    if "pixels" in baselines:
        encoders["raw pixels"] = None
    out_dir = cfg.run_dir / "probe"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, encoder in encoders.items():
        results[name] = probe_encoder(encoder, (train_imgs, train_y), (val_imgs, val_y), classes, cfg, device)
        slug = name.replace(" ", "-")
        plot_confusion(results[name]["linear"]["confusion"], classes, out_dir / f"confusion-{slug}.png", f"{name}, linear probe")
        results[name]["confusion_png"] = str(out_dir / f"confusion-{slug}.png")
    report = dict(checkpoint=str(path), classes=classes, train_images=len(train_y), val_images=len(val_y), pool=pc.pool, epochs=pc.epochs,
                  k=pc.k, device=str(device), results=results, notes=notes, report=str(out_dir / "report.json"))
    write_json(out_dir / "report.json", report)
    return report
