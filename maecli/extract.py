"""`maecli extract`: video files to a frame store, one worker process per video, resumable.

A video is identified by its content fingerprint: re-running skips videos already in the store, a
killed run redoes only the videos it had not finished, and `--shard i/n` takes a fixed 1/n of them.
A bad file is reported with a one-line reason and the others still extract.
"""

import glob
import json
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from maecli.config import ExtractConfig
from maecli.errors import ConfigError, Interrupted
from maecli.files import locked
from maecli.location import Location
from maecli.store import FORMATS, FrameStore, ShardWriter, clear_video, done_fingerprints, fingerprint, open_for_writing, write_record
from maecli.video import VIDEO_EXTENSIONS, VideoError, grey_thumbnail, sample_frames, to_rgb


@dataclass(frozen=True)
class Job:
    path: Path
    fp: str
    split: str


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' with 1 <= i <= n."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard: expected i/n, e.g. 1/4 (got {text!r})") from None
    if not 1 <= i <= n:
        raise ConfigError(f"--shard: i must be between 1 and n (got {text!r})")
    return i, n


def find_videos(inputs: list[str]) -> tuple[list[Path], list[dict[str, str]]]:
    """Expand files, folders (recursively, by video extension) and glob patterns, in the order given."""
    paths, failures = [], []
    for item in inputs:
        if any(c in item for c in "*?["):
            found = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not found:
                failures.append({"path": item, "reason": "the pattern matches no file"})
        elif Path(item).is_dir():
            found = sorted(p for p in Path(item).rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
            if not found:
                failures.append({"path": item, "reason": "the folder holds no video file"})
        else:
            found = [Path(item)]  # named explicitly: used whatever its extension; a missing one is reported below
        paths += found
    unique = list(dict.fromkeys(p.absolute() for p in paths))
    return unique, failures


def split_of(fp: str, val_fraction: float) -> str:
    """Deterministic by content: the same video always lands on the same side, whatever else is extracted."""
    return "val" if int(fp[:8], 16) / 2**32 < val_fraction else "train"


def in_shard(fp: str, shard: tuple[int, int] | None) -> bool:
    return shard is None or int(fp[8:16], 16) % shard[1] == shard[0] - 1


def extract_video(job: Job, root: Path, cfg: ExtractConfig, threads: int = 0, report: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Decode, sample, resize and dedup one video into shards; return its record (written by the caller)."""
    clear_video(root, job.fp)
    writer = ShardWriter(root, job.fp, cfg.size, cfg.shard_frames, cfg.format, cfg.quality)
    times, indices, dropped, last, warning, info = [], [], 0, None, None, {}
    try:
        for index, t, frame in sample_frames(job.path, fps=cfg.fps, every_n=cfg.every_n, start=cfg.start, end=cfg.end, threads=threads, info=info):
            rgb = to_rgb(frame, cfg.size, cfg.resize)  # (H, W, 3) uint8
            if cfg.dedup > 0:
                thumb = grey_thumbnail(rgb)
                if last is not None and float(np.abs(thumb - last).mean()) < cfg.dedup:
                    dropped += 1
                    continue
                last = thumb
            writer.add(rgb)
            times.append(t)
            indices.append(index)
            if report is not None and len(times) % 8 == 0:
                report(8)
            if cfg.max_frames and len(times) >= cfg.max_frames:
                break
    except VideoError as err:
        if not times:
            raise
        warning = f"kept the {len(times)} frames before an error: {err}"  # a truncated recording is still footage
    if report is not None:
        report(len(times) % 8)
    shards, spans = writer.close()
    return dict(
        source=str(job.path),
        fingerprint=job.fp,
        split=job.split,
        stream=info["stream"],
        codec=info["codec"],
        width=info["width"],
        height=info["height"],
        bytes=job.path.stat().st_size,
        decoded=info["decoded"],
        dropped_duplicates=dropped,
        shards=shards,
        timestamps=times,
        frame_indices=indices,
        warning=warning,
        **({"spans": spans} if spans is not None else {}),
    )


def _safe_extract(job: Job, where: Location, cfg: ExtractConfig, threads: int, report: Callable[[int], None] | None) -> dict[str, Any]:
    """The worker's entry point: one video, extracted and recorded while this process holds its lock, so two runs
    on one store never write the same video at once (the other one skips it). A bad video becomes a failure entry,
    never an exception across processes; any other failure (a full disk, Ctrl-C) leaves none of its files behind.
    For a URL the video is written to a local staging folder, then its shards are uploaded and its record last."""
    root = where.staging
    lock = root / "shards" / f".{job.fp}.lock"
    with locked(lock) as holder:
        if holder is not None:
            return {"busy": f"being extracted by another run ({holder}): skipped"}
        try:
            if where.read_text(f"videos/{job.fp}.json") is not None:  # another run finished it since this one looked
                return {"busy": "extracted by another run meanwhile: skipped"}
            record = extract_video(job, root, cfg, threads, report)
            write_record(root, record)  # the video is in the store from here on (once published, for a URL)
            where.publish([f"shards/{name}" for name, *_ in record["shards"]] + [f"videos/{job.fp}.json"])
            return record
        except VideoError as err:
            clear_video(root, job.fp)
            return {"failure": str(err)}
        except BaseException:
            # a signal can land after the record was written (before this function returns): the video is complete
            # then, and deleting its shards would leave a record of missing files
            if where.read_text(f"videos/{job.fp}.json") is None:
                clear_video(root, job.fp)
            raise
        finally:
            lock.unlink(missing_ok=True)  # while still held: a run that opens it later finds the record, or redoes the video


def _put(queue: Any, n: int) -> None:
    queue.put(n)


def run_extract(cfg: ExtractConfig, inputs: list[str] | None = None, shard: tuple[int, int] | None = None, console: Console | None = None) -> dict[str, Any]:
    """Extract every input video not yet in the store; returns the summary."""
    items = inputs or cfg.inputs
    if not items:
        raise ConfigError("extract.inputs: no videos given (list them under [extract] inputs, or pass them as arguments)")
    where = Location(cfg.store)
    open_for_writing(where, cfg.settings)
    t_start = time.perf_counter()

    paths, failures = find_videos(items)
    warnings, jobs, seen = [], [], {}
    for path in paths:
        try:
            fp = fingerprint(path)
        except FileNotFoundError:
            failures.append({"path": str(path), "reason": "no such file"})
            continue
        except OSError as err:
            failures.append({"path": str(path), "reason": f"cannot read: {(err.strerror or str(err)).lower()}"})
            continue
        if fp in seen:
            warnings.append({"path": str(path), "message": f"same content as {seen[fp]}: skipped"})
            continue
        seen[fp] = path
        if in_shard(fp, shard):
            jobs.append(Job(path, fp, split_of(fp, cfg.val_fraction)))
    done = done_fingerprints(where)
    todo = [j for j in jobs if j.fp not in done]
    cores = os.cpu_count() or 1
    workers = max(1, min(cfg.workers or cores, len(todo)))
    threads = 0 if workers == 1 else max(1, cores // workers)  # decoder threads: the workers share the cores

    records, others = [], []  # others: videos another run was extracting, or finished meanwhile
    progress = Progress(
        TextColumn("extract"), BarColumn(), MofNCompleteColumn(), TextColumn("videos  {task.fields[frames]} frames  {task.fields[rate]} frames/s"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, disable=console is None or not console.is_terminal,
    )  # fmt: skip
    with progress:
        task = progress.add_task("extract", total=len(todo), frames=0, rate="-")

        def count(n: int) -> None:
            frames = progress.tasks[0].fields["frames"] + n
            progress.update(task, frames=frames, rate=f"{frames / max(1e-9, time.perf_counter() - t_start):.0f}")

        def finish(job: Job, result: dict[str, Any]) -> None:
            if "failure" in result:
                failures.append({"path": str(job.path), "reason": result["failure"]})
            elif "busy" in result:
                others.append(job)
                warnings.append({"path": str(job.path), "message": result["busy"]})
            else:
                records.append(result)
                if result["warning"]:
                    warnings.append({"path": str(job.path), "message": result["warning"]})
            progress.advance(task)

        try:
            if workers == 1:
                for job in todo:
                    finish(job, _safe_extract(job, where, cfg, threads, count))
            else:
                ctx = multiprocessing.get_context("spawn")
                with ctx.Manager() as manager, ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                    queue = manager.Queue()
                    running = {pool.submit(_safe_extract, job, where, cfg, threads, partial(_put, queue)): job for job in todo}
                    try:
                        while running:
                            finished, _ = wait(running, timeout=0.2, return_when=FIRST_COMPLETED)
                            while not queue.empty():
                                count(queue.get())
                            for future in finished:
                                finish(running.pop(future), future.result())
                    except KeyboardInterrupt:  # the videos in flight finish and are recorded; the queued ones never start
                        pool.shutdown(wait=True, cancel_futures=True)
                        raise
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted after {len(records)} of {len(todo)} videos; run the same command again to resume") from None

    seconds = time.perf_counter() - t_start
    new_frames = sum(len(r["timestamps"]) for r in records)
    summary = dict(
        **FrameStore(cfg.store).info(),
        videos_extracted=len(records),
        videos_skipped=len(jobs) - len(todo) + len(others),
        videos_failed=len(failures),
        new_frames=new_frames,
        dropped_duplicates=sum(r["dropped_duplicates"] for r in records),
        seconds=round(seconds, 3),
        frames_per_second=round(sum(r["decoded"] for r in records) / seconds, 1) if records else 0.0,
        failures=failures,
        warnings=warnings,
        shard=f"{shard[0]}/{shard[1]}" if shard else None,
    )
    where.write_text("last-extract.json", json.dumps(summary, indent=2) + "\n")
    return summary


def convert_store(source: str, target: str, format: str, quality: int) -> dict[str, Any]:
    """Rewrite every video of `source` into `target` in another format: the same frames (re-encoded), timestamps and
    split; a video at a time, each published as extract publishes it, so an interrupted run resumes."""
    if format not in FORMATS or not 1 <= quality <= 100:
        raise ConfigError(f"--format/--quality: expected jpeg or raw and a quality of 1-100 (got {format!r}, {quality})")
    store = FrameStore(source)
    where = Location(target)
    settings = store.meta["settings"] | {"format": format, "quality": quality}
    open_for_writing(where, settings)
    done = done_fingerprints(where)
    converted = 0
    for v, start, stop in zip(store.videos, store.video_offsets[:-1].tolist(), store.video_offsets[1:].tolist()):
        if v["fingerprint"] in done:
            continue
        clear_video(where.staging, v["fingerprint"])
        writer = ShardWriter(where.staging, v["fingerprint"], store.size, settings["shard_frames"], format, quality)
        for first in range(start, stop, 256):
            for rgb in store.get_batch(np.arange(first, min(stop, first + 256))):
                writer.add(rgb)
        shards, spans = writer.close()
        record = {k: x for k, x in v.items() if k != "spans"} | {"shards": shards} | ({"spans": spans} if spans is not None else {})
        write_record(where.staging, record)
        where.publish([f"shards/{name}" for name, *_ in shards] + [f"videos/{v['fingerprint']}.json"])
        converted += 1
    info = FrameStore(target).info()
    return dict(**info, videos_converted=converted, source_bytes=store.info()["bytes"])
