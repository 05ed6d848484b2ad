"""What every training loop here shares (`pretrain` and `finetune`): the process group, the learning-rate schedule,
AdamW's weight-decay rule, Ctrl-C, the progress bar and peak memory. Each command owns its own loop."""

import math
import os
import resource
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def distributed(device: torch.device) -> Iterator[tuple[int, int]]:
    """(rank, world size) of this process: (0, 1) alone; under torchrun (`RANK` in the environment) the process group
    (NCCL on CUDA, gloo on the CPU) lives for the block."""
    if "RANK" not in os.environ:
        yield 0, 1
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def for_training(raw: torch.nn.Module, device: torch.device, world: int, mode: str | None) -> torch.nn.Module:
    """The module a training loop calls: `raw` (which keeps the weights, for checkpoints) in DDP under torchrun,
    through torch.compile in `mode` unless it is None (`device.compile_mode`)."""
    model = torch.nn.parallel.DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else raw
    return torch.compile(model, mode=mode) if mode else model


def get_lr(step: int, *, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warmup from 0, then a half-cycle cosine from lr to min_lr, evaluated every optimizer step."""
    if step < warmup:
        return lr * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


NO_DECAY = ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed")


def decays(name: str, p: torch.Tensor) -> bool:
    """AdamW's weight decay applies to weight matrices only: not to biases, norm weights (1-D), position embeddings
    and tokens."""
    return not (p.ndim <= 1 or name.endswith(".bias") or name in NO_DECAY)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups for the trainable parameters: [with weight decay, without]."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if decays(name, p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@contextmanager
def stop_on_ctrl_c(enabled: bool) -> Iterator[dict[str, bool]]:
    """Ctrl-C sets `stop["requested"]`: the loop finishes its step, writes a checkpoint and stops; a second Ctrl-C
    stops at once. Single-process only: under torchrun the flag would reach rank 0 alone and desynchronize the
    collectives; torchrun stops its workers, and the run resumes from its last checkpoint."""
    stop = {"requested": False}
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request_stop(signum: int, frame: Any) -> None:
        stop["requested"] = True
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def progress_bar(console: Console | None, label: str) -> Progress:
    """A bar for a training loop's steps, with its epoch, loss, lr and images/s (task fields); hidden off a terminal."""
    return Progress(
        TextColumn(label), BarColumn(), TextColumn("step {task.completed}/{task.total}  epoch {task.fields[epoch]}  "
        "loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[ips]} img/s"), TimeElapsedColumn(), TextColumn("ETA"),
        TimeRemainingColumn(), console=console, disable=console is None or not console.is_terminal,
    )  # fmt: skip


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB
