"""`maecli compare`: which pretraining method gives the better backbone on *this* data at *this* compute budget? Like
`quickstart`, a command that composes others (pretrain, probe, finetune).

Each method of [compare] (MAE and SimCLR by default) is pretrained on the project's store with [pretrain]'s recipe
for the steps one budget buys it, and probed with the frozen encoder ([probe]'s protocol: linear + k-NN top-1 on a
classification set, the dense probe's mIoU on a segmentation set: `maecli.tasks`) at 1/8, 1/4, 1/2 and all of the budget:
quality-versus-compute curves rather than one point. A random-init encoder and the raw pixels (and, for segmentation,
the majority class) are the floors; with `finetune_epochs`, each method's final encoder (and a random-init one) is
fine-tuned too.

The budget is per method, in the user's terms: a time on this device (turned into steps from a step time measured
once, interleaved across the methods, and recorded), analytic FLOPs, or steps of the reference method (the others
get the same FLOPs). The plan is written before any training, so the runs are deterministic and a rerun continues
them (each method is an ordinary `pretrain` run folder under `<output_dir>/<compare.run>/`), reusing every probe
already made. Step counts are whole eighths of the budget, so that every probed fraction is a checkpoint.
"""

import math
import os
import shutil
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from maecli.bench import interleaved, train_step_fn
from maecli.checkpoint import checkpoint_files
from maecli.config import MaecliConfig
from maecli.data import Plan
from maecli.device import compile_mode, pick_device
from maecli.errors import ConfigError
from maecli.figures import plot_compare
from maecli.files import owned, read_json, write_json
from maecli.inference import random_encoder
from maecli.methods import method_of
from maecli.store import FrameStore
from maecli.tasks import input_size, load_labeled
from maecli.weights import load_model

FRACTIONS = (0.125, 0.25, 0.5, 1.0)
EIGHTHS = 8  # steps are a multiple of this, so every fraction is a checkpoint


def run_compare(cfg: MaecliConfig, *, restart: bool = False, console: Console | None = None) -> dict[str, Any]:
    """Plan (or reload the plan), train, probe and fine-tune every method; returns the report written to compare.json."""
    from maecli.finetune import run_finetune
    from maecli.train import pretrain

    cc, notes = cfg.compare, []
    folder = cfg.project.output_dir / cc.run
    if "RANK" in os.environ:
        raise ConfigError("compare: runs as one process on one device (torchrun is for pretrain and finetune)")
    data = load_labeled(cfg, input_size(cfg, cfg.model.img_size, cfg.model.patch_size), notes)  # no labeled set: fail before any training
    if not (cc.budget or cc.budget_flops or cc.budget_steps):
        raise ConfigError("compare.budget: no budget given (--budget 20m, --budget-flops 1e15 or --budget-steps 500)")
    if restart and folder.exists():
        shutil.rmtree(folder)
    with owned(folder, "compare.run"):
        device = pick_device(cfg.project.device)
        plan = load_plan(cfg, folder, device)
        arch = cfg.model.mae_kwargs
        task = data.task
        floors = {name: cached(folder / f"probe-{name.replace(' ', '-')}.json", task.probe_one, encoder, arch, data, cfg, device)
                  for name, encoder in (("random init", random_encoder(arch, cfg.project.seed)), ("raw pixels", None))}
        floors.update(task.floors(data, cfg, device))
        configs = {name: method_config(cfg, name, plan["methods"][name]["steps"]) for name in cc.methods}
        methods = {}
        for name, m_cfg in configs.items():
            summary = pretrain(m_cfg, console=console)
            notes += [f"{name}: {note}" for note in summary["notes"]]
            progress = read_json(folder / name / "compare-progress.json", {"train_seconds": 0.0})
            if summary["steps_this_run"]:
                progress["train_seconds"] += summary["seconds"]
                write_json(folder / name / "compare-progress.json", progress)
            points = []
            for fraction in FRACTIONS:
                step = round(fraction * summary["steps"])
                weights = checkpoint_files(m_cfg.run_dir / "checkpoints", step)[0]
                encoder, enc_arch = load_model(weights, encoder_only_ok=True)
                probe = cached(folder / name / f"compare-probe-{step:08d}.json", task.probe_one, encoder, enc_arch, data, cfg, device)
                points.append(dict(fraction=fraction, step=step, flops=step * plan["methods"][name]["flops_per_step"], checkpoint=str(weights),
                                   **task.frozen_scores(probe)))
            methods[name] = dict(plan["methods"][name], images_seen=summary["steps"] * plan["batch"], flops=points[-1]["flops"],
                                 train_seconds=round(progress["train_seconds"], 1), run_dir=str(m_cfg.run_dir), points=points)
        if cc.finetune_epochs:
            for i, name in enumerate(cc.methods):
                m_cfg = configs[name].model_copy(update=dict(finetune=cfg.finetune.model_copy(update=dict(epochs=cc.finetune_epochs))))
                tuned = run_finetune(m_cfg, checkpoint=methods[name]["points"][-1]["checkpoint"], baselines=("random",) if i == 0 else (),
                                     console=console)
                methods[name]["finetuned"] = tuned["results"]["pretrained"][task.score]
                if i == 0:
                    floors["random init"]["finetuned"] = tuned["results"]["random init"][task.score]
        report = dict(budget=plan["budget"], batch=plan["batch"], device=plan["device"], task=task.name,
                      classes=len(data.classes), train_images=len(data.train_x), val_images=len(data.val_x), methods=methods,
                      floors={name: dict(**task.frozen_scores(f), finetuned=f.get("finetuned")) for name, f in floors.items()},
                      finetune_epochs=cc.finetune_epochs,
                      step_times_measured=plan["step_times_measured"], notes=notes, report=str(folder / "compare.json"),
                      plot=str(folder / "compare.png"))  # fmt: skip
        plot_compare(report, folder / "compare.png", cfg.project.name)
        write_json(folder / "compare.json", report)
    return report


