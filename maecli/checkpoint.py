"""A run folder's checkpoints (`checkpoints/` of pretrain and finetune runs): pairs written in order, each atomically:
`step-N.state.pt` (the optimizer state, written by maecli and read weights-only) then `step-N.safetensors` (the
weights, the resolved config in the metadata; `maecli.weights` writes and reads them). The newest complete pair is
where a run resumes and what every command uses by default.
"""

import re
from pathlib import Path
from typing import Any

import torch

from maecli.errors import CheckpointError, ConfigError
from maecli.files import atomic_write
from maecli.weights import check_same_arch, load_state, read_metadata, read_weights, save_weights


STEP_FILE = re.compile(r"step-(\d{8})\.safetensors")


def checkpoint_files(ckpt_dir: Path, step: int) -> tuple[Path, Path]:
    """(weights, optimizer state) of the checkpoint at `step`."""
    return ckpt_dir / f"step-{step:08d}.safetensors", ckpt_dir / f"step-{step:08d}.state.pt"


def checkpoint_steps(ckpt_dir: Path) -> list[int]:
    """Steps with a complete checkpoint pair, oldest first."""
    found = [int(m[1]) for p in ckpt_dir.glob("step-*.safetensors") if (m := STEP_FILE.fullmatch(p.name))] if ckpt_dir.is_dir() else []
    return sorted(s for s in found if checkpoint_files(ckpt_dir, s)[1].exists())


def save_checkpoint(ckpt_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, arch: dict[str, Any],
                    metadata: dict[str, str], keep_last: int) -> Path:
    """Write the pair for `step` (state first, so a pair whose weights exist is complete), then delete all but the
    newest `keep_last` pairs. Returns the weights' path. A failed write (a full disk) leaves no half pair."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    weights, state = checkpoint_files(ckpt_dir, step)
    with atomic_write(state) as tmp:
        torch.save({"step": step, "optimizer": optimizer.state_dict()}, tmp)
    try:
        save_weights(weights, model.state_dict(), arch, {"step": str(step), **metadata})
    except BaseException:
        state.unlink(missing_ok=True)
        raise
    for old in checkpoint_steps(ckpt_dir)[:-keep_last]:
        for path in checkpoint_files(ckpt_dir, old):
            path.unlink(missing_ok=True)
    return weights


def resume_checkpoint(ckpt_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, arch: dict[str, Any],
                      device: torch.device, notes: list[str], run_field: str = "pretrain.run") -> tuple[int, Path | None]:
    """Load the newest readable pair into `model` and `optimizer`: (its step, its weights), or (0, None) if none.
    A damaged newer pair (truncated by a bad copy, say) is skipped with a note. Weights of another shape are
    refused, naming the first differing key."""
    for step in reversed(checkpoint_steps(ckpt_dir)):
        weights, state = checkpoint_files(ckpt_dir, step)
        try:
            state_dict, found = read_weights(weights)
            opt_state = torch.load(state, map_location=device, weights_only=True)["optimizer"]
        except Exception as err:  # torch raises many types for a damaged file; all mean "cannot resume from this pair"
            notes.append(f"skipped {weights.name} and {state.name}: unreadable ({_reason(err)}); trying an older checkpoint")
            continue
        check_same_arch(found, arch, ckpt_dir.parent, f"this run was trained with another model shape (use --restart to start over, or another {run_field})")
        load_state(model, state_dict, weights)
        optimizer.load_state_dict(opt_state)
        return step, weights
    return 0, None


def checkpoint_method(ckpt_dir: Path) -> str | None:
    """The pretraining method of the newest readable checkpoint (files from before methods existed: "mae"), or None."""
    for step in reversed(checkpoint_steps(ckpt_dir)):
        try:
            return read_metadata(checkpoint_files(ckpt_dir, step)[0]).get("method", "mae")
        except CheckpointError:  # damaged: resuming skips it too
            continue
    return None


def resolve_checkpoint(run_dir: Path, explicit: str | Path | None, notes: list[str]) -> Path:
    """The weights a command uses: the one named (used as it is, failing loudly if damaged), else the run folder's
    newest readable checkpoint; a damaged newer one is skipped with a note."""
    if explicit:
        return Path(explicit)
    ckpt_dir = run_dir / "checkpoints"
    steps = checkpoint_steps(ckpt_dir)
    if not steps:
        raise ConfigError(f"{run_dir}: no checkpoint yet (train with 'maecli pretrain', or name weights with --checkpoint)")
    for step in reversed(steps):
        weights = checkpoint_files(ckpt_dir, step)[0]
        try:
            read_metadata(weights)  # the header: safetensors checks that the data covers the whole file
            return weights
        except CheckpointError as err:
            notes.append(f"skipped {weights}: {str(err).removeprefix(f'{weights}: ')}; using an older checkpoint")
    raise CheckpointError(f"{ckpt_dir}: no readable checkpoint ({len(steps)} damaged)")


def _reason(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
