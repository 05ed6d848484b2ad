"""Weights on disk, in one place: maecli `.safetensors`, official MAE `.pth`, Hugging Face ViTMAE folders (the run
folder's checkpoint pairs are `maecli.checkpoint`'s).

Every format is read into a state dict with the official MAE key names (those of `MaskedAutoencoder`)
and written from one. `load_model` is the one loader every command uses.

A maecli weights file is a safetensors file whose metadata holds `format = "maecli"`, the
`format_version`, and `arch`: the JSON keyword arguments of `MaskedAutoencoder`.
"""

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from maecli.errors import CheckpointError, ConfigError
from maecli.files import atomic_write, write_json
from maecli.methods import method_class, weights_method
from maecli.model import MaskedAutoencoder, to_2tuple

FORMAT_VERSION = "1"
StateDict = dict[str, torch.Tensor]
HEADS = ("decoder", "mask_token", "projector.")  # key prefixes outside the encoder: the MAEs' decoders, SimCLR's projection head


# --- maecli safetensors -------------------------------------------------------------------------


def save_weights(path: Path, state_dict: StateDict, arch: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    meta = {"format": "maecli", "format_version": FORMAT_VERSION, "arch": json.dumps(arch), **(metadata or {})}
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def read_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def _read_safetensors(path: Path) -> tuple[StateDict, dict[str, Any] | None]:
    meta = read_metadata(path)
    if meta.get("format") == "maecli" and meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: weights format version {meta.get('format_version')} is not supported (this maecli reads {FORMAT_VERSION})")
    try:
        state_dict = load_file(path)
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    return state_dict, json.loads(meta["arch"]) if "arch" in meta else None


# --- official MAE .pth --------------------------------------------------------------------------


def _read_official(path: Path) -> StateDict:
    try:
        # weights_only: never unpickle code. Official training checkpoints also carry an argparse Namespace.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad or unsafe pickle; all mean "cannot use this file"
        reason = str(err).strip().split("\n")[0]
        raise CheckpointError(f"{path}: cannot read as an official MAE checkpoint ({type(err).__name__}: {reason})") from None
    state_dict = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path}: holds no state dict (expected a dict of tensors, or one under 'model')")
    return state_dict


def save_official(path: Path, state_dict: StateDict) -> None:
    """The official MAE layout, `{"model": state_dict}`, for users of facebookresearch/mae."""
    with atomic_write(path) as tmp:
        torch.save({"model": {k: v.detach().cpu() for k, v in state_dict.items()}}, tmp)


# --- Hugging Face ViTMAE folders ----------------------------------------------------------------
# transformers 4.x names (what the Hub's checkpoints use; 5.x renames them on load) and 5.x names.

_HF_BLOCK = {  # official sub-key -> (4.x name, 5.x name)
    "norm1": ("layernorm_before", "layernorm_before"),
    "norm2": ("layernorm_after", "layernorm_after"),
    "attn.proj": ("attention.output.dense", "attention.o_proj"),
    "mlp.fc1": ("intermediate.dense", "mlp.fc1"),
    "mlp.fc2": ("output.dense", "mlp.fc2"),
}
_HF_QKV = (("attention.attention.query", "attention.attention.key", "attention.attention.value"), ("attention.q_proj", "attention.k_proj", "attention.v_proj"))
_HF_TOP = {
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "vit.layernorm.weight",
    "norm.bias": "vit.layernorm.bias",
    "decoder_embed.weight": "decoder.decoder_embed.weight",
    "decoder_embed.bias": "decoder.decoder_embed.bias",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_norm.weight": "decoder.decoder_norm.weight",
    "decoder_norm.bias": "decoder.decoder_norm.bias",
    "decoder_pred.weight": "decoder.decoder_pred.weight",
    "decoder_pred.bias": "decoder.decoder_pred.bias",
}


def _num_blocks(keys: Any, prefix: str) -> int:
    return len({k[len(prefix) :].split(".")[0] for k in keys if k.startswith(prefix)})


# Block prefixes HF files use: 4.x names, 5.x names, and what transformers 5.x's save_pretrained writes for the
# decoder (it reverse-applies its `encoder.layer` -> `layers` rename there too).
_HF_PREFIXES = {
    "blocks.": ("vit.encoder.layer.", "vit.layers."),
    "decoder_blocks.": ("decoder.decoder_layers.", "decoder.decoder_encoder.layer."),
}


