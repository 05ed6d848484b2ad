"""`maecli export`: the encoder for timm or Hugging Face, and frozen-encoder features for a store, images or a video.

Encoder weights keep the official MAE / timm key names, so timm loads them strictly (`maecli.vit` has the
spec and the loader line). Features are written in chunks that a rerun skips, then joined into one
`.safetensors` with an index of every row's provenance.
"""

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file

from maecli.checkpoint import resolve_checkpoint
from maecli.config import MaecliConfig
from maecli.device import autocast_for
from maecli.errors import ConfigError
from maecli.files import atomic_write, write_json
from maecli.inference import load_for_inference, pool_features
from maecli.inputs import Inputs
from maecli.methods import METHODS, listed, method_class
from maecli.vit import encoder_state_dict, load_snippet, timm_spec
from maecli.weights import canonical_arch, load_model, save_hf

def export_encoder(cfg: MaecliConfig, *, checkpoint: str | None, fmt: str, out: str | None) -> dict[str, Any]:
    notes: list[str] = []
    path = resolve_checkpoint(cfg.run_dir, checkpoint or cfg.export.checkpoint, notes)
    model, arch = load_model(path, canonical_arch(cfg.model.mae_kwargs), encoder_only_ok=fmt == "timm")  # HF's ViTMAE holds the decoder
    method = method_class(model.method)
    if fmt == "hf" and method.not_hf:
        alike = listed([name for name in METHODS if method_class(name).kind == method.kind])
        raise ConfigError(f"{path}: a {method.kind} ({alike}) checkpoint: {method.not_hf}; export the encoder with --format timm")
    folder = Path(out or cfg.export.out or cfg.run_dir / "export")
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "hf":
        save_hf(folder / "hf", model.state_dict(), arch)
        target = folder / "hf"
        snippet = f"transformers.ViTMAEForPreTraining.from_pretrained({str(target)!r})  # or ViTMAEModel for the encoder"
        return dict(format="hf", checkpoint=str(path), path=str(target), snippet=snippet, notes=notes)
    weights = folder / "encoder.safetensors"
    spec = timm_spec(arch)
    with atomic_write(weights) as tmp:
        save_file({k: v.contiguous() for k, v in encoder_state_dict(model).items()}, tmp, metadata={"format": "pt", "source": str(path)})
    write_json(folder / "encoder.json", spec)
    return dict(format="timm", checkpoint=str(path), path=str(weights), spec=str(folder / "encoder.json"), timm_model=spec["timm_model"],
                snippet=f"import timm, safetensors.torch; {load_snippet(spec, str(weights))}", notes=notes)


# --- features -----------------------------------------------------------------------------------


def export_features(cfg: MaecliConfig, inputs: list[str], *, checkpoint: str | None, out: str | None, console: Console | None = None) -> dict[str, Any]:
    """Features of every input row, in chunks of 16 batches that a rerun reuses; rows whose image cannot be read are
    left out of the features and of the index (and named in the notes)."""
    ec = cfg.export
    skipped: list[str] = []
    model, _, path, device = load_for_inference(cfg, checkpoint or ec.checkpoint, skipped)
    source = Inputs(cfg.extract, inputs, model.img_size, split=ec.split)
    folder = Path(out or ec.out or cfg.run_dir / "export")
    parts = folder / "features.parts"
    settings = dict(checkpoint=str(path), pool=ec.pool, dtype=ec.dtype, rows=len(source.rows), inputs=inputs, split=ec.split)
    if parts.exists() and (not (parts / "settings.json").exists() or json.loads((parts / "settings.json").read_text()) != settings):
        shutil.rmtree(parts)  # chunks of another export: start over
    parts.mkdir(parents=True, exist_ok=True)
    write_json(parts / "settings.json", settings)

    chunk = 16 * ec.batch_size
    starts = list(range(0, len(source.rows), chunk))
    done = sum((parts / f"{i:06d}.safetensors").exists() for i in range(len(starts)))
    dtype = getattr(torch, ec.dtype)
    progress = Progress(TextColumn("export features"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console,
                        disable=console is None or not console.is_terminal)
    with progress, torch.no_grad():
        task = progress.add_task("features", total=len(source.rows))
        for c, c_start in enumerate(starts):
            c_stop = min(c_start + chunk, len(source.rows))
            part = parts / f"{c:06d}.safetensors"
            if not part.exists():
                feats, rows = [], []
                for b in range(c_start, c_stop, ec.batch_size):
                    imgs, kept = source.read(b, min(b + ec.batch_size, c_stop), device)  # (B, 3, h, w)
                    with autocast_for(device):
                        feats.append(pool_features(model.forward_features(imgs), ec.pool).to(dtype).cpu())
                    rows += kept
                with atomic_write(part) as tmp:
                    save_file({"features": torch.cat(feats), "rows": torch.tensor(rows, dtype=torch.int64)}, tmp)
            progress.update(task, completed=c_stop)

    saved = [load_file(parts / f"{c:06d}.safetensors") for c in range(len(starts))]
    features = torch.cat([p["features"] for p in saved])  # (N, D) or (N, L, D)
    rows = torch.cat([p["rows"] for p in saved]).tolist()
    notes = skipped + source.report() + ([f"{len(source.rows) - len(rows)} of {len(source.rows)} inputs could not be read: left out"] if len(rows) < len(source.rows) else [])
    target = folder / "features.safetensors"
    meta = {"checkpoint": str(path), "pool": ec.pool, "source": source.kind}
    with atomic_write(target) as tmp:
        save_file({"features": features}, tmp, metadata=meta)
    with atomic_write(folder / "features.index.jsonl") as tmp:
        tmp.write_text("".join(json.dumps({"row": i, **source.rows[r]}) + "\n" for i, r in enumerate(rows)))
    shutil.rmtree(parts)
    return dict(checkpoint=str(path), path=str(target), index=str(folder / "features.index.jsonl"), rows=len(rows),
                shape=list(features.shape), dtype=ec.dtype, pool=ec.pool, source=source.kind, device=str(device), chunks_reused=done, notes=notes)
