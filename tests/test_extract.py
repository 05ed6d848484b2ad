"""`maecli extract` and `maecli store info` end to end, on videos generated here with PyAV."""

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from maecli.cli import app
from maecli.config import load_config
from maecli.extract import run_extract
from maecli.store import FrameStore, fingerprint
from tests.videos import frame_image, write_audio_only, write_latin1_title, write_undecodable, write_video

VFR_MS = [0, 100, 150, 700, 720, 1300, 2000, 2050, 2600]


@pytest.fixture(scope="session")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    for i in range(6):  # six distinct 3 s clips at 30 fps
        write_video(d / "many" / f"clip{i}.mp4" if (d / "many").mkdir(exist_ok=True) is None else None, n=90,
                    images=[frame_image(i * 7 + j, 48, 64) for j in range(90)])
    write_video(d / "vfr.mkv", times_ms=VFR_MS)
    wide = [np.full((48, 128, 3), 200, np.uint8) for _ in range(30)]
    for img in wide:
        img[:, :32] = (255, 0, 0)  # a red left quarter: gone after a center crop, kept by stretch
    write_video(d / "wide.mp4", n=30, h=48, w=128, images=wide)
    rng = np.random.default_rng(0)
    still = frame_image(0, 48, 64)
    write_video(d / "static.mp4", images=[np.clip(still.astype(int) + rng.integers(-1, 2, still.shape), 0, 255).astype(np.uint8) for _ in range(90)])
    return d


