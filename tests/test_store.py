"""The frame store's formats and places: JPEG WebDataset shards (the default) beside raw arrays, a folder or an S3
bucket (a real S3 server, moto's, on loopback, reached through the same client a user's bucket is), and each bad
input said in one line."""

import itertools
import json
import logging
import os
import socket
from pathlib import Path

import numpy as np
import pytest

from maecli.cli import app
from maecli.store import FrameStore
from tests.conftest import write_project
from tests.videos import frame_image, write_video

BUCKETS = itertools.count()  # one moto backend per process: a new bucket for each test


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    for i in range(3):
        write_video(d / f"v{i}.mp4", n=40, fps=10, images=[frame_image(13 * i + j, 48, 64) for j in range(40)])
    return d


@pytest.fixture
def s3(monkeypatch, tmp_path):
    """An S3 server on loopback, credentials and endpoint in the environment (as for any bucket), an empty bucket."""
    import fsspec
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = dict(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
               AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true",
               MAECLI_CACHE=str(tmp_path / "cache"))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    bucket = f"maecli-test-{next(BUCKETS)}"
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(bucket)
    yield f"s3://{bucket}"
    server.stop()


def extract(runner, folder: Path, videos: Path, **settings) -> dict:
    config = write_project(folder, settings.pop("store", folder / "frames"), extract=dict(fps=10, val_fraction=0.3, shard_frames=16, **{"workers": 1, **settings}))
    result = runner.invoke(app, ["extract", "-c", str(config), "--json", str(videos)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_jpeg_store_is_a_webdataset_of_the_raw_frames_several_times_smaller(runner, tmp_path, videos):
    import webdataset as wds

    (tmp_path / "raw").mkdir()
    (tmp_path / "jpeg").mkdir()
    raw = extract(runner, tmp_path / "raw", videos, format="raw")
    jpeg = extract(runner, tmp_path / "jpeg", videos)  # the default
    assert jpeg["format"] == "jpeg" and raw["format"] == "raw" and jpeg["frames"] == raw["frames"]
    a, b = FrameStore(tmp_path / "raw" / "frames"), FrameStore(tmp_path / "jpeg" / "frames")
    assert [v["timestamps"] for v in a.videos] == [v["timestamps"] for v in b.videos]
    idx = np.random.default_rng(0).permutation(len(a))
    x, y = a.get_batch(idx).astype(int), b.get_batch(idx).astype(int)
    assert 0 < np.abs(x - y).mean() < 10  # quality 90, 4:2:0 chroma, on saturated 32x32 stripes (dashcam frames at 224x398: 1.3)
    assert b.spans[:, 1].sum() * 2 < a.info()["bytes"] < b.info()["bytes"] * 2  # 32x32 JPEGs (~600 bytes of tables each), in 512-byte tar blocks
    # the shards are WebDataset's: its own reader streams them, one sample per frame, keys in frame order
    for video, start in zip(b.videos, b.video_offsets.tolist()):
        urls = [str(tmp_path / "jpeg" / "frames" / "shards" / name) for name, *_ in video["shards"]]
        samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
        assert [s["__key__"] for s in samples] == [f"{video['fingerprint']}_{i:06d}" for i in range(len(video["timestamps"]))]
        assert np.array_equal(np.stack([s["jpg"] for s in samples]), b.get_batch(np.arange(start, start + len(samples))))


def test_a_raw_store_of_an_older_maecli_reads_and_converts_to_jpeg(runner, tmp_path, videos):
    extract(runner, tmp_path, videos, format="raw")
    meta = json.loads((tmp_path / "frames" / "store.json").read_text())
    for k in ("format", "quality"):  # what a store written before formats existed lacks
        del meta["settings"][k]
    (tmp_path / "frames" / "store.json").write_text(json.dumps(meta))
    old = FrameStore(tmp_path / "frames")
    result = runner.invoke(app, ["store", "convert", str(tmp_path / "frames"), str(tmp_path / "converted"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["format"] == "jpeg" and summary["videos_converted"] == 3 and summary["bytes"] < summary["source_bytes"]
    new = FrameStore(tmp_path / "converted")
    assert [v["timestamps"] for v in new.videos] == [v["timestamps"] for v in old.videos] and new.info()["frames"] == old.info()["frames"]
    assert 0 < np.abs(new.get_batch(np.arange(len(new))).astype(int) - old.get_batch(np.arange(len(old)))).mean() < 10
    again = runner.invoke(app, ["store", "convert", str(tmp_path / "frames"), str(tmp_path / "converted"), "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout)["videos_converted"] == 0  # done: nothing redone


def test_extract_into_and_pretrain_from_an_s3_bucket_with_a_bounded_cache(runner, tmp_path, videos, s3, monkeypatch):
    (tmp_path / "local").mkdir()
    (tmp_path / "remote").mkdir()
    local = extract(runner, tmp_path / "local", videos)
    url = f"{s3}/fleet/frames"
    remote = extract(runner, tmp_path / "remote", videos, store=url, workers=2)
    assert remote["store"] == url and remote["frames"] == local["frames"] and remote["bytes"] == local["bytes"] and remote["videos_extracted"] == 3
    assert not (tmp_path / "remote" / "frames").exists()  # nothing of it on local disk but the cache
    a, b = FrameStore(tmp_path / "local" / "frames"), FrameStore(url)
    assert np.array_equal(a.get_batch(np.arange(len(a))), b.get_batch(np.arange(len(b))))  # the same bytes, from the bucket
    again = extract(runner, tmp_path / "remote", videos, store=url)
    assert again["videos_extracted"] == 0 and again["videos_skipped"] == 3  # resumes from the bucket's records
    # pretrain from the bucket through a cache bounded to ~3 shards (each ~6 KB): it evicts as it goes
    monkeypatch.setenv("MAECLI_CACHE_GB", "2e-5")
    config = write_project(tmp_path / "remote", url, pretrain=dict(steps=6, checkpoint_every=6, log_every=1))
    result = runner.invoke(app, ["pretrain", "-c", str(config), "--json"])
    assert result.exit_code == 0, result.output
    assert np.isfinite(json.loads(result.stdout)["final_loss"])
    cached = [p for p in (Path(os.environ["MAECLI_CACHE"]) / "stores").glob("*/shards/*")]
    shard_bytes = max(n for v in b.videos for _, _, n in v["shards"])
    assert 0 < len(cached) and sum(p.stat().st_size for p in cached) <= 20_000 + 8 * shard_bytes  # the bound, plus one batch's shards in use
    result = runner.invoke(app, ["store", "info", url])
    assert result.exit_code == 0 and result.output.startswith(f"{url} (frame store format 1, jpeg frames)")


def test_bad_stores_and_buckets_are_one_line_each(runner, tmp_path, videos, s3, monkeypatch):
    extract(runner, tmp_path, videos)
    root = tmp_path / "frames"
    store = FrameStore(root)
    name, _, size = store.videos[0]["shards"][0]
    video = store.videos[0]

    def info(where) -> tuple[int, str]:
        result = runner.invoke(app, ["store", "info", str(where)])
        assert result.exit_code != 0 and "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1, result.output
        return result.exit_code, result.stderr.strip()

    shard = root / "shards" / name
    data = shard.read_bytes()
    shard.write_bytes(data[: size // 2])  # truncated: a copy cut short
    assert info(root) == (2, f"{root}/shards/{name}: {size // 2:,} bytes, its record says {size:,} (truncated or overwritten); "
                             f"delete videos/{video['fingerprint']}.json and run 'maecli extract' again")
    shard.unlink()
    assert info(root) == (2, f"{root}/shards/{name}: missing, so video {video['source']} is incomplete; "
                             f"delete videos/{video['fingerprint']}.json and run 'maecli extract' again")
    corrupt = bytearray(data)  # the same size, frame 2's JPEG overwritten: found when read
    offset, length = video["spans"][2]
    corrupt[offset: offset + length] = bytes(length)
    shard.write_bytes(bytes(corrupt))
    result = runner.invoke(app, ["store", "convert", str(root), str(tmp_path / "copy"), "--format", "raw"])  # reads every frame
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.stderr.strip().startswith(f"{root}/shards/{name}: frame 2 (video {video['source']} at 0.20 s) does not decode (")
    (root / "store.json").unlink()  # the index of the store
    assert info(root) == (2, f"{root}: not a frame store (no store.json; create one with 'maecli extract')")

    url = f"{s3}/nothing-here"
    assert info(url) == (2, f"{url}: not a frame store (no store.json; create one with 'maecli extract')")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    code, line = info(url)
    assert code == 2 and line.startswith(f"{url}/store.json: no credentials for this store (NoCredentialsError)"), line
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{s.getsockname()[1]}")
    code, line = info(url)
    assert code == 2 and line.startswith(f"{url}/store.json: unreachable (EndpointConnectionError: "), line
