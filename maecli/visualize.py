"""`maecli visualize`: what the model sees and fills in, as the MAE figure (a PNG) or a side-by-side clip (an MP4).

Inputs follow `maecli.inputs` (store frames, one video sampled as extract samples it, or image files); masks come
from `project.seed`, so the same seed shows the same holes. A frame-pair method's checkpoint is shown on
the store's pairs as its method forms them (earlier frame | later frame masked | reconstruction, or the global crop
and the local crop).
"""

from pathlib import Path
from typing import Any

import numpy as np
import torch

from maecli.config import MaecliConfig
from maecli.errors import ConfigError
from maecli.figures import save_reconstructions
from maecli.inference import fixed_noise, load_for_inference, reconstruct
from maecli.inputs import Inputs, shown_split
from maecli.methods import method_class, method_of
from maecli.store import FrameStore
from maecli.video import VIDEO_EXTENSIONS, write_h264


def run_visualize(cfg: MaecliConfig, inputs: list[str], *, checkpoint: str | None = None, mask_ratio: float | None = None,
                  out: Path | None = None, video_out: Path | None = None, start: float | None = None, end: float | None = None) -> dict[str, Any]:
    vc = cfg.visualize
    if mask_ratio is not None and not 0 <= mask_ratio < 1:
        raise ConfigError(f"--mask-ratio: must be at least 0 and less than 1 (got {mask_ratio})")
    if video_out is not None and (len(inputs) != 1 or Path(inputs[0]).suffix.lower() not in VIDEO_EXTENSIONS):
        raise ConfigError("--video: needs a video file as input (with --start/--end for a time range)")
    notes: list[str] = []
    model, _, path, device = load_for_inference(cfg, checkpoint or vc.checkpoint, notes, decoder=True)
    split, split_notes = shown_split(cfg) if not inputs else ("all", [])
    notes += split_notes
    if method_class(model.method).reconstructs == "pairs":
        return show_pairs(cfg, model, path, device, split, inputs or video_out, mask_ratio, out, notes)
    ratio = mask_ratio if mask_ratio is not None else (vc.mask_ratio or cfg.model.mask_ratio)
    source = Inputs(cfg.extract, inputs, model.img_size, split=split, limit=0 if video_out else vc.num_images, start=start, end=end)
    imgs, kept = source.read(0, len(source.rows), device)  # (N, 3, h, w)
    notes += source.report()
    if len(imgs) == 0:
        raise ConfigError("visualize: none of the images could be read")
    summary: dict[str, Any] = dict(checkpoint=str(path), mask_ratio=ratio, stats=vc.stats if model.norm_pix_loss else None, notes=notes)
    if video_out is None:
        noise = fixed_noise(cfg.project.seed, len(imgs), model.num_patches, device)
        out = Path(out) if out else cfg.run_dir / "reconstructions.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        labels = [source.label(i) for i in kept]
        save_reconstructions(model, imgs, ratio, noise, out, f"{path.name}: {', '.join(labels[:3])}{' ...' if len(labels) > 3 else ''}", vc.stats)
        return {**summary, "image": str(out), "rows": len(imgs)}
    noise = fixed_noise(cfg.project.seed, 1, model.num_patches, device)  # one mask for the whole clip: watch the same holes fill
    rows = []
    for batch in imgs.split(32):
        cols = reconstruct(model, batch, ratio, noise.expand(len(batch), -1), vc.stats)
        side = torch.cat([cols["original"], cols["masked"], cols["reconstruction + visible"]], dim=3)  # (B, 3, h, 3w)
        rows.append((side.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8))
    frames = np.concatenate(rows)  # (T, h, 3w, 3)
    times = [r["time"] for r in source.rows]
    fps = round(1 / float(np.median(np.diff(times))), 3) if len(times) > 1 else 1.0  # the sampling rate: the clip plays in real time
    write_h264(Path(video_out), frames, fps, frames.shape[1:3])
    return {**summary, "video": str(video_out), "frames": len(frames), "fps": fps, "columns": ["original", "masked", "reconstruction + visible"]}


def show_pairs(cfg: MaecliConfig, model: torch.nn.Module, path: Path, device: torch.device, split: str, inputs: Any, mask_ratio: float | None,
               out: Path | None, notes: list[str]) -> dict[str, Any]:
    """A frame-pair checkpoint's figure: the frame seen whole | the other masked | reconstruction | + visible, on pairs
    of the store's shown split formed as its method forms them (`method.shown`)."""
    name = model.method
    if inputs:
        raise ConfigError(f"{path}: a frame-pair ({name}) checkpoint is shown on pairs of store frames; run visualize without inputs or --video")
    method = method_of(cfg, name)
    ratio = mask_ratio if mask_ratio is not None else (cfg.visualize.mask_ratio or method.mask_ratio)
    store = FrameStore(cfg.extract.store, split=split)
    first_name, first, later, labels = method.shown(store, cfg.visualize.num_images, device)
    out = Path(out) if out else cfg.run_dir / "reconstructions.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    noise = fixed_noise(cfg.project.seed, len(later), model.num_patches, device)
    title = f"{path.name} ({name}): {', '.join(labels[:2])}{' ...' if len(labels) > 2 else ''}"
    save_reconstructions(model, later, ratio, noise, out, title, cfg.visualize.stats, first=(first_name, first))
    return dict(checkpoint=str(path), method=name, mask_ratio=ratio, stats=cfg.visualize.stats if model.norm_pix_loss else None, notes=notes,
                image=str(out), rows=len(later))
