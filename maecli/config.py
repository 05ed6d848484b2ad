"""The project file `maecli.toml`: pydantic models, loading, `--set` overrides and error text.

One section per stage. Relative paths resolve against the folder of the project file. Every problem
is reported at once, one line each, as `maecli.toml: model.mask_ratio: must be less than 1 (got 1.5)`.
"""

import difflib
import json
import os
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, ValidationError, ValidationInfo, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError

from maecli.errors import ConfigError
from maecli.files import write_text
from maecli.methods import METHODS, described, listed
from maecli.methods.sections import SECTIONS
from maecli.schema import Section, area_range

CONFIG_NAME = "maecli.toml"

# Encoder sizes of the official ViT / MAE models; any field set explicitly in [model] wins.
PRESETS: dict[str, dict[str, int]] = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_huge": dict(embed_dim=1280, depth=32, num_heads=16),
}
PresetName = Literal["vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge"]
CompileMode = Literal["auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]  # torch.compile's modes, and auto


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    """Relative paths are relative to the project file's folder (passed as validation context)."""
    root = (info.context or {}).get("root")
    if root is None or value.is_absolute():
        return value
    return Path(os.path.normpath(Path(root) / value))


def _resolve_optional(value: str, info: ValidationInfo) -> str:
    """An optional path ("" for none), resolved against the project file's folder."""
    return str(_resolve_path(Path(value), info)) if value else value


def _known_method(value: str) -> str:
    """A registered pretraining method (`maecli.methods`), reported as a Literal's error is."""
    if value not in METHODS:
        raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": listed([repr(name) for name in METHODS])})
    return value


MethodName = Annotated[str, AfterValidator(_known_method)]


def _square(value: Any) -> Any:
    return [value, value] if isinstance(value, int) and not isinstance(value, bool) else value


def _positive(value: tuple[int, int]) -> tuple[int, int]:
    if min(value) <= 0:
        raise ValueError(f"must be positive (got {list(value)})")
    return value


# An image size: one number for a square, or [height, width].
Size = Annotated[tuple[int, int], BeforeValidator(_square), AfterValidator(_positive)]


class ProjectConfig(Section):
    """What the project is called, where its runs go, and the seed behind every random choice."""

    name: str = Field("maecli-project", min_length=1, description="Name of the project, recorded in every run.")
    output_dir: Path = Field(Path("runs"), description="Folder for runs and checkpoints (relative paths: to this file).")
    seed: int = Field(0, ge=0, description="Seed for every random choice: masks, crops, splits.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where every command runs; auto: CUDA when present (bf16), else CPU (float32).")
    stop_timeout: float = Field(30.0, gt=0, description="Seconds a training run may take to stop after Ctrl-C or SIGTERM (its checkpoint at the agreed step); past them it exits without a new checkpoint.")

    _resolve_output_dir = field_validator("output_dir")(_resolve_path)


class ModelConfig(Section):
    """The MAE: a ViT encoder that sees the visible patches only, and a light decoder (names as in the official MAE)."""

    preset: PresetName = Field("vit_base", description="Encoder size: vit_tiny, vit_small, vit_base, vit_large or vit_huge.")
    img_size: Size = Field((224, 224), description="Input size: one number for square images, or [height, width].")
    patch_size: int = Field(16, gt=0, description="Side of a square patch in pixels; must divide both sides of img_size.")
    embed_dim: int = Field(gt=0, description="Encoder width (default: from preset).")
    depth: int = Field(gt=0, description="Encoder blocks (default: from preset).")
    num_heads: int = Field(gt=0, description="Encoder attention heads; must divide embed_dim (default: from preset).")
    decoder_embed_dim: int = Field(512, gt=0, description="Decoder width.")
    decoder_depth: int = Field(8, gt=0, description="Decoder blocks.")
    decoder_num_heads: int = Field(16, gt=0, description="Decoder attention heads; must divide decoder_embed_dim.")
    mlp_ratio: float = Field(4.0, gt=0, description="Hidden width of each MLP as a multiple of the block's width.")
    mask_ratio: float = Field(0.75, gt=0, lt=1, description="Fraction of patches removed before the encoder.")
    norm_pix_loss: bool = Field(False, description="Predict per-patch normalized pixels (better features, as in the paper).")

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        preset = data.get("preset", cls.model_fields["preset"].default)
        # An unknown preset is reported on its own; filling from the default keeps it the only error.
        sizes = PRESETS.get(preset, PRESETS[cls.model_fields["preset"].default]) if isinstance(preset, str) else {}
        return {**sizes, **data}

    @model_validator(mode="after")
    def _consistent(self) -> "ModelConfig":
        problems = []
        if self.img_size[0] % self.patch_size or self.img_size[1] % self.patch_size:
            problems.append(f"img_size: must be divisible by patch_size {self.patch_size} (got {list(self.img_size)})")
        for width, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
            if getattr(self, width) % getattr(self, heads):
                problems.append(f"{heads}: must divide {width} {getattr(self, width)} (got {getattr(self, heads)})")
            if getattr(self, width) % 4:
                problems.append(f"{width}: must be divisible by 4 for 2-D sin-cos position embeddings (got {getattr(self, width)})")
        if not problems and int(self.num_patches * (1 - self.mask_ratio)) < 1:
            problems.append(f"mask_ratio: leaves no visible patch out of {self.num_patches} (got {self.mask_ratio})")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def num_patches(self) -> int:
        return (self.img_size[0] // self.patch_size) * (self.img_size[1] // self.patch_size)

    @property
    def mae_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `MaskedAutoencoder` (the architecture; mask_ratio is a forward argument)."""
        return self.model_dump(exclude={"preset", "mask_ratio"})


class ExtractConfig(Section):
    """Videos to a frame store: which files, how frames are sampled, and the stored frame size."""

    inputs: list[str] = Field([], description="Video files, folders (searched recursively) and glob patterns (relative: to this file).")
    store: str = Field("frames", description="The frame store that extract writes and every other command reads: a folder, or a URL (s3://, gs://; https:// to read).")
    fps: float = Field(2.0, ge=0, description="Frames kept per second of video, chosen by timestamp (0: sample by every_n).")
    every_n: int = Field(0, ge=0, description="Keep every N-th decoded frame instead of sampling by fps (needs fps = 0).")
    start: float = Field(0.0, ge=0, description="Seconds skipped at the start of each video.")
    end: float = Field(0.0, ge=0, description="Stop at this second of each video (0: at its end).")
    max_frames: int = Field(0, ge=0, description="At most this many frames per video (0: no cap).")
    size: Size = Field((224, 224), description="Stored frame size: one number for square frames, or [height, width].")
    resize: Literal["crop", "stretch"] = Field("crop", description="crop: scale the short side to fit, then center-crop; stretch: scale to size exactly.")
    dedup: float = Field(
        0.004, ge=0, lt=1, description="Drop a frame whose mean grey difference (0-1) to the last kept one is below this (0: keep all)."
    )
    val_fraction: float = Field(0.05, ge=0, lt=1, description="Fraction of videos held out for validation (whole videos, chosen by content).")
    workers: int = Field(0, ge=0, description="Videos decoded in parallel, one process each (0: one per CPU core).")
    shard_frames: int = Field(1024, gt=0, description="Frames per shard file in the store.")
    format: Literal["jpeg", "raw"] = Field("jpeg", description="jpeg: WebDataset tar shards of JPEG frames, ~18x smaller; raw: uint8 arrays, memory-mapped.")
    quality: int = Field(90, ge=1, le=100, description="JPEG quality of the stored frames (format jpeg).")

    @field_validator("inputs")
    @classmethod
    def _resolve_inputs(cls, value: list[str], info: ValidationInfo) -> list[str]:
        root = (info.context or {}).get("root")
        return [str(Path(root) / v) if root and not Path(v).is_absolute() else v for v in value]

    @field_validator("store")
    @classmethod
    def _resolve_store(cls, value: str, info: ValidationInfo) -> str:
        if not value:
            raise ValueError("give a folder or a URL")
        return value.rstrip("/") if "://" in value else str(_resolve_path(Path(value), info))

    @model_validator(mode="after")
    def _one_sampling(self) -> "ExtractConfig":
        problems = []
        if self.fps > 0 and self.every_n > 0:
            problems.append(f"every_n: set fps = 0 to keep every N-th frame (got every_n {self.every_n} with fps {_show(self.fps)})")
        if self.fps == 0 and self.every_n == 0:
            problems.append("fps: set fps > 0, or every_n > 0 with fps = 0")
        if self.end and self.end <= self.start:
            problems.append(f"end: must be after start {_show(self.start)} (got {_show(self.end)})")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def settings(self) -> dict[str, Any]:
        """What defines the frames of a store (not where they come from, nor how many processes)."""
        return self.model_dump(mode="json", exclude={"inputs", "store", "workers"})


class PretrainConfig(Section):
    """Pretraining on the store's train split: the official MAE recipe (AdamW, warmup + cosine), checkpoints, logging."""

    run: str = Field("pretrain", min_length=1, description="Run folder name, under project.output_dir.")
    method: MethodName = Field("mae", description=described(SECTIONS) + ".")
    batch_size: int = Field(64, gt=0, description="Images per device per step (the effective batch is batch_size x devices x accum_iter).")
    epochs: int = Field(100, ge=0, description="Passes over the train split (replaced by steps when steps > 0).")
    steps: int = Field(0, ge=0, description="Total optimizer steps; when > 0 it replaces epochs.")
    accum_iter: int = Field(1, gt=0, description="Gradient accumulation: micro-batches per optimizer step.")
    blr: float = Field(1.5e-4, gt=0, description="Base learning rate: lr = blr x effective batch / 256.")
    lr: float = Field(0.0, ge=0, description="Absolute learning rate (0: from blr).")
    min_lr: float = Field(0.0, ge=0, description="Learning rate at the end of the cosine decay.")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (none on biases, norms, position embeddings and tokens).")
    warmup_epochs: float = Field(5.0, ge=0, description="Linear warmup length in epochs (replaced by warmup_steps when > 0).")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup length in optimizer steps; when > 0 it replaces warmup_epochs.")
    clip_grad: float = Field(0.0, ge=0, description="Clip the gradient norm to this value (0: no clipping).")
    crop_scale: tuple[float, float] = Field((0.2, 1.0), description="MAE's random resized crop: range of the crop's area as a fraction of the frame.")
    hflip: bool = Field(True, description="MAE's random horizontal flips.")
    compile: bool | Literal["auto"] = Field("auto", description="torch.compile the model (auto: on CUDA only; compiling on a CPU rarely pays).")
    compile_mode: CompileMode = Field("auto", description="torch.compile's mode: auto (reduce-overhead for a small model's step on CUDA, else default), default (each transformer block compiled once), reduce-overhead (CUDA graphs of the whole model), max-autotune, max-autotune-no-cudagraphs.")
    checkpoint_every: int = Field(1000, gt=0, description="Write a checkpoint and a reconstruction snapshot every this many steps (and at the end).")
    keep_last: int = Field(3, gt=0, description="Checkpoints kept in the run folder (older ones are deleted).")
    log_every: int = Field(20, gt=0, description="Append a metrics line every this many steps.")
    init_from: str = Field("", description="Start from these weights: a maecli checkpoint, an official MAE .pth or a Hugging Face ViTMAE folder.")

    _scale_range = field_validator("crop_scale")(area_range)

    _resolve_init_from = field_validator("init_from")(_resolve_optional)

    @model_validator(mode="after")
    def _has_length(self) -> "PretrainConfig":
        if self.epochs == 0 and self.steps == 0:
            raise ValueError("epochs: set epochs > 0 or steps > 0")
        return self


class VisualizeConfig(Section):
    """Reconstruction pictures and clips from a checkpoint."""

    checkpoint: str = Field("", description="Weights to show (default: the pretraining run's latest checkpoint).")
    split: Literal["val", "train"] = Field("val", description="Store frames to show when no image or video is given.")
    num_images: int = Field(8, gt=0, description="Rows in the picture: frames or images shown.")
    mask_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of patches removed (0: the model's mask_ratio).")
    stats: Literal["visible", "target"] = Field(
        "visible", description="norm_pix_loss models: de-normalize with the visible patches' statistics, or the true target's (leaks information)."
    )

    _resolve_checkpoint = field_validator("checkpoint")(_resolve_optional)


class ExportConfig(Section):
    """Encoder weights for timm or Hugging Face, and frozen-encoder features."""

    checkpoint: str = Field("", description="Weights to export (default: the pretraining run's latest checkpoint).")
    out: str = Field("", description="Output folder (default: export/ in the pretraining run folder).")
    pool: Literal["cls", "mean", "patch"] = Field("cls", description="Features: the class token, the mean of the patch tokens, or every patch token.")
    dtype: Literal["float16", "float32"] = Field("float16", description="Feature precision on disk.")
    batch_size: int = Field(256, gt=0, description="Images per forward pass.")
    split: Literal["all", "train", "val"] = Field("all", description="Store frames to embed when no images or video are given.")

    _resolve_paths = field_validator("checkpoint", "out")(_resolve_optional)


class ProbeConfig(Section):
    """The labeled set that probe, finetune and compare judge an encoder on, and the frozen-encoder probes. A set is a
    classification folder (one sub-folder per class: linear probe and k-NN on a pooled token) or a segmentation folder
    (images/ and masks/, matched by file stem, optional classes.csv: a BatchNorm + 1x1 linear head on the patch-token
    grid, scored by mIoU)."""

    train: str = Field("", description="Labeled training set: one folder per class, or images/ + masks/ (segmentation).")
    val: str = Field("", description="Labeled validation set of the same kind (default: a val_fraction of train).")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="Share held out when there is no val folder (of each class; of the frames for segmentation).")
    per_class: int = Field(0, ge=0, description="Use at most this many training images per class, chosen by the seed (0: all): accuracy with few labels.")
    frames: int = Field(0, ge=0, description="Segmentation: train on at most this many labeled frames, chosen by the seed (0: all).")
    ignore_index: int = Field(255, ge=0, le=255, description="Segmentation: the mask value that marks unlabeled pixels (CamVid: 11).")
    input_size: Size | None = Field(None, examples=[[240, 320]], description="Segmentation: the input size [height, width] (default: the model's img_size; position embeddings are interpolated).")
    layers: int = Field(1, gt=0, description="Segmentation probe: patch tokens of the last N blocks, each after the final norm, concatenated (MAE's features spread over layers: try 4).")
    batch_frames: int = Field(16, gt=1, description="Segmentation probe: frames per step (the head sees every pixel of each).")
    hflip: bool = Field(False, description="Segmentation probe: random horizontal flips (then features are computed every step instead of cached).")
    crop_scale: tuple[float, float] = Field((1.0, 1.0), description="Segmentation probe: scale jitter, random crops of this range of the frame's area ([1, 1]: none, features cached).")
    checkpoint: str = Field("", description="Encoder to probe (default: the pretraining run's latest checkpoint).")
    run: str = Field("probe", min_length=1, description="Folder for the probe's report and pictures, inside the pretraining run folder.")
    pool: Literal["cls", "mean"] = Field("cls", description="Feature: the class token (the MAE protocol) or the mean of the patch tokens.")
    epochs: int = Field(100, gt=0, description="Linear-probe epochs over the cached features.")
    lr: float = Field(1e-3, gt=0, description="Linear-probe AdamW learning rate (cosine to 0, no weight decay).")
    batch_size: int = Field(256, gt=0, description="Linear-probe batch size.")
    k: int = Field(20, gt=0, description="Neighbours of the weighted k-NN classifier (cosine similarity).")
    temperature: float = Field(0.07, gt=0, description="k-NN vote weights: exp(similarity / temperature).")

    _resolve_paths = field_validator("train", "val", "checkpoint")(_resolve_optional)
    _scale_range = field_validator("crop_scale")(area_range)


class FinetuneConfig(Section):
    """Fine-tuning the encoder with a linear head on the labeled set of [probe] (train / val): the MAE fine-tuning
    recipe (AdamW, layer-wise lr decay, warmup + cosine, drop path, label smoothing), sized for small label sets."""

    checkpoint: str = Field("", description="Encoder to fine-tune (default: the pretraining run's latest checkpoint).")
    run: str = Field("finetune", min_length=1, description="Folder for the fine-tuning runs, inside the pretraining run folder.")
    epochs: int = Field(30, gt=0, description="Passes over the labeled train images.")
    batch_size: int = Field(64, gt=0, description="Images per device per step (the effective batch is batch_size x devices).")
    blr: float = Field(4e-3, gt=0, description="Base learning rate: lr = blr x effective batch / 256 (1e-3 at batch 64).")
    lr: float = Field(0.0, ge=0, description="Absolute learning rate (0: from blr).")
    min_lr: float = Field(1e-6, ge=0, description="Learning rate at the end of the cosine decay.")
    warmup_epochs: float = Field(3.0, ge=0, description="Linear warmup length in epochs.")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (none on biases, norms, position embeddings and tokens).")
    layer_decay: float = Field(0.75, gt=0, le=1, description="Layer-wise lr decay: block i of D trains at lr x layer_decay^(D - i); the head at lr.")
    drop_path: float = Field(0.1, ge=0, lt=1, description="Stochastic depth rate of the last block (linear from 0 over the blocks).")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Label smoothing of the cross-entropy targets.")
    blocks: int = Field(-1, ge=-1, description="Train only the last N encoder blocks (and the final norm) with the head; 0: the head only; -1: all.")
    crop_scale: tuple[float, float] = Field((0.5, 1.0), description="Random resized crop: range of the crop's area as a fraction of the image.")
    hflip: bool = Field(False, description="Random horizontal flips (off by default: they change the meaning of signs, arrows and text).")
    mixup: float = Field(0.0, ge=0, description="Mixup's Beta(alpha, alpha) (0: off).")
    cutmix: float = Field(0.0, ge=0, description="CutMix's Beta(alpha, alpha) (0: off); with mixup too, each step picks one of them.")
    compile: bool | Literal["auto"] = Field("auto", description="torch.compile the model (auto: on CUDA only).")
    compile_mode: CompileMode = Field("auto", description="torch.compile's mode: auto (reduce-overhead for a small model's step on CUDA, else default), default (each transformer block compiled once), reduce-overhead (CUDA graphs of the whole model), max-autotune, max-autotune-no-cudagraphs.")
    checkpoint_every: int = Field(1, gt=0, description="Evaluate on val (a point of the learning curves) and write a checkpoint every this many epochs, and at the end.")
    keep_last: int = Field(2, gt=0, description="Checkpoints kept per run (older ones are deleted).")

    _scale_range = field_validator("crop_scale")(area_range)
    _resolve_checkpoint = field_validator("checkpoint")(_resolve_optional)


DURATION = re.compile(r"(\d+(?:\.\d+)?)(s|m|h)")
SECONDS = {"s": 1, "m": 60, "h": 3600}


class CompareConfig(Section):
    """`maecli compare`: each method pretrained on the store under one compute budget, probed at 1/8, 1/4, 1/2 and all
    of it on the labeled set of [probe] (and fine-tuned at the end). Each run's recipe is [pretrain]'s (and its method's
    own section); compare sets its length. Give one budget: a time, FLOPs, or steps."""

    run: str = Field("compare", min_length=1, description="Folder for the comparison, under project.output_dir (one run per method inside).")
    methods: list[MethodName] = Field(["mae", "simclr"], min_length=1, description=f"Methods to compare ({', '.join(METHODS)}); the first is the reference of budget_steps.")
    budget: str = Field("", description="Training time per method on this device, like 90s, 20m or 2h: steps from a measured step time.")
    budget_flops: float = Field(0.0, ge=0, description="Training FLOPs per method (analytic, forward + backward).")
    budget_steps: int = Field(0, ge=0, description="Steps of the reference method (the first); the others get the same FLOPs.")
    finetune_epochs: int = Field(0, ge=0, description="Then fine-tune each method's final encoder, and a random-init one, for this many epochs ([finetune]'s recipe; 0: not).")
    warmup: float = Field(0.05, ge=0, lt=1, description="Each method's linear warmup as a fraction of its steps (the methods run for different step counts; [pretrain]'s warmup is for one run).")

    @field_validator("budget")
    @classmethod
    def _duration(cls, value: str) -> str:
        if value and not DURATION.fullmatch(value):
            raise ValueError(f"expected a duration like 90s, 20m or 2h (got {_show(value)})")
        return value

    @field_validator("methods")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) < len(value):
            raise ValueError(f"each method once (got {_show(value)})")
        return value

    @model_validator(mode="after")
    def _one_budget(self) -> "CompareConfig":
        given = [name for name in ("budget", "budget_flops", "budget_steps") if getattr(self, name)]
        if len(given) > 1:
            raise ValueError(f"{given[1]}: give one budget (got {' and '.join(given)})")
        return self

    @property
    def budget_seconds(self) -> float:
        number, unit = DURATION.fullmatch(self.budget).groups()
        return float(number) * SECONDS[unit]


class ProjectFile(Section):
    """What holds across sections (the fields are `MaecliConfig`'s)."""

    @model_validator(mode="after")
    def _visible_patches(self) -> "ProjectFile":
        """A method that runs (in pretrain or compare) with a mask ratio of its own (its section's) must leave its
        masked image a visible patch."""
        problems = []
        for name in dict.fromkeys((self.pretrain.method, *self.compare.methods)):
            ratio = getattr(getattr(self, name, None), "mask_ratio", None)
            if ratio is not None and int(self.model.num_patches * (1 - ratio)) < 1:
                problems.append(f"{name}.mask_ratio: leaves no visible patch out of the model's {self.model.num_patches} (got {_show(ratio)})")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def run_dir(self) -> Path:
        return self.project.output_dir / self.pretrain.run


STAGES: dict[str, type[Section]] = dict(project=ProjectConfig, model=ModelConfig, extract=ExtractConfig, pretrain=PretrainConfig, **SECTIONS,
                                        visualize=VisualizeConfig, export=ExportConfig, probe=ProbeConfig, finetune=FinetuneConfig, compare=CompareConfig)
# The whole project file: one section per stage, each method's own after [pretrain] (`maecli.methods.sections`).
MaecliConfig = create_model("MaecliConfig", __base__=ProjectFile, __module__=__name__,
                            **{name: (section, Field(default_factory=dict)) for name, section in STAGES.items()})


# --- loading ------------------------------------------------------------------------------------


def load_config(path: Path, overrides: Sequence[str] = ()) -> MaecliConfig:
    """Read, override and validate a project file. `path` may be the file or its folder."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_NAME
    if not path.exists():
        raise ConfigError(f"{path}: file not found (create one with 'maecli init')")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read: {getattr(err, 'strerror', None) or err}") from None
    overridden = apply_overrides(data, overrides)
    return validate_config(data, root=path.resolve().parent, source=str(path), overridden=overridden)


def validate_config(data: dict[str, Any], *, root: Path, source: str, overridden: set[str] = frozenset()) -> MaecliConfig:
    try:
        return MaecliConfig.model_validate(data, context={"root": root})
    except ValidationError as err:
        raise ConfigError(*format_errors(err, source, overridden)) from None


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> set[str]:
    """Apply `section.key=value` items to `data` in place; values are read as TOML, else as plain strings."""
    overridden = set()
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ConfigError(f"--set: expected section.key=value (got {item!r})")
        node = data
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key.strip()}: {'.'.join(parts[: i + 1])} is not a table")
        node[parts[-1]] = _parse_value(raw.strip())
        overridden.add(".".join(parts))
    return overridden


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


# --- error text ---------------------------------------------------------------------------------


def format_errors(err: ValidationError, source: str, overridden: set[str] = frozenset()) -> list[str]:
    lines = []
    for e in err.errors():
        loc = [str(part) for part in e["loc"]]
        if e["type"] == "value_error":
            # Cross-field checks report several "field: text" lines at the section's location.
            messages = [m.split(": ", 1) if ": " in m else [None, m] for m in str(e["ctx"]["error"]).splitlines()]
        else:
            messages = [[None, _describe(e, loc)]]
        for field, text in messages:
            where = ".".join(loc + ([field] if field else []))
            origin = "--set" if any(o == where or o.startswith(where + ".") or where.startswith(o + ".") for o in overridden) else source
            lines.append(f"{origin}: {where}: {text}" if where else f"{origin}: {text}")
    return lines


MOVED = {"pretrain.device": "project.device", "visualize.fps": "extract.fps (every command samples a video as extract does)"}  # keys of earlier versions, and where they live now


def _describe(e: dict[str, Any], loc: list[str]) -> str:
    t, ctx = e["type"], e.get("ctx", {})
    got = f" (got {_show(e.get('input'))})"
    if t == "missing":
        return "required"
    if t == "extra_forbidden":
        if ".".join(loc) in MOVED:
            return f"moved to {MOVED['.'.join(loc)]}"
        close = difflib.get_close_matches(loc[-1], _known_keys(loc[:-1]), n=1)
        return "unknown key" + (f"; did you mean '{close[0]}'?" if close else "")
    text = {
        "greater_than": f"must be greater than {_show(ctx.get('gt'))}",
        "greater_than_equal": f"must be at least {_show(ctx.get('ge'))}",
        "less_than": f"must be less than {_show(ctx.get('lt'))}",
        "less_than_equal": f"must be at most {_show(ctx.get('le'))}",
        "literal_error": f"must be one of {ctx.get('expected')}",
        "int_type": "must be an integer",
        "int_parsing": "must be an integer",
        "int_from_float": "must be an integer",
        "float_type": "must be a number",
        "float_parsing": "must be a number",
        "bool_type": "must be true or false",
        "bool_parsing": "must be true or false",
        "string_type": "must be a string",
        "string_too_short": "must not be empty",
        "path_type": "must be a path (a string)",
        "model_type": "must be a table",
        "dict_type": "must be a table",
        "tuple_type": "must be a list",
        "too_short": f"must have {ctx.get('min_length')} items",
        "too_long": f"must have {ctx.get('max_length')} items",
    }.get(t)
    return (text or e["msg"][0].lower() + e["msg"][1:]) + got


def _known_keys(loc: list[str]) -> list[str]:
    model: Any = MaecliConfig
    for part in loc:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        model = field.annotation
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _show(value: Any) -> str:
    """A value as the user wrote it in TOML: 1 not 1.0, true not True, "text" in quotes."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps(value, default=str, ensure_ascii=False)


# --- writing ------------------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)


def dump_toml(config: MaecliConfig) -> str:
    """The resolved config as TOML (every value explicit)."""
    out = []
    for name, section in config:
        out.append(f"[{name}]")
        out.extend(f"{key} = {toml_value(value)}" for key, value in section.model_dump(mode="json").items() if value is not None)  # None: unset
        out.append("")
    return "\n".join(out)


def template() -> str:
    """A commented project file with every option at its default (what `maecli init` writes)."""
    out = ["# maecli project file. Every option is shown at its default; relative paths are relative to this file.", ""]
    for name, field in MaecliConfig.model_fields.items():
        section = field.annotation
        out += [f"# {line.strip()}" for line in section.__doc__.strip().splitlines()] + [f"[{name}]"]
        for key, info in section.model_fields.items():
            out.append(f"# {info.description}")
            if info.is_required():  # sized by the preset: shown commented, at the default preset's value
                preset = section.model_fields["preset"].default
                out.append(f"# {key} = {toml_value(PRESETS[preset][key])}")
            elif info.default is None:  # unset by default: shown commented, with an example value
                out.append(f"# {key} = {toml_value(info.examples[0])}")
            else:
                default = info.default
                out.append(f"{key} = {toml_value(list(default) if isinstance(default, tuple) else default)}")
        out.append("")
    return "\n".join(out)


def write_template(directory: Path, force: bool = False) -> Path:
    path = Path(directory) / CONFIG_NAME
    if path.exists() and not force:
        raise ConfigError(f"{path}: already exists (use --force to overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, template())
    return path