def project(folder: Path, **extract) -> Path:
    settings = {"store": "frames", "workers": 1, "size": [32, 32], **extract}
    lines = ["[extract]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    (folder / "maecli.toml").write_text("\n".join(lines) + "\n")
    return folder / "maecli.toml"


def run(runner, config, *args):
    result = runner.invoke(app, ["extract", "-c", str(config), "--json", *map(str, args)])
    summary = json.loads(result.stdout) if result.stdout.startswith("{") else None
    return result, summary


def store_state(root: Path) -> dict:
    """Everything a store holds that must not depend on how it was made: records and shard bytes."""
    records = {p.name: json.loads(p.read_text()) for p in (root / "videos").glob("*.json")}
    shards = {p.name: p.read_bytes() for p in (root / "shards").glob("[!.]*")}
    return {"records": records, "shards": shards, "hidden": sorted(p.name for p in (root / "shards").glob(".*"))}


def test_exact_frames_and_timestamps_for_fps(runner, tmp_path, clips):
    result, summary = run(runner, project(tmp_path), clips / "many" / "clip0.mp4")
    assert result.exit_code == 0, result.output
    store = FrameStore(tmp_path / "frames")
    assert len(store) == 6 and summary["new_frames"] == 6
    assert [store.provenance(i)["time"] for i in range(6)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert [store.provenance(i)["frame_index"] for i in range(6)] == [0, 15, 30, 45, 60, 75]
    p = store.provenance(3)
    assert p["source"] == str(clips / "many" / "clip0.mp4") and p["stream"] == 0 and p["split"] in ("train", "val")
    assert store[3].shape == (32, 32, 3) and store[3].dtype == np.uint8
    assert summary["frames_per_second"] > 0 and summary["bytes"] > 6 * 32 * 32 * 3


def test_every_n_start_end_and_cap(runner, tmp_path, clips):
    clip = clips / "many" / "clip1.mp4"
    run(runner, project(tmp_path / "a" if (tmp_path / "a").mkdir() is None else None, fps=0, every_n=10), clip)
    assert [FrameStore(tmp_path / "a" / "frames").provenance(i)["frame_index"] for i in range(9)] == list(range(0, 90, 10))
    run(runner, project(tmp_path / "b" if (tmp_path / "b").mkdir() is None else None, start=1.0, end=2.0), clip)
    store = FrameStore(tmp_path / "b" / "frames")
    assert [store.provenance(i)["time"] for i in range(len(store))] == [1.0, 1.5, 2.0]
    run(runner, project(tmp_path / "c" if (tmp_path / "c").mkdir() is None else None, max_frames=4), clip)
    assert len(FrameStore(tmp_path / "c" / "frames")) == 4


def test_variable_frame_rate_is_sampled_by_timestamp(runner, tmp_path, clips):
    run(runner, project(tmp_path), clips / "vfr.mkv")
    store = FrameStore(tmp_path / "frames")
    times = [t / 1000 for t in VFR_MS]
    expected = sorted({min(t for t in times if t >= k / 2) for k in range(10) if any(t >= k / 2 for t in times)})  # first frame at or after k/2 s
    assert [store.provenance(i)["time"] for i in range(len(store))] == expected == [0.0, 0.7, 1.3, 2.0, 2.6]
    assert [store.provenance(i)["frame_index"] for i in range(len(store))] == [0, 3, 5, 6, 8]


def test_wide_frames_stay_wide_and_crop_centers(runner, tmp_path, clips):
    run(runner, project(tmp_path, size=[32, 86], resize="stretch"), clips / "wide.mp4")
    wide = FrameStore(tmp_path / "frames")[0]
    assert wide.shape == (32, 86, 3)
    assert wide[16, 2, 0] > 200 and wide[16, 2, 2] < 60  # the red quarter is there
    (tmp_path / "sq").mkdir()
    run(runner, project(tmp_path / "sq", size=[32, 32]), clips / "wide.mp4")
    square = FrameStore(tmp_path / "sq" / "frames")[0]
    assert square.shape == (32, 32, 3)
    assert np.abs(square.astype(int) - 200).max() < 16  # center crop: no red left


def test_static_clip_is_deduplicated(runner, tmp_path, clips):
    result, summary = run(runner, project(tmp_path), clips / "static.mp4")
    assert result.exit_code == 0
    assert summary["new_frames"] == 1 and summary["dropped_duplicates"] == 5
    (tmp_path / "off").mkdir()
    _, summary = run(runner, project(tmp_path / "off", dedup=0), clips / "static.mp4")
    assert summary["new_frames"] == 6 and summary["dropped_duplicates"] == 0
    # moving footage loses nothing at the default threshold
    (tmp_path / "moving").mkdir()
    _, summary = run(runner, project(tmp_path / "moving"), clips / "many" / "clip2.mp4")
    assert summary["dropped_duplicates"] == 0


def test_split_is_by_whole_video_and_stable(runner, tmp_path, clips):
    # The encoder's bytes (so the fingerprints) can differ from one test process to the next: a fraction between the
    # third and fourth video's puts three on each side, whatever was written.
    fractions = sorted(int(fingerprint(p)[:8], 16) / 2**32 for p in (clips / "many").glob("*.mp4"))
    val_fraction = (fractions[2] + fractions[3]) / 2
    _, summary = run(runner, project(tmp_path, val_fraction=val_fraction), clips / "many")
    assert summary["videos"] == 6 and summary["frames"]["train"] > 0 and summary["frames"]["val"] > 0
    store = FrameStore(tmp_path / "frames")
    by_video = {}
    for i in range(len(store)):
        p = store.provenance(i)
        by_video.setdefault(p["source"], set()).add(p["split"])
    assert all(len(splits) == 1 for splits in by_video.values()), "a video was split across train and val"
    assert len(FrameStore(tmp_path / "frames", split="train")) + len(FrameStore(tmp_path / "frames", split="val")) == len(store)
    # the same video lands on the same side whatever else is extracted with it
    (tmp_path / "two").mkdir()
    run(runner, project(tmp_path / "two", val_fraction=val_fraction), clips / "many" / "clip4.mp4", clips / "many" / "clip5.mp4")
    again = FrameStore(tmp_path / "two" / "frames")
    for v in again.videos:
        assert v["split"] == by_video[v["source"]].pop()


def test_rerun_skips_and_settings_change_is_refused(runner, tmp_path, clips):
    config = project(tmp_path)
    run(runner, config, clips / "many")
    before = store_state(tmp_path / "frames")
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "frames" / "shards").iterdir()}
    result, summary = run(runner, config, clips / "many")
    assert result.exit_code == 0 and summary["videos_skipped"] == 6 and summary["videos_extracted"] == 0
    assert store_state(tmp_path / "frames") == before
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "frames" / "shards").iterdir()} == mtimes
    result = runner.invoke(app, ["extract", "-c", str(config), "--set", "extract.size=[16,16]", str(clips / "many")])
    assert result.exit_code == 2
    assert result.stderr == f"{tmp_path / 'frames'}: this store was extracted with size=[32, 32]; use another store folder for other settings\n"


