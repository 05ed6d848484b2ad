"""The frame store: the only module that knows its layout.

    STORE/store.json              format name and version, frame size, the extraction settings
    STORE/videos/<fp>.json        one record per extracted video: provenance of each frame, its shards
    STORE/shards/<fp>-<k>.tar     format "jpeg" (the default): a WebDataset shard, one `<fp>_<i>.jpg` per frame
    STORE/shards/<fp>-<k>.npy     format "raw": uint8 frames (n, H, W, 3), memory-mappable

`<fp>` is the video's content fingerprint, `<k>` counts its shards of at most `shard_frames` frames. A video is
in the store once its record exists; the record is written after all its shards, so an interrupted run never
shows a partial video, and videos from many machines (`--shard i/n`) merge by sitting in one folder or bucket.
STORE is a folder or a URL (`maecli.location`): shards and records are published by whole-file writes.

The JPEG shards are plain tar files that WebDataset (and any tar reader) streams; the record keeps each frame's
byte span in its shard, so a frame is one positioned read and one libjpeg-turbo decode (Pillow), with no index
to rebuild. Shard sizes are in the records too: a truncated or missing shard is named when the store opens.
"""

import hashlib
import io
import json
import os
import tarfile
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from maecli.errors import ConfigError, MaecliError
from maecli.files import atomic_write, write_json
from maecli.location import Location

FORMAT = "maecli-frames"
FORMAT_VERSION = 1
FORMATS = ("jpeg", "raw")
OLD_SETTINGS = {"format": "raw", "quality": 90}  # what a store written before formats existed holds
OPEN_SHARDS = 256  # file descriptors kept open per store; the least recently used beyond this are closed


