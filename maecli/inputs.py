"""What a command feeds the model besides weights: store frames, a video's frames, or image files.

One set of rules, for `visualize` and `export features` (and the image reading of `probe`):
- no paths: the frame store's frames of a split ("train", "val" or "all"), as the largest centered crop of the
  model's aspect resized to its input: what pretraining sees, without the random crops;
- one video file: its frames sampled exactly as `maecli extract` samples them ([extract] fps or every_n, start,
  end; a command's --start/--end win), center-cropped to the model's input size;
- image files and folders (searched recursively; the class is the first sub-folder's name): center-cropped to the
  model's aspect and resized, antialiased. An unreadable image is skipped, with one line saying which and why,
  and a resize note says how many images had another size.
`limit` > 0 keeps that many rows, evenly spaced. Every row carries its provenance (source, time or path, label).
"""

from pathlib import Path

import numpy as np
import torch

from maecli.config import ExtractConfig, MaecliConfig
from maecli.data import store_input, to_input
from maecli.errors import ConfigError, MaecliError
from maecli.store import FrameStore
from maecli.video import VIDEO_EXTENSIONS, VideoError, read_frames

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff", ".gif"}


def list_images(folder: Path) -> list[tuple[Path, str]]:
    """Image files under `folder` (recursively, sorted) with their class: the first sub-folder's name ("" at the top)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    return [(p, p.relative_to(folder).parts[0] if len(p.relative_to(folder).parts) > 1 else "") for p in files]


def ignored_in(folder: Path) -> list[str]:
    """One line per thing under `folder` that `list_images` leaves out: files that are not images (hidden ones
    aside), and class folders with no image in them."""
    folder = Path(folder)
    lines = [f"ignored {p}: not an image file" for p in sorted(folder.rglob("*"))
             if p.is_file() and p.suffix.lower() not in IMAGE_EXTENSIONS and not p.name.startswith(".")]
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        if not any(p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() for p in d.rglob("*")):
            lines.append(f"ignored {d}: a class folder with no images")
    return lines


def read_image(path: Path, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """An image as uint8 RGB (h, w, 3) at `size`: centered crop to the aspect ratio, antialiased resize (PIL).
    Returns it with the original (height, width). Raises OSError (or PIL's UnidentifiedImageError) if unreadable."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img = img.convert("RGB")
        original = (img.height, img.width)
        fitted = ImageOps.fit(img, (size[1], size[0]), method=Image.BICUBIC) if original != tuple(size) else img
        return np.asarray(fitted, dtype=np.uint8), original


def read_images(paths: list[Path], size: tuple[int, int]) -> tuple[list[np.ndarray], list[int], list[tuple[int, int]], list[str]]:
    """Read many images at `size`: (images, indices into `paths` they came from, their original sizes, one line per
    unreadable file)."""
    images, kept, originals, failures = [], [], [], []
    for i, path in enumerate(paths):
        try:
            rgb, original = read_image(path, size)
        except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
            failures.append(f"skipped {path}: not a readable image ({type(err).__name__})")
            continue
        images.append(rgb)
        kept.append(i)
        originals.append(original)
    return images, kept, originals, failures


def resize_notes(originals: list[tuple[int, int]], size: tuple[int, int]) -> list[str]:
    """One line per original size that differs from the model's input size."""
    counts: dict[tuple[int, int], int] = {}
    for hw in originals:
        if hw != tuple(size):
            counts[hw] = counts.get(hw, 0) + 1
    return [f"resized {n} images from {h}x{w} to {size[0]}x{size[1]} (the model's input size)" for (h, w), n in counts.items()]


def shown_split(cfg: MaecliConfig) -> tuple[str, list[str]]:
    """The store split that `visualize` and pretraining snapshots show: [visualize] split, or train (with a note) when
    it asks for val and a small store has no val frames."""
    if cfg.visualize.split == "val" and len(FrameStore(cfg.extract.store, split="val")) == 0:
        return "train", ["the val split is empty: showing train frames"]
    return cfg.visualize.split, []


def evenly(n: int, limit: int) -> np.ndarray:
    """`limit` indices spread evenly over range(n), first and last included (all of them when limit is 0 or >= n)."""
    return np.linspace(0, n - 1, min(limit or n, n)).round().astype(int)


class Inputs:
    """The rows a command feeds the model, by the rules above: `kind` ("store", "video" or "images"), `rows`
    (provenance dicts), `read(start, stop, device)`, and `report()`: what was skipped or resized."""

    def __init__(self, ex: ExtractConfig, paths: list[str], size: tuple[int, int], *, split: str, limit: int = 0,
                 start: float | None = None, end: float | None = None) -> None:
        """`ex`: the [extract] section, whose store and sampling (fps, every_n, start, end) these rows follow."""
        self.size, self.notes, self.originals = tuple(size), [], []
        videos = [p for p in paths if Path(p).suffix.lower() in VIDEO_EXTENSIONS]
        if not paths:
            self.kind = "store"
            self.store = FrameStore(ex.store, split=None if split == "all" else split)
            if len(self.store) == 0:
                raise ConfigError(f"{ex.store}: no {split} frames in the store (run 'maecli extract', or pass images or a video)")
            self.index = evenly(len(self.store), limit)
            self.rows = [self.store.provenance(i) for i in self.index.tolist()]
        elif videos:
            if len(paths) > 1:
                raise ConfigError("give one video, or image files, not both or several videos")
            self.kind = "video"
            start, end = ex.start if start is None else start, ex.end if end is None else end
            try:
                sampled = read_frames(Path(paths[0]), self.size, fps=ex.fps, every_n=ex.every_n, start=start, end=end)
            except VideoError as err:
                raise MaecliError(f"{paths[0]}: {err}") from None
            sampled = [sampled[i] for i in evenly(len(sampled), limit)] if sampled else []
            self.frames = np.stack([rgb for _, _, rgb in sampled]) if sampled else np.zeros((0, *self.size, 3), np.uint8)  # (N, h, w, 3)
            self.rows = [{"source": paths[0], "time": t, "frame_index": i} for i, t, _ in sampled]
        else:
            self.kind, self.rows = "images", []
            for item in map(Path, paths):
                found = list_images(item) if item.is_dir() else [(item, "")]
                self.notes += ignored_in(item) if item.is_dir() else []
                self.rows += [{"source": str(p), "label": label or None} for p, label in found]
            self.rows = [self.rows[i] for i in evenly(len(self.rows), limit)] if self.rows else []
        if not self.rows:
            raise ConfigError(f"nothing to read in {', '.join(paths) or ex.store}")

    def read(self, start: int, stop: int, device: torch.device) -> tuple[torch.Tensor, list[int]]:
        """Rows start..stop as model input (B, 3, h, w), and which rows those are (unreadable images are left out)."""
        if self.kind == "store":
            return store_input(self.store, self.index[start:stop], self.size, device), list(range(start, stop))
        if self.kind == "video":
            return to_input(torch.from_numpy(self.frames[start:stop]).to(device)), list(range(start, stop))
        images, kept, originals, failures = read_images([Path(r["source"]) for r in self.rows[start:stop]], self.size)
        self.notes += failures
        self.originals += originals
        batch = torch.from_numpy(np.stack(images)).to(device) if images else torch.zeros((0, *self.size, 3), dtype=torch.uint8, device=device)
        return to_input(batch), [start + i for i in kept]

    def report(self) -> list[str]:
        """Lines for the user: skipped images, then how many images were resized from which size."""
        return self.notes + resize_notes(self.originals, self.size)

    def label(self, row: int) -> str:
        """A short caption: the file's name, and the time for frames."""
        r = self.rows[row]
        return f"{Path(r['source']).name} @ {r['time']:.1f} s" if "time" in r else Path(r["source"]).name