def test_two_workers_and_small_shards_give_the_same_store(runner, tmp_path, clips):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    run(runner, project(tmp_path / "one", shard_frames=4), clips / "many")
    result, summary = run(runner, project(tmp_path / "two", shard_frames=4, workers=2), clips / "many")
    assert result.exit_code == 0 and summary["videos_extracted"] == 6
    assert store_state(tmp_path / "one" / "frames") == store_state(tmp_path / "two" / "frames")
    store = FrameStore(tmp_path / "two" / "frames")
    assert len(store.shard_names) == 12  # 6 frames per video in shards of 4: 4 + 2
    idx = np.random.default_rng(0).permutation(len(store))[:20]
    assert np.array_equal(store.get_batch(idx), np.stack([store[i] for i in idx]))


def test_shards_of_the_input_list_merge_into_one_store(runner, tmp_path, clips):
    (tmp_path / "full").mkdir()
    run(runner, project(tmp_path / "full"), clips / "many")
    config = project(tmp_path)
    parts = [run(runner, config, "--shard", f"{i}/3", clips / "many")[1] for i in (1, 2, 3)]
    assert sum(p["videos_extracted"] for p in parts) == 6 and all(p["shard"] for p in parts)
    assert store_state(tmp_path / "frames") == store_state(tmp_path / "full" / "frames")
    result = runner.invoke(app, ["extract", "-c", str(config), "--shard", "4/3", str(clips)])
    assert result.exit_code == 2 and result.stderr == "--shard: i must be between 1 and n (got '4/3')\n"


@pytest.fixture(scope="session")
def long_clips(tmp_path_factory):
    """Six clips long enough (600 frames each, every frame kept) that an interrupted run has seconds of work left."""
    d = tmp_path_factory.mktemp("long")
    for i in range(6):
        write_video(d / f"long{i}.mp4", images=[frame_image(i * 1000 + j, 48, 64) for j in range(600)])
    return d


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_run_resumes_to_the_same_store(runner, tmp_path, long_clips, sig):
    (tmp_path / "ref").mkdir()
    settings = dict(fps=0, every_n=1, dedup=0, shard_frames=128)
    run(runner, project(tmp_path / "ref", **settings), long_clips)
    config = project(tmp_path, **settings)
    cmd = [sys.executable, "-m", "maecli", "extract", "-c", str(config), str(long_clips)]
    # Ctrl-C reaches Python as KeyboardInterrupt only if SIGINT was not ignored when it started, and a shell's
    # background job (`bash .ci/run &`) starts with it ignored: the child gets the default handling back
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    records = tmp_path / "frames" / "videos"
    deadline = time.monotonic() + 60
    while not (records.is_dir() and any(records.glob("*.json"))) and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(sig)
    _, stderr = proc.communicate()
    done = len(list(records.glob("*.json")))
    assert 1 <= done < 6, f"the run was not interrupted mid-way ({done} of 6 videos done)"
    if sig == signal.SIGINT:  # Ctrl-C: a clean stop that says how to go on
        assert proc.returncode == 130, stderr
        assert stderr.splitlines()[-1].endswith("videos; run the same command again to resume")
    assert all(json.loads(p.read_text())["warning"] is None for p in records.glob("*.json")), "an interrupted video was recorded as done"
    assert len(FrameStore(tmp_path / "frames")) == 600 * done  # only complete videos are visible
    result, summary = run(runner, config, long_clips)
    assert result.exit_code == 0 and summary["videos_skipped"] == done and summary["videos_extracted"] == 6 - done
    state = store_state(tmp_path / "frames")
    assert state == store_state(tmp_path / "ref" / "frames")


