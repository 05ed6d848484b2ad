"""What every training loop here shares (`pretrain` and `finetune`): the process group, the learning-rate schedule,
AdamW's weight-decay rule, stopping on Ctrl-C or SIGTERM, the progress bar and peak memory. Each command owns its own
loop."""

import math
import os
import resource
import signal
import threading
import time
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


class Stop:
    """A stop asked for by SIGINT (Ctrl-C) or SIGTERM (what Slurm sends at a job's time limit, Kubernetes before it
    evicts a pod, `timeout` when its time is up): the loop finishes its step, writes a checkpoint and stops, exiting
    with 128 + the signal's number. `now(done)` says whether to stop after step `done`: at once in one process; under
    torchrun (which forwards SIGTERM to every rank; Ctrl-C reaches them all) at the first step that is a multiple of
    `every`, where the ranks agree with one small all-reduce, so all of them stop at the same step and rank 0 writes
    its checkpoint."""

    def __init__(self, world: int, every: int, device: torch.device) -> None:
        self.world, self.every, self.device = world, every, device
        self.signum = 0  # the signal received, 0: none

    def now(self, done: int) -> bool:
        if self.world == 1:
            return self.signum > 0
        if done % self.every:
            return False
        flag = torch.tensor(self.signum, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank, at the same steps: a signal to one rank stops them all
        self.signum = int(flag.item())
        return self.signum > 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


@contextmanager
def stop_on_signals(world: int, every: int, device: torch.device) -> Iterator[Stop]:
    """SIGINT and SIGTERM set a `Stop` for the block (in the main thread); a second signal stops at once."""
    stop = Stop(world, every, device)
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request_stop(signum: int, frame: Any) -> None:
        stop.signum = signum
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


CPU_SIZED = ("[model] preset = \"vit_tiny\", depth = 6, img_size = [48, 96], patch_size = 8 with [pretrain] steps = 1000 "
             "(a few CPU-minutes)")  # what the quickstart trains on a CPU
LONG_ON_CPU = 3 * 3600  # seconds: a CPU run projected past this is told which settings make it fit


def duration(seconds: float) -> str:
    """12 s, 3 min 20 s, 2 h 05 min, 3 d 4 h."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def projection(label: str, steps_left: int, step_seconds: float, elapsed: float, device: torch.device) -> str:
    """The line that says what a run will cost, from its first measured steps; on a CPU, past a few hours, what to
    change to make it fit."""
    left = steps_left * step_seconds
    ends = time.strftime("%Y-%m-%d %H:%M", time.localtime(time.time() + left))
    line = (f"{label}: {step_seconds:.3g} s a step over the first steps: {steps_left:,} steps more take about {duration(left)} "
            f"(ends about {ends}; {duration(elapsed)} so far)")
    if device.type == "cpu" and left > LONG_ON_CPU:
        line += (". That is long for this CPU (the defaults are sized for a GPU): a smaller model or input, or fewer epochs/steps, make it "
                 f"fit; the quickstart's CPU size is {CPU_SIZED}")
    return line


def log_line(label: str, step: int, total: int, epoch: float, loss: float, lr: float, ips: float, wait: float | None,
             elapsed: float, eta: float) -> str:
    """One plain progress line, as the official MAE's logger prints: what a job's log shows off a terminal."""
    return (f"{label}  step {step}/{total}  epoch {epoch:.2f}  loss {loss:.4f}  lr {lr:.2e}  {ips:.1f} img/s"
            + (f"  data wait {100 * wait:.1f}%" if wait is not None else "") + f"  elapsed {duration(elapsed)}  ETA {duration(eta)}")


PROJECT_STEPS = 3  # the steps after the first (which compiles and warms up) that the projected duration is measured on


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
