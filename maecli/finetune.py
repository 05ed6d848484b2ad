"""`maecli finetune`: the encoder plus a linear head, trained on the labeled set of [probe], as users adopt a backbone.

The MAE fine-tuning recipe, scaled to small label sets: timm's VisionTransformer holding the encoder's weights and a
fresh head (the set's kind, `maecli.tasks`, says which: on the class token for classification, on every patch token
for segmentation, with its loss and metric); AdamW with layer-wise lr decay, linear warmup then cosine, drop path;
random resized crops (optional flips) done batched on the device from uint8 images held in memory (few labels: a few
thousand small images). `blocks = N` trains only the last N blocks and the final norm with the head (partial
fine-tuning; 0: the head alone). `--baseline random` runs the same recipe and budget from a random-init encoder of
the same shape.

Every random choice is a function of (seed, step): the epoch's order (`data.Plan`), each sample's crop, the mixing,
drop path. Every `checkpoint_every` epochs a run evaluates on val (a point of the learning curves) and writes a
checkpoint; a killed run resumes from its last checkpoint bit for bit (on the CPU). The reported accuracy is the
last epoch's: picking the best epoch on val would tune to the evaluation set. Under torchrun each rank takes its
slice of the global batch (DDP).
"""

import json
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from safetensors.torch import save_file

from maecli import __version__
from maecli.board import Board
from maecli.checkpoint import resume_checkpoint, save_checkpoint
from maecli.config import MaecliConfig
from maecli.data import Plan, augment, crop_boxes
from maecli.device import autocast_for, compile_mode, precision
from maecli.errors import ConfigError, NonFiniteLoss
from maecli.figures import plot_curves
from maecli.files import append_line, atomic_write, keep_lines, owned, read_lines, write_json
from maecli.inference import load_for_inference, random_encoder
from maecli.loop import Steps, compile_scope, decays, distributed, eager, for_training, get_lr, set_lr
from maecli.methods.mae import blocks_flops
from maecli.model import MaskedAutoencoder
from maecli.tasks import Labeled, input_size, load_labeled
from maecli.vit import load_snippet, timm_spec
from maecli.weights import canonical_arch

BASELINES = ("random",)
STOP_EVERY = 10  # under torchrun, the ranks agree on a Ctrl-C or SIGTERM every this many steps (a small all-reduce)
RESUMABLE = ("checkpoint_every", "keep_last", "compile", "compile_mode")  # settings a run may change between resumes


def run_finetune(cfg: MaecliConfig, *, checkpoint: str | None = None, baselines: tuple[str, ...] = (), restart: bool = False,
                 console: Console | None = None) -> dict[str, Any] | None:
    """Fine-tune the pretrained encoder (and each baseline's) on the labeled set; returns the report (None on the
    other ranks under torchrun). Each encoder is its own resumable run in `<run folder>/<finetune.run>/<name>`."""
    assert set(baselines) <= set(BASELINES), f"baselines must be among {BASELINES}, got {baselines}"
    fc, notes = cfg.finetune, []
    encoder, arch, path, device = load_for_inference(cfg, checkpoint or fc.checkpoint, notes)  # device: before any collective
    if fc.blocks > arch["depth"]:
        raise ConfigError(f"finetune.blocks: the encoder has {arch['depth']} blocks (got {fc.blocks})")
    data = load_labeled(cfg, input_size(cfg, encoder.img_size, encoder.patch_size), notes)
    data.task.check_recipe(fc)
    encoders = {"pretrained": encoder}
    if "random" in baselines:
        encoders["random init"] = random_encoder(arch, cfg.project.seed)
    out = cfg.run_dir / fc.run
    with distributed(device) as (rank, world), owned(out, "finetune.run") if rank == 0 else nullcontext():
        settings = dict(source=str(path), classes=data.classes, seed=cfg.project.seed, **data.task.settings(data),
                        **fc.model_dump(mode="json", exclude={"checkpoint", *RESUMABLE}))
        results = {name: _train(cfg, enc, arch, data, out / name.replace(" ", "-"), settings, rank, world, device, restart,
                                console if rank == 0 else None) for name, enc in encoders.items()}
    if rank != 0:
        return None
    plot_curves({name: r["curve"] for name, r in results.items()}, out / "curves.png", cfg.project.name)
    report = dict(checkpoint=str(path), task=data.task.name, classes=data.classes, train_images=len(data.train_x),
                  val_images=len(data.val_x), input_size=list(data.train_x.shape[1:3]), device=str(device),
                  precision=precision(device), world_size=world, recipe=fc.model_dump(mode="json"), results=results,
                  curves_png=str(out / "curves.png"), notes=notes, report=str(out / "report.json"))
    write_json(out / "report.json", report)
    return report