def test_ctrl_c_just_after_a_record_keeps_that_video_whole(runner, tmp_path, clips, monkeypatch):
    """The race the signal test above hits now and then: Ctrl-C landing after a video's record was written, before
    the worker returned, deleted the video's shards and left its record (a store that no longer opens)."""
    from maecli.location import Location

    def ctrl_c(self, rels):  # `publish` runs right after the record is written
        raise KeyboardInterrupt

    monkeypatch.setattr(Location, "publish", ctrl_c)
    config = project(tmp_path)
    result = runner.invoke(app, ["extract", "-c", str(config), str(clips / "many" / "clip0.mp4"), str(clips / "many" / "clip1.mp4")])
    assert result.exit_code == 130 and result.stderr.endswith("run the same command again to resume\n"), result.stderr
    store = FrameStore(tmp_path / "frames")
    assert len(store.videos) == 1 and len(store) == len(store.videos[0]["timestamps"]) > 0
    assert store.get_batch(np.arange(len(store))).shape == (len(store), 32, 32, 3)


def test_bad_files_are_reported_and_the_rest_extracts(runner, tmp_path, clips):
    bad = tmp_path / "in"
    bad.mkdir()
    good = shutil.copy(clips / "many" / "clip0.mp4", bad / "ünïcödé clip with spaces.mp4")
    (bad / "zero.mp4").write_bytes(b"")
    data = (clips / "many" / "clip1.mp4").read_bytes()
    (bad / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (bad / "text.mp4").write_text("this is not a video\n" * 20)
    write_audio_only(bad / "audio.m4a")
    write_undecodable(bad / "noise.mkv")
    write_video(bad / "single.mp4", n=1)
    from PIL import Image

    Image.fromarray(frame_image(0, 48, 64)).save(bad / "photo.png")
    names = ["zero.mp4", "truncated.mp4", "text.mp4", "audio.m4a", "noise.mkv", "single.mp4", "photo.png", "missing.mp4"]
    result, summary = run(runner, project(tmp_path), good, *[bad / n for n in names])
    assert result.exit_code == 0, result.output
    assert summary["videos_extracted"] == 1 and summary["new_frames"] == 6
    reasons = {Path(f["path"]).name: f["reason"] for f in summary["failures"]}
    assert reasons == {
        "zero.mp4": "empty file (0 bytes)",
        "truncated.mp4": "not a readable video (Invalid data found when processing input)",
        "text.mp4": "not a readable video (Invalid data found when processing input)",
        "audio.m4a": "no video stream (audio streams only)",
        "noise.mkv": "no decodable frames in the h264 stream",
        "single.mp4": "a single frame: an image, not a video",
        "photo.png": "an image (png), not a video",
        "missing.mp4": "no such file",
    }
    # the human summary names every failed file with its reason, one line each
    text = runner.invoke(app, ["extract", "-c", str(project(tmp_path)), *map(str, [good] + [bad / n for n in names])])
    assert text.exit_code == 0
    for name, reason in reasons.items():
        assert f"failed: {bad / name}: {reason}\n" in text.stderr
    assert runner.invoke(app, ["extract", "-c", str(project(tmp_path)), "--strict", str(good), str(bad / "zero.mp4")]).exit_code == 1
    (tmp_path / "none").mkdir()
    result = runner.invoke(app, ["extract", "-c", str(project(tmp_path / "none")), str(bad / "zero.mp4"), str(bad / "text.mp4")])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == "nothing could be extracted"


def _extract_unprivileged(cfg, inputs, conn):
    """In a child process: drop root (whose reads ignore permissions), then run the real extraction."""
    if os.geteuid() == 0:
        import pwd

        nobody = pwd.getpwnam("nobody")
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)
    conn.send(run_extract(cfg, inputs))


def test_unreadable_file_is_reported(tmp_path, clips):
    work = Path(tempfile.mkdtemp())
    try:
        work.chmod(0o777)
        ok = shutil.copy(clips / "many" / "clip0.mp4", work / "ok.mp4")
        locked = shutil.copy(clips / "many" / "clip1.mp4", work / "locked.mp4")
        os.chmod(locked, 0)
        cfg = load_config(project(work))
        # spawn, not fork: a forked child inherits FFmpeg's worker threads as dead copies (PyAV 19's swscale hangs on
        # them). The spawned child imports everything as root, from this module's imports, before it drops to nobody.
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_extract_unprivileged, args=(cfg.extract, [str(ok), str(locked)], child))
        proc.start()
        summary = parent.recv() if parent.poll(120) else None
        proc.join()
        assert proc.exitcode == 0 and summary is not None
        assert summary["failures"] == [{"path": str(locked), "reason": "cannot read: permission denied"}]
        assert summary["videos_extracted"] == 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_no_inputs_is_a_config_error(runner, tmp_path):
    result = runner.invoke(app, ["extract", "-c", str(project(tmp_path))])
    assert result.exit_code == 2
    assert result.stderr == "extract.inputs: no videos given (list them under [extract] inputs, or pass them as arguments)\n"


