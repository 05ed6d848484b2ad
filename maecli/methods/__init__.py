"""The pretraining methods, one module each. The loop (`maecli.train`) and the loader (`maecli.data`) are one for every
method; a method supplies the rest:

- `samples(store)`: what a sample reads, `data.Samples` (every frame alone, or a frame and the range its later frame
  comes from) and notes for the user;
- `build()`: its model (the encoder keys are the MAE's whatever the method, so every command reads its encoder);
- `draw(rng, n, frame_hw)`: each sample's randomness for n samples as numpy arrays (crops, masks, colours), drawn per
  (seed, micro-step) for the whole global batch by `data.Loader`;
- `inputs(frames, *draws)`: uint8 frames (B, F, H, W, 3) -> the model's inputs, augmented in batched ops on the device;
- `loss(model, *inputs)`: the scalar to minimise (under autocast);
- `flops_per_image()`: analytic training FLOPs of one sample, forward + backward (a multiply-add is 2 FLOPs).

    mae      masked autoencoding of single frames (He et al. 2021)            `maecli.methods.mae`
    simclr   contrastive, two augmented views of a frame (Chen et al. 2020)  `maecli.methods.simclr`
    siammae  a later frame rebuilt from 5% of it and an earlier frame         `maecli.methods.siammae`
    cropmae  the same model on a global crop and a local crop of one frame    `maecli.methods.cropmae`
"""

from maecli.config import MaecliConfig
from maecli.methods.cropmae import CropMAE
from maecli.methods.mae import MAE
from maecli.methods.siammae import SiamMAE
from maecli.methods.simclr import Contrastive

METHODS = {"mae": MAE, "simclr": Contrastive, "siammae": SiamMAE, "cropmae": CropMAE}
Method = MAE | Contrastive | SiamMAE | CropMAE


def method_of(cfg: MaecliConfig, name: str | None = None) -> Method:
    """The method `name` (default: `pretrain.method`) with the project's settings."""
    name = name or cfg.pretrain.method
    assert name in METHODS, f"method must be one of {list(METHODS)}, got {name!r}"
    return METHODS[name](cfg)
