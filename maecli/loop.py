"""What every training loop here shares (`pretrain` and `finetune`): the process group, compiling the model and saying
what that costs, the learning-rate schedule, AdamW's weight-decay rule, stopping on Ctrl-C or SIGTERM, the progress bar
and peak memory, and `Steps`, the machinery around a loop's steps. Each command keeps only its step body and its records."""

import math
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from maecli.errors import Interrupted


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


REGIONS = ("blocks", "decoder_blocks")  # a model's stacks of repeated transformer blocks (the MAE's, timm's ViT's)


def for_training(raw: torch.nn.Module, device: torch.device, world: int, mode: str | None, *, regional: bool = True) -> torch.nn.Module:
    """The module a training loop calls: `raw` (which keeps the weights and their names, for checkpoints) in DDP under
    torchrun, compiled in `mode` unless it is None (`device.compile_mode`).

    Which part is compiled is `compile_scope`'s: the whole model for CUDA graphs, else (when `regional`) each
    transformer block in place. Eager code reading `raw` afterwards (snapshots, validation) runs under `eager()`."""
    scope = compile_scope(mode, regional)
    blocks = [block for name, stack in raw.named_modules() if name.rsplit(".", 1)[-1] in REGIONS for block in stack] if scope == "blocks" else []
    for block in blocks:
        block.compile(mode=mode, dynamic=False)
    model = torch.nn.parallel.DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else raw
    whole = scope == "model" or (scope == "blocks" and not blocks)  # a model without such stacks (a baseline of bench's) compiles whole
    return torch.compile(model, mode=mode, dynamic=False) if whole else model


def compile_scope(mode: str | None, regional: bool = True) -> str | None:
    """What torch.compile compiles: None (eager); "model", the whole model, for CUDA graphs (reduce-overhead: one replay
    for the whole forward and backward is their point) or when `regional` is off; else "blocks": each transformer block
    on its own (regional compilation, as PyTorch advises for transformer stacks). Blocks of one shape share one
    compiled graph, so the cold start is one block's compile (and the decoder's), whatever the depth: ViT-B/16's first
    step took 11.9 s on an H200 against the whole model's 53.3 s, for a step 4% slower. The blocks must be alike:
    fine-tuning with drop path gives each block a rate of its own, so a compile each, and compiles the whole model."""
    if mode is None:
        return None
    return "model" if mode == "reduce-overhead" or not regional else "blocks"


def eager() -> Any:
    """A block in which compiled modules run eagerly: evaluation and pictures on `raw`, whose blocks a regional compile
    compiled for training (other batch sizes, no gradients: they would compile again for nothing)."""
    return torch.compiler.set_stance("force_eager")


def compiled_graphs() -> int:
    """How many graphs torch.compile has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


class CompileWatch:
    """What a compiled run's compile costs, said where the user reads it: a line before the first step (which compiles
    the model and can take minutes), its duration after it, and once, a line when the model compiles again after its
    first steps (a changing shape or a guard that fails every few steps: each recompile stalls the run)."""

    def __init__(self, label: str, mode: str | None, scope: str | None, device: torch.device, say: Any) -> None:
        self.label, self.mode, self.say = label, mode, say
        self.graphs, self.said = -1, False
        if mode is not None:
            what = "its transformer blocks" if scope == "blocks" else "the whole model"
            say(f"{label}: compiling the model for {device} (torch.compile, mode {mode}, {what}): the first step takes longer")

    def first_step(self, seconds: float) -> None:
        if self.mode is not None:
            self.say(f"{self.label}: compiled; the first step took {duration(seconds)}")

    def steady(self) -> None:
        """After the first steps: what is compiled now is the model's own."""
        if self.mode is not None:
            self.graphs = compiled_graphs()

    def check(self, step: int) -> None:
        if self.graphs < 0 or self.said or (more := compiled_graphs() - self.graphs) <= 0:
            return
        self.said = True
        self.say(f"{self.label}: torch.compile compiled again by step {step} ({more} graph{'s' * (more != 1)} more than after the first steps); "
                 "each recompile stalls the run: TORCH_LOGS=recompiles says why")


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


class StopNow(BaseException):
    """Raised by the signal handler itself when no step has finished: it unwinds whatever runs, torch.compile's
    compiler included (a BaseException: no `except Exception` on the way swallows it)."""


class Stop:
    """A stop asked for by SIGINT (Ctrl-C) or SIGTERM (what Slurm sends at a job's time limit, Kubernetes before it
    evicts a pod, `timeout` when its time is up), exiting with 128 + the signal's number.

    Before the run's first step has finished (`started` is False) there is nothing new to save: the signal ends the
    run at once, also in the middle of a compile. After it, the loop finishes its step, writes a checkpoint and stops.
    `now(done)` says whether to stop after step `done`: at once in one process; under torchrun (which forwards SIGTERM
    to every rank; Ctrl-C reaches them all) at the first step that is a multiple of `every`, where the ranks agree
    with one small all-reduce, so all of them stop at the same step and rank 0 writes its checkpoint. Either way, a
    process still running `grace` seconds after the signal (a compile, a hung collective) exits then, writing nothing
    new: the grace period a scheduler gives before SIGKILL is not spent waiting."""

    def __init__(self, world: int, every: int, device: torch.device, grace: float) -> None:
        self.world, self.every, self.device, self.grace = world, every, device, grace
        self.signum = 0  # the signal received, 0: none
        self.started = False

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

    def give_up(self, signum: int) -> None:
        """The grace period is over: one line, and the process ends here (a checkpoint being written stays a temporary
        file: nothing half-written is ever shown as a checkpoint)."""
        line = (f"interrupted ({signal.Signals(signum).name}): still running {self.grace:g} s after the signal (project.stop_timeout); "
                "stopped without a new checkpoint; run the same command again to resume from the last one\n")
        os.write(sys.stderr.fileno(), line.encode())
        os._exit(128 + signum)