def method_config(cfg: MaecliConfig, name: str, steps: int) -> MaecliConfig:
    """The project's config for one method's run: [pretrain]'s recipe, this method, the plan's steps with [compare]
    warmup of them warming up (at least one), a checkpoint at every eighth of them (all kept)."""
    pc = cfg.pretrain.model_copy(update=dict(run=f"{cfg.compare.run}/{name}", method=name, steps=steps, checkpoint_every=steps // EIGHTHS,
                                             keep_last=EIGHTHS, warmup_steps=max(1, round(cfg.compare.warmup * steps))))
    return cfg.model_copy(update=dict(pretrain=pc))


def cached(path: Path, compute: Any, *args: Any) -> Any:
    """`compute(*args)`, saved to `path` the first time and read back after (a rerun of compare skips finished probes)."""
    if path.exists():
        return read_json(path, None)
    result = compute(*args)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    return result


# --- the budget -----------------------------------------------------------------------------------


def budget_spec(cfg: MaecliConfig) -> dict[str, Any]:
    cc = cfg.compare
    if cc.budget:
        return {"field": "budget", "value": cc.budget, "text": f"{cc.budget} of {cfg.project.device} time per method"}
    if cc.budget_flops:
        return {"field": "budget_flops", "value": cc.budget_flops, "text": f"{cc.budget_flops:.3g} FLOPs per method"}
    return {"field": "budget_steps", "value": cc.budget_steps, "text": f"{cc.budget_steps} steps of {cc.methods[0]} (its FLOPs per method)"}


def load_plan(cfg: MaecliConfig, folder: Path, device: torch.device) -> dict[str, Any]:
    """The steps each method gets, from plan.json when this comparison was planned before (a rerun continues it), else
    from the budget (measuring step times for a time budget) and written there."""
    cc, spec = cfg.compare, budget_spec(cfg)
    plan = read_json(folder / "plan.json", None)
    if plan is not None:
        if plan["budget"] != spec or list(plan["methods"]) != cc.methods or plan["batch"] != cfg.pretrain.batch_size * cfg.pretrain.accum_iter:
            raise ConfigError(f"compare.{spec['field']}: {folder} was planned for {plan['budget']['text']}, methods {list(plan['methods'])}, batch "
                              f"{plan['batch']} ({folder / 'plan.json'}); use --restart to plan again, or another compare.run")
        return plan
    batch = cfg.pretrain.batch_size * cfg.pretrain.accum_iter  # images per optimizer step
    flops = {name: method_of(cfg, name).flops_per_image() * batch for name in cc.methods}
    seconds = {name: t * cfg.pretrain.accum_iter for name, t in measure_steps(cfg, device).items()} if cc.budget else None
    methods = {}
    for name in cc.methods:
        if cc.budget:
            steps = math.floor(cc.budget_seconds / seconds[name])
        elif cc.budget_flops:
            steps = math.floor(cc.budget_flops / flops[name])
        else:
            steps = math.floor(cc.budget_steps * flops[cc.methods[0]] / flops[name])
        if steps < EIGHTHS:
            raise ConfigError(f"compare.{spec['field']}: {spec['value']} buys {steps} steps of {name} ({flops[name]:.3g} FLOPs"
                              + (f", {seconds[name]:.3g} s" if seconds else "") + f" per step at batch {batch}); compare needs at least "
                              f"{EIGHTHS}, one per eighth of the budget")
        steps -= steps % EIGHTHS
        methods[name] = dict(steps=steps, flops_per_step=flops[name], step_seconds=seconds[name] if seconds else None)
    plan = dict(budget=spec, batch=batch, device=str(device), methods=methods, step_times_measured=seconds is not None)
    write_json(folder / "plan.json", plan)
    return plan


def measure_steps(cfg: MaecliConfig, device: torch.device, steps: int = 5, warmup: int = 2) -> dict[str, float]:
    """Seconds per micro-step of each method (median, interleaved across methods after `warmup` steps): the forward,
    backward and AdamW step of `pretrain`, with the method's augmentations, on the store's first frames."""
    from maecli.train import Schedule

    store = FrameStore(cfg.extract.store, split="train")
    # the run's own check first: a store smaller than one step's batch is refused as `pretrain` refuses it
    Schedule.of(cfg, Plan(num_frames=len(store), batch_size=cfg.pretrain.batch_size, world_size=1, rank=0, seed=cfg.project.seed))
    frames = torch.from_numpy(store.get_batch(np.arange(cfg.pretrain.batch_size))).to(device)  # (B, H, W, 3) uint8
    fns = {}
    for name in cfg.compare.methods:
        method = method_of(cfg, name)
        torch.manual_seed(cfg.project.seed)
        fns[name] = train_step_fn(method.build().to(device), method, frames, seed=cfg.project.seed, weight_decay=cfg.pretrain.weight_decay,
                                  compile=compile_mode(cfg.pretrain.compile, cfg.pretrain.compile_mode, device, method.flops_per_image() * len(frames)))
    times = interleaved(fns, steps, warmup, device)
    return {name: statistics.median(t) for name, t in times.items()}
