"""`maecli pretrain`: the pretraining loop on one CPU, one GPU, or many through torchrun, for every method (MAE, SimCLR,
SiamMAE, CropMAE: `maecli.methods` says what a method reads, builds, draws and minimises).

One flat loop: set the lr, micro-steps (forward, backward), clip, step, then maybe log, checkpoint and
snapshot. Distributed is one probe (`RANK` in the environment) and an `is_main` flag; only the main
process writes files and prints. Checkpoints (their layout, saving, pruning, resuming) are `maecli.checkpoint`'s.
"""

import json
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console

from maecli import __version__
from maecli.bench import device_peak
from maecli.board import Board
from maecli.checkpoint import checkpoint_files, checkpoint_method, resume_checkpoint, save_checkpoint
from maecli.config import MaecliConfig, dump_toml
from maecli.data import Loader, Plan
from maecli.device import autocast_for, compile_mode, pick_device, precision
from maecli.errors import ConfigError, NonFiniteLoss
from maecli.figures import plot_loss, save_reconstructions
from maecli.files import append_line, keep_lines, owned, write_json, write_text
from maecli.inference import fixed_noise
from maecli.inputs import Inputs, shown_split
from maecli.loop import Steps, compile_scope, distributed, eager, for_training, get_lr, param_groups, peak_memory_mib, set_lr
from maecli.methods import method_of
from maecli.model import MaskedAutoencoder
from maecli.store import FrameStore
from maecli.weights import HEADS, canonical_arch, check_same_arch, load_state, read_weights


@dataclass(frozen=True)
class Schedule:
    """How long the run is and how fast it learns, in optimizer steps."""

    steps_per_epoch: int
    total: int
    warmup: int
    batch: int  # effective: per device x devices x accum_iter
    lr: float  # peak

    @classmethod
    def of(cls, cfg: MaecliConfig, plan: Plan) -> "Schedule":
        pc, store = cfg.pretrain, cfg.extract.store
        if plan.micro_steps_per_epoch < pc.accum_iter:
            raise ConfigError(
                f"pretrain.batch_size: the train split of {store} has {plan.num_frames} frames, fewer than one optimizer step "
                f"needs ({pc.batch_size} x {plan.world_size} devices x {pc.accum_iter} accum_iter)"
            )
        steps_per_epoch = plan.micro_steps_per_epoch // pc.accum_iter
        batch = plan.global_batch * pc.accum_iter
        return cls(steps_per_epoch=steps_per_epoch, total=pc.steps or pc.epochs * steps_per_epoch,
                   warmup=pc.warmup_steps or round(pc.warmup_epochs * steps_per_epoch), batch=batch, lr=method_of(cfg).lr(batch))


# --- the run ------------------------------------------------------------------------------------


def pretrain(cfg: MaecliConfig, *, restart: bool = False, console: Console | None = None) -> dict[str, Any] | None:
    """Train (or resume) the run in `cfg.run_dir`; returns the summary. Under torchrun, every rank calls this."""
    device = pick_device(cfg.project.device)  # before any collective: a bad setting stops every rank at once
    with distributed(device) as (rank, world), owned(cfg.run_dir, "pretrain.run") if rank == 0 else nullcontext():  # the ranks of one run are one owner
        return _run(cfg, restart, console if rank == 0 else None, rank, world, device)


