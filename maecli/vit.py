"""The encoder as timm's `VisionTransformer`: how timm builds it, the line users load it with, and the models that
`finetune` trains and the dense probe reads: timm's own ViT with the MAE encoder's weights and a linear head, on the
class token (`classifier`) or on every patch token (`segmenter`: Segmenter's linear decoder, at any input size).

The MAE keeps the official / timm key names (`cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.N.*`,
`norm.*`), so the encoder loads strictly into `VisionTransformer(global_pool="token")`; a fine-tuned classifier
adds `head.*`. `timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=..., custom_load=False))`
loads either file (`custom_load=False`: some registered names default to a JAX .npz loader, which timm < 1.0.31
keeps for an overlaid file).
"""

from typing import Any

import torch
import torch.nn as nn

from maecli.config import PRESETS
from maecli.model import MaskedAutoencoder
from maecli.weights import canonical_arch

TIMM_SIZES = {(s["embed_dim"], s["depth"], s["num_heads"]): name.removeprefix("vit_") for name, s in PRESETS.items()}  # timm's names


def encoder_state_dict(model: MaskedAutoencoder) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith(("decoder", "mask_token"))}


def timm_spec(arch: dict[str, Any], num_classes: int = 0, *, dense: bool = False) -> dict[str, Any]:
    """How timm builds this encoder (with a head of `num_classes`, 0 for none): a registered model name when one
    has these sizes, and the keyword arguments. `dense`: the head applies to every token (no pooling)."""
    import timm

    arch = canonical_arch(arch)
    kwargs = dict(img_size=arch["img_size"], patch_size=arch["patch_size"], embed_dim=arch["embed_dim"], depth=arch["depth"],
                  num_heads=arch["num_heads"], mlp_ratio=arch["mlp_ratio"], qkv_bias=True, class_token=True, global_pool="" if dense else "token",
                  num_classes=num_classes)
    size = TIMM_SIZES.get((arch["embed_dim"], arch["depth"], arch["num_heads"]))
    name = f"vit_{size}_patch{arch['patch_size']}_224" if size and arch["mlp_ratio"] == 4.0 and not dense else None
    return {"timm_model": name if name and timm.is_model(name) else None, "kwargs": kwargs}


def load_snippet(spec: dict[str, Any], weights: str) -> str:
    """The line that loads `weights` into timm, as users paste it."""
    if spec["timm_model"]:
        size = "" if spec["kwargs"]["img_size"] == [224, 224] else f", img_size={tuple(spec['kwargs']['img_size'])}"
        return (f"timm.create_model({spec['timm_model']!r}, num_classes={spec['kwargs']['num_classes']}{size}, pretrained=True, "
                f"pretrained_cfg_overlay=dict(file={str(weights)!r}, custom_load=False))")
    kwargs = {**spec["kwargs"], "img_size": tuple(spec["kwargs"]["img_size"])}
    return (f"m = timm.models.VisionTransformer(**{kwargs!r}); "
            f"m.load_state_dict(safetensors.torch.load_file({str(weights)!r}))")


def classifier(encoder: MaskedAutoencoder, arch: dict[str, Any], num_classes: int, *, drop_path: float) -> nn.Module:
    """timm's VisionTransformer holding `encoder`'s weights (position embeddings included, trainable from here on, as
    in MAE fine-tuning), stochastic depth `drop_path`, and a fresh linear head on the class token (trunc-normal,
    std 2e-5, as the official fine-tuning initialises it)."""
    return with_head(encoder, arch, num_classes, tuple(encoder.img_size), dense=False, drop_path=drop_path)


def segmenter(encoder: MaskedAutoencoder, arch: dict[str, Any], num_classes: int, size: tuple[int, int], *, drop_path: float = 0.0) -> nn.Module:
    """As `classifier`, at input `size` (position embeddings resampled bicubically to the new grid when the size
    differs) and with no pooling: `model(x)` is (N, 1 + L, num_classes), a linear head on every token (Segmenter's
    linear decoder; `dense_logits` makes it a map); num_classes 0: the normalized tokens."""
    return with_head(encoder, arch, num_classes, size, dense=True, drop_path=drop_path)


def with_head(encoder: MaskedAutoencoder, arch: dict[str, Any], num_classes: int, size: tuple[int, int], *, dense: bool, drop_path: float) -> nn.Module:
    """timm's ViT at `size` with `encoder`'s weights and a fresh head of `num_classes` (none for 0), on the class token
    or (`dense`) on every token."""
    from timm.layers import resample_abs_pos_embed
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(**{**timm_spec({**arch, "img_size": list(size)}, num_classes, dense=dense)["kwargs"], "drop_path_rate": drop_path})
    state = encoder_state_dict(encoder)
    if tuple(model.patch_embed.grid_size) != tuple(encoder.grid_size):
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=list(model.patch_embed.grid_size),
                                                    old_size=list(encoder.grid_size), num_prefix_tokens=1)
    missing, unexpected = model.load_state_dict(state, strict=False)
    head = {"head.weight", "head.bias"} if num_classes else set()
    assert set(missing) == head and not unexpected, f"encoder keys do not fit timm's ViT: {missing} {unexpected}"
    if num_classes:
        nn.init.trunc_normal_(model.head.weight, std=2e-5)
        nn.init.zeros_(model.head.bias)
    return model


def dense_logits(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per-token outputs (N, 1 + L, C) -> a map over the patch grid (N, C, gh, gw), the class token dropped."""
    return tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
