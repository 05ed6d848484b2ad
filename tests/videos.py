"""Videos made with PyAV for the tests: real encoded files, tiny and fast to write."""

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def frame_image(i: int, h: int, w: int) -> np.ndarray:
    """A frame that differs clearly from its neighbours: a diagonal pattern moving with i."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = ((x + y + 9 * i) % 32) * 8
    img[..., 1] = ((2 * x + 5 * i) % 64) * 4
    img[..., 2] = 255 - img[..., 0]
    return img


def write_video(path: Path, n: int = 90, fps: int = 30, h: int = 48, w: int = 64, *, times_ms: list[int] | None = None,
                images: list[np.ndarray] | None = None, codec: str = "libx264", title: str | None = None) -> Path:
    """Constant frame rate by default; `times_ms` gives each frame's timestamp (variable frame rate, in .mkv)."""
    with av.open(str(path), "w") as c:
        if title is not None:
            c.metadata["title"] = title
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.thread_count = 1  # encoders' output depends on their thread count: fixed, so test videos are identical everywhere
        if times_ms is not None:
            s.codec_context.time_base = Fraction(1, 1000)
        frames = images if images is not None else [frame_image(i, h, w) for i in range(len(times_ms) if times_ms else n)]
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            if times_ms is not None:
                frame.pts, frame.time_base = times_ms[i], Fraction(1, 1000)
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


def write_audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        for _ in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


def write_undecodable(path: Path) -> Path:
    """A well-formed Matroska file whose H.264 stream is noise: the container opens, no frame decodes."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", format="matroska") as c:
        s = c.add_stream("h264", rate=30)
        s.width, s.height = 64, 48
        for i in range(20):
            packet = av.Packet(rng.integers(0, 256, 400, dtype=np.uint8).tobytes())
            packet.stream, packet.pts, packet.dts, packet.time_base = s, i, i, Fraction(1, 30)
            c.mux(packet)
    return path


def write_latin1_title(path: Path) -> Path:
    """A 2 s, 10 fps video whose title tag is Latin-1, not UTF-8 (as some cameras write it): the bytes are patched in
    after writing, since PyAV only writes UTF-8."""
    placeholder = "MAECLI-TITLE-PLACEHOLDER"
    data = write_video(path, n=20, fps=10, title=placeholder).read_bytes()
    assert data.count(placeholder.encode()) == 1, "the title must appear once to be patched"
    path.write_bytes(data.replace(placeholder.encode(), "Caméra Fahrt n°1 ÄÖÜ".encode("latin-1").ljust(len(placeholder))))
    return path
