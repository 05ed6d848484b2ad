"""The kinds of labeled set, one module each, and the registry: the one place that knows which kinds exist. `probe`,
`finetune`, `compare` and `quickstart` call the kind their set is and never branch on it. A kind is recognised by its
layout (`recognises(folder)`, asked in the registry's order; the last kind takes whatever the others do not) and
declares what the rest reads:

- `name` (reports' `task`), `layout` (how errors describe it), `score` (the headline metric of a fine-tuned model:
  "top1", "miou"), `head` (what fine-tuning exports: "classifier", "segmenter"), `per_token`: the head reads every
  token, not the class token;
- `input_size(cfg, img_size)`: the size its images are fed at; `load(cfg, size, notes)`: the set in memory, a `Labeled`;
- the frozen probe: `probe_one(encoder, arch, data, cfg, device)` (one encoder, None: the raw pixels), `probe(encoders,
  arch, data, cfg, device, out_dir)` (every encoder, its floors and pictures: the report's part), `floors(data, cfg,
  device)` (baselines without an encoder), `frozen_scores(probe)` (the numbers a comparison shows);
- fine-tuning: `check_recipe(fc)`, `settings(data)` (what a resumed run must share), `model(encoder, arch, classes,
  size, drop_path)`, `loss(model, raw, data, imgs, labels, theta, rng, fc, world, autocast)`, `validate(model, data, device,
  autocast)` (the curve's numbers and what `final` scores), `final(val_result, data, run_dir)` (scores and
  pictures), `usage(arch, size, classes)` (how to run the exported model);
- `table(probed, tuned)`: the quickstart's Markdown table of its results.

    segmentation    images/ + masks/: a dense probe, a per-token head, mIoU             `maecli.tasks.segmentation`
    classification  a sub-folder per class: linear probe, k-NN, a class-token head, top-1  `maecli.tasks.classification`

`register` adds a kind at run time (ahead of the fallback).
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from maecli.registry import resolve

if TYPE_CHECKING:
    import torch

    from maecli.config import MaecliConfig

TASKS: dict[str, Any] = {  # name -> its class, or "module:class" until first asked for; recognised in this order
    "segmentation": "maecli.tasks.segmentation:Segmentation",
    "classification": "maecli.tasks.classification:Classification",
}


def register(cls: Any) -> Any:
    """Add a kind of labeled set (under `cls.name`), recognised before the others."""
    items = [(cls.name, cls)] + [(k, v) for k, v in TASKS.items() if k != cls.name]
    TASKS.clear()
    TASKS.update(items)
    return cls


def task_class(name: str) -> Any:
    return resolve(TASKS, name, "task")


def kind_of(folder: Any) -> Any:
    """The kind whose layout `folder` has: the first that recognises it, else the last (the fallback)."""
    names = list(TASKS)
    return next((task_class(n) for n in names[:-1] if folder and task_class(n).recognises(folder)), task_class(names[-1]))()


def task_of(cfg: "MaecliConfig") -> Any:
    """The kind of [probe]'s labeled set, by the layout of probe.train."""
    return kind_of(cfg.probe.train)


@dataclass(frozen=True)
class Labeled:
    """A labeled set in memory: uint8 images (N, h, w, 3) at the input size, their targets as the kind keeps them
    (labels (N,); masks (N, h, w), and the validation masks at their own resolution), the class names, the kind
    (`task`) and what else it keeps beside the labels (`seg`: a segmentation set's palette and ignore index)."""

    train_x: "torch.Tensor"
    train_y: "torch.Tensor"
    val_x: "torch.Tensor"
    val_y: Any
    classes: list[str]
    task: Any
    seg: Any = None


def input_size(cfg: "MaecliConfig", img_size: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """The size [probe]'s labeled images are fed at (its kind's choice), checked against the patch size."""
    from maecli.errors import ConfigError

    size = tuple(task_of(cfg).input_size(cfg, img_size))
    if size[0] % patch_size or size[1] % patch_size:
        raise ConfigError(f"probe.input_size: must be divisible by the model's patch_size {patch_size} (got {list(size)})")
    return size


def load_labeled(cfg: "MaecliConfig", size: tuple[int, int], notes: list[str]) -> Labeled:
    """[probe] train / val in memory at `size` (`input_size`), whichever kind they are."""
    return task_of(cfg).load(cfg, size, notes)
