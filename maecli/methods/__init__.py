"""The pretraining methods, one module each, and the registry: the one place that knows which methods exist. The loop
(`maecli.train`), the loader (`maecli.data`), checkpoints, visualize, export, bench, compare and the project file's
validation read what a method declares; none of them names a method. A method class has:

- `name`; `loss_name` (the loss curve's label); `label` (bench's row); `mae_decoder`: its decoder is the MAE's (an
  `init_from` decoder must then have this run's shape; otherwise readers of the encoder leave its head behind);
  `head`: what an `init_from` may leave fresh ("decoder", ...);
- `model_class`, the module its checkpoints rebuild into; `key_marker`: a key part that recognises its checkpoints
  written before checkpoints recorded their method ("" for none);
- `kind` (how errors name it: "contrastive", "frame-pair", ...); `reconstructs`: "frames" (visualize shows frame |
  masked | reconstruction), "pairs" (a frame seen whole beside another rebuilt, `shown(store, n, device)`), or ""
  (nothing to reconstruct); `not_hf`: why Hugging Face's ViTMAE cannot hold its model ("" when it can);
- `samples(store)`: what a sample reads, `data.Samples` (every frame alone, or a frame and the range its later frame
  comes from) and notes for the user;
- `build()`: its model (the encoder keys are the MAE's whatever the method, so every command reads its encoder);
- `draw(rng, n, frame_hw)`: each sample's randomness for n samples as numpy arrays (crops, masks, colours), drawn per
  (seed, micro-step) for the whole global batch by `data.Loader`;
- `inputs(frames, *draws)`: uint8 frames (B, F, H, W, 3) -> the model's inputs, augmented in batched ops on the device;
- `loss(model, *inputs)`: the scalar to minimise (under autocast);
- `flops_per_image()`: analytic training FLOPs of one sample, forward + backward (a multiply-add is 2 FLOPs);
- `lr(batch)`: the peak learning rate at this effective batch; `after_run(loss, global_batch)`: notes for the user.

    mae      masked autoencoding of single frames (He et al. 2021)            `maecli.methods.mae`
    simclr   contrastive, two augmented views of a frame (Chen et al. 2020)  `maecli.methods.simclr`
    siammae  a later frame rebuilt from 5% of it and an earlier frame         `maecli.methods.siammae`
    cropmae  the same model on a global crop and a local crop of one frame    `maecli.methods.cropmae`

This module imports no torch (the project file validates method names against it): a method's class is imported
the first time it is asked for. `register` adds one at run time.
"""

from typing import TYPE_CHECKING, Any

from maecli.registry import resolve

if TYPE_CHECKING:
    from maecli.config import MaecliConfig

METHODS: dict[str, Any] = {  # name -> its class, or "module:class" until first asked for
    "mae": "maecli.methods.mae:MAE",
    "simclr": "maecli.methods.simclr:Contrastive",
    "siammae": "maecli.methods.siammae:SiamMAE",
    "cropmae": "maecli.methods.cropmae:CropMAE",
}

ABOUT = {  # name -> what it does, in a few words: what help texts say of it without importing it (and torch)
    "mae": "masked autoencoding",
    "simclr": "contrastive, two augmented views",
    "siammae": "frame pairs",
    "cropmae": "two crops of a frame",
}


def register(cls: Any) -> Any:
    """Add a method class (under `cls.name`); the project file accepts its name from then on."""
    METHODS[cls.name], ABOUT[cls.name] = cls, cls.kind
    return cls


def described(sections: Any = ()) -> str:
    """'mae: masked autoencoding; simclr: contrastive, two augmented views ([simclr]); ...': the methods as help lists
    them, each with its own section of the project file where it has one."""
    return "; ".join(f"{name}: {ABOUT[name]}" + (f" ([{name}])" if name in sections else "") for name in METHODS)


def listed(names: list[str]) -> str:
    """'a, b or c': names as help texts and errors list them."""
    return " or ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else "".join(names)


def method_class(name: str) -> Any:
    return resolve(METHODS, name, "method")


def method_of(cfg: "MaecliConfig", name: str | None = None) -> Any:
    """The method `name` (default: `pretrain.method`) with the project's settings."""
    return method_class(name or cfg.pretrain.method)(cfg)


def weights_method(metadata: dict[str, str], keys: Any) -> str:
    """The method that wrote a weights file: its recorded `method`, else (files from before methods were recorded,
    official and Hugging Face weights) the method whose `key_marker` a key holds, else MAE."""
    if metadata.get("method") in METHODS:
        return metadata["method"]
    keys = list(keys)
    for name in METHODS:
        marker = method_class(name).key_marker
        if marker and any(marker in k for k in keys):
            return name
    return "mae"
