"""Reconstructions as pictures: original | masked | reconstruction | reconstruction + visible (the MAE figure).

Models trained with `norm_pix_loss` predict each patch normalized by its own mean and variance. Showing
the prediction with the target patch's true statistics leaks the answer; `stats="visible"` (the honest
default) uses the mean and variance of the image's visible patches for every patch instead, and the
picture says which statistics were used.
"""

from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from PIL import Image, ImageDraw

from maecli.checkpoint import canonical_arch, load_model, resolve_checkpoint
from maecli.config import MaecliConfig
from maecli.data import denormalize, read_images, resize_notes, store_input, to_input
from maecli.device import pick_device
from maecli.errors import ConfigError, MaecliError
from maecli.files import atomic_write
from maecli.model import MaskedAutoencoder
from maecli.store import FrameStore
from maecli.video import VIDEO_EXTENSIONS, VideoError, read_frames

COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")
STATS_LABELS = {"visible": "patch statistics: visible patches only", "target": "patch statistics: true target (leaks information)"}


@torch.no_grad()
def reconstruct(model: MaskedAutoencoder, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor,
                stats: str = "visible") -> dict[str, torch.Tensor]:
    """Normalized images (N, 3, H, W) -> the four columns as (N, 3, H, W) pixels in [0, 1]."""
    assert stats in STATS_LABELS, f"stats must be one of {list(STATS_LABELS)}, got {stats!r}"
    _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)  # (N, L, p*p*3), (N, L)
    pred = pred.float()
    if model.norm_pix_loss:
        target = model.patchify(imgs)  # (N, L, p*p*3)
        if stats == "target":
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)  # (N, L, 1)
        else:
            keep = (1 - mask).unsqueeze(-1)  # (N, L, 1)
            n_keep = keep.sum(1, keepdim=True).clamp(min=1)  # (N, 1, 1)
            mean = (target.mean(-1, keepdim=True) * keep).sum(1, keepdim=True) / n_keep  # (N, 1, 1)
            var = (target.var(-1, keepdim=True) * keep).sum(1, keepdim=True) / n_keep
        pred = pred * (var + 1e-6) ** 0.5 + mean
    m = mask.unsqueeze(-1).expand_as(pred)  # (N, L, p*p*3): 1 where removed
    recon = model.unpatchify(pred)
    removed = model.unpatchify(m)  # (N, 3, H, W) 1 where removed
    original = denormalize(imgs)
    return {
        "original": original,
        "masked": original * (1 - removed) + 0.5 * removed,  # removed patches grey
        "reconstruction": denormalize(recon),
        "reconstruction + visible": denormalize(imgs * (1 - removed) + recon * removed),
    }


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
                         title: str, stats: str = "visible") -> Path:
    columns = reconstruct(model, imgs, mask_ratio, noise, stats)
    label = f"{title} | mask ratio {mask_ratio:g}" + (f" | {STATS_LABELS[stats]}" if model.norm_pix_loss else "")
    with atomic_write(path) as tmp:
        grid_image(columns, label).save(tmp, format="PNG")
    return Path(path)


# --- the command --------------------------------------------------------------------------------


def load_frames(cfg: MaecliConfig, inputs: list[str], n: int, start: float, end: float, size: tuple[int, int], device: torch.device,
                notes: list[str]) -> tuple[torch.Tensor, list[str]]:
    """What to show, as model input (N, 3, h, w) with one label per row: store frames (no inputs), a video's frames
    (sampled at [visualize] fps within start/end), or image files. `n` caps the rows (0: every sampled frame)."""
    if not inputs:
        store = FrameStore(cfg.extract.store, split=cfg.visualize.split)
        if len(store) == 0 and cfg.visualize.split == "val":
            notes.append("the val split is empty: showing train frames")
            store = FrameStore(cfg.extract.store, split="train")
        if len(store) == 0:
            raise ConfigError(f"{cfg.extract.store}: the store has no frames (run 'maecli extract', or pass images or a video)")
        idx = np.linspace(0, len(store) - 1, min(n or len(store), len(store))).round().astype(int)
        labels = [f"{Path(p['source']).name} @ {p['time']:.1f} s" for p in map(store.provenance, idx.tolist())]
        return store_input(store, idx, size, device), labels
    videos = [Path(i) for i in inputs if Path(i).suffix.lower() in VIDEO_EXTENSIONS]
    if videos:
        if len(videos) != len(inputs) or len(videos) > 1:
            raise ConfigError("visualize: give one video, or image files, not both")
        try:
            sampled = [(t, rgb) for _, t, rgb in read_frames(videos[0], size, fps=cfg.visualize.fps, start=start, end=end)]
        except VideoError as err:
            raise MaecliError(f"{videos[0]}: {err}") from None
        if n and len(sampled) > n:
            sampled = [sampled[i] for i in np.linspace(0, len(sampled) - 1, n).round().astype(int)]
        frames = torch.from_numpy(np.stack([rgb for _, rgb in sampled])).to(device)
        return to_input(frames), [f"{videos[0].name} @ {t:.1f} s" for t, _ in sampled]
    paths = [Path(i) for i in inputs[: n or None]]
    images, kept, originals, failures = read_images(paths, size)
    notes += failures + resize_notes(originals, size)
    labels = [paths[i].name for i in kept]
    if not images:
        raise MaecliError("visualize: none of the images could be read")
    return to_input(torch.from_numpy(np.stack(images)).to(device)), labels


