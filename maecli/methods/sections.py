"""The project file's section of each method that has knobs of its own, named as the method: `SECTIONS` is what
`maecli.config` adds after [pretrain]. They sit here, beside the methods, rather than in the methods' modules because
the project file validates without torch (extraction-only installs have none) and the methods' modules import it; a
method reads its section as `cfg.<its name>`. A method without knobs has no section.
"""

from pydantic import Field, field_validator

from maecli.schema import Section, area_range, positive_range


class SimclrConfig(Section):
    """Contrastive pretraining (`pretrain.method = "simclr"`): SimCLR's two views per frame, a projection head on the
    class token, NT-Xent with the rest of the global batch as negatives. Optimizer and schedule are [pretrain]'s (the
    learning rate too unless blr is set: contrastive ViTs often need a lower one)."""

    blr: float = Field(0.0, ge=0, description="Base learning rate of SimCLR runs, lr = blr x effective batch / 256 (0: [pretrain]'s lr or blr).")
    temperature: float = Field(0.2, gt=0, description="NT-Xent temperature.")
    proj_hidden: int = Field(2048, gt=0, description="Hidden width of the 2-layer projection head.")
    proj_dim: int = Field(128, gt=0, description="Output width of the projection head (the space the loss compares in).")
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="Random resized crop of each view: range of its area as a fraction of the frame.")
    hflip: bool = Field(True, description="Random horizontal flips of each view.")
    jitter: float = Field(1.0, ge=0, description="Colour jitter strength s: brightness, contrast, saturation by up to 0.8 s, hue by up to 0.2 s.")
    jitter_prob: float = Field(0.8, ge=0, le=1, description="Probability that a view is colour-jittered.")
    grayscale_prob: float = Field(0.2, ge=0, le=1, description="Probability that a view is turned grey.")
    blur_prob: float = Field(0.5, ge=0, le=1, description="Probability that a view is Gaussian-blurred (kernel: a tenth of the image side).")
    blur_sigma: tuple[float, float] = Field((0.1, 2.0), description="Range of the blur's sigma, in pixels of the model input.")

    _scale_range = field_validator("crop_scale")(area_range)

    _sigma_range = field_validator("blur_sigma")(positive_range)


class SiammaeConfig(Section):
    """Frame-pair pretraining (`pretrain.method = "siammae"`, Siamese MAE, Gupta et al. 2023): an earlier frame seen whole,
    a later frame of the same video mostly hidden, rebuilt by a decoder that attends to the earlier one. Crop, flip,
    optimizer and schedule are [pretrain]'s; the decoder's size is [model]'s."""

    gap: tuple[float, float] = Field((0.13, 1.6), description="Seconds from the earlier frame to the later, [min, max]: the later frame is drawn uniformly among the video's frames in range (the paper: 4-48 frames at 30 fps).")
    mask_ratio: float = Field(0.95, gt=0, lt=1, description="Fraction of the later frame's patches hidden from the encoder.")

    _gap_range = field_validator("gap")(positive_range)


class CropmaeConfig(Section):
    """The crop-only control of siammae (`pretrain.method = "cropmae"`, CropMAE, Eymael et al. 2024): the same model on one
    frame, a global crop ([pretrain] crop_scale) seen whole and a local crop inside it mostly hidden."""

    local_scale: tuple[float, float] = Field((0.3, 0.6), description="The local crop's area as a fraction of the global crop's.")
    mask_ratio: float = Field(0.985, gt=0, lt=1, description="Fraction of the local crop's patches hidden from the encoder.")

    _scale_range = field_validator("local_scale")(area_range)


SECTIONS: dict[str, type[Section]] = {"simclr": SimclrConfig, "siammae": SiammaeConfig, "cropmae": CropmaeConfig}
