"""The one data path from the frame store to the model: sampling order, per-sample randomness, prefetching,
and the random resized crop (+ horizontal flip) done in one batched op on the device.

Every random choice is a function of (seed, micro-step): the epoch's permutation, each sample's draws (a method
says what it draws, `maecli.methods`: for MAE a crop, a flip and mask noise) and, for a method that reads frame pairs,
which later frame goes with each earlier one. A global micro-batch is drawn whole and each rank takes its slice, so
one process and N processes see the same global batch, and a resumed run continues bit for bit without saved RNG
state.
"""

import functools
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from maecli.store import FrameStore

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Samples:
    """What one sample reads from the store, as a method declares it (`method.samples(store)`): its first frame is one
    of `first` (store indices); for frame pairs, its second frame is drawn uniformly from the store indices
    [lo, hi) of that first frame (the same video, within the method's time gap)."""

    first: np.ndarray  # (S,) store indices
    lo: np.ndarray | None = None  # (S,) with hi: where the later frame of each first frame may come from
    hi: np.ndarray | None = None

    @classmethod
    def stills(cls, num_frames: int) -> "Samples":
        """Every frame on its own (MAE, SimCLR, CropMAE)."""
        return cls(first=np.arange(num_frames))

    def frames(self, pos: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Store indices (B, F) of the samples at positions `pos` (B,) of `first`; u (B,) in [0, 1) picks the later
        frame of a pair."""
        first = self.first[pos]  # (B,)
        if self.lo is None:
            return first[:, None]
        lo, hi = self.lo[pos], self.hi[pos]
        later = np.minimum(lo + np.floor(u * (hi - lo)).astype(np.int64), hi - 1)  # (B,) uniform over the frames in range
        return np.stack([first, later], axis=1)


@dataclass(frozen=True)
class Plan:
    """Which frames and which random draws each micro-step uses, for one rank."""

    num_frames: int  # samples in an epoch: frames of the split, or first frames of pairs
    batch_size: int  # per rank
    world_size: int
    rank: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def micro_steps_per_epoch(self) -> int:
        return self.num_frames // self.global_batch  # the last incomplete batch of an epoch is dropped

    def indices(self, micro_step: int) -> np.ndarray:
        """Sample positions (`Samples.first`; store indices for stills) for this rank at a micro-step: (B,)."""
        epoch, pos = divmod(micro_step, self.micro_steps_per_epoch)
        perm = np.random.default_rng([self.seed, 0, epoch]).permutation(self.num_frames)
        start = pos * self.global_batch + self.rank * self.batch_size
        return perm[start : start + self.batch_size]

    def rank_slice(self) -> slice:
        return slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)


def crop_boxes(rng: np.random.Generator, n: int, frame_hw: tuple[int, int], out_hw: tuple[int, int], scale: tuple[float, float],
               hflip: bool) -> np.ndarray:
    """Random resized crops as affine maps (n, 2, 3) from output to input coordinates (normalized, align_corners=False).

    Area uniform in `scale` of the frame, aspect ratio log-uniform in [3/4, 4/3] around the output's own
    aspect (so wide outputs get wide crops), clamped to the frame; flipped horizontally with probability 1/2.
    """
    H, W = frame_hw
    area = H * W * rng.uniform(scale[0], scale[1], n)  # (n,)
    ratio = (out_hw[1] / out_hw[0]) * np.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3), n))  # (n,) width / height
    cw = np.minimum(np.sqrt(area * ratio), W)
    ch = np.minimum(np.sqrt(area / ratio), H)
    cx = cw / 2 + rng.uniform(0, 1, n) * (W - cw)  # crop centers, pixels
    cy = ch / 2 + rng.uniform(0, 1, n) * (H - ch)
    flip = np.where(rng.uniform(0, 1, n) < 0.5, -1.0, 1.0) if hflip else np.ones(n)
    theta = np.zeros((n, 2, 3), dtype=np.float32)
    theta[:, 0, 0] = cw / W * flip
    theta[:, 0, 2] = 2 * cx / W - 1
    theta[:, 1, 1] = ch / H
    theta[:, 1, 2] = 2 * cy / H - 1
    return theta


Draw = Callable[[np.random.Generator, int, tuple[int, int]], tuple[np.ndarray, ...]]  # (rng, n, frame_hw) -> arrays of n rows


def step_randomness(plan: Plan, micro_step: int, draw: Draw, frame_hw: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """This rank's rows of the method's random draws (crops, masks, ...) at a micro-step, drawn for the whole global
    batch so that one process and N processes see the same draws."""
    rng = np.random.default_rng([plan.seed, 1, micro_step])
    s = plan.rank_slice()
    return tuple(a[s] for a in draw(rng, plan.global_batch, frame_hw))


def step_frames(plan: Plan, micro_step: int, samples: Samples) -> np.ndarray:
    """This rank's store indices (B, F) at a micro-step: the epoch's samples, and for pairs each later frame, picked
    by a draw of its own stream (the methods' draws stay as they are)."""
    u = np.random.default_rng([plan.seed, 2, micro_step]).random(plan.global_batch)[plan.rank_slice()] if samples.lo is not None else None
    return samples.frames(plan.indices(micro_step), u)


def center_crop(n: int, frame_hw: tuple[int, int], out_hw: tuple[int, int]) -> torch.Tensor:
    """The largest centered crop with the output's aspect ratio, no flip: (n, 2, 3). The whole frame when aspects match."""
    a_frame, a_out = frame_hw[1] / frame_hw[0], out_hw[1] / out_hw[0]  # width / height
    sx, sy = (a_out / a_frame, 1.0) if a_frame > a_out else (1.0, a_frame / a_out)
    return torch.tensor([[sx, 0.0, 0.0], [0.0, sy, 0.0]]).expand(n, 2, 3).contiguous()


@functools.cache
def constant(values: tuple, device: torch.device) -> torch.Tensor:
    """`torch.tensor(values)` on `device`, made once per device: copied from the host at every step, a constant would
    make the host wait for the GPU each time (a synchronizing copy). Shared: never modify it in place."""
    with torch.inference_mode(False):  # usable by training even when first made under inference mode
        return torch.tensor(values, device=device)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1], (B, 3, H, W) -> ImageNet-normalized model input."""
    mean, std = constant(IMAGENET_MEAN, x.device).view(1, 3, 1, 1), constant(IMAGENET_STD, x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Model input (B, 3, H, W) -> pixels in [0, 1]: the inverse of `normalize`, clamped."""
    mean, std = constant(IMAGENET_MEAN, x.device).view(1, 3, 1, 1), constant(IMAGENET_STD, x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def resized_crop(frames: torch.Tensor, theta: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """uint8 frames (B, H, W, 3) + crops (B, 2, 3) -> pixels (B, 3, h, w) in [0, 1], bilinear, on the frames' device."""
    x = frames.permute(0, 3, 1, 2).float().div_(255)  # (B, 3, H, W)
    grid = F.affine_grid(theta.to(x.device), [x.shape[0], 3, *out_hw], align_corners=False)  # (B, h, w, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)  # (B, 3, h, w)


def resized_crop_masks(masks: torch.Tensor, theta: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """uint8 masks (B, H, W) + the crops of their images (B, 2, 3) -> uint8 (B, h, w): the same crops, nearest
    neighbour, so each pixel keeps a class of its own (never a blend of two)."""
    x = masks[:, None].float()  # (B, 1, H, W)
    grid = F.affine_grid(theta.to(x.device), [x.shape[0], 1, *out_hw], align_corners=False)  # (B, h, w, 2)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="border", align_corners=False)[:, 0].round().to(torch.uint8)


def augment(frames: torch.Tensor, theta: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """uint8 frames (B, H, W, 3) + crops (B, 2, 3) -> normalized float images (B, 3, h, w), on the frames' device."""
    return normalize(resized_crop(frames, theta, out_hw))


def store_input(store: FrameStore, indices: np.ndarray, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Store frames -> model input (B, 3, h, w): the largest centered crop of the model's aspect, resized; no augmentation."""
    frames = torch.from_numpy(store.get_batch(indices)).to(device)  # (B, H, W, 3) uint8
    return augment(frames, center_crop(len(frames), store.size, size), size)


def to_input(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames (B, h, w, 3) already at the model's size -> normalized (B, 3, h, w)."""
    return normalize(frames.permute(0, 3, 1, 2).float().div_(255))


class Loader:
    """Prefetches micro-batches in a background thread: store reads and the method's random draws, pinned for CUDA.

    `next()` returns (frames uint8 (B, F, H, W, 3), *draws) on `device` (F: 1, or 2 for frame pairs; for MAE the draws
    are crops (B, 2, 3) and mask noise (B, L)), and adds the time it had to wait to `waited` (seconds): a loader that
    keeps up leaves it near zero.
    """

    def __init__(self, store: FrameStore, samples: Samples, plan: Plan, start: int, device: torch.device, draw: Draw, depth: int = 4) -> None:
        self.store, self.samples, self.plan, self.device, self.draw = store, samples, plan, device, draw
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.waited = 0.0
        self.thread = threading.Thread(target=self._produce, args=(start,), daemon=True)
        self.thread.start()

    def _produce(self, micro_step: int) -> None:
        pin = self.device.type == "cuda"
        try:
            while not self.stop.is_set():
                indices = step_frames(self.plan, micro_step, self.samples)  # (B, F)
                frames = torch.from_numpy(self.store.get_batch(indices.reshape(-1))).view(*indices.shape, *self.store.size, 3)  # (B, F, H, W, 3) uint8
                draws = [torch.from_numpy(a) for a in step_randomness(self.plan, micro_step, self.draw, tuple(self.store.size))]
                item = tuple(t.pin_memory() if pin else t for t in (frames, *draws))
                while not self.stop.is_set():
                    try:
                        self.queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                micro_step += 1
        except Exception as err:  # handed to the consumer, which re-raises it with its traceback
            self.queue.put(err)

    def next(self) -> tuple[torch.Tensor, ...]:
        t = time.perf_counter()
        item = self.queue.get()
        self.waited += time.perf_counter() - t
        if isinstance(item, Exception):
            raise item
        return tuple(x.to(self.device, non_blocking=True) for x in item)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
