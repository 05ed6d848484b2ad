"""Segmentation sets on disk (images, masks, classes.csv), read into memory, and how dense predictions are scored:
what the segmentation kind of labeled set (`maecli.tasks.segmentation`) reads and counts with.

A set is a folder with `images/` and `masks/`, an image and its mask matched by file stem (`images/0001.jpg` with
`masks/0001.png`). A mask is a single-channel PNG of class indices (8-bit, 16-bit or palette mode: the index is the
value), or an RGB PNG whose colours `classes.csv` lists. `classes.csv` (optional, in the set's folder):
`class_id,name[,r,g,b]`; class ids run 0..C-1, and a row whose id is the ignore index names the colour of unlabeled
pixels (CamVid's `11,void,0,0,0`) rather than a class. Without it the classes are numbered 0..max value found.

Bad input is one line each: a frame without its mask (or the reverse), a mask of another size than its image, a
value that is neither a class nor the ignore index, an unreadable file: that frame is skipped and said. A set with
no usable frame, or one class, is refused.

Images are resized (stretched, not cropped) to the model's input size, so every labeled pixel is scored; masks are
kept at their own resolution for scoring and resized (nearest) to the input size for training. Scores come from one
confusion matrix over the whole validation set: IoU per class, mIoU (the mean over the classes present in the truth
or the predictions), pixel accuracy and mean class accuracy.
"""

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maecli.errors import ConfigError
from maecli.inputs import IMAGE_EXTENSIONS


def is_segmentation(folder: str | Path) -> bool:
    """A segmentation set is recognised by its layout: images/ and masks/ side by side."""
    return (Path(folder) / "images").is_dir() and (Path(folder) / "masks").is_dir()


@dataclass(frozen=True)
class Classes:
    """Class names (index = class id), RGB colours (C, 3) for pictures and colour masks, and the ignore index with
    its colour when classes.csv gives one."""

    names: list[str]
    palette: np.ndarray  # (C, 3) uint8
    ignore_index: int
    ignore_color: tuple[int, int, int] | None = None
    from_csv: bool = False


def default_palette(n: int) -> np.ndarray:
    """n distinct colours (matplotlib's tab20, then a seeded draw): (n, 3) uint8."""
    from matplotlib import colormaps

    tab = (np.array([colormaps["tab20"](i)[:3] for i in range(20)]) * 255).round().astype(np.uint8)
    extra = np.random.default_rng(0).integers(0, 256, (max(0, n - 20), 3), dtype=np.uint8)
    return np.concatenate([tab, extra])[:n]


def read_classes(folder: Path, ignore_index: int) -> Classes | None:
    """classes.csv of a set folder, or None when there is none. Any problem is one ConfigError naming file and line."""
    path = folder / "classes.csv"
    if not path.is_file():
        return None
    names, colors, ignore_color = {}, {}, None
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(f"{path}: cannot read: {err}") from None
    for n, row in enumerate(rows, start=1):
        if not row or (n == 1 and row[0].strip() == "class_id"):
            continue
        row = [c.strip() for c in row]
        if len(row) not in (2, 5) or not row[0].isdigit() or not all(c.isdigit() and int(c) < 256 for c in row[2:]):
            raise ConfigError(f"{path}: line {n}: expected class_id,name or class_id,name,r,g,b with integers 0-255 (got {','.join(row)!r})")
        class_id, color = int(row[0]), tuple(int(c) for c in row[2:]) or None
        if class_id == ignore_index:
            ignore_color = color
            continue
        if class_id in names:
            raise ConfigError(f"{path}: line {n}: class_id {class_id} given twice")
        names[class_id], colors[class_id] = row[1], color
    if sorted(names) != list(range(len(names))):
        raise ConfigError(f"{path}: class ids must be 0..{len(names) - 1} besides the ignore index {ignore_index} (got {sorted(names)})")
    palette = default_palette(len(names))
    for i, color in colors.items():
        if color is not None:
            palette[i] = color
    return Classes([names[i] for i in range(len(names))], palette, ignore_index, ignore_color, from_csv=True)