def _run(cfg: MaecliConfig, restart: bool, console: Console | None, rank: int, world: int, device: torch.device) -> dict[str, Any] | None:
    pc, is_main = cfg.pretrain, rank == 0
    store = FrameStore(cfg.extract.store, split="train")
    method = method_of(cfg)
    samples, sample_notes = method.samples(store)
    plan = Plan(num_frames=len(samples.first), batch_size=pc.batch_size, world_size=world, rank=rank, seed=cfg.project.seed)
    sched = Schedule.of(cfg, plan)
    torch.manual_seed(cfg.project.seed)
    raw = method.build().to(device)
    optimizer = torch.optim.AdamW(param_groups(raw, pc.weight_decay), lr=sched.lr, betas=(0.9, 0.95), fused=True)
    if restart and is_main:
        clear_run(cfg.run_dir)
    if world > 1:
        dist.barrier()
    start, notes = load_start(cfg, raw, optimizer, device)
    mode = compile_mode(pc.compile, pc.compile_mode, device, method.flops_per_image() * pc.batch_size)
    model = for_training(raw, device, world, mode)
    log = RunLog(cfg, start, raw, device, method) if is_main else None
    loader = Loader(store, samples, plan, start * pc.accum_iter, device, method.draw)
    first_bad = torch.tensor(-1, device=device)  # the first step whose loss was not finite, found without a host sync
    last_ckpt = None
    steps = Steps("pretrain", start=start, total=sched.total, steps_per_epoch=sched.steps_per_epoch, batch=sched.batch, console=console, device=device,
                  rank=rank, world=world, stop_every=pc.log_every, grace=cfg.project.stop_timeout, mode=mode, scope=compile_scope(mode))
    try:
        with steps:
            for step in range(start, sched.total):
                done = step + 1
                lr = get_lr(step, total=sched.total, warmup=sched.warmup, lr=sched.lr, min_lr=pc.min_lr)
                set_lr(optimizer, lr)
                step_loss = micro_steps(model, method, loader, pc.accum_iter, world, mode == "reduce-overhead", autocast_for(device))
                stopping = steps.stopping(done)
                at_ckpt = done % pc.checkpoint_every == 0 or done == sched.total or stopping
                logs = done % pc.log_every == 0 or at_ckpt
                grad_norm = clip_grads(raw, pc.clip_grad, logs)  # the norm of a step that logs it
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(step_loss), step, first_bad)  # step: a kernel argument, not a copy
                early = steps.ran(done)  # the first steps fill the bar and time the projection
                if logs or early:
                    loss_value = checked_loss(step_loss, first_bad, world, last_ckpt)  # every rank: a collective (and a host sync)
                    if is_main and logs:
                        row = log.metrics(done, done / sched.steps_per_epoch, loss_value, lr, grad_norm.item(), sched.batch, loader.waited)
                        steps.logged(done, row["loss"], lr, row["images_per_s"], row["data_wait"])
                    elif is_main:
                        steps.show(loss_value, lr)
                    if early:
                        steps.timed(done)
                if is_main and at_ckpt:
                    meta = {"method": method.name, "config": json.dumps(cfg.model_dump(mode="json")), "maecli": __version__, "torch": torch.__version__}
                    last_ckpt = save_checkpoint(cfg.run_dir / "checkpoints", done, raw, optimizer, canonical_arch(cfg.model.mae_kwargs), meta, pc.keep_last)
                    with autocast_for(device), eager():
                        log.snapshot(raw, done)
                steps.end(done, at_ckpt, last_ckpt)
    finally:
        loader.close()
    if not is_main:
        return None
    return log.finish(cfg, method, sched, start, loader.waited, notes + sample_notes + method.after_run(log.last_loss, plan.global_batch),
                      device=device, mode=mode, world=world, seconds=time.perf_counter() - steps.t_run)


def micro_steps(model: torch.nn.Module, method: Any, loader: Loader, accum_iter: int, world: int, graphs: bool, autocast: Any) -> torch.Tensor:
    """One optimizer step's forward and backward passes, `accum_iter` micro-batches (gradients synchronised on the last
    one under DDP); returns their mean loss, detached, on the device."""
    for micro in range(accum_iter):
        frames, *draws = loader.next()  # uint8 (B, F, H, W, 3), the method's random draws
        inputs = method.inputs(frames, *draws)  # augmented on the device, in float32
        if graphs:  # CUDA graphs: each forward starts a new replay
            torch.compiler.cudagraph_mark_step_begin()
        with (model.no_sync() if world > 1 and micro < accum_iter - 1 else nullcontext()), autocast:
            loss = method.loss(model, *inputs)
        (loss / accum_iter if accum_iter > 1 else loss).backward()
        step_loss = loss.detach().float() if micro == 0 else step_loss + loss.detach().float()
    return step_loss / accum_iter if accum_iter > 1 else step_loss