def fixed_noise(seed: int, n: int, num_patches: int, device: torch.device) -> torch.Tensor:
    """The same masks for the same seed: (n, L) in [0, 1)."""
    return torch.from_numpy(np.random.default_rng([seed, 3]).random((n, num_patches), dtype=np.float32)).to(device)


def write_clip(path: Path, frames: np.ndarray, fps: float) -> None:
    """uint8 (T, H, W, 3) -> an H.264 MP4 written with PyAV (even sizes: yuv420p)."""
    T, H, W, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)))
    with atomic_write(path) as tmp, av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.thread_count = 1  # x264's output depends on its thread count: one thread, the same bytes everywhere
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def run_visualize(cfg: MaecliConfig, inputs: list[str], *, checkpoint: str | None = None, mask_ratio: float | None = None,
                  out: Path | None = None, video_out: Path | None = None, start: float = 0.0, end: float = 0.0) -> dict[str, Any]:
    vc = cfg.visualize
    path = resolve_checkpoint(cfg.run_dir, checkpoint or vc.checkpoint)
    model, arch = load_model(path, canonical_arch(cfg.model.mae_kwargs))
    device = pick_device(cfg.project.device)
    model = model.to(device).eval()
    ratio = mask_ratio if mask_ratio is not None else (vc.mask_ratio or cfg.model.mask_ratio)
    if not 0 <= ratio < 1:
        raise ConfigError(f"--mask-ratio: must be at least 0 and less than 1 (got {ratio})")
    notes: list[str] = []
    summary: dict[str, Any] = dict(checkpoint=str(path), mask_ratio=ratio, stats=vc.stats if model.norm_pix_loss else None, notes=notes)
    size = model.img_size
    if video_out is None:
        imgs, labels = load_frames(cfg, inputs, vc.num_images, start, end, size, device, notes)
        noise = fixed_noise(cfg.project.seed, len(imgs), model.num_patches, device)
        out = Path(out) if out else cfg.run_dir / "reconstructions.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        save_reconstructions(model, imgs, ratio, noise, out, f"{path.name}: {', '.join(labels[:3])}{' ...' if len(labels) > 3 else ''}", vc.stats)
        return {**summary, "image": str(out), "rows": len(imgs)}
    if not inputs or Path(inputs[0]).suffix.lower() not in VIDEO_EXTENSIONS:
        raise ConfigError("--video: needs a video file as input (with --start/--end for a time range)")
    imgs, labels = load_frames(cfg, inputs, 0, start, end, size, device, notes)
    noise = fixed_noise(cfg.project.seed, 1, model.num_patches, device)  # one mask for the whole clip: watch the same holes fill
    rows = []
    for batch in imgs.split(32):
        cols = reconstruct(model, batch, ratio, noise.expand(len(batch), -1), vc.stats)
        side = torch.cat([cols["original"], cols["masked"], cols["reconstruction + visible"]], dim=3)  # (B, 3, h, 3w)
        rows.append((side.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8))
    frames = np.concatenate(rows)  # (T, h, 3w, 3)
    write_clip(Path(video_out), frames, vc.fps)
    return {**summary, "video": str(video_out), "frames": len(frames), "fps": vc.fps, "columns": ["original", "masked", "reconstruction + visible"]}
