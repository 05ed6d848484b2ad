"""The pictures maecli writes: reconstruction grids (PIL) and plots (matplotlib's object API, so a notebook's
backend is never switched). Every file is written atomically."""

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from maecli.files import atomic_write, read_lines
from maecli.inference import STATS_LABELS, reconstruct
from maecli.model import MaskedAutoencoder


def grid_image(columns: dict[str, torch.Tensor], title: str, cell: int = 160) -> Image.Image:
    """One row per sample, one column per entry; small images are scaled up (nearest) to `cell` pixels high."""
    names = list(columns)
    n, _, h, w = columns[names[0]].shape
    scale = max(1, cell // h)
    ch, cw = h * scale, w * scale
    header, pad = 36, 4
    img = Image.new("RGB", (len(names) * (cw + pad) + pad, header + n * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, 2), title, fill="black")
    for c, name in enumerate(names):
        draw.text((pad + c * (cw + pad), 18), name, fill="black")
        arr = (columns[name].permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)  # (N, H, W, 3)
        for r in range(n):
            tile = Image.fromarray(arr[r]).resize((cw, ch), Image.NEAREST)
            img.paste(tile, (pad + c * (cw + pad), header + pad + r * (ch + pad)))
    return img


def save_reconstructions(model: MaskedAutoencoder, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor, path: Path,
                         title: str, stats: str = "visible", first: tuple[str, torch.Tensor] | None = None) -> Path:
    """The MAE figure (original | masked | reconstruction | reconstruction + visible) as a PNG; a frame-pair model's
    starts with the frame it sees whole (`first`: its name and frames)."""
    columns = reconstruct(model, imgs, mask_ratio, noise, stats, first)
    label = f"{title} | mask ratio {mask_ratio:g}" + (f" | {STATS_LABELS[stats]}" if model.norm_pix_loss else "")
    with atomic_write(path) as tmp:
        grid_image(columns, label).save(tmp, format="PNG")
    return Path(path)


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")


def plot_loss(metrics: Path, path: Path, title: str, loss_name: str) -> None:
    from matplotlib.figure import Figure

    rows = read_lines(metrics)
    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="." if len(rows) < 50 else None)
    ax.set(xlabel="step", ylabel=f"loss ({loss_name})", title=f"{title}: pretraining loss")
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_curves(runs: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    """Fine-tuning curves, one line per run: training loss and validation top-1 (or mIoU) by epoch."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.5), dpi=100)
    loss_ax, acc_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    key = "val_miou" if any("val_miou" in r for rows in runs.values() for r in rows) else "val_top1"
    for name, rows in runs.items():
        epochs = [r["epoch"] for r in rows]
        loss_ax.plot(epochs, [r["train_loss"] for r in rows], marker=".", label=name)
        acc_ax.plot(epochs, [100 * r[key] for r in rows], marker=".", label=name)
    loss_ax.set(xlabel="epoch", ylabel="training loss (cross-entropy)", title=f"{title}: training loss")
    acc_ax.set(xlabel="epoch", ylabel=f"validation {'mIoU' if key == 'val_miou' else 'top-1'} (%)", title=f"{title}: validation")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def plot_confusion(confusion: list[list[int]], classes: list[str], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    m = np.array(confusion, dtype=float)
    m = m / np.maximum(m.sum(1, keepdims=True), 1)  # each row sums to 1: recall on the diagonal
    side = min(14, 3 + 0.25 * len(classes))
    fig = Figure(figsize=(side, side), dpi=100)
    ax = fig.add_subplot()
    ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=90, fontsize=7)
    ax.set_yticks(ticks, classes, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    _save(fig, path)


def plot_bench(result: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    names = list(result["variants"])
    values = [result["variants"][n]["images_per_s"] for n in names]
    fig = Figure(figsize=(7, 0.6 * len(names) + 1.5), dpi=100)
    ax = fig.add_subplot()
    ax.barh(names[::-1], values[::-1], color=["#4c72b0" if n.startswith("mae") and "[M]" not in n else "#bbbbbb" for n in names[::-1]])
    for y, v in enumerate(values[::-1]):
        ax.text(v, y, f" {v:.1f}", va="center")
    a = result["arch"]
    ax.set(xlabel="training images / s (higher is better)",
           title=f"ViT {a['embed_dim']}x{a['depth']}, patch {a['patch_size']}, {a['img_size'][0]}x{a['img_size'][1]} px, batch {result['batch']}, {result['device']}")
    _save(fig, path)


def plot_compare(report: dict[str, Any], path: Path, title: str) -> None:
    """Quality against training compute, one line per method (a point per probed checkpoint), the floors as
    horizontal lines: linear probe and k-NN side by side, or the dense probe's mIoU."""
    from matplotlib.figure import Figure

    panels = (("miou", "frozen-encoder probe", "mIoU"),) if report["task"] == "segmentation" else (("linear", "linear probe", "top-1"), ("knn", "k-NN", "top-1"))
    fig = Figure(figsize=(5 * len(panels), 3.8), dpi=100)
    for i, (key, label, unit) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for name, m in report["methods"].items():
            ax.plot([p["flops"] for p in m["points"]], [100 * p[key] for p in m["points"]], marker="o", label=name)
        for (name, floor), style in zip(report["floors"].items(), ("--", ":", "-."), strict=False):
            ax.axhline(100 * floor[key], color="grey", linestyle=style, label=name)
        ax.set_xscale("log")
        ax.set(xlabel="training FLOPs (analytic)", ylabel=f"{label} {unit} (%)", title=f"{title}: {label}, budget {report['budget']['text']}")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def plot_iou(results: dict[str, dict[str, float | None]], classes: list[str], path: Path, title: str) -> None:
    """Per-class IoU, one bar per encoder in each class's group (a class absent from truth and predictions: no bar)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6, 1 + 0.6 * len(classes) * max(1, len(results)) / 2), 4), dpi=100)
    ax = fig.add_subplot()
    width = 0.8 / len(results)
    for k, (name, per_class) in enumerate(results.items()):
        values = [100 * v if v is not None else np.nan for v in per_class.values()]
        miou = np.nanmean(values) if not np.all(np.isnan(values)) else 0.0
        ax.bar(np.arange(len(classes)) + (k - (len(results) - 1) / 2) * width, values, width, label=f"{name} (mIoU {miou:.1f})")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set(ylabel="IoU (%)", ylim=(0, 100), title=title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    _save(fig, path)


def save_segmentations(data: Any, predictions: dict[str, dict[int, torch.Tensor]], path: Path, title: str, height: int = 180) -> None:
    """The picture people look at first: a few validation frames as image | truth | each model's prediction, classes
    in the set's palette, ignored pixels black. `predictions`: name -> {val index: (H, W) uint8}."""
    import torch.nn.functional as F

    shown = sorted(next(iter(predictions.values())))
    palette = torch.from_numpy(np.concatenate([data.seg.palette, np.zeros((256 - len(data.seg.palette), 3), np.uint8)])).float() / 255  # (256, 3)

    def colour(masks: list[torch.Tensor]) -> torch.Tensor:  # uint8 (H, W) each -> (N, 3, h, w) at the picture's height
        rgb = torch.stack([palette[m.long()] for m in masks]).permute(0, 3, 1, 2)  # (N, 3, H, W)
        return F.interpolate(rgb, size=(height, round(height * rgb.shape[3] / rgb.shape[2])), mode="nearest")

    truth = colour([data.val_y[i] for i in shown])
    image = data.val_x[shown].permute(0, 3, 1, 2).float() / 255  # (N, 3, h, w) at the input size
    columns = {"image": F.interpolate(image, size=truth.shape[2:], mode="bilinear", align_corners=False).clamp(0, 1), "truth": truth}
    columns.update({name: colour([preds[i] for i in shown]) for name, preds in predictions.items()})
    with atomic_write(path) as tmp:
        grid_image(columns, title, cell=height).save(tmp, format="PNG")