def find_pairs(folder: Path, notes: list[str]) -> list[tuple[Path, Path]]:
    """(image, mask) pairs matched by file stem, sorted; a file without its partner is one note."""
    images = {p.stem: p for p in sorted((folder / "images").iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()}
    masks = {p.stem: p for p in sorted((folder / "masks").iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()}
    notes += [f"skipped {images[s]}: no mask {folder / 'masks' / s}.png" for s in images if s not in masks]
    notes += [f"skipped {masks[s]}: no image {folder / 'images' / s}.* for this mask" for s in masks if s not in images]
    return [(images[s], masks[s]) for s in sorted(images) if s in masks]


def read_mask(path: Path, classes: Classes | None) -> np.ndarray:
    """A mask as (H, W) int32 values: indices as stored, or colours mapped through classes.csv (the ignore colour to
    the ignore index). Raises ValueError with the reason for an RGB mask without colours or an unknown colour."""
    from PIL import Image

    with Image.open(path) as img:
        if img.mode in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
            return np.asarray(img, dtype=np.int32)
        if img.mode not in ("RGB", "RGBA"):
            raise ValueError(f"a mask in PIL mode {img.mode} (expected one channel of class indices, or RGB colours)")
        rgb = np.asarray(img.convert("RGB"), dtype=np.int32)  # (H, W, 3)
    if classes is None or not classes.from_csv or len(classes.palette) == 0:
        raise ValueError("an RGB mask, and no classes.csv with r,g,b colours to read it by")
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]  # (H, W)
    known = {(int(r) << 16) | (int(g) << 8) | int(b): i for i, (r, g, b) in enumerate(classes.palette)}
    if classes.ignore_color is not None:
        known[(classes.ignore_color[0] << 16) | (classes.ignore_color[1] << 8) | classes.ignore_color[2]] = classes.ignore_index
    keys = np.array(sorted(known), dtype=np.int64)
    pos = np.clip(np.searchsorted(keys, codes), 0, len(keys) - 1)  # (H, W)
    bad = keys[pos] != codes
    if bad.any():
        y, x = np.argwhere(bad)[0]
        raise ValueError(f"colour {tuple(int(c) for c in rgb[y, x])} at row {y}, column {x} is not in classes.csv")
    return np.array([known[int(k)] for k in keys], dtype=np.int32)[pos]


def load_frames(pairs: list[tuple[Path, Path]], size: tuple[int, int], classes: Classes | None, notes: list[str],
                ) -> tuple[list[np.ndarray], list[np.ndarray], list[tuple[Path, Path]]]:
    """Read each pair: images stretched to `size`, masks as values, and the pairs kept. A bad pair is skipped with one
    note."""
    from PIL import Image

    images, masks, kept = [], [], []
    for image_path, mask_path in pairs:
        try:
            mask = read_mask(mask_path, classes)
        except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
            notes.append(f"skipped {mask_path}: {err if isinstance(err, ValueError) else 'not a readable image (' + type(err).__name__ + ')'}")
            continue
        try:
            with Image.open(image_path) as img:
                img = img.convert("RGB")
                if (img.height, img.width) != mask.shape:
                    notes.append(f"skipped {image_path}: its mask {mask_path.name} is {mask.shape[1]}x{mask.shape[0]}, the image {img.width}x{img.height}")
                    continue
                rgb = np.asarray(img.resize((size[1], size[0]), Image.BICUBIC) if (img.height, img.width) != tuple(size) else img, dtype=np.uint8)
        except OSError as err:
            notes.append(f"skipped {image_path}: not a readable image ({type(err).__name__})")
            continue
        images.append(rgb)
        masks.append(mask)
        kept.append((image_path, mask_path))
    return images, masks, kept


def check_values(masks: list[np.ndarray], paths: list[Path], num_classes: int, ignore_index: int, notes: list[str]) -> list[int]:
    """Indices of the masks whose every value is a class or the ignore index; one note per other mask."""
    good = []
    for i, mask in enumerate(masks):
        bad = (mask >= num_classes) & (mask != ignore_index)
        if bad.any():
            y, x = np.argwhere(bad)[0]
            notes.append(f"skipped {paths[i]}: mask value {mask[y, x]} at row {y}, column {x} is neither a class (0-{num_classes - 1}) "
                         f"nor the ignore index {ignore_index}")
            continue
        good.append(i)
    return good


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) values -> (h, w) uint8 by nearest neighbour: the training target at the input size."""
    from PIL import Image

    if mask.shape == tuple(size):
        return mask.astype(np.uint8)
    return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((size[1], size[0]), Image.NEAREST))


# --- scores ---------------------------------------------------------------------------------------


def confusion_of(pred: torch.Tensor, truth: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Pixel counts (C, C), rows: truth, columns: prediction, over the pixels not marked ignore. pred, truth: any
    equal shapes of class indices."""
    keep = truth != ignore_index
    idx = truth[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def seg_scores(confusion: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """mIoU (over the classes present in truth or prediction), IoU per class (None when absent from both), pixel
    accuracy, mean class accuracy (over the classes present in the truth), and the confusion matrix."""
    m = confusion.double()
    tp, truth, pred = m.diag(), m.sum(1), m.sum(0)
    union = truth + pred - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.zeros_like(tp))
    in_truth = truth > 0
    return {
        "miou": iou[present].mean().item() if present.any() else 0.0,
        "pixel_acc": (tp.sum() / m.sum().clamp(min=1)).item(),
        "mean_class_acc": (tp[in_truth] / truth[in_truth]).mean().item() if in_truth.any() else 0.0,
        "per_class_iou": {c: iou[i].item() if present[i] else None for i, c in enumerate(classes)},
        "confusion": confusion.tolist(),
    }


# --- the split ------------------------------------------------------------------------------------


def load_segmentation(cfg: Any, size: tuple[int, int], notes: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor], Classes]:
    """[probe] train / val in memory: uint8 images (N, h, w, 3) at `size`, training masks (N, h, w) at `size`, val
    images, val masks at their own resolution (uint8 (H, W) each), and the classes. val: the val folder, else a
    val_fraction of the train frames drawn by the seed; `frames` > 0 keeps that many training frames (few labels)."""
    pc = cfg.probe
    for name in ("train", "val"):
        folder = getattr(pc, name)
        if folder and not is_segmentation(folder):
            raise ConfigError(f"probe.{name}: {folder} is not a segmentation set (images/ and masks/) like probe.train")
    classes = read_classes(Path(pc.train), pc.ignore_index)
    read = {}
    for name in ("train", "val"):
        folder = getattr(pc, name)
        if not folder:
            continue
        pairs = find_pairs(Path(folder), notes)
        if not pairs:
            raise ConfigError(f"probe.{name}: {folder} has no image with a mask of the same name")
        before = len(notes)
        read[name] = load_frames(pairs, size, classes, notes)
        if not read[name][0]:
            raise ConfigError(*notes[before:], f"probe.{name}: none of the {len(pairs)} frames of {folder} could be used")
    found = [m for images, masks, _ in read.values() for m in masks]
    num_classes = len(classes.names) if classes else max((int(m[m != pc.ignore_index].max(initial=-1)) for m in found), default=-1) + 1
    if classes is None:
        classes = Classes([str(i) for i in range(num_classes)], default_palette(num_classes), pc.ignore_index)
    if num_classes > 255:
        raise ConfigError(f"probe.train: {num_classes} classes; masks hold at most 255 besides the ignore index")
    for name, (images, masks, paths) in list(read.items()):
        before = len(notes)
        good = check_values(masks, [m for _, m in paths], num_classes, pc.ignore_index, notes)
        if not good:
            raise ConfigError(*notes[before:], f"probe.{name}: none of the {len(paths)} frames of {getattr(pc, name)} could be used")
        read[name] = ([images[i] for i in good], [masks[i] for i in good], [paths[i] for i in good])
    train = read["train"]
    if "val" not in read:
        n = len(train[2])
        order = np.random.default_rng([cfg.project.seed, 4]).permutation(n)
        take = round(n * pc.val_fraction)
        if take < 1 or take >= n:
            raise ConfigError(f"probe.train: {n} frames, too few to hold out a validation split (give probe.val)")
        val_idx, train_idx = sorted(order[:take].tolist()), sorted(order[take:].tolist())
        read["val"] = tuple([part[i] for i in val_idx] for part in train)
        train = tuple([part[i] for i in train_idx] for part in train)
        notes.append(f"no val folder: held out {take} of {n} frames ({pc.val_fraction:g}, seed {cfg.project.seed}); frames of one video are "
                     "alike, so give a val folder of other drives for an honest score")
    if pc.frames and pc.frames < len(train[2]):
        keep = sorted(np.random.default_rng([cfg.project.seed, 8]).permutation(len(train[2]))[: pc.frames].tolist())
        notes.append(f"probe.frames: training on {pc.frames} of {len(train[2])} labeled frames (seed {cfg.project.seed})")
        train = tuple([part[i] for i in keep] for part in train)
    labeled = np.unique(np.concatenate([np.unique(m) for m in train[1]]))
    labeled = labeled[labeled != pc.ignore_index]
    if len(labeled) < 2:
        raise ConfigError(f"probe.train: the training masks hold {len(labeled)} class{'es' * (len(labeled) != 1)}; a probe needs at least two")
    return (torch.from_numpy(np.stack(train[0])), torch.from_numpy(np.stack([resize_mask(m, size) for m in train[1]])),
            torch.from_numpy(np.stack(read["val"][0])), [torch.from_numpy(m.astype(np.uint8)) for m in read["val"][1]], classes)
