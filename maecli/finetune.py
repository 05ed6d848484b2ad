"""`maecli finetune`: the encoder plus a linear head, trained on the labeled set of [probe], as users adopt a backbone.

The MAE fine-tuning recipe, scaled to small label sets: timm's VisionTransformer holding the encoder's weights and a
fresh head on the class token; AdamW with layer-wise lr decay, linear warmup then cosine, drop path, label
smoothing; random resized crops (optional flips, mixup, cutmix) done batched on the device from uint8 images held in
memory (few labels: a few thousand small images). `blocks = N` trains only the last N blocks and the final norm with
the head (partial fine-tuning; 0: the head alone). `--baseline random` runs the same recipe and budget from a
random-init encoder of the same shape.

On a segmentation set the head is linear on every patch token instead (Segmenter's linear decoder, `vit.segmenter`)
at the set's input size; each mask is cropped (and flipped) with its image, the loss is the per-pixel cross-entropy
over the labeled pixels of all ranks (no label smoothing, no mixing), and the scores are mIoU and its kin
(`maecli.dense.evaluate`).

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
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import save_file

from maecli import __version__
from maecli.board import Board
from maecli.checkpoint import resume_checkpoint, save_checkpoint
from maecli.config import MaecliConfig
from maecli.data import Plan, augment, crop_boxes, resized_crop_masks, to_input
from maecli.dense import evaluate as evaluate_dense
from maecli.dense import shown_frames
from maecli.device import autocast_for, compile_mode, precision
from maecli.errors import ConfigError, Interrupted, NonFiniteLoss
from maecli.figures import plot_confusion, plot_curves, plot_iou, save_segmentations
from maecli.files import append_line, atomic_write, keep_lines, owned, read_lines, write_json
from maecli.inference import load_for_inference, random_encoder
from maecli.labeled import Labeled, input_size, load_labeled, scores_report
from maecli.loop import PROJECT_STEPS, CompileWatch, compile_scope, decays, distributed, eager, for_training, get_lr, log_line, progress_bar, projection, stop_on_signals
from maecli.methods.mae import blocks_flops
from maecli.model import MaskedAutoencoder
from maecli.segmentation import seg_scores
from maecli.vit import classifier, dense_logits, load_snippet, segmenter, timm_spec
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
    if data.dense and (fc.mixup or fc.cutmix):
        raise ConfigError(f"finetune.{'mixup' if fc.mixup else 'cutmix'}: mixes whole images' labels; a segmentation set has per-pixel labels (set it to 0)")
    encoders = {"pretrained": encoder}
    if "random" in baselines:
        encoders["random init"] = random_encoder(arch, cfg.project.seed)
    out = cfg.run_dir / fc.run
    with distributed(device) as (rank, world), owned(out, "finetune.run") if rank == 0 else nullcontext():
        dense = dict(input_size=list(data.train_x.shape[1:3]), ignore_index=data.seg.ignore_index) if data.dense else {}
        settings = dict(source=str(path), classes=data.classes, seed=cfg.project.seed, **dense, **fc.model_dump(mode="json", exclude={"checkpoint", *RESUMABLE}))
        results = {name: _train(cfg, enc, arch, data, out / name.replace(" ", "-"), settings, rank, world, device, restart,
                                console if rank == 0 else None) for name, enc in encoders.items()}
    if rank != 0:
        return None
    plot_curves({name: r["curve"] for name, r in results.items()}, out / "curves.png", cfg.project.name)
    report = dict(checkpoint=str(path), task="segmentation" if data.dense else "classification", classes=data.classes, train_images=len(data.train_x),
                  val_images=len(data.val_x), input_size=list(data.train_x.shape[1:3]), device=str(device),
                  precision=precision(device), world_size=world, recipe=fc.model_dump(mode="json"), results=results,
                  curves_png=str(out / "curves.png"), notes=notes, report=str(out / "report.json"))
    write_json(out / "report.json", report)
    return report


def _train(cfg: MaecliConfig, encoder: MaskedAutoencoder, arch: dict[str, Any], data: Labeled, run_dir: Path, settings: dict[str, Any],
           rank: int, world: int, device: torch.device, restart: bool, console: Console | None) -> dict[str, Any] | None:
    fc, seed, is_main = cfg.finetune, cfg.project.seed, rank == 0
    plan = Plan(num_frames=len(data.train_y), batch_size=fc.batch_size, world_size=world, rank=rank, seed=seed)
    steps_per_epoch = plan.micro_steps_per_epoch
    if steps_per_epoch == 0:
        raise ConfigError(f"finetune.batch_size: {len(data.train_y)} labeled train images, fewer than one step needs "
                          f"({fc.batch_size} x {world} devices)")
    total, warmup = fc.epochs * steps_per_epoch, round(fc.warmup_epochs * steps_per_epoch)
    lr = fc.lr or fc.blr * plan.global_batch / 256
    if restart and is_main:
        shutil.rmtree(run_dir, ignore_errors=True)
    if world > 1:
        dist.barrier()
    check_settings(run_dir, settings)

    torch.manual_seed(seed)
    size, C = tuple(data.train_x.shape[1:3]), len(data.classes)
    if data.dense:  # a linear head on every patch token, at the set's input size
        raw = segmenter(encoder, arch, C, size, drop_path=fc.drop_path).to(device)
    else:  # a linear head on the class token
        raw = classifier(encoder, arch, C, drop_path=fc.drop_path).to(device)
    freeze(raw, fc.blocks)
    optimizer = torch.optim.AdamW(layer_groups(raw, fc.weight_decay, fc.layer_decay), lr=lr, fused=True)
    ckpt_arch = {**canonical_arch({**arch, "img_size": list(size)}), "num_classes": C}
    notes: list[str] = []
    start, weights = resume_checkpoint(run_dir / "checkpoints", raw, optimizer, ckpt_arch, device, notes, run_field="finetune.run")
    if weights is not None:
        notes.append(f"resumed from step {start} ({weights})")
    tokens = 1 + (size[0] // arch["patch_size"]) * (size[1] // arch["patch_size"])
    step_flops = 3 * blocks_flops(arch["depth"], tokens, arch["embed_dim"], arch["mlp_ratio"]) * fc.batch_size  # the blocks, forward and backward
    mode = compile_mode(fc.compile, fc.compile_mode, device, step_flops)
    regional = fc.drop_path == 0  # drop path gives each block a rate of its own: one compile each, as the whole model
    model = for_training(raw, device, world, mode, regional=regional)
    graphs = mode == "reduce-overhead"  # CUDA graphs: each forward starts a new replay
    autocast = autocast_for(device)
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)  # uint8 (N, h, w, 3); (N,) labels or (N, h, w) masks
    metrics = run_dir / "metrics.jsonl"
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "settings.json", settings)
        keep_lines(metrics, lambda r: r["step"] <= start)  # a killed run's later rows go
    loss_sum, loss_steps, last_ckpt, t_run, t_epoch = torch.zeros((), device=device), 0, weights, time.perf_counter(), time.perf_counter()
    plain, t_first = console is not None and not console.is_terminal, 0.0  # off a terminal: a plain line per evaluation
    val_result = None  # the last evaluation (`validate`): the one reported
    name = run_dir.name.replace("-", " ")
    say = (lambda line: console.print(line, markup=False, soft_wrap=True)) if console is not None else (lambda line: None)
    watch = CompileWatch(f"finetune {name}", mode, compile_scope(mode, regional), device, say)
    board = Board(run_dir, start) if is_main else None
    with stop_on_signals(world, STOP_EVERY, device, cfg.project.stop_timeout) as stop, progress_bar(console, f"finetune {name}") as progress:
        task = progress.add_task("finetune", total=total, completed=start, epoch=start // steps_per_epoch, loss="-", lr="-", ips="-")
        for step in range(start, total):
            step_lr = get_lr(step, total=total, warmup=warmup, lr=lr, min_lr=fc.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = step_lr * group["lr_scale"]
            rng = np.random.default_rng([seed, 5, step])
            theta = torch.from_numpy(crop_boxes(rng, plan.global_batch, size, size, fc.crop_scale, fc.hflip)[plan.rank_slice()])  # (B, 2, 3)
            idx = torch.from_numpy(plan.indices(step)).to(device)  # (B,)
            imgs = augment(train_x[idx], theta, size)  # (B, 3, h, w)
            torch.manual_seed(int(np.random.SeedSequence([seed, 7, step, rank]).generate_state(1)[0]))  # drop path
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            if data.dense:  # the masks cropped as their images, per-pixel cross-entropy at the input size
                targets = resized_crop_masks(train_y[idx], theta, size).long()  # (B, h, w)
                with autocast:
                    logits = F.interpolate(dense_logits(model(imgs), raw.patch_embed.grid_size), size=size, mode="bilinear", align_corners=False)  # (B, C, h, w)
                labeled = (targets != data.seg.ignore_index).sum()  # pixels that count: the mean is over all ranks' labeled pixels
                if world > 1:  # DDP averages the ranks' gradients, so each rank's sum is scaled by world / the global count
                    dist.all_reduce(labeled)
                loss = F.cross_entropy(logits.float(), targets, ignore_index=data.seg.ignore_index, reduction="sum") * world / labeled.clamp(min=1)
            else:
                targets = F.one_hot(train_y[idx], C).float() * (1 - fc.label_smoothing) + fc.label_smoothing / C  # (B, C)
                imgs, targets = mix(rng, imgs, targets, fc.mixup, fc.cutmix)
                with autocast:
                    logits = model(imgs)  # (B, C)
                loss = F.cross_entropy(logits.float(), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            loss_steps += 1
            done = step + 1
            stop.started = True  # a step has run: a signal now stops at a checkpoint
            if done - start in (1, 1 + PROJECT_STEPS):  # the first steps time the compile and the projected duration
                progress.update(task, loss=f"{loss.item():.4f}", lr=f"{step_lr:.2e}")  # .item(): the step has run
                if done - start == 1:
                    t_first = time.perf_counter()
                    watch.first_step(t_first - t_run)
                else:
                    watch.steady()
                    if console is not None and done < total:
                        step_seconds = (time.perf_counter() - t_first) / PROJECT_STEPS
                        progress.update(task, ips=f"{plan.global_batch / step_seconds:.1f}")
                        say(projection(f"finetune {name}", total - done, step_seconds, time.perf_counter() - t_run, device))
            at_eval = (done % steps_per_epoch == 0 and (done // steps_per_epoch) % fc.checkpoint_every == 0) or done == total
            stopping = stop.now(done)
            if at_eval or stopping:
                train_loss = epoch_loss(loss_sum, loss_steps, world)
                if not math.isfinite(train_loss):
                    good = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written"
                    raise NonFiniteLoss(f"finetune {name}: loss is {train_loss} (not finite) before step {done}; stopped, {good}")
                loss_sum.zero_()
                if is_main and at_eval:
                    seconds = time.perf_counter() - t_epoch  # training only
                    watch.check(done)
                    scores, val_result = validate(raw, data, device, autocast)
                    row = dict(epoch=done // steps_per_epoch, step=done, train_loss=round(train_loss, 6), **scores, lr=step_lr,
                               images_per_s=round(loss_steps * plan.global_batch / seconds, 2))
                    append_line(metrics, json.dumps(row))
                    board.scalars(done, {"train/loss": train_loss, **{f"val/{k.removeprefix('val_')}": v for k, v in scores.items()}, "train/lr": step_lr,
                                         "perf/images_per_s": row["images_per_s"]})
                    progress.update(task, epoch=row["epoch"], loss=f"{row['train_loss']:.4f}", lr=f"{step_lr:.2e}", ips=f"{row['images_per_s']:.1f}")
                    if plain:
                        elapsed = time.perf_counter() - t_run
                        console.print(log_line(f"finetune {name}", done, total, done / steps_per_epoch, row["train_loss"], step_lr, row["images_per_s"], None,
                                               elapsed, (total - done) * elapsed / (done - start)), markup=False, soft_wrap=True)
                loss_steps, t_epoch = 0, time.perf_counter()
                if is_main:
                    meta = {"config": json.dumps(cfg.model_dump(mode="json")), "maecli": __version__, "torch": torch.__version__, "classes": json.dumps(data.classes)}
                    last_ckpt = save_checkpoint(run_dir / "checkpoints", done, raw, optimizer, ckpt_arch, meta, fc.keep_last)
            progress.update(task, completed=done)
            if stopping or (at_eval and stop.now(done)):  # a signal during this step's checkpoint: it is written already
                if world > 1:
                    dist.barrier()  # rank 0's checkpoint is written before any rank ends
                raise Interrupted(f"interrupted ({stop.name}): checkpoint written at step {done} ({last_ckpt if is_main else 'by rank 0'}); "
                                  "run the same command again to resume", signum=stop.signum)
    if not is_main:
        return None
    board.close()
    seconds = time.perf_counter() - t_run
    if val_result is None:  # a finished run, rerun: nothing trained, nothing evaluated yet
        val_result = validate(raw, data, device, autocast)[1]
    return finish(raw, arch, data, run_dir, val_result, dict(
        epochs=fc.epochs, steps=total, steps_this_run=total - start, seconds=round(seconds, 2),
        images_per_s=round((total - start) * plan.global_batch / seconds, 2) if total > start else None,
        lr=lr, trainable_params=sum(p.numel() for p in raw.parameters() if p.requires_grad), compiled=mode is not None, notes=notes))  # fmt: skip


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


def mix(rng: np.random.Generator, imgs: torch.Tensor, targets: torch.Tensor, mixup: float, cutmix: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix (one per step, chosen by `rng`, when both are on) of the batch with itself reversed: images
    (B, 3, h, w) and soft targets (B, C), mixed in the same proportion. Identity when both are off."""
    if mixup <= 0 and cutmix <= 0:
        return imgs, targets
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    lam = float(rng.beta(cutmix, cutmix) if use_cutmix else rng.beta(mixup, mixup))
    other = imgs.flip(0)
    if use_cutmix:  # a box of area (1 - lam) from the other image; lam becomes the exact area kept
        H, W = imgs.shape[2:]
        ch, cw = round(H * math.sqrt(1 - lam)), round(W * math.sqrt(1 - lam))
        cy, cx = rng.integers(0, H), rng.integers(0, W)
        y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch - ch // 2, H), max(cx - cw // 2, 0), min(cx + cw - cw // 2, W)
        imgs = imgs.clone()
        imgs[:, :, y0:y1, x0:x1] = other[:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        imgs = lam * imgs + (1 - lam) * other
    return imgs, lam * targets + (1 - lam) * targets.flip(0)


def epoch_loss(loss_sum: torch.Tensor, steps: int, world: int) -> float:
    """The mean training loss of the steps since the last evaluation, over every rank (a host sync)."""
    total = loss_sum / max(steps, 1)
    if world > 1:
        dist.all_reduce(total)
        total /= world
    return total.item()


@torch.no_grad()
def validate(model: torch.nn.Module, data: Labeled, device: torch.device, autocast: torch.autocast, batch: int = 256) -> tuple[dict[str, float], Any]:
    """The model on the val set, without augmentation or drop path: the curve's numbers (val_loss, and val_top1 or
    val_miou) and what `finish` scores (logits (N, C) on the CPU; for segmentation the confusion matrix and the
    pictured frames' predictions)."""
    model.eval()
    with eager():  # a compiled run's blocks, at another batch size and without gradients
        if data.dense:
            grid = model.patch_embed.grid_size
            confusion, loss, preds = evaluate_dense(lambda x: dense_logits(model(x), grid), data, device, shown=shown_frames(len(data.val_x)))
            scores, result = dict(val_loss=round(loss, 6), val_miou=round(seg_scores(confusion, data.classes)["miou"], 6)), (confusion, preds)
        else:
            logits = []
            for chunk in data.val_x.split(batch):
                with autocast:
                    logits.append(model(to_input(chunk.to(device))).float().cpu())
            result = torch.cat(logits)  # (N, C)
            scores = dict(val_loss=round(F.cross_entropy(result, data.val_y).item(), 6), val_top1=round((result.argmax(1) == data.val_y).float().mean().item(), 6))
    model.train()
    return scores, result


def finish(model: torch.nn.Module, arch: dict[str, Any], data: Labeled, run_dir: Path, val_result: Any, summary: dict[str, Any]) -> dict[str, Any]:
    """The run's results: scores of the last epoch, best epoch on the curve, pictures (confusion matrix; per-class IoU
    and predictions for segmentation), and the model for timm with the line that loads it."""
    curve = read_lines(run_dir / "metrics.jsonl")
    key, kind = ("val_miou", "segmenter") if data.dense else ("val_top1", "classifier")
    best = max(curve, key=lambda r: r[key]) if curve else None
    if data.dense:
        confusion, preds = val_result
        scores = seg_scores(confusion, data.classes)
        plot_iou({run_dir.name: scores["per_class_iou"]}, data.classes, run_dir / "iou.png", f"{run_dir.name}, fine-tuned: per-class IoU")
        save_segmentations(data, {f"{run_dir.name}, fine-tuned": preds}, run_dir / "predictions.png", f"{run_dir.name}, fine-tuned: val frames")
        pictures = dict(iou_png=str(run_dir / "iou.png"), predictions_png=str(run_dir / "predictions.png"))
    else:
        scores = scores_report(val_result, data.val_y, data.classes)
        plot_confusion(scores["confusion"], data.classes, run_dir / "confusion.png", f"{run_dir.name}, fine-tuned")
        pictures = dict(confusion_png=str(run_dir / "confusion.png"))
    weights = run_dir / f"{kind}.safetensors"
    with atomic_write(weights) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp, metadata={"format": "pt", "classes": json.dumps(data.classes)})
    size = list(data.train_x.shape[1:3])
    spec = timm_spec({**arch, "img_size": size}, len(data.classes), dense=data.dense)
    snippet = f"import timm, {'torch, ' * data.dense}safetensors.torch; {load_snippet(spec, str(weights))}"
    usage = {}
    if data.dense:  # per-token logits -> a map -> each image's own resolution
        gh, gw = size[0] // arch["patch_size"], size[1] // arch["patch_size"]
        usage["predict"] = (f"logits = torch.nn.functional.interpolate(m(x)[:, 1:].transpose(1, 2).reshape(len(x), {len(data.classes)}, {gh}, {gw}), "
                            f"size=(H, W), mode='bilinear')  # x: (N, 3, {size[0]}, {size[1]}) ImageNet-normalized, the frames resized to it")
    write_json(run_dir / f"{kind}.json", {**spec, "classes": data.classes, "load": snippet, **usage})
    result = dict(**scores, **{f"best_{key}": best[key] if best else None}, best_epoch=best["epoch"] if best else None, curve=curve, **pictures,
                  **{kind: str(weights)}, snippet=snippet, **usage, **summary)
    write_json(run_dir / "summary.json", result)
    return result