def _train(cfg: MaecliConfig, encoder: MaskedAutoencoder, arch: dict[str, Any], data: Labeled, run_dir: Path, settings: dict[str, Any],
           rank: int, world: int, device: torch.device, restart: bool, console: Console | None) -> dict[str, Any] | None:
    fc, seed, is_main = cfg.finetune, cfg.project.seed, rank == 0
    plan = Plan(num_frames=len(data.train_y), batch_size=fc.batch_size, world_size=world, rank=rank, seed=seed)
    steps_per_epoch, lr = plan.micro_steps_per_epoch, fc.lr or fc.blr * plan.global_batch / 256
    if steps_per_epoch == 0:
        raise ConfigError(f"finetune.batch_size: {len(data.train_y)} labeled train images, fewer than one step needs ({fc.batch_size} x {world} devices)")
    total, warmup = fc.epochs * steps_per_epoch, round(fc.warmup_epochs * steps_per_epoch)
    if restart and is_main:
        shutil.rmtree(run_dir, ignore_errors=True)
    if world > 1:
        dist.barrier()
    check_settings(run_dir, settings)
    raw, optimizer, ckpt_arch, start, last_ckpt, notes = build(cfg, encoder, arch, data, run_dir, lr, device)
    mode = compile_mode(fc.compile, fc.compile_mode, device, step_flops(arch, tuple(data.train_x.shape[1:3]), fc.batch_size))
    regional = fc.drop_path == 0  # drop path gives each block a rate of its own: one compile each, as the whole model
    model, autocast = for_training(raw, device, world, mode, regional=regional), autocast_for(device)
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)  # uint8 (N, h, w, 3); the kind's targets
    log = Curve(run_dir, settings, start, steps_per_epoch, plan.global_batch) if is_main else None
    loss_sum, loss_steps, val_result = torch.zeros((), device=device), 0, None  # val_result: the last evaluation, the one reported
    name = run_dir.name.replace("-", " ")
    with Steps(f"finetune {name}", start=start, total=total, steps_per_epoch=steps_per_epoch, batch=plan.global_batch, console=console, device=device,
               rank=rank, world=world, stop_every=STOP_EVERY, grace=cfg.project.stop_timeout, mode=mode, scope=compile_scope(mode, regional)) as steps:
        for step in range(start, total):
            step_lr = get_lr(step, total=total, warmup=warmup, lr=lr, min_lr=fc.min_lr)
            set_lr(optimizer, step_lr)
            loss = train_step(model, raw, optimizer, data, train_x, train_y, plan, step, seed, fc, rank, world, mode == "reduce-overhead", autocast)
            loss_sum += loss.detach()
            loss_steps += 1
            done = step + 1
            if steps.ran(done):  # the first steps time the compile and the projected duration
                steps.show(loss.item(), step_lr)  # .item(): the step has run
                steps.timed(done)
            at_eval = (done % steps_per_epoch == 0 and (done // steps_per_epoch) % fc.checkpoint_every == 0) or done == total
            if steps.stopping(done) or at_eval:
                train_loss = epoch_loss(loss_sum, loss_steps, world)
                if not math.isfinite(train_loss):
                    good = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written"
                    raise NonFiniteLoss(f"finetune {name}: loss is {train_loss} (not finite) before step {done}; stopped, {good}")
                loss_sum.zero_()
                if is_main and at_eval:
                    val_result = log.evaluate(raw, data, device, autocast, done, train_loss, step_lr, loss_steps, steps)
                loss_steps = 0
                if is_main:
                    meta = {"config": json.dumps(cfg.model_dump(mode="json")), "maecli": __version__, "torch": torch.__version__, "classes": json.dumps(data.classes)}
                    last_ckpt = save_checkpoint(run_dir / "checkpoints", done, raw, optimizer, ckpt_arch, meta, fc.keep_last)
            steps.end(done, at_eval, last_ckpt)
    if not is_main:
        return None
    log.board.close()
    seconds = time.perf_counter() - steps.t_run
    if val_result is None:  # a finished run, rerun: nothing trained, nothing evaluated yet
        val_result = validate(raw, data, device, autocast)[1]
    return finish(raw, arch, data, run_dir, val_result, dict(
        epochs=fc.epochs, steps=total, steps_this_run=total - start, seconds=round(seconds, 2),
        images_per_s=round((total - start) * plan.global_batch / seconds, 2) if total > start else None,
        lr=lr, trainable_params=sum(p.numel() for p in raw.parameters() if p.requires_grad), compiled=mode is not None, notes=notes))  # fmt: skip


def build(cfg: MaecliConfig, encoder: MaskedAutoencoder, arch: dict[str, Any], data: Labeled, run_dir: Path, lr: float, device: torch.device,
          ) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict[str, Any], int, Path | None, list[str]]:
    """The model with the kind's head (the trainable part as `blocks` says), its optimizer, the architecture its
    checkpoints record, and where it starts: the run's newest checkpoint (its path, and a note), else step 0."""
    fc = cfg.finetune
    torch.manual_seed(cfg.project.seed)
    size = tuple(data.train_x.shape[1:3])
    raw = data.task.model(encoder, arch, len(data.classes), size, drop_path=fc.drop_path).to(device)
    freeze(raw, fc.blocks)
    optimizer = torch.optim.AdamW(layer_groups(raw, fc.weight_decay, fc.layer_decay), lr=lr, fused=True)
    ckpt_arch = {**canonical_arch({**arch, "img_size": list(size)}), "num_classes": len(data.classes)}
    notes: list[str] = []
    start, weights = resume_checkpoint(run_dir / "checkpoints", raw, optimizer, ckpt_arch, device, notes, run_field="finetune.run")
    if weights is not None:
        notes.append(f"resumed from step {start} ({weights})")
    return raw, optimizer, ckpt_arch, start, weights, notes


def train_step(model: torch.nn.Module, raw: torch.nn.Module, optimizer: torch.optim.Optimizer, data: Labeled, train_x: torch.Tensor, train_y: torch.Tensor,
               plan: Plan, step: int, seed: int, fc: Any, rank: int, world: int, graphs: bool, autocast: Any) -> torch.Tensor:
    """One optimizer step on this rank's slice of the step's batch: crops (and flips) drawn by (seed, step), the kind's
    loss, backward, AdamW. Returns the loss."""
    size = tuple(train_x.shape[1:3])
    rng = np.random.default_rng([seed, 5, step])
    theta = torch.from_numpy(crop_boxes(rng, plan.global_batch, size, size, fc.crop_scale, fc.hflip)[plan.rank_slice()])  # (B, 2, 3)
    idx = torch.from_numpy(plan.indices(step)).to(train_x.device)  # (B,)
    imgs = augment(train_x[idx], theta, size)  # (B, 3, h, w)
    torch.manual_seed(int(np.random.SeedSequence([seed, 7, step, rank]).generate_state(1)[0]))  # drop path
    if graphs:  # CUDA graphs: each forward starts a new replay
        torch.compiler.cudagraph_mark_step_begin()
    loss = data.task.loss(model, raw, data, imgs, train_y[idx], theta, rng, fc, world, autocast)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def step_flops(arch: dict[str, Any], size: tuple[int, int], batch: int) -> float:
    """Training FLOPs of one step's transformer blocks, forward and backward (what `compile_mode` "auto" weighs)."""
    tokens = 1 + (size[0] // arch["patch_size"]) * (size[1] // arch["patch_size"])
    return 3 * blocks_flops(arch["depth"], tokens, arch["embed_dim"], arch["mlp_ratio"]) * batch


class Curve:
    """What the main process records of a run besides checkpoints: `settings.json`, `metrics.jsonl` (cut back to the
    step the run starts from, so a killed run's later rows go), a row per evaluation, TensorBoard's curves."""

    def __init__(self, run_dir: Path, settings: dict[str, Any], start: int, steps_per_epoch: int, batch: int) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "settings.json", settings)
        self.metrics, self.steps_per_epoch, self.batch = run_dir / "metrics.jsonl", steps_per_epoch, batch
        keep_lines(self.metrics, lambda r: r["step"] <= start)
        self.board, self.t = Board(run_dir, start), time.perf_counter()

    def evaluate(self, raw: torch.nn.Module, data: Labeled, device: torch.device, autocast: Any, done: int, train_loss: float, lr: float,
                 steps_run: int, steps: Steps) -> Any:
        """The model on val at step `done`: a point of the curve, logged; returns what `finish` scores."""
        seconds = time.perf_counter() - self.t  # training only
        scores, val_result = validate(raw, data, device, autocast)
        row = dict(epoch=done // self.steps_per_epoch, step=done, train_loss=round(train_loss, 6), **scores, lr=lr,
                   images_per_s=round(steps_run * self.batch / seconds, 2))
        append_line(self.metrics, json.dumps(row))
        self.board.scalars(done, {"train/loss": train_loss, **{f"val/{k.removeprefix('val_')}": v for k, v in scores.items()}, "train/lr": lr,
                                  "perf/images_per_s": row["images_per_s"]})
        steps.logged(done, row["train_loss"], lr, row["images_per_s"], None)
        self.t = time.perf_counter()
        return val_result


# --- the pieces around the loop ------------------------------------------------------------------


def check_settings(run_dir: Path, settings: dict[str, Any]) -> None:
    """A run resumes only with the settings it started with (source weights, classes, recipe): anything else would
    mix two experiments in one curve."""
    path = run_dir / "settings.json"
    if not path.exists() or not (run_dir / "checkpoints").exists():
        return
    before = json.loads(path.read_text())
    changed = [k for k in settings if before.get(k) != settings[k]]
    if changed:
        k = changed[0]
        raise ConfigError(f"{run_dir}: fine-tuned with {k} = {json.dumps(before.get(k))}, now {json.dumps(settings[k])}; "
                          f"use --restart to start over, or another finetune.run")


def freeze(model: torch.nn.Module, blocks: int) -> None:
    """Partial fine-tuning: only the last `blocks` blocks, the final norm and the head train (-1: everything)."""
    if blocks < 0:
        return
    first = len(model.blocks) - blocks
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("head.") or (blocks > 0 and (name.startswith("norm.") or
                                                                      (name.startswith("blocks.") and int(name.split(".")[1]) >= first)))


def layer_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups with layer-wise lr decay (BEiT / MAE): embeddings are layer 0, block i is layer i + 1, the final norm
    and head are layer D + 1; a group's `lr_scale` is layer_decay^(D + 1 - layer). Weight decay as in pretraining."""
    depth, groups = len(model.blocks), {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = int(name.split(".")[1]) + 1 if name.startswith("blocks.") else 0 if name.startswith(("cls_token", "pos_embed", "patch_embed")) else depth + 1
        decay = decays(name, p)
        group = groups.setdefault((layer, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                   "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(p)
    return list(groups.values())


def epoch_loss(loss_sum: torch.Tensor, steps: int, world: int) -> float:
    """The mean training loss of the steps since the last evaluation, over every rank (a host sync)."""
    total = loss_sum / max(steps, 1)
    if world > 1:
        dist.all_reduce(total)
        total /= world
    return total.item()


@torch.no_grad()
def validate(model: torch.nn.Module, data: Labeled, device: torch.device, autocast: Any) -> tuple[dict[str, float], Any]:
    """The model on the val set, without augmentation or drop path: the curve's numbers (val_loss and the kind's score)
    and what `finish` scores (the kind's `validate`)."""
    model.eval()
    with eager():  # a compiled run's blocks, at another batch size and without gradients
        scores, result = data.task.validate(model, data, device, autocast)
    model.train()
    return scores, result


def finish(model: torch.nn.Module, arch: dict[str, Any], data: Labeled, run_dir: Path, val_result: Any, summary: dict[str, Any]) -> dict[str, Any]:
    """The run's results: scores of the last epoch, best epoch on the curve, the kind's pictures, and the model for timm
    with the line that loads it."""
    task, curve = data.task, read_lines(run_dir / "metrics.jsonl")
    key = f"val_{task.score}"
    best = max(curve, key=lambda r: r[key]) if curve else None
    scores, pictures = task.final(val_result, data, run_dir)
    weights = run_dir / f"{task.head}.safetensors"
    with atomic_write(weights) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp, metadata={"format": "pt", "classes": json.dumps(data.classes)})
    size = list(data.train_x.shape[1:3])
    spec = timm_spec({**arch, "img_size": size}, len(data.classes), dense=task.per_token)
    snippet = f"import timm, {'torch, ' * task.per_token}safetensors.torch; {load_snippet(spec, str(weights))}"
    usage = task.usage(arch, size, len(data.classes))
    write_json(run_dir / f"{task.head}.json", {**spec, "classes": data.classes, "load": snippet, **usage})
    result = dict(**scores, **{f"best_{key}": best[key] if best else None}, best_epoch=best["epoch"] if best else None, curve=curve, **pictures,
                  **{task.head: str(weights)}, snippet=snippet, **usage, **summary)
    write_json(run_dir / "summary.json", result)
    return result