# --- the pieces around the loop ------------------------------------------------------------------


def clear_run(run_dir: Path) -> None:
    """--restart: delete what a run wrote, keeping the folder (and anything else a user put there)."""
    for name in ("checkpoints", "snapshots", "metrics.jsonl", "loss.png", "summary.json"):
        target = run_dir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)


def load_start(cfg: MaecliConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> tuple[int, list[str]]:
    """Where training starts: the run's newest checkpoint (model and optimizer), else `init_from`'s weights (the
    encoder at least: another method's head is left out, this method's starts fresh when the file lacks it), else
    step 0 from the seed's initialization. Returns the step and a note for the user."""
    arch, method = canonical_arch(cfg.model.mae_kwargs), method_of(cfg)
    ckpt_dir = cfg.run_dir / "checkpoints"
    if (found := checkpoint_method(ckpt_dir)) not in (None, method.name):
        raise ConfigError(f"{cfg.run_dir}: this run was trained with pretrain.method = {found!r}, not {method.name!r} (use --restart to start over, "
                          "or another pretrain.run)")
    notes: list[str] = []
    start, weights = resume_checkpoint(ckpt_dir, model, optimizer, arch, device, notes)
    if weights is not None:
        return start, notes + [f"resumed from step {start} ({weights})"]
    init_from = cfg.pretrain.init_from
    if not init_from:
        return 0, notes
    state_dict, found_arch = read_weights(Path(init_from))
    decoder = ("decoder_embed_dim", "decoder_depth", "decoder_num_heads") if not method.mae_decoder else ()
    if found_arch is not None:  # norm_pix_loss may change: it is the loss, not the shape
        check_same_arch(found_arch, arch, init_from, "init_from has another model shape", ignore=("norm_pix_loss", *decoder))
    own = model.state_dict()
    state_dict = {k: v for k, v in state_dict.items() if k in own or not k.startswith(HEADS)}  # another method's head stays behind
    missing = load_state(model, state_dict, init_from, encoder_only_ok=True)
    return 0, notes + [f"initialized from {init_from}" + (f" (encoder only: {len(missing)} tensors of the {method.head} start fresh)" if missing else "")]


def clip_grads(model: torch.nn.Module, clip: float, norm: bool) -> torch.Tensor | None:
    """Clip the gradients' global norm to `clip` (0: no clipping) and return the norm before clipping; without
    clipping the norm is computed only when asked (`norm`: a step that logs it), not on every step."""
    if clip > 0 or norm:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
    return None


def checked_loss(step_loss: torch.Tensor, first_bad: torch.Tensor, world: int, last_ckpt: Path | None) -> float:
    """The step's loss averaged over ranks, as a float (a host sync); raises NonFiniteLoss if any step so far had a
    loss that was not finite."""
    if world > 1:
        dist.all_reduce(step_loss)
        dist.all_reduce(first_bad, op=dist.ReduceOp.MAX)
        step_loss /= world
    if first_bad.item() >= 0:
        good = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written"
        raise NonFiniteLoss(f"loss is {step_loss.item()} (not finite) from step {first_bad.item() + 1}; stopped, {good}")
    return step_loss.item()


class RunLog:
    """What the main process writes besides checkpoints: `config.toml`, `metrics.jsonl` (cut back to the step the run
    starts from, so a killed run's extra lines go), for MAE reconstruction snapshots of fixed frames and masks (those
    that `maecli visualize` shows; it shows the other methods' on demand), and at the end `loss.png` and `summary.json`;
    the same scalars and snapshots for TensorBoard where it is installed (`maecli.board`), with the MFU on CUDA."""

    def __init__(self, cfg: MaecliConfig, start: int, model: torch.nn.Module, device: torch.device, method: Any) -> None:
        self.run_dir, self.title = cfg.run_dir, cfg.project.name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_text(self.run_dir / "config.toml", dump_toml(cfg))
        self.metrics_path = self.run_dir / "metrics.jsonl"
        kept = keep_lines(self.metrics_path, lambda r: r["step"] <= start)
        self.last_loss = kept[-1]["loss"] if kept else float("nan")  # a finished run, rerun, still reports its loss
        self.device, self.t, self.waited = device, time.perf_counter(), 0.0
        self.loss_name, self.snapshots = method.loss_name, method.reconstructs == "frames"  # the others' pictures need pairs, or have none
        self.last_step = start
        self.board = Board(self.run_dir, start)
        self.flops, self.peak = method.flops_per_image(), device_peak(device, None)[0] if device.type == "cuda" else None  # MFU: on a GPU of known peak
        if not self.snapshots:
            return
        snap = Inputs(cfg.extract, [], model.img_size, split=shown_split(cfg)[0], limit=cfg.visualize.num_images)
        self.snap_imgs, _ = snap.read(0, len(snap.rows), device)  # (N, 3, h, w)
        self.snap_noise = fixed_noise(cfg.project.seed, len(self.snap_imgs), model.num_patches, device)
        self.mask_ratio = cfg.model.mask_ratio

    def metrics(self, step: int, epoch: float, loss: float, lr: float, grad_norm: float, batch: int, waited: float) -> dict[str, Any]:
        seconds = time.perf_counter() - self.t
        row = dict(step=step, epoch=round(epoch, 3), loss=round(loss, 6), lr=lr, images_per_s=round((step - self.last_step) * batch / seconds, 2),
                   grad_norm=round(grad_norm, 5), data_wait=round((waited - self.waited) / seconds, 4), peak_mem_mib=peak_memory_mib(self.device))
        append_line(self.metrics_path, json.dumps(row))  # a torn last line is dropped on resume
        mfu = self.flops * row["images_per_s"] / self.peak if self.peak else None
        self.board.scalars(step, {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm, "perf/images_per_s": row["images_per_s"],
                                  "perf/data_wait": row["data_wait"], "perf/mfu": mfu})
        self.t, self.waited, self.last_step, self.last_loss = time.perf_counter(), waited, step, loss
        return row

    def snapshot_path(self, step: int) -> Path:
        return self.run_dir / "snapshots" / f"step-{step:08d}.png"

    def snapshot(self, model: MaskedAutoencoder, step: int) -> None:
        if not self.snapshots:
            return
        self.snapshot_path(step).parent.mkdir(exist_ok=True)
        save_reconstructions(model, self.snap_imgs, self.mask_ratio, self.snap_noise, self.snapshot_path(step), f"{self.title}, step {step}")
        self.board.picture("reconstructions", self.snapshot_path(step), step)

    def finish(self, cfg: MaecliConfig, method: Any, sched: Schedule, start: int, waited: float, notes: list[str], *, device: torch.device,
               mode: str | None, world: int, seconds: float) -> dict[str, Any]:
        """The run's summary (`summary.json`, and what `pretrain` returns), after `loss.png`."""
        summary = dict(
            run_dir=str(cfg.run_dir), method=method.name, steps=sched.total, steps_this_run=sched.total - start, epochs=round(sched.total / sched.steps_per_epoch, 3),
            final_loss=round(self.last_loss, 6), seconds=round(seconds, 2), images_per_s=round((sched.total - start) * sched.batch / seconds, 2),
            data_wait_fraction=round(waited / seconds, 4), effective_batch=sched.batch, lr=sched.lr, device=str(device),
            precision=precision(device), compiled=mode is not None, compile_mode=mode, world_size=world,
            checkpoint=str(checkpoint_files(cfg.run_dir / "checkpoints", sched.total)[0]),
            snapshot=str(self.snapshot_path(sched.total)) if self.snapshots else None, loss_curve=str(cfg.run_dir / "loss.png"), notes=notes,
        )  # fmt: skip
        self.board.close()
        plot_loss(self.metrics_path, self.run_dir / "loss.png", self.title, self.loss_name)
        write_json(self.run_dir / "summary.json", summary)
        return summary
