"""Classification: a labeled set of one sub-folder per class (a train folder and a val folder, or a stratified split
of train), images at the model's input size, scored by top-1 (top-5 with more than 5 classes).

The frozen probe (the MAE linear-probing protocol): features computed once per encoder (the class token, or the mean
patch token) and cached in memory; on them
- a linear probe: BatchNorm1d without affine parameters, then one linear layer, trained with AdamW (no weight decay,
  cosine schedule to 0) for `epochs` over shuffled batches;
- a weighted k-NN: cosine similarity, the k nearest training features vote with exp(similarity / T).
Both report top-1, per-class accuracy and a confusion matrix; the raw pixels through the same probes are the floor.

Fine-tuning: a linear head on the class token, label smoothing, optional Mixup / CutMix, cross-entropy.
"""

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from maecli.data import to_input
from maecli.errors import ConfigError
from maecli.figures import plot_confusion
from maecli.inference import cached, pool_features
from maecli.inputs import ignored_in, list_images, read_images, resize_notes
from maecli.model import MaskedAutoencoder
from maecli.tasks import Labeled, kind_of
from maecli.vit import classifier


class Classification:
    name, layout, score, head, per_token = "classification", "one sub-folder per class", "top1", "classifier", False

    @staticmethod
    def recognises(folder: str | Path) -> bool:
        return Path(folder).is_dir()  # the fallback: any folder is read as one sub-folder per class

    def input_size(self, cfg: Any, img_size: tuple[int, int]) -> tuple[int, int]:
        return tuple(img_size)

    def load(self, cfg: Any, size: tuple[int, int], notes: list[str]) -> Labeled:
        if cfg.probe.val and (other := kind_of(cfg.probe.val)).name != self.name:
            raise ConfigError(f"probe.val: {cfg.probe.val} is a {other.name} set ({other.layout}), probe.train is not")
        train_items, val_items, classes = labeled_split(cfg, notes)
        if len(classes) <= 5:
            notes.append(f"top-5 accuracy not reported: only {len(classes)} classes")
        train_x, train_y = load_images(train_items, size, notes)
        val_x, val_y = load_images(val_items, size, notes)
        return Labeled(train_x, train_y, val_x, val_y, classes, self)

    # --- the frozen probe -------------------------------------------------------------------------

    def probe_one(self, encoder: MaskedAutoencoder | None, arch: dict[str, Any], data: Labeled, cfg: Any, device: torch.device) -> dict[str, Any]:
        """Linear probe and k-NN reports of one encoder's features (None: the raw pixels)."""
        pc = cfg.probe
        if encoder is None:
            train_x, val_x = pixel_features(data.train_x), pixel_features(data.val_x)
        else:  # features computed once, cached
            train_x, val_x = embed(encoder, data.train_x, pc.pool, device), embed(encoder, data.val_x, pc.pool, device)
        linear = linear_probe(train_x, data.train_y, val_x, len(data.classes), epochs=pc.epochs, lr=pc.lr, batch_size=pc.batch_size, seed=cfg.project.seed)
        knn = knn_scores(train_x, data.train_y, val_x, len(data.classes), k=pc.k, temperature=pc.temperature)
        return {"linear": scores_report(linear, data.val_y, data.classes), "knn": scores_report(knn, data.val_y, data.classes)}

    def probe(self, encoders: dict[str, Any], arch: dict[str, Any], data: Labeled, cfg: Any, device: torch.device, out_dir: Path) -> dict[str, Any]:
        """Each encoder's probes, with the linear probe's confusion matrix as a picture."""
        results = {}
        for name, encoder in encoders.items():
            results[name] = self.probe_one(encoder, arch, data, cfg, device)
            slug = name.replace(" ", "-")
            plot_confusion(results[name]["linear"]["confusion"], data.classes, out_dir / f"confusion-{slug}.png", f"{name}, linear probe")
            results[name]["confusion_png"] = str(out_dir / f"confusion-{slug}.png")
        return dict(pool=cfg.probe.pool, epochs=cfg.probe.epochs, k=cfg.probe.k, results=results)

    def floors(self, data: Labeled, cfg: Any, device: torch.device) -> dict[str, Any]:
        return {}  # the raw pixels (probe_one(None)) are the floor

    def frozen_scores(self, probe: dict[str, Any]) -> dict[str, float]:
        return {"linear": probe["linear"]["top1"], "knn": probe["knn"]["top1"]}

    # --- fine-tuning ------------------------------------------------------------------------------

    def check_recipe(self, fc: Any) -> None:
        pass

    def settings(self, data: Labeled) -> dict[str, Any]:
        return {}

    def model(self, encoder: MaskedAutoencoder, arch: dict[str, Any], num_classes: int, size: tuple[int, int], *, drop_path: float) -> nn.Module:
        return classifier(encoder, arch, num_classes, drop_path=drop_path)  # a linear head on the class token

    def loss(self, model: nn.Module, raw: nn.Module, data: Labeled, imgs: torch.Tensor, labels: torch.Tensor, theta: torch.Tensor,
             rng: np.random.Generator, fc: Any, world: int, autocast: Any) -> torch.Tensor:
        """Cross-entropy against label-smoothed targets, after Mixup / CutMix when the recipe has them."""
        C = len(data.classes)
        targets = F.one_hot(labels, C).float() * (1 - fc.label_smoothing) + fc.label_smoothing / C  # (B, C)
        imgs, targets = mix(rng, imgs, targets, fc.mixup, fc.cutmix)
        with autocast:
            logits = model(imgs)  # (B, C)
        return F.cross_entropy(logits.float(), targets)

    def validate(self, model: nn.Module, data: Labeled, device: torch.device, autocast: Any, batch: int = 256) -> tuple[dict[str, float], torch.Tensor]:
        """val_loss and val_top1, and the logits (N, C) on the CPU."""
        logits = []
        for chunk in data.val_x.split(batch):
            with autocast:
                logits.append(model(to_input(chunk.to(device))).float().cpu())
        result = torch.cat(logits)  # (N, C)
        return dict(val_loss=round(F.cross_entropy(result, data.val_y).item(), 6), val_top1=round((result.argmax(1) == data.val_y).float().mean().item(), 6)), result

    def final(self, val_result: torch.Tensor, data: Labeled, run_dir: Path) -> tuple[dict[str, Any], dict[str, str]]:
        scores = scores_report(val_result, data.val_y, data.classes)
        plot_confusion(scores["confusion"], data.classes, run_dir / "confusion.png", f"{run_dir.name}, fine-tuned")
        return scores, dict(confusion_png=str(run_dir / "confusion.png"))

    def usage(self, arch: dict[str, Any], size: list[int], num_classes: int) -> dict[str, str]:
        return {}

    # --- the quickstart's table -------------------------------------------------------------------

    def table(self, probed: dict[str, Any], tuned: dict[str, Any]) -> str:
        """One row per encoder (and the pixels), one column per evaluation."""
        header = f"| encoder | linear probe top-1 | k-NN (k={probed['k']}) top-1 | fine-tuned top-1 ({tuned['recipe']['epochs']} epochs) |"
        lines = [header, "|---|---:|---:|---:|"]
        for name, r in probed["results"].items():
            tuned_top1 = f"{100 * tuned['results'][name]['top1']:.1f}%" if name in tuned["results"] else "-"
            lines.append(f"| {name} | {100 * r['linear']['top1']:.1f}% | {100 * r['knn']['top1']:.1f}% | {tuned_top1} |")
        return "\n".join(lines) + "\n"