def mae_to_hf(state_dict: StateDict, v5: bool = False) -> StateDict:
    """Official keys -> ViTMAEForPreTraining keys (4.x names by default); the fused qkv is split in three."""
    out = {hf: state_dict[ours] for ours, hf in _HF_TOP.items()}
    for ours, theirs in (("blocks.", "vit.layers." if v5 else "vit.encoder.layer."), ("decoder_blocks.", "decoder.decoder_layers.")):
        for i in range(_num_blocks(state_dict, ours)):
            for sub, names in _HF_BLOCK.items():
                for p in ("weight", "bias"):
                    out[f"{theirs}{i}.{names[v5]}.{p}"] = state_dict[f"{ours}{i}.{sub}.{p}"]
            for p in ("weight", "bias"):
                for name, part in zip(_HF_QKV[v5], state_dict[f"{ours}{i}.attn.qkv.{p}"].chunk(3, dim=0), strict=True):
                    out[f"{theirs}{i}.{name}.{p}"] = part
    return out


def hf_to_mae(hf: StateDict) -> StateDict:
    """ViTMAEForPreTraining keys (any naming above, detected per stack) -> official keys."""
    try:
        out = {ours: hf[theirs] for ours, theirs in _HF_TOP.items() if theirs in hf}
        for ours, prefixes in _HF_PREFIXES.items():
            theirs = next((p for p in prefixes if _num_blocks(hf, p)), prefixes[0])
            v5 = f"{theirs}0.{_HF_QKV[1][0]}.weight" in hf
            for i in range(_num_blocks(hf, theirs)):
                for sub, names in _HF_BLOCK.items():
                    for p in ("weight", "bias"):
                        out[f"{ours}{i}.{sub}.{p}"] = hf[f"{theirs}{i}.{names[v5]}.{p}"]
                for p in ("weight", "bias"):
                    out[f"{ours}{i}.attn.qkv.{p}"] = torch.cat([hf[f"{theirs}{i}.{name}.{p}"] for name in _HF_QKV[v5]], dim=0)
    except KeyError as err:
        raise CheckpointError(f"Hugging Face weights lack {err.args[0]!r}") from None
    return out


def arch_to_hf_config(arch: dict[str, Any]) -> dict[str, Any]:
    h, w = to_2tuple(arch["img_size"])
    return {
        "architectures": ["ViTMAEForPreTraining"],
        "model_type": "vit_mae",
        "image_size": h if h == w else [h, w],
        "patch_size": arch["patch_size"],
        "num_channels": arch.get("in_chans", 3),
        "hidden_size": arch["embed_dim"],
        "num_hidden_layers": arch["depth"],
        "num_attention_heads": arch["num_heads"],
        "intermediate_size": int(arch["embed_dim"] * arch["mlp_ratio"]),
        "decoder_hidden_size": arch["decoder_embed_dim"],
        "decoder_num_hidden_layers": arch["decoder_depth"],
        "decoder_num_attention_heads": arch["decoder_num_heads"],
        "decoder_intermediate_size": int(arch["decoder_embed_dim"] * arch["mlp_ratio"]),
        "hidden_act": "gelu",
        "qkv_bias": True,
        "layer_norm_eps": 1e-6,
        "norm_pix_loss": arch["norm_pix_loss"],
    }


def hf_config_to_arch(cfg: dict[str, Any], source: Path) -> dict[str, Any]:
    try:
        mlp_ratio = cfg["intermediate_size"] / cfg["hidden_size"]
        if cfg["decoder_intermediate_size"] != int(cfg["decoder_hidden_size"] * mlp_ratio):
            raise CheckpointError(f"{source}: decoder_intermediate_size must be decoder_hidden_size x {mlp_ratio} (the encoder's MLP ratio)")
        if cfg.get("hidden_act", "gelu") != "gelu" or not cfg.get("qkv_bias", True):
            raise CheckpointError(f"{source}: only hidden_act 'gelu' with qkv_bias true is supported")
        return dict(
            img_size=to_2tuple(cfg["image_size"]),
            patch_size=cfg["patch_size"],
            in_chans=cfg.get("num_channels", 3),
            embed_dim=cfg["hidden_size"],
            depth=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            decoder_embed_dim=cfg["decoder_hidden_size"],
            decoder_depth=cfg["decoder_num_hidden_layers"],
            decoder_num_heads=cfg["decoder_num_attention_heads"],
            mlp_ratio=mlp_ratio,
            norm_pix_loss=cfg.get("norm_pix_loss", False),
        )
    except KeyError as err:
        raise CheckpointError(f"{source}: config.json lacks {err.args[0]!r}") from None