def fingerprint(path: Path, chunk: int = 1 << 20) -> str:
    """Content identity of a video without reading all of it: size, first, middle and last MiB."""
    size = path.stat().st_size
    h = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as f:
        for offset in sorted({0, max(0, size // 2 - chunk // 2), max(0, size - chunk)}):
            f.seek(offset)
            h.update(f.read(chunk))
    return h.hexdigest()


def open_for_writing(where: Location, settings: dict[str, Any]) -> None:
    """Create the store, or check that an existing one was made with the same settings."""
    if where.read_text("store.json") is not None:
        meta = read_meta(where)
        if meta["settings"] != settings:
            diff = sorted(k for k in settings.keys() | meta["settings"].keys() if settings.get(k) != meta["settings"].get(k))
            old = ", ".join(f"{k}={json.dumps(meta['settings'].get(k))}" for k in diff)
            raise ConfigError(f"{where}: this store was extracted with {old}; use another store folder for other settings")
    else:
        where.write_text("store.json", json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "size": settings["size"], "settings": settings}, indent=2) + "\n")
    (where.staging / "videos").mkdir(parents=True, exist_ok=True)
    (where.staging / "shards").mkdir(exist_ok=True)


def read_meta(where: Location) -> dict[str, Any]:
    try:
        text = where.read_text("store.json")
        meta = json.loads(text) if text is not None else None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MaecliError(f"{where}/store.json: unreadable ({err})") from None
    if meta is None:
        raise ConfigError(f"{where}: not a frame store (no store.json; create one with 'maecli extract')")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise MaecliError(f"{where}: not a maecli frame store (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        hint = "upgrade maecli" if isinstance(version, int) and version > FORMAT_VERSION else "extract it again"
        raise MaecliError(f"{where}: frame store format version {version}, this maecli reads version {FORMAT_VERSION}: {hint}")
    meta["settings"] = OLD_SETTINGS | meta["settings"]
    return meta


def done_fingerprints(where: Location) -> set[str]:
    return {name.removesuffix(".json") for name in where.sizes("videos") if name.endswith(".json")}


def clear_video(root: Path, fp: str) -> None:
    """Remove what an interrupted extraction of this video left behind (its shards and temporary files)."""
    for p in (root / "shards").glob(f"{fp}-*"):
        p.unlink(missing_ok=True)
    for p in (root / "shards").glob(f".{fp}-*"):
        p.unlink(missing_ok=True)


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes -> (H, W, 3) uint8 (libjpeg-turbo through Pillow; it lets other threads run while it decodes)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB") if image.mode != "RGB" else image)


class ShardWriter:
    """Collects one video's frames into shards of at most `shard_frames`; `close()` flushes the last one and returns
    the shards ([file name, frame count, bytes]) and, for JPEG, each frame's [offset, size] in its shard."""

    def __init__(self, root: Path, fp: str, size: tuple[int, int], shard_frames: int, format: str = "jpeg", quality: int = 90) -> None:
        self.root, self.fp, self.shard_frames, self.format, self.quality = root, fp, shard_frames, format, quality
        self.frames: list[Any] = []  # raw: (H, W, 3) uint8 arrays; jpeg: encoded bytes
        self.shards: list[list[Any]] = []
        self.spans: list[list[int]] = []
        self.written = 0

    def add(self, rgb: np.ndarray) -> None:
        self.frames.append(rgb.copy() if self.format == "raw" else encode_jpeg(rgb, self.quality))
        if len(self.frames) == self.shard_frames:
            self._flush()

    def _flush(self) -> None:
        name = f"{self.fp}-{len(self.shards):05d}.{'npy' if self.format == 'raw' else 'tar'}"
        path = self.root / "shards" / name
        with atomic_write(path) as tmp:
            if self.format == "raw":
                with open(tmp, "wb") as f:
                    np.save(f, np.stack(self.frames))
            else:
                with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:  # fixed header fields: same frames, same bytes
                    for i, data in enumerate(self.frames, start=self.written):
                        info = tarfile.TarInfo(f"{self.fp}_{i:06d}.jpg")
                        info.size, info.mode, info.mtime = len(data), 0o644, 0
                        tar.addfile(info, io.BytesIO(data))
                with tarfile.open(tmp) as tar:
                    self.spans += [[m.offset_data, m.size] for m in tar.getmembers()]
            bytes_ = tmp.stat().st_size
        self.shards.append([name, len(self.frames), bytes_])
        self.written += len(self.frames)
        self.frames = []

    def close(self) -> tuple[list[list[Any]], list[list[int]] | None]:
        if self.frames:
            self._flush()
        return self.shards, self.spans if self.format == "jpeg" else None


def write_record(root: Path, record: dict[str, Any]) -> None:
    """The last step of a video: from now on it is in the store."""
    write_json(root / "videos" / f"{record['fingerprint']}.json", record, compact=True)


class FrameStore:
    """Read access to a frame store: `len()`, `store[i]` -> (H, W, 3) uint8, `get_batch(indices)`, `provenance(i)`.

    Frames are ordered by video (source path, then fingerprint), then time. Shards are opened (and, for a URL,
    downloaded) on first use, so the store can be opened in a parent and read in forked or spawned loader processes.
    """

    def __init__(self, root: str | Path, split: str | None = None) -> None:
        self.root = root
        self.where = Location(root)
        self.meta = read_meta(self.where)
        self.size = tuple(self.meta["size"])
        self.format = self.meta["settings"]["format"]
        names = sorted(n for n in self.where.sizes("videos") if n.endswith(".json"))
        try:
            records = [json.loads(text) for text in self.where.read_texts([f"videos/{n}" for n in names])]
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise MaecliError(f"{self.where}/videos: a video record is unreadable ({err}); delete it and run 'maecli extract' again") from None
        self.videos = sorted((r for r in records if split is None or r["split"] == split), key=lambda r: (r["source"], r["fingerprint"]))
        self.shards = [(name, n, rest[0] if rest else None) for v in self.videos for name, n, *rest in v["shards"]]  # (name, frames, bytes)
        self.shard_names = [name for name, _, _ in self.shards]
        counts = np.array([n for _, n, _ in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])  # (S + 1,) first global index of each shard
        video_counts = np.array([len(v["timestamps"]) for v in self.videos], dtype=np.int64)
        self.video_offsets = np.concatenate([[0], np.cumsum(video_counts)])  # (V + 1,)
        assert self.offsets[-1] == self.video_offsets[-1], f"{self.root}: shard frame counts disagree with the records"
        if self.format == "jpeg":
            self.spans = np.array([span for v in self.videos for span in v["spans"]], dtype=np.int64).reshape(-1, 2)  # (N, 2) offset, size
        self._check_shards()
        self._open: OrderedDict[int, Any] = OrderedDict()  # shard -> mapped array (raw) or file descriptor (jpeg)
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def _check_shards(self) -> None:
        present = self.where.sizes("shards")
        for v in self.videos:
            for name, _, *rest in v["shards"]:
                if name not in present:
                    raise ConfigError(f"{self.where}/shards/{name}: missing, so video {v['source']} is incomplete; "
                                      f"delete videos/{v['fingerprint']}.json and run 'maecli extract' again")
                if rest and present[name] != rest[0]:
                    raise ConfigError(f"{self.where}/shards/{name}: {present[name]:,} bytes, its record says {rest[0]:,} (truncated or "
                                      f"overwritten); delete videos/{v['fingerprint']}.json and run 'maecli extract' again")

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_open", "_lock", "_pool")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _open=OrderedDict(), _lock=threading.Lock(), _pool=None)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _shards(self, wanted: list[int]) -> None:
        """Open these shards (downloading those of a URL not yet cached), closing the least recently used beyond
        OPEN_SHARDS; a mapped raw shard or an open descriptor stays valid when its cached file is evicted."""
        with self._lock:
            new = [s for s in wanted if s not in self._open]
            paths = self.where.local([f"shards/{self.shards[s][0]}" for s in new], [self.shards[s][2] for s in new]) if new else []
            for s, path in zip(new, paths):
                if self.format == "raw":
                    self._open[s] = np.load(path, mmap_mode="r").view(np.ndarray)  # same pages; skips np.memmap's __getitem__
                else:
                    self._open[s] = os.open(path, os.O_RDONLY)
            for s in wanted:
                self._open.move_to_end(s)
            while len(self._open) > max(OPEN_SHARDS, len(wanted)):
                _, closing = self._open.popitem(last=False)
                if isinstance(closing, int):
                    os.close(closing)

    def _locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"frame index out of range for a store of {len(self)} frames")
        shard = np.searchsorted(self.offsets, indices, side="right") - 1  # (B,)
        return shard, indices - self.offsets[shard]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get_batch([i])[0]

    def get_batch(self, indices: Any) -> np.ndarray:
        """(B, H, W, 3) uint8 for global `indices`.

        raw: one memcpy per frame, visited in store order (sequential reads within a shard): 1.7x faster than numpy's
        fancy-index gather on a memmap, which copies element by element (docs/benchmarks.md). jpeg: one positioned
        read and one decode per frame, spread over a thread pool (one thread per core, at most 8).
        """
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), *self.size, 3), dtype=np.uint8)
        shard, local = (a.tolist() for a in self._locate(indices))
        self._shards(sorted(set(shard)))
        if self.format == "raw":
            for j in np.argsort(indices, kind="stable").tolist():
                out[j] = self._open[shard[j]][local[j]]
            return out

        def decode(j: int) -> None:
            offset, size = self.spans[indices[j]].tolist()
            try:
                out[j] = decode_jpeg(os.pread(self._open[shard[j]], size, offset))
            except (OSError, ValueError) as err:
                p = self.provenance(int(indices[j]))
                raise ConfigError(f"{self.where}/shards/{self.shards[shard[j]][0]}: frame {local[j]} (video {p['source']} at {p['time']:.2f} s) "
                                  f"does not decode ({err}); delete videos/{p['fingerprint']}.json and run 'maecli extract' again") from None

        if self._pool is None:
            self._pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="maecli-decode")
        list(self._pool.map(decode, range(len(indices))))
        return out

    def times(self) -> np.ndarray:
        """Each frame's time in its video, seconds: (N,), in store order (`video_offsets` says where each video starts)."""
        return np.array([t for v in self.videos for t in v["timestamps"]], dtype=np.float64)

    def provenance(self, i: int) -> dict[str, Any]:
        v = int(np.searchsorted(self.video_offsets, i, side="right") - 1)
        video, j = self.videos[v], i - int(self.video_offsets[v])
        return dict(source=video["source"], stream=video["stream"], time=video["timestamps"][j], frame_index=video["frame_indices"][j],
                    split=video["split"], fingerprint=video["fingerprint"])

    def info(self) -> dict[str, Any]:
        frames = {split: sum(len(v["timestamps"]) for v in self.videos if v["split"] == split) for split in ("train", "val")}
        present = self.where.sizes("shards")
        return dict(
            store=str(self.root),
            format_version=self.meta["format_version"],
            format=self.format,
            size=list(self.size),
            videos=len(self.videos),
            frames=frames,
            bytes=sum(present.get(name, 0) for name in self.shard_names),
            settings=self.meta["settings"],
        )