# --- the set --------------------------------------------------------------------------------------


def labeled_split(cfg: Any, notes: list[str]) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]], list[str]]:
    """(train items, val items, class names) from the train folder and the val folder or a stratified split of train."""
    pc = cfg.probe
    if not pc.train:
        raise ConfigError("probe.train: no labeled images given (a folder with one sub-folder per class)")
    sets = {}
    for name, folder in (("train", pc.train), ("val", pc.val)):
        if not folder:
            continue
        if not Path(folder).is_dir():
            raise ConfigError(f"probe.{name}: {folder} is not a folder")
        found = list_images(Path(folder))
        items = [(p, c) for p, c in found if c]
        notes += ignored_in(Path(folder)) + [f"ignored {p}: not in a class folder" for p, c in found if not c]
        if not items:
            raise ConfigError(f"probe.{name}: {folder} holds no images in class sub-folders")
        sets[name] = items
    classes = sorted({c for items in sets.values() for _, c in items})
    trained_classes = sorted({c for _, c in sets["train"]})
    if len(trained_classes) < 2:
        raise ConfigError(f"probe.train: {pc.train} has only one class ({trained_classes[0]}); a probe needs at least two")
    notes += [f"class {c} has validation images but none to train on" for c in classes if c not in trained_classes]
    index = {c: i for i, c in enumerate(classes)}
    train = [(p, index[c]) for p, c in sets["train"]]
    if "val" in sets:
        return fewer(train, pc.per_class, cfg.project.seed, notes), [(p, index[c]) for p, c in sets["val"]], classes
    rng = np.random.default_rng([cfg.project.seed, 4])
    val_idx = []
    for k in range(len(classes)):  # stratified: the same fraction of every class, at least one when the class has two
        members = [i for i, (_, y) in enumerate(train) if y == k]
        take = min(len(members) - 1, max(1, round(len(members) * pc.val_fraction))) if len(members) > 1 else 0
        val_idx += rng.permutation(members)[:take].tolist()
    chosen = set(val_idx)
    if not chosen:
        raise ConfigError("probe.train: too few images per class to hold out a validation split (give probe.val)")
    notes.append(f"no val folder: held out {len(chosen)} of {len(train)} images ({pc.val_fraction:g} of each class, seed {cfg.project.seed})")
    return fewer([t for i, t in enumerate(train) if i not in chosen], pc.per_class, cfg.project.seed, notes), [train[i] for i in sorted(chosen)], classes


