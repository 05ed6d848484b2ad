"""The labeled set that `probe`, `finetune` and `compare` share, of either kind, recognised by its layout:
- classification: one folder per class, a train folder and a val folder (or a stratified split of train), the images
  at the model's input size, scored by top-1 / top-5;
- segmentation (`maecli.segmentation`): images/ + masks/, scored by mIoU.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maecli.config import MaecliConfig
from maecli.errors import ConfigError
from maecli.inputs import ignored_in, list_images, read_images, resize_notes
from maecli.segmentation import Classes, is_segmentation, load_segmentation


@dataclass(frozen=True)
class Labeled:
    """The labeled set in memory: uint8 images (N, h, w, 3) at the input size and their targets, class names.
    Classification: labels (N,). Segmentation (`dense`): training masks (N, h, w) at the input size, validation masks
    at their own resolution (a list of uint8 (H, W)), and the palette / ignore index (`seg`)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor | list[torch.Tensor]
    classes: list[str]
    seg: Classes | None = None

    @property
    def dense(self) -> bool:
        return self.seg is not None


def is_dense(cfg: MaecliConfig) -> bool:
    """Is [probe]'s labeled set a segmentation set?"""
    return bool(cfg.probe.train) and is_segmentation(cfg.probe.train)


def input_size(cfg: MaecliConfig, img_size: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """The size labeled images are fed at: the model's, or [probe] input_size for a segmentation set."""
    size = tuple(cfg.probe.input_size or img_size) if is_dense(cfg) else tuple(img_size)
    if size[0] % patch_size or size[1] % patch_size:
        raise ConfigError(f"probe.input_size: must be divisible by the model's patch_size {patch_size} (got {list(size)})")
    return size


def load_labeled(cfg: MaecliConfig, size: tuple[int, int], notes: list[str]) -> Labeled:
    """[probe] train / val in memory at `size` (`input_size`), whichever kind they are."""
    if is_dense(cfg):
        train_x, train_y, val_x, val_y, classes = load_segmentation(cfg, size, notes)
        return Labeled(train_x, train_y, val_x, val_y, classes.names, seg=classes)
    if cfg.probe.val and is_segmentation(cfg.probe.val):
        raise ConfigError(f"probe.val: {cfg.probe.val} is a segmentation set (images/ and masks/), probe.train is not")
    train_items, val_items, classes = labeled_split(cfg, notes)
    if len(classes) <= 5:
        notes.append(f"top-5 accuracy not reported: only {len(classes)} classes")
    train_x, train_y = load_images(train_items, size, notes)
    val_x, val_y = load_images(val_items, size, notes)
    return Labeled(train_x, train_y, val_x, val_y, classes)


def labeled_split(cfg: MaecliConfig, notes: list[str]) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]], list[str]]:
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
    C = len(classes)
    pred = scores.argmax(1)
    confusion = torch.zeros(C, C, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)  # rows: truth, columns: prediction
    per_class = {c: (confusion[i, i] / confusion[i].sum()).item() if confusion[i].sum() else None for i, c in enumerate(classes)}
    report = {"top1": (pred == labels).float().mean().item(), "per_class": per_class, "confusion": confusion.tolist()}
    if C > 5:
        report["top5"] = (scores.topk(5, dim=1).indices == labels[:, None]).any(1).float().mean().item()
    return report