@contextmanager
def stop_on_signals(world: int, every: int, device: torch.device, grace: float) -> Iterator[Stop]:
    """SIGINT and SIGTERM set a `Stop` for the block (in the main thread); a second signal stops at once."""
    stop = Stop(world, every, device, grace)
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request_stop(signum: int, frame: Any) -> None:
        stop.signum = signum
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        timer = threading.Timer(stop.grace, stop.give_up, (signum,))
        timer.daemon = True  # it never holds up a process that ends
        timer.start()
        if not stop.started:
            raise StopNow

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    except StopNow:
        raise Interrupted(f"interrupted ({stop.name}) before the first step finished: nothing new to save; run the same command again to "
                          "start it", signum=stop.signum) from None
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


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """This step's learning rate, scaled by each group's `lr_scale` where it has one (layer-wise decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr


class Steps:
    """The machinery around a training loop's steps, once for `pretrain` and `finetune`: the progress bar (off a terminal,
    a plain line per logged step instead), what the compile costs (`CompileWatch`), the duration projected from the
    first steps, and Ctrl-C / SIGTERM (`stop_on_signals`): the loop finishes its step, writes a checkpoint and ends with
    one line, every rank at the same step under torchrun. A loop reads:

        with Steps("pretrain", ...) as steps:
            for step in range(start, total):
                ...                                  # the step body: forward, backward, optimizer step
                if steps.ran(done):                  # True on the first steps: `show` the loss, then `timed`
                    ...
                stopping = steps.stopping(done)      # a signal came (agreed by the ranks every `stop_every` steps)
                ...                                  # log (`logged`), checkpoint when due or stopping
                steps.end(done, checkpointed, path)  # raises Interrupted after a stop
    """

    def __init__(self, label: str, *, start: int, total: int, steps_per_epoch: int, batch: int, console: Console | None, device: torch.device,
                 rank: int, world: int, stop_every: int, grace: float, mode: str | None, scope: str | None) -> None:
        self.label, self.start, self.total, self.steps_per_epoch, self.batch = label, start, total, steps_per_epoch, batch
        self.console, self.device, self.rank, self.world = console, device, rank, world
        self.plain = console is not None and not console.is_terminal  # nohup, Slurm, `2> log`: plain lines instead of the bar
        self.t_run, self.t_first, self.asked = time.perf_counter(), 0.0, False
        self.watch = CompileWatch(label, mode, scope, device, self.say)
        self._signals, self.progress = stop_on_signals(world, stop_every, device, grace), progress_bar(console, label)

    def __enter__(self) -> "Steps":
        self._stack = ExitStack()
        self.stop = self._stack.enter_context(self._signals)
        self._stack.enter_context(self.progress)
        self.task = self.progress.add_task(self.label, total=self.total, completed=self.start, epoch=self.start // self.steps_per_epoch,
                                           loss="-", lr="-", ips="-")
        return self

    def __exit__(self, *exc: Any) -> bool:
        return self._stack.__exit__(*exc)

    def say(self, line: str) -> None:
        if self.console is not None:
            self.console.print(line, markup=False, soft_wrap=True)

    def stopping(self, done: int) -> bool:
        """Stop after step `done`? (A collective under torchrun, every `stop_every` steps: every rank calls it.)"""
        self.asked = self.stop.now(done)
        return self.asked

    def ran(self, done: int) -> bool:
        """Step `done` has run: a signal now stops at a checkpoint. True on the first steps, which `timed` times."""
        self.stop.started = True
        return done - self.start in (1, 1 + PROJECT_STEPS)

    def timed(self, done: int) -> None:
        """After the first step, what its compile took; PROJECT_STEPS later, the run's projected duration."""
        now = time.perf_counter()
        if done - self.start == 1:
            self.t_first = now
            self.watch.first_step(now - self.t_run)
            return
        self.watch.steady()
        if self.console is not None and done < self.total:
            step_seconds = (now - self.t_first) / PROJECT_STEPS
            self.progress.update(self.task, ips=f"{self.batch / step_seconds:.1f}")
            self.say(projection(self.label, self.total - done, step_seconds, now - self.t_run, self.device))

    def show(self, loss: float, lr: float) -> None:
        self.progress.update(self.task, loss=f"{loss:.4f}", lr=f"{lr:.2e}")

    def logged(self, done: int, loss: float, lr: float, ips: float, wait: float | None) -> None:
        """A logged step: the bar's fields, off a terminal one plain line; a recompile since the first steps, said once."""
        self.watch.check(done)
        self.progress.update(self.task, epoch=done // self.steps_per_epoch, loss=f"{loss:.4f}", lr=f"{lr:.2e}", ips=f"{ips:.1f}")
        if self.plain:
            elapsed = time.perf_counter() - self.t_run
            self.say(log_line(self.label, done, self.total, done / self.steps_per_epoch, loss, lr, ips, wait, elapsed,
                              (self.total - done) * elapsed / (done - self.start)))

    def end(self, done: int, checkpointed: bool, last_ckpt: Path | None) -> None:
        """The step's end. After a stop (asked during the step, or during its checkpoint, which is written already) the
        ranks meet, so that rank 0's checkpoint is written before any rank ends (torchrun stops the rest when one
        ends), and the run ends with one line."""
        self.progress.update(self.task, completed=done)
        if self.asked or (checkpointed and self.stopping(done)):
            if self.world > 1:
                dist.barrier()
            raise Interrupted(f"interrupted ({self.stop.name}): checkpoint written at step {done} ({last_ckpt if self.rank == 0 else 'by rank 0'}); "
                              "run the same command again to resume", signum=self.stop.signum)