def save_hf(folder: Path, state_dict: StateDict, arch: dict[str, Any]) -> None:
    """A folder that `ViTMAEForPreTraining.from_pretrained(folder)` loads (transformers 4.x and 5.x)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", arch_to_hf_config(arch))
    with atomic_write(folder / "model.safetensors") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in mae_to_hf(state_dict).items()}, tmp, metadata={"format": "pt"})


def _read_hf(folder: Path) -> tuple[StateDict, dict[str, Any]]:
    config, weights = folder / "config.json", folder / "model.safetensors"
    for f in (config, weights):
        if not f.is_file():
            raise CheckpointError(f"{folder}: not a Hugging Face ViTMAE folder ({f.name} is missing)")
    try:
        cfg = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config}: not readable JSON ({err})") from None
    state_dict, _ = _read_safetensors(weights)
    try:
        return hf_to_mae(state_dict), hf_config_to_arch(cfg, config)
    except CheckpointError as err:
        raise CheckpointError(f"{folder}: {err}") from None


# --- the one loader -----------------------------------------------------------------------------


def canonical_arch(arch: dict[str, Any]) -> dict[str, Any]:
    """Architecture keyword arguments in one spelling: img_size as [H, W], every default explicit."""
    return {"in_chans": 3, "norm_pix_loss": False, **arch, "img_size": list(to_2tuple(arch["img_size"])), "mlp_ratio": float(arch["mlp_ratio"])}


def check_same_arch(found: dict[str, Any], expected: dict[str, Any], source: Path | str, what: str, ignore: tuple[str, ...] = ()) -> None:
    """Raise ConfigError naming the first architecture key on which a weights file and the config disagree."""
    found, expected = canonical_arch(found), canonical_arch(expected)
    for key, value in expected.items():
        if key not in ignore and found.get(key) != value:
            raise ConfigError(f"{source}: {what}: model.{key} is {json.dumps(found.get(key))} there, {json.dumps(value)} in the config")


def read_weights(path: Path) -> tuple[StateDict, dict[str, Any] | None]:
    """Any supported weights as an official-keyed state dict, and the architecture when the file records one."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file or folder")  # a wrong path is a usage mistake (exit 2); a bad file, a runtime one
    if path.is_dir():
        return _read_hf(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in (".pth", ".pt"):
        return _read_official(path), None
    raise CheckpointError(f"{path}: unknown weights format (expected .safetensors, an official MAE .pth, or a Hugging Face folder)")


def load_state(model: torch.nn.Module, state_dict: StateDict, source: Path | str, *, encoder_only_ok: bool = False) -> list[str]:
    """Copy `state_dict` into `model`, naming the first key that is missing, extra or of the wrong shape.

    With `encoder_only_ok`, a file without the decoder (as the official pretrained releases are) or the projection
    head loads into the encoder and those keep their fresh weights. Returns the keys that were not loaded.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    heads_only = all(k.startswith(HEADS) for k in missing)
    if missing and not (encoder_only_ok and heads_only and len(missing) < len(expected)):
        raise CheckpointError(f"{source}: missing key '{missing[0]}' ({len(missing)} missing in all)")
    for key in expected:
        if key in state_dict and state_dict[key].shape != expected[key].shape:
            raise CheckpointError(
                f"{source}: '{key}' has shape {tuple(state_dict[key].shape)} in the file, the model expects {tuple(expected[key].shape)}"
            )
    extra = [k for k in state_dict if k not in expected]
    if extra:
        raise CheckpointError(f"{source}: unexpected key '{extra[0]}' ({len(extra)} unexpected in all)")
    model.load_state_dict(state_dict, strict=not missing)
    return missing


def load_model(path: Path, arch: dict[str, Any] | None = None, *, encoder_only_ok: bool = False) -> tuple[MaskedAutoencoder, dict[str, Any]]:
    """Build the model of the method that wrote a weights file (`maecli.methods.weights_method`), of the shape it
    records (or `arch`, for files that record none), and load it strictly. With `encoder_only_ok` (what uses the
    encoder alone) the decoder may be missing, and the head of a method whose decoder is not the MAE's is left out.
    Returns the model and its shape; `model.method` names the method."""
    state_dict, file_arch = read_weights(path)
    if "head.weight" in state_dict:
        raise CheckpointError(f"{path}: a fine-tuned classifier (from maecli finetune), not MAE weights; load it with timm (see its classifier.json)")
    metadata = read_metadata(path) if Path(path).suffix == ".safetensors" else {}
    method = method_class(weights_method(metadata, state_dict))
    if not encoder_only_ok and not method.reconstructs:
        raise ConfigError(f"{path}: a {method.kind} ({method.name}) checkpoint: an encoder without an MAE decoder, so there is nothing to reconstruct "
                          "(probe, finetune and export --format timm use it)")
    if encoder_only_ok and not method.mae_decoder:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(HEADS)}
    arch = file_arch or arch
    if arch is None:
        raise CheckpointError(f"{path}: the file records no architecture; give the model size in the [model] section")
    model = MaskedAutoencoder(**arch) if encoder_only_ok else method.model_class(**arch)
    load_state(model, state_dict, path, encoder_only_ok=encoder_only_ok)
    model.method = method.name
    return model, arch
