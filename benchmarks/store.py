"""The frame store's formats side by side on real dashcam clips: size, read + decode rate per core, cores for a GPU.

    python benchmarks/store.py [--videos ../shared/data/driving_video] [--reps 3]

1. `maecli extract` of every second frame of the clips at 224x398 into a raw store and JPEG stores at quality 75,
   90 (the default) and 95: bytes per frame (shard files, tar headers included), the size ratio to raw, the mean
   absolute pixel error against raw (0-255), extraction frames/s.
2. Random batches of 256 by global index (a permutation, as training reads), through `FrameStore.get_batch`: one
   decode thread (one core) and the store's pool (every core), at 224x398 and at 144x192 (the CamVid recipe's
   frame size), interleaved over --reps rounds, median; then the same with the augmentation a CPU loader would add
   (`augment`: crop, resize to the model's 224x224 or 144x192, normalize; torch on one thread).
3. Cores for 4,500 images/s (ViT-B/16 MAE on an H200, measured there): 4,500 x 1.02 / (per-core rate), so that the
   loader idles at least 2% of the time and the GPU's data wait stays under 2%. maecli's loader reads and decodes
   on the CPU and augments on the device (first column); a loader that augments on the CPU too needs the second.
"""

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from maecli.config import validate_config
from maecli.data import augment, center_crop
from maecli.extract import run_extract
from maecli.store import FrameStore

GPU_RATE = 4500  # images/s: ViT-B/16 MAE, batch 256, bf16, compiled, on an H200 (docs/benchmarks.md)


def extract(store: Path, videos: Path, size: list[int], **settings) -> tuple[FrameStore, float]:
    cfg = validate_config({"extract": {"store": str(store), "size": size, "fps": 0, "every_n": 2, "dedup": 0, **settings}}, root=store.parent,
                          source="benchmark").extract
    t = time.perf_counter()
    summary = run_extract(cfg, [str(videos)])
    return FrameStore(store), summary["new_frames"] / (time.perf_counter() - t)


def read_rate(store: FrameStore, threads: int, out_hw: tuple[int, int] | None, reps: int, seed: int) -> float:
    """Frames/s of `get_batch` over random batches of 256 (+ CPU augmentation to `out_hw`)."""
    store._pool = ThreadPoolExecutor(threads)
    order = np.random.default_rng(seed).permutation(len(store))
    batches = [order[i: i + 256] for i in range(0, len(order) - 255, 256)] or [order]
    rates = []
    for _ in range(reps):
        t, n = time.perf_counter(), 0
        for idx in batches:
            frames = store.get_batch(idx)
            if out_hw is not None:
                augment(torch.from_numpy(frames), center_crop(len(frames), store.size, out_hw), out_hw)
            n += len(idx)
        rates.append(n / (time.perf_counter() - t))
    store._pool.shutdown()
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "driving_video")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        stores, rows = {}, []
        for name, settings in [("raw", dict(format="raw")), ("jpeg q75", dict(quality=75)), ("jpeg q90", dict(quality=90)), ("jpeg q95", dict(quality=95))]:
            store, fps = extract(work / name.replace(" ", "-"), args.videos, [224, 398], **settings)
            stores[name] = store
            rows.append((name, len(store), store.info()["bytes"] / len(store), fps))
        raw = stores["raw"].get_batch(np.arange(len(stores["raw"]))).astype(np.int16)
        print(f"\n1. store size, {len(stores['raw'])} frames of 224x398 from {args.videos}")
        print("| format | bytes/frame | smaller than raw | mean abs error | extract frames/s |\n|---|---|---|---|---|")
        for name, n, per_frame, fps in rows:
            err = np.abs(stores[name].get_batch(np.arange(n)).astype(np.int16) - raw).mean()
            print(f"| {name} | {per_frame:,.0f} | {rows[0][2] / per_frame:.1f}x | {err:.2f} | {fps:.0f} |")

        small = {"raw": extract(work / "raw-144", args.videos, [144, 192], format="raw")[0],
                 "jpeg q90": extract(work / "jpeg-144", args.videos, [144, 192])[0]}
        cases = [("224x398", "raw", stores["raw"], (224, 224)), ("224x398", "jpeg q90", stores["jpeg q90"], (224, 224)),
                 ("144x192", "raw", small["raw"], (144, 192)), ("144x192", "jpeg q90", small["jpeg q90"], (144, 192))]
        cores = torch.get_num_threads(), len(__import__("os").sched_getaffinity(0))
        print(f"\n2. random batches of 256 through get_batch, frames/s (median of {args.reps}); pool = {cores[1]} threads on {cores[1]} cores")
        print("| frames | format | read, 1 thread | read, pool | read + augment, 1 thread | cores for 4,500 img/s: read | read + augment |")
        print("|---|---|---|---|---|---|---|")
        for size, name, store, out_hw in cases:
            one, pool, aug = (read_rate(store, threads, hw, args.reps, seed) for seed, (threads, hw) in enumerate([(1, None), (cores[1], None), (1, out_hw)]))
            print(f"| {size} | {name} | {one:,.0f} | {pool:,.0f} | {aug:,.0f} | {GPU_RATE * 1.02 / one:.1f} | {GPU_RATE * 1.02 / aug:.1f} |")


if __name__ == "__main__":
    main()
