"""`maecli probe`: how good is the frozen encoder on a labeled set? The set's kind (`maecli.tasks`) says how it is
probed: linear probe and k-NN on pooled features for a classification folder, the dense probe's mIoU for a
segmentation set. With `--baseline random` the same probe runs on a randomly initialised encoder of the same shape,
with `--baseline pixels` on the raw pixels; a kind may add floors of its own (segmentation: the majority class).
"""

from typing import Any

from maecli.config import MaecliConfig
from maecli.files import write_json
from maecli.inference import load_for_inference, random_encoder
from maecli.model import MaskedAutoencoder
from maecli.tasks import input_size, load_labeled

BASELINES = ("random", "pixels")


def run_probe(cfg: MaecliConfig, *, checkpoint: str | None = None, baselines: tuple[str, ...] = ()) -> dict[str, Any]:
    """The probes on the pretrained encoder and on each of `baselines`: "random" (a randomly initialised encoder of
    the same shape) and "pixels" (the input pixels themselves, no encoder)."""
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
    report = dict(checkpoint=str(path), task=data.task.name, classes=data.classes, train_images=len(data.train_x), val_images=len(data.val_x),
                  device=str(device), notes=notes, report=str(out_dir / "report.json"))
    report.update(data.task.probe(encoders, arch, data, cfg, device, out_dir))
    write_json(out_dir / "report.json", report)
    return report
