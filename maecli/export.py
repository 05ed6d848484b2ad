"""`maecli export`: the encoder for timm or Hugging Face, and frozen-encoder features for a store, images or a video.

Encoder weights keep the official MAE / timm key names (`cls_token`, `pos_embed`, `patch_embed.proj.*`,
`blocks.N.*`, `norm.*`), so `timm.create_model(name, num_classes=0, pretrained=True,
pretrained_cfg_overlay=dict(file=..., custom_load=False))` loads them strictly (`custom_load=False`: some
registered names default to a JAX .npz loader, which timm < 1.0.31 keeps for an overlaid file). Features are written in chunks that a
rerun skips, then joined into one `.safetensors` with an index of every row's provenance.
"""

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file

from maecli.checkpoint import canonical_arch, load_model, resolve_checkpoint, save_hf
from maecli.config import PRESETS, MaecliConfig
from maecli.device import autocast_for
from maecli.files import atomic_write, write_json
from maecli.inference import load_for_inference, pool_features
from maecli.inputs import Inputs
from maecli.model import MaskedAutoencoder

TIMM_SIZES = {(s["embed_dim"], s["depth"], s["num_heads"]): name.removeprefix("vit_") for name, s in PRESETS.items()}  # timm's names


def encoder_state_dict(model: MaskedAutoencoder) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith(("decoder", "mask_token"))}


def timm_spec(arch: dict[str, Any]) -> dict[str, Any]:
    """How timm builds this encoder: a registered model name when one has these sizes, and the keyword arguments."""
    import timm

    arch = canonical_arch(arch)
    kwargs = dict(img_size=arch["img_size"], patch_size=arch["patch_size"], embed_dim=arch["embed_dim"], depth=arch["depth"],
                  num_heads=arch["num_heads"], mlp_ratio=arch["mlp_ratio"], qkv_bias=True, class_token=True, global_pool="token", num_classes=0)
    size = TIMM_SIZES.get((arch["embed_dim"], arch["depth"], arch["num_heads"]))
    name = f"vit_{size}_patch{arch['patch_size']}_224" if size and arch["mlp_ratio"] == 4.0 else None
    return {"timm_model": name if name and timm.is_model(name) else None, "kwargs": kwargs}


def load_snippet(spec: dict[str, Any], weights: Path) -> str:
    if spec["timm_model"]:
        size = "" if spec["kwargs"]["img_size"] == [224, 224] else f", img_size={tuple(spec['kwargs']['img_size'])}"
        return (f"timm.create_model({spec['timm_model']!r}, num_classes=0{size}, pretrained=True, "
                f"pretrained_cfg_overlay=dict(file={str(weights)!r}, custom_load=False))")
    kwargs = {**spec["kwargs"], "img_size": tuple(spec["kwargs"]["img_size"])}
    return (f"m = timm.models.VisionTransformer(**{kwargs!r}); "
            f"m.load_state_dict(safetensors.torch.load_file({str(weights)!r}))")


def export_encoder(cfg: MaecliConfig, *, checkpoint: str | None, fmt: str, out: str | None) -> dict[str, Any]:
    notes: list[str] = []
    path = resolve_checkpoint(cfg.run_dir, checkpoint or cfg.export.checkpoint, notes)
    model, arch = load_model(path, canonical_arch(cfg.model.mae_kwargs))
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
                snippet=f"import timm, safetensors.torch; {load_snippet(spec, weights)}", notes=notes)


# --- features -----------------------------------------------------------------------------------


def export_features(cfg: MaecliConfig, inputs: list[str], *, checkpoint: str | None, out: str | None, console: Console | None = None) -> dict[str, Any]:
    """Features of every input row, in chunks of 16 batches that a rerun reuses; rows whose image cannot be read are
    left out of the features and of the index (and named in the notes)."""
    ec = cfg.export
    skipped: list[str] = []
    model, _, path, device = load_for_inference(cfg, checkpoint or ec.checkpoint, skipped)
    source = Inputs(cfg, inputs, model.img_size, split=ec.split)
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
