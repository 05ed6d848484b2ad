"""`maecli pretrain`: the MAE pretraining loop on one CPU, one GPU, or many through torchrun.

One flat loop: set the lr, micro-steps (forward, backward), clip, step, then maybe log, checkpoint and
snapshot. Distributed is one probe (`RANK` in the environment) and an `is_main` flag; only the main
process writes files and prints. A checkpoint is a pair written in order, each atomically:
`step-N.state.pt` (optimizer state, tool-written, loaded weights-only) then `step-N.safetensors` (the
weights with the resolved config in their metadata); the newest complete pair is where a run resumes.
"""

import json
import math
import os
import resource
import shutil
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from maecli import __version__
from maecli.checkpoint import canonical_arch, check_same_arch, checkpoint_steps, load_state, read_weights, save_weights
from maecli.config import MaecliConfig, dump_toml
from maecli.data import Loader, Plan, augment
from maecli.device import autocast_for, pick_device, precision
from maecli.errors import ConfigError, Interrupted, MaecliError
from maecli.model import MaskedAutoencoder
from maecli.files import atomic_write, write_json, write_text
from maecli.store import FrameStore
from maecli.visualize import fixed_noise, load_frames, save_reconstructions


class NonFiniteLoss(MaecliError):
    pass


def get_lr(step: int, *, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warmup from 0, then a half-cycle cosine from lr to min_lr, evaluated every optimizer step."""
    if step < warmup:
        return lr * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


NO_DECAY = ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norm weights (1-D), position embeddings and tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in NO_DECAY else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --- checkpoints --------------------------------------------------------------------------------


def save_checkpoint(ckpt_dir: Path, step: int, model: MaskedAutoencoder, optimizer: torch.optim.Optimizer, cfg: MaecliConfig,
                    arch: dict[str, Any], keep_last: int) -> Path:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = ckpt_dir / f"step-{step:08d}.state.pt"
    with atomic_write(state) as tmp:
        torch.save({"step": step, "optimizer": optimizer.state_dict()}, tmp)
    weights = ckpt_dir / f"step-{step:08d}.safetensors"
    meta = {"step": str(step), "config": json.dumps(cfg.model_dump(mode="json")), "maecli": __version__, "torch": torch.__version__}
    save_weights(weights, model.state_dict(), arch, meta)
    for old in checkpoint_steps(ckpt_dir)[:-keep_last]:
        for p in (ckpt_dir / f"step-{old:08d}.safetensors", ckpt_dir / f"step-{old:08d}.state.pt"):
            p.unlink(missing_ok=True)
    return weights


# --- the run ------------------------------------------------------------------------------------


def pretrain(cfg: MaecliConfig, *, restart: bool = False, console: Console | None = None) -> dict[str, Any] | None:
    """Train (or resume) the run in `cfg.run_dir`; returns the summary. Under torchrun, every rank calls this."""
    distributed = "RANK" in os.environ
    device = pick_device(cfg.project.device)  # before any collective: a bad setting stops every rank at once
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    is_main = rank == 0
    console = console if is_main else None
    try:
        return _run(cfg, restart, console, rank, world, device, is_main)
    finally:
        if distributed:
            dist.destroy_process_group()


def _run(cfg: MaecliConfig, restart: bool, console: Console | None, rank: int, world: int, device: torch.device, is_main: bool) -> dict[str, Any] | None:
    pc, mc = cfg.pretrain, cfg.model
    run_dir, ckpt_dir = cfg.run_dir, cfg.run_dir / "checkpoints"
    store = FrameStore(cfg.extract.store, split="train")
    plan = Plan(num_frames=len(store), batch_size=pc.batch_size, world_size=world, rank=rank, seed=cfg.project.seed)
    if plan.micro_steps_per_epoch < pc.accum_iter:
        raise ConfigError(
            f"pretrain.batch_size: the train split of {cfg.extract.store} has {len(store)} frames, fewer than one optimizer step "
            f"needs ({pc.batch_size} x {world} devices x {pc.accum_iter} accum_iter)"
        )
    steps_per_epoch = plan.micro_steps_per_epoch // pc.accum_iter
    total = pc.steps or pc.epochs * steps_per_epoch
    warmup = pc.warmup_steps or round(pc.warmup_epochs * steps_per_epoch)
    eff_batch = pc.batch_size * world * pc.accum_iter
    peak_lr = pc.lr or pc.blr * eff_batch / 256

    arch = canonical_arch(mc.mae_kwargs)
    torch.manual_seed(cfg.project.seed)
    raw = MaskedAutoencoder(**mc.mae_kwargs).to(device)
    optimizer = torch.optim.AdamW(param_groups(raw, pc.weight_decay), lr=peak_lr, betas=(0.9, 0.95), fused=True)

    if restart and is_main and run_dir.exists():
        for name in ("checkpoints", "snapshots", "metrics.jsonl", "loss.png", "summary.json"):
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    if world > 1:
        dist.barrier()
    done = checkpoint_steps(ckpt_dir)
    start, notes = 0, []
    if done:
        start = done[-1]
        weights = ckpt_dir / f"step-{start:08d}.safetensors"
        state_dict, found = read_weights(weights)
        check_same_arch(found, arch, run_dir, "this run was trained with another model shape (use --restart to start over, or another pretrain.run)")
        load_state(raw, state_dict, weights)
        optimizer.load_state_dict(torch.load(ckpt_dir / f"step-{start:08d}.state.pt", map_location=device, weights_only=True)["optimizer"])
        notes.append(f"resumed from step {start} ({weights})")
    elif pc.init_from:
        state_dict, found = read_weights(Path(pc.init_from))
        if found is not None:  # norm_pix_loss may change: it is the loss, not the shape
            check_same_arch(found, arch, pc.init_from, "init_from has another model shape", ignore=("norm_pix_loss",))
        missing = load_state(raw, state_dict, pc.init_from, encoder_only_ok=True)
        notes.append(f"initialized from {pc.init_from}" + (f" (encoder only: {len(missing)} decoder tensors start fresh)" if missing else ""))

    model: torch.nn.Module = raw
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None)
    compiled = pc.compile is True or (pc.compile == "auto" and device.type == "cuda")
    if compiled:
        model = torch.compile(model)
    autocast = autocast_for(device)

    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "config.toml", dump_toml(cfg))
        metrics_path = run_dir / "metrics.jsonl"
        kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= start] if metrics_path.exists() else []
        metrics_path.write_text("".join(line + "\n" for line in kept))  # drop what a killed run logged past its checkpoint
        # the same frames and masks as `maecli visualize` shows: snapshots at every checkpoint
        snap_imgs, _ = load_frames(cfg, [], cfg.visualize.num_images, 0.0, 0.0, mc.img_size, device, [])
        snap_noise = fixed_noise(cfg.project.seed, len(snap_imgs), raw.num_patches, device)

    stop = {"requested": False}
    previous_handler = None
    # Ctrl-C finishes the step and writes a checkpoint. One process only: under torchrun the flag would reach rank 0
    # alone and desynchronize the collectives; torchrun stops its workers, and the run resumes from its last checkpoint.
    if world == 1 and threading.current_thread() is threading.main_thread():

        def request_stop(signum: int, frame: Any) -> None:
            stop["requested"] = True
            signal.signal(signal.SIGINT, previous_handler)  # a second Ctrl-C stops at once

        previous_handler = signal.signal(signal.SIGINT, request_stop)

    loader = Loader(store, plan, start * pc.accum_iter, device, mc.img_size, raw.num_patches, pc.crop_scale, pc.hflip)
    progress = Progress(
        TextColumn("pretrain"), BarColumn(), TextColumn("step {task.completed}/{task.total}  epoch {task.fields[epoch]}  "
        "loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[ips]} img/s"), TimeElapsedColumn(), TextColumn("ETA"),
        TimeRemainingColumn(), console=console, disable=console is None or not console.is_terminal,
    )  # fmt: skip
    first_bad = torch.tensor(-1, device=device)  # the first step whose loss was not finite, found without a host sync
    last_loss = json.loads(kept[-1])["loss"] if is_main and kept else float("nan")  # a finished run, rerun, still reports its loss
    last_ckpt, t_run = None, time.perf_counter()
    t_log, images_since, wait_since = time.perf_counter(), 0, 0.0
    try:
        with progress:
            task = progress.add_task("pretrain", total=total, completed=start, epoch=start // steps_per_epoch, loss="-", lr="-", ips="-")
            for step in range(start, total):
                lr = get_lr(step, total=total, warmup=warmup, lr=peak_lr, min_lr=pc.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = torch.zeros((), device=device)
                for micro in range(pc.accum_iter):
                    frames, theta, noise = loader.next()
                    imgs = augment(frames, theta, mc.img_size)  # (B, 3, h, w)
                    sync = micro == pc.accum_iter - 1
                    with (model.no_sync() if world > 1 and not sync else nullcontext()), autocast:
                        loss, _, _ = model(imgs, mask_ratio=mc.mask_ratio, noise=noise)
                    (loss / pc.accum_iter).backward()
                    loss_sum += loss.detach().float()
                grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), pc.clip_grad if pc.clip_grad > 0 else float("inf"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step_loss = loss_sum / pc.accum_iter
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(step_loss), torch.tensor(step, device=device), first_bad)
                images_since += eff_batch
                done_steps = step + 1
                at_ckpt = done_steps % pc.checkpoint_every == 0 or done_steps == total
                if done_steps % pc.log_every == 0 or at_ckpt or stop["requested"]:
                    if world > 1:
                        dist.all_reduce(step_loss)
                        dist.all_reduce(first_bad, op=dist.ReduceOp.MAX)
                        step_loss /= world
                    if first_bad.item() >= 0:
                        good = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written"
                        raise NonFiniteLoss(f"loss is {step_loss.item()} (not finite) from step {first_bad.item() + 1}; stopped, {good}")
                    last_loss = step_loss.item()
                    seconds = time.perf_counter() - t_log
                    if is_main:
                        row = dict(step=done_steps, epoch=round(done_steps / steps_per_epoch, 3), loss=round(last_loss, 6), lr=lr,
                                   images_per_s=round(images_since / seconds, 2), grad_norm=round(grad_norm.item(), 5),
                                   data_wait=round((loader.waited - wait_since) / seconds, 4), peak_mem_mib=peak_memory_mib(device))
                        with open(run_dir / "metrics.jsonl", "a") as f:
                            f.write(json.dumps(row) + "\n")
                        progress.update(task, epoch=done_steps // steps_per_epoch, loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", ips=f"{row['images_per_s']:.1f}")
                    t_log, images_since, wait_since = time.perf_counter(), 0, loader.waited
                if is_main and (at_ckpt or stop["requested"]):
                    last_ckpt = save_checkpoint(ckpt_dir, done_steps, raw, optimizer, cfg, arch, pc.keep_last)
                    (run_dir / "snapshots").mkdir(exist_ok=True)
                    with autocast:
                        save_reconstructions(raw, snap_imgs, mc.mask_ratio, snap_noise, run_dir / "snapshots" / f"step-{done_steps:08d}.png",
                                             f"{cfg.project.name}, step {done_steps}")
                progress.update(task, completed=done_steps)
                if stop["requested"]:
                    raise Interrupted(f"interrupted: checkpoint written at step {done_steps} ({last_ckpt}); run the same command again to resume")
    finally:
        loader.close()
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)

    seconds = time.perf_counter() - t_run
    summary = dict(
        run_dir=str(run_dir),
        steps=total,
        steps_this_run=total - start,
        epochs=round(total / steps_per_epoch, 3),
        final_loss=round(last_loss, 6),
        seconds=round(seconds, 2),
        images_per_s=round((total - start) * eff_batch / seconds, 2),
        data_wait_fraction=round(loader.waited / seconds, 4),
        effective_batch=eff_batch,
        lr=peak_lr,
        device=str(device),
        precision=precision(device),
        compiled=compiled,
        world_size=world,
        checkpoint=str(ckpt_dir / f"step-{total:08d}.safetensors"),
        snapshot=str(run_dir / "snapshots" / f"step-{total:08d}.png"),
        loss_curve=str(run_dir / "loss.png"),
        notes=notes,
    )
    if not is_main:
        return None
    plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png", cfg.project.name)
    write_json(run_dir / "summary.json", summary)
    return summary


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def plot_loss(metrics: Path, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="." if len(rows) < 50 else None)
    ax.set(xlabel="step", ylabel="loss (MSE on masked patches)", title=f"{title}: pretraining loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
