"""PyAV decoding and frame sampling: pure functions from a video file to uint8 RGB frames.

Sampling by `fps` picks, for each target time t0 + k / fps (t0: the first frame kept), the first frame
whose presentation timestamp is at or after it, so it is correct for variable frame rates. Only kept
frames are converted to RGB and resized, in one swscale pass: the conversion, not decoding, is the cost.
"""

from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from maecli.files import atomic_write

VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mts", ".ts", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp"}
EPS = 1e-6  # seconds: timestamps are rationals printed as floats
# Metadata that is not UTF-8 (a camera's Latin-1 title) must not make a video unreadable. PyAV < 19 decodes it
# strictly unless told to ignore errors; PyAV 19 removed that argument and always decodes with surrogateescape.
OPEN_OPTIONS = {"metadata_errors": "ignore"} if int(av.__version__.split(".")[0]) < 19 else {}


class VideoError(Exception):
    """A file that cannot be used as a video; the message is the one-line reason."""


def open_video(path: Path, threads: int = 0) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    """Open `path` and pick its first video stream (decoded by `threads` threads, 0: one per core), or raise
    VideoError saying why not."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise VideoError("no such file") from None
    except OSError as err:
        raise VideoError(f"cannot read: {err.strerror}") from None
    if not path.is_file():
        raise VideoError("not a regular file")
    if size == 0:
        raise VideoError("empty file (0 bytes)")
    try:
        container = av.open(str(path), **OPEN_OPTIONS)
    except av.ExitError:  # FFmpeg's interrupt callback saw Ctrl-C: it is the user's, not the file's
        raise KeyboardInterrupt from None
    except PermissionError:
        raise VideoError("cannot read: permission denied") from None
    except (av.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise VideoError(f"not a readable video ({_reason(err)})") from None
    if container.format.name == "image2" or container.format.name.endswith("_pipe"):
        container.close()
        raise VideoError(f"an image ({container.format.name.removesuffix('_pipe')}), not a video")
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["no"]
        container.close()
        raise VideoError(f"no video stream ({', '.join(kinds)} streams only)")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = threads
    return container, stream


def sample_frames(
    path: Path, *, fps: float, every_n: int, start: float = 0.0, end: float = 0.0, threads: int = 0, info: dict[str, Any] | None = None
) -> Iterator[tuple[int, float, av.VideoFrame]]:
    """Yield (frame index, timestamp in seconds, frame) for the sampled frames of `path`'s first video stream.

    fps > 0 samples by timestamp; otherwise every `every_n`-th decoded frame. `start`/`end` bound the time
    range (end 0: to the end). When `start` > 0 the decoder seeks to the keyframe before it, and the frame
    index is derived from the timestamp and the average frame rate. `info`, when given, receives the
    stream's index, codec, size and the number of frames decoded.
    """
    assert (fps > 0) != (every_n > 0), f"sample by fps or by every_n, not both or neither (fps={fps}, every_n={every_n})"
    container, stream = open_video(path, threads)
    info = {} if info is None else info
    info.update(stream=stream.index, codec=stream.codec_context.name, width=stream.width, height=stream.height, decoded=0)
    with container:
        t_base = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        if start > 0:
            container.seek(int((t_base + start) / stream.time_base), stream=stream, backward=True)
        index, t0, k = -1, None, 0  # fps targets are t0 + k / fps, t0 the first kept frame's time
        held = None  # the first frame waits for a second one: a single-frame file is an image, not a video
        try:
            for frame in container.decode(stream):
                info["decoded"] += 1
                if held is not None:
                    yield held
                    held = None
                t = (frame.time - t_base) if frame.time is not None else (info["decoded"] - 1) / (rate or 1.0)
                index = round(t * rate) if start > 0 and rate else index + 1
                if t + EPS < start:
                    continue
                if end > 0 and t > end + EPS:
                    break
                if fps > 0:
                    t0 = t if t0 is None else t0
                    if t + EPS < t0 + k / fps:
                        continue
                    k = int(np.floor((t - t0) * fps + EPS)) + 1  # the next target after t: gaps skip targets
                elif index % every_n:
                    continue
                if info["decoded"] == 1 and start == 0:
                    held = (index, round(t, 6), frame)
                else:
                    yield index, round(t, 6), frame
        except av.ExitError:  # Ctrl-C inside FFmpeg: stop the run, do not record a truncated video
            raise KeyboardInterrupt from None
        except av.FFmpegError as err:
            if info["decoded"] == 0:
                raise VideoError(f"cannot decode the {info['codec']} stream ({_reason(err)})") from None
            raise VideoError(f"decoding failed at {t:.2f} s after {info['decoded']} frames ({_reason(err)})") from None
        if info["decoded"] == 0:
            raise VideoError(f"no decodable frames in the {info['codec']} stream")
        if held is not None:
            raise VideoError("a single frame: an image, not a video")


def to_rgb(frame: av.VideoFrame, size: tuple[int, int], resize: str) -> np.ndarray:
    """Convert one frame to uint8 RGB (H, W, 3) of `size`; resize 'crop' scales the short side then center-crops,
    'stretch' scales to `size` exactly. swscale's area filter antialiases when shrinking."""
    h, w = size
    if resize == "stretch":
        return frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()
    scale = max(h / frame.height, w / frame.width)
    sh, sw = max(h, round(frame.height * scale)), max(w, round(frame.width * scale))
    rgb = frame.reformat(width=sw, height=sh, format="rgb24", interpolation="AREA").to_ndarray()  # (sh, sw, 3)
    top, left = (sh - h) // 2, (sw - w) // 2
    return rgb[top : top + h, left : left + w]


def read_frames(path: Path, size: tuple[int, int], *, fps: float, every_n: int = 0, start: float = 0.0,
                end: float = 0.0) -> list[tuple[int, float, np.ndarray]]:
    """A video's sampled frames as (frame index, seconds, uint8 RGB (h, w, 3) center-cropped to `size`)."""
    return [(i, t, to_rgb(frame, size, "crop")) for i, t, frame in sample_frames(path, fps=fps, every_n=every_n, start=start, end=end)]


def write_h264(path: Path, frames: Iterable[np.ndarray], fps: float, size: tuple[int, int]) -> Path:
    """uint8 RGB frames (h, w, 3) of `size` -> an H.264 MP4, written atomically. Odd sides are padded by one pixel
    (yuv420p needs even ones); one encoder thread, since x264's output depends on its thread count: the same frames
    give the same bytes on every machine."""
    h, w = size
    with atomic_write(path) as tmp, av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = w + w % 2, h + h % 2, "yuv420p"
        stream.codec_context.thread_count = 1
        for rgb in frames:
            rgb = np.pad(rgb, ((0, h % 2), (0, w % 2), (0, 0)))  # (h', w', 3)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return Path(path)


def grey_thumbnail(rgb: np.ndarray, side: int = 32) -> np.ndarray:
    """A small grey float image in [0, 1] for near-duplicate checks: block means, no Python loop over pixels."""
    h, w = rgb.shape[:2]
    bh, bw = max(1, h // side), max(1, w // side)
    g = rgb[: h - h % bh, : w - w % bw].mean(axis=2, dtype=np.float32)  # (H', W')
    return g.reshape(g.shape[0] // bh, bh, g.shape[1] // bw, bw).mean(axis=(1, 3)) / 255.0


def _reason(err: Exception) -> str:
    text = getattr(err, "strerror", None) or str(err)
    return text.strip().split("\n")[0]
