"""Extraction and frame-store read throughput, measured side by side in one run.

    python benchmarks/extract.py [--videos ../shared/data/driving_video] [--reps 5]

1. One 720p H.264 clip: `maecli extract` with one worker (in-process, default settings: 2 fps, 224x224,
   dedup) versus plain PyAV decoding of the same file (threaded, no conversion). Runs interleave.
2. All clips: extraction with 1 and 2 worker processes.
3. Frame store reads: random batches of 256 frames from one process, against what a training step of
   the default model (MAE ViT-B/16, 224 px) consumes on this CPU, and against what an H100 would
   consume at 45% MFU (analytic FLOPs: `maecli.methods.mae.analytic_flops`).
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from maecli.config import validate_config
from maecli.extract import run_extract
from maecli.store import FrameStore


def extract_config(store: Path, **settings):
    return validate_config({"extract": {"store": str(store), **settings}}, root=store.parent, source="benchmark").extract


def plain_decode(path: Path) -> int:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        return sum(1 for _ in c.decode(s))


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def bench_one_clip(clip: Path, reps: int, work: Path) -> list[tuple[str, float, float]]:
    frames = plain_decode(clip)  # warm the page cache and count
    variants = {
        "plain PyAV decode": lambda i: plain_decode(clip),
        "maecli extract, 2 fps (default)": lambda i: run_extract(extract_config(work / f"a{i}", workers=1), [str(clip)]),
        "maecli extract, every frame": lambda i: run_extract(extract_config(work / f"b{i}", workers=1, fps=0, every_n=1, dedup=0), [str(clip)]),
    }
    times = {name: [] for name in variants}
    for i in range(reps):  # interleaved: A, B, C, A, B, C ...
        for name, fn in variants.items():
            times[name].append(timed(lambda: fn(i))[0])
    base = statistics.median(times["plain PyAV decode"])
    return [(name, frames / statistics.median(t), base / statistics.median(t)) for name, t in times.items()]


def bench_workers(clips: list[Path], reps: int, work: Path) -> list[tuple[str, int, float, float]]:
    frames = sum(plain_decode(c) for c in clips)
    settings = {"2 fps (default)": {}, "every frame": dict(fps=0, every_n=1, dedup=0)}
    times = {(name, w): [] for name in settings for w in (1, 2)}
    for i in range(reps):
        for name, w in times:
            cfg = extract_config(work / f"w{w}-{len(name)}-{i}", workers=w, **settings[name])
            times[name, w].append(timed(lambda: run_extract(cfg, [str(c) for c in clips]))[0])
    return [(name, w, frames / statistics.median(t), statistics.median(times[name, 1]) / statistics.median(t)) for (name, w), t in times.items()]


def bench_reads(clips: list[Path], work: Path, batch: int = 256, reps: int = 20) -> tuple[float, int]:
    root = work / "read"
    run_extract(extract_config(root, workers=2, fps=0, every_n=1, dedup=0), [str(c) for c in clips])
    store = FrameStore(root)
    rng = np.random.default_rng(0)
    store.get_batch(rng.integers(0, len(store), batch))  # map the shards
    t = [timed(lambda: store.get_batch(rng.integers(0, len(store), batch)))[0] for _ in range(reps)]
    return batch / statistics.median(t), len(store)


def training_consumption() -> tuple[float, float]:
    """Images/s of one MAE ViT-B/16 training step on this CPU (batch 8), and its analytic FLOPs per image (fwd + bwd)."""
    import torch

    from maecli.bench import interleaved, train_step_fn
    from maecli.config import validate_config
    from maecli.methods import method_of

    mae = method_of(validate_config({"model": {"preset": "vit_base"}}, root=Path.cwd(), source="benchmark"), "mae")  # ViT-B/16 at 224
    frames = torch.randint(0, 256, (8, 224, 224, 3), dtype=torch.uint8)
    step = train_step_fn(mae.build(), mae, frames)
    times = interleaved({"step": step}, 3, 1, torch.device("cpu"))["step"]
    return 8 / statistics.median(times), mae.flops_per_image()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "driving_video")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    clips = sorted(args.videos.glob("*.mp4"))
    assert clips, f"no .mp4 clips in {args.videos}"
    clip = max(clips, key=lambda c: av.open(str(c)).streams.video[0].height)  # a 720p one

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = bench_one_clip(clip, args.reps, work)
        print(f"\n1. one clip: {clip.name} ({av.open(str(clip)).streams.video[0].width}x{av.open(str(clip)).streams.video[0].height}), median of {args.reps} interleaved runs")
        print(f"| {'variant':<34} | {'decoded frames/s':>16} | {'vs plain decode':>15} |")
        print(f"|{'-' * 36}|{'-' * 18}:|{'-' * 16}:|")
        for name, fps, ratio in rows:
            print(f"| {name:<34} | {fps:>16.0f} | {ratio:>14.2f}x |")

        rows = bench_workers(clips, max(1, args.reps // 2), work)
        print(f"\n2. all {len(clips)} clips, median of {max(1, args.reps // 2)} interleaved runs (process start-up included)")
        print(f"| {'sampling':<16} | {'workers':>7} | {'decoded frames/s':>16} | {'speed-up':>8} |")
        print(f"|{'-' * 18}|{'-' * 8}:|{'-' * 18}:|{'-' * 9}:|")
        for name, w, fps, speedup in rows:
            print(f"| {name:<16} | {w:>7} | {fps:>16.0f} | {speedup:>7.2f}x |")

        read_fps, n = bench_reads(clips, work)
        step_ips, flops = training_consumption()
        h100 = 0.45 * 989e12 / flops
        print(f"\n3. frame store reads: random batches of 256 frames (224x224 RGB uint8) from a {n}-frame store, one process")
        print(f"| {'consumer':<44} | {'frames/s':>9} | {'store reads / consumption':>25} |")
        print(f"|{'-' * 46}|{'-' * 10}:|{'-' * 26}:|")
        print(f"| {'store read (get_batch)':<44} | {read_fps:>9.0f} | {'':>25} |")
        print(f"| {'MAE ViT-B/16 step on this CPU (batch 8)':<44} | {step_ips:>9.1f} | {read_fps / step_ips:>24.0f}x |")
        print(f"| {'MAE ViT-B/16 on an H100 at 45% MFU (analytic)':<44} | {h100:>9.0f} | {read_fps / h100:>24.1f}x |")
        print(f"\n(ViT-B/16 MAE training: {flops / 1e9:.1f} GFLOP per image, forward + backward, analytic)")


if __name__ == "__main__":
    main()