def test_inputs_from_the_project_file_resolve_against_it(runner, tmp_path, clips):
    shutil.copytree(clips / "many", tmp_path / "videos")
    config = project(tmp_path, inputs=["videos/clip0.mp4", "videos/*1.mp4"])
    result = runner.invoke(app, ["extract", "-c", str(config), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["videos"] == 2


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"every_n": 5}, "extract.every_n: set fps = 0 to keep every N-th frame (got every_n 5 with fps 2)"),
        ({"fps": 0}, "extract.fps: set fps > 0, or every_n > 0 with fps = 0"),
        ({"start": 5, "end": 2}, "extract.end: must be after start 5 (got 2)"),
        ({"resize": "squash"}, "extract.resize: must be one of 'crop' or 'stretch' (got \"squash\")"),
        ({"dedup": 1.5}, "extract.dedup: must be less than 1 (got 1.5)"),
    ],
)
def test_extract_settings_are_validated(runner, tmp_path, settings, message):
    config = project(tmp_path, **settings)
    result = runner.invoke(app, ["extract", "-c", str(config), "x.mp4"])
    assert result.exit_code == 2
    assert result.stderr == f"{config}: {message}\n"


def test_store_info(runner, tmp_path, clips):
    config = project(tmp_path)
    run(runner, config, clips / "many" / "clip0.mp4", clips / "many" / "clip3.mp4")
    result = runner.invoke(app, ["store", "info", "-c", str(config), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["videos"] == 2 and info["frames"]["train"] + info["frames"]["val"] == 12 and info["size"] == [32, 32]
    assert info["settings"]["fps"] == 2.0 and info["format_version"] == 1
    text = runner.invoke(app, ["store", "info", str(tmp_path / "frames")])
    assert text.exit_code == 0 and "32x32 RGB" in text.stderr
    meta = json.loads((tmp_path / "frames" / "store.json").read_text())
    (tmp_path / "frames" / "store.json").write_text(json.dumps({**meta, "format_version": 99}))
    result = runner.invoke(app, ["store", "info", str(tmp_path / "frames")])
    assert result.exit_code == 1
    assert result.stderr == f"{tmp_path / 'frames'}: frame store format version 99, this maecli reads version 1: upgrade maecli\n"
    result = runner.invoke(app, ["store", "info", str(tmp_path)])
    assert result.exit_code == 2 and "not a frame store" in result.stderr


@pytest.mark.parametrize("name, codec", [("clip.webm", "libvpx-vp9"), ("clip.mkv", "libx265"), ("clip.avi", "mpeg4")])
def test_other_codecs_and_containers(runner, tmp_path, name, codec):
    write_video(tmp_path / name, n=30, fps=10, codec=codec)  # 3 s at 10 fps
    result, summary = run(runner, project(tmp_path), tmp_path / name)
    assert result.exit_code == 0, result.output
    store = FrameStore(tmp_path / "frames")
    assert [store.provenance(i)["time"] for i in range(len(store))] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert store.videos[0]["codec"] == {"libvpx-vp9": "vp9", "libx265": "hevc", "mpeg4": "mpeg4"}[codec]


def test_metadata_that_is_not_utf8_does_not_stop_extraction(runner, tmp_path):
    """A Latin-1 title tag: PyAV < 19 raises UnicodeDecodeError on open unless told to ignore it, PyAV 19 has no
    such option (passing it is a TypeError). Either mistake loses the whole video."""
    write_latin1_title(tmp_path / "latin1.mkv")
    result, summary = run(runner, project(tmp_path, fps=5), tmp_path / "latin1.mkv")
    assert result.exit_code == 0, result.output
    assert summary["failures"] == [] and summary["new_frames"] == 10  # 2 s at 10 fps, sampled at 5 fps