def fewer(items: list[tuple[Path, int]], per_class: int, seed: int, notes: list[str]) -> list[tuple[Path, int]]:
    """At most `per_class` items of each class, drawn by the seed (all of them when per_class is 0), in their order."""
    if not per_class:
        return items
    rng = np.random.default_rng([seed, 8])
    keep = set()
    for k in sorted({y for _, y in items}):
        members = [i for i, (_, y) in enumerate(items) if y == k]
        keep.update(rng.permutation(members)[:per_class].tolist())
    notes.append(f"probe.per_class: training on {len(keep)} of {len(items)} labeled images (at most {per_class} per class, seed {seed})")
    return [t for i, t in enumerate(items) if i in keep]


def load_images(items: list[tuple[Path, int]], size: tuple[int, int], notes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, h, w, 3) at the model's size and labels (N,); unreadable files are skipped and reported."""
    images, kept, originals, failures = read_images([p for p, _ in items], size)
    notes += failures + resize_notes(originals, size)
    if not images:
        raise ConfigError(f"probe: none of the {len(items)} images could be read")
    return torch.from_numpy(np.stack(images)), torch.tensor([items[i][1] for i in kept])


def scores_report(scores: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """top-1 (and top-5 past 5 classes), per-class accuracy and the confusion matrix of scores (N, C) against labels (N,)."""
    C = len(classes)
    pred = scores.argmax(1)
    confusion = torch.zeros(C, C, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)  # rows: truth, columns: prediction
    per_class = {c: (confusion[i, i] / confusion[i].sum()).item() if confusion[i].sum() else None for i, c in enumerate(classes)}
    report = {"top1": (pred == labels).float().mean().item(), "per_class": per_class, "confusion": confusion.tolist()}
    if C > 5:
        report["top5"] = (scores.topk(5, dim=1).indices == labels[:, None]).any(1).float().mean().item()
    return report


# --- the probe ------------------------------------------------------------------------------------


@torch.no_grad()
def embed(model: MaskedAutoencoder, images: torch.Tensor, pool: str, device: torch.device, batch: int = 256) -> torch.Tensor:
    """Pooled features (N, D) on the CPU of uint8 images (N, h, w, 3), computed once."""
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


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, h, w, 3) at the model's input size -> their normalized pixels, flattened (N, 3 * h * w): the
    floor an encoder has to beat (the probe's BatchNorm and linear layer, or k-NN, on the input itself)."""
    return to_input(images).flatten(1)


# --- fine-tuning ----------------------------------------------------------------------------------


def mix(rng: np.random.Generator, imgs: torch.Tensor, targets: torch.Tensor, mixup: float, cutmix: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix (one per step, chosen by `rng`, when both are on) of the batch with itself reversed: images
    (B, 3, h, w) and soft targets (B, C), mixed in the same proportion. Identity when both are off."""
    if mixup <= 0 and cutmix <= 0:
        return imgs, targets
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    lam = float(rng.beta(cutmix, cutmix) if use_cutmix else rng.beta(mixup, mixup))
    other = imgs.flip(0)
    if use_cutmix:  # a box of area (1 - lam) from the other image; lam becomes the exact area kept
        H, W = imgs.shape[2:]
        ch, cw = round(H * math.sqrt(1 - lam)), round(W * math.sqrt(1 - lam))
        cy, cx = rng.integers(0, H), rng.integers(0, W)
        y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch - ch // 2, H), max(cx - cw // 2, 0), min(cx + cw - cw // 2, W)
        imgs = imgs.clone()
        imgs[:, :, y0:y1, x0:x1] = other[:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        imgs = lam * imgs + (1 - lam) * other
    return imgs, lam * targets + (1 - lam) * targets.flip(0)
