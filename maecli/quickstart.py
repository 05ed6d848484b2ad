"""`maecli quickstart`: the whole lifecycle on built-in synthetic dashcam video, offline, in minutes on a CPU.

Generates driving clips, a labeled still set (road curving left / straight / right) and a segmentation set (stills
labeled per pixel: sky, grass, road, shoulder, lane marking, pole, tree, car), writes a project file sized for the
machine, then runs extract -> pretrain -> visualize -> export -> probe (against a random-init encoder and the raw
pixels) -> finetune (against a random-init encoder), and the probe and fine-tuning again on the segmentation set
(`probe.run` / `finetune.run` "*-segmentation"). Every stage resumes, so running it again continues where it
stopped. The results tables are also written to `results.md`, the file the README quotes.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from maecli.config import CONFIG_NAME, load_config
from maecli.export import export_encoder
from maecli.extract import run_extract
from maecli.files import write_text
from maecli.finetune import run_finetune
from maecli.probe import run_probe
from maecli.synthetic import generate_clips, generate_labeled, generate_segmentation
from maecli.tasks import task_of
from maecli.train import pretrain
from maecli.visualize import run_visualize

PROJECT = """\
# maecli quickstart: a small MAE on synthetic dashcam video, sized for a laptop CPU.
# Edit and run `maecli quickstart` again (it continues), or run the stages one by one:
#   maecli extract; maecli pretrain; maecli visualize; maecli export encoder;
#   maecli probe --baseline random --baseline pixels; maecli finetune --baseline random
# and per pixel (segmentation): add --set probe.train=segmentation/train --set probe.val=segmentation/val
#   --set probe.run=probe-segmentation (finetune: --set finetune.run=finetune-segmentation --set finetune.batch_size=32
#   --set finetune.epochs=20) to probe and finetune

[project]
name = "quickstart"
output_dir = "runs"
seed = 0

[model]
preset = "vit_tiny"       # 192 wide, 3 heads; 6 blocks instead of 12 to fit a CPU budget
depth = 6
img_size = [48, 96]       # wide frames stay wide: 6 x 12 patches of 8 x 8 pixels
patch_size = 8
decoder_embed_dim = 128
decoder_depth = 2
decoder_num_heads = 4
mask_ratio = 0.75
norm_pix_loss = true

[extract]
inputs = ["videos"]
store = "frames"
fps = 4.0
size = [72, 144]
val_fraction = 0.15

[pretrain]
batch_size = 64
steps = {steps}
warmup_steps = {warmup}
lr = 1.5e-3
# A dashcam is mounted: horizon and vanishing point never move. Crops that keep most of the frame keep that
# geometry, so filling in the far road means inferring its curve (MAE's default, 0.2-1.0, zooms it away:
# measured on this demo, it turned the probe gain from -6 into +6 points; docs/benchmarks.md).
crop_scale = [0.8, 1.0]
checkpoint_every = {checkpoint_every}
log_every = 10

[visualize]
num_images = 6

[probe]
train = "labeled/train"
val = "labeled/val"
epochs = 100

[finetune]
epochs = {finetune_epochs}
"""


def write_project(folder: Path) -> Path:
    """The quickstart's project file; an existing one (perhaps edited) is kept."""
    path = folder / CONFIG_NAME
    if not path.exists():
        steps = 4000 if torch.cuda.is_available() else 1000  # a GPU trains longer in the same minutes
        write_text(path, PROJECT.format(steps=steps, warmup=steps // 20, checkpoint_every=steps // 4, finetune_epochs=30 if torch.cuda.is_available() else 10))
    return path


THREADS = 2  # the demo's torch threads on any machine: the order of its float reductions, and so its figures, then
# depend on the instruction set alone (a 1-thread run and a 2-thread run part by up to 4 points; docs/benchmarks.md)


@contextmanager
def threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for the block, then back as they were."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def quickstart(folder: Path, *, overrides: list[str], clips: int = 16, per_class: int = 200, console: Console | None = None) -> dict[str, Any]:
    with threads(THREADS):
        return _quickstart(folder, overrides, clips, per_class, console)


def _quickstart(folder: Path, overrides: list[str], clips: int, per_class: int, console: Console | None) -> dict[str, Any]:
    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    say = console.print if console is not None else (lambda *a, **k: None)

    seg = max(4, (per_class + 1) // 2)  # segmentation frames: 200 train + 100 val by default
    say(f"[bold]1/8 generating[/] {clips} synthetic dashcam clips, {3 * per_class} + {3 * (per_class // 2)} labeled stills and {2 * seg} + {seg} "
        f"stills labeled per pixel in {folder}")
    generate_clips(folder / "videos", count=clips, seconds=12.0, fps=10, seed=0)
    generate_labeled(folder / "labeled" / "train", per_class=per_class, seed=1)
    generate_labeled(folder / "labeled" / "val", per_class=per_class // 2, seed=2)
    generate_segmentation(folder / "segmentation" / "train", count=2 * seg, seed=3)
    generate_segmentation(folder / "segmentation" / "val", count=seg, seed=4)
    cfg = load_config(write_project(folder), overrides)
    # 200 frames at batch 64 are 3 steps an epoch: fine-tuning on them takes batches of 32 for twice the epochs (120 steps)
    seg_cfg = load_config(folder / CONFIG_NAME, [*overrides, "probe.train=segmentation/train", "probe.val=segmentation/val",
                                                 "probe.run=probe-segmentation", "finetune.run=finetune-segmentation",
                                                 f"finetune.batch_size={min(32, cfg.finetune.batch_size)}", f"finetune.epochs={2 * cfg.finetune.epochs}"])

    say("[bold]2/8 extract[/]: videos -> frame store")
    extracted = run_extract(cfg.extract, console=console)
    say("[bold]3/8 pretrain[/]: masked autoencoder on the train frames")
    trained = pretrain(cfg, console=console)
    say("[bold]4/8 visualize[/]: reconstructions of validation frames")
    shown = run_visualize(cfg, [])
    say("[bold]5/8 export[/]: the encoder for timm")
    exported = export_encoder(cfg, checkpoint=None, fmt="timm", out=None)
    say("[bold]6/8 probe[/]: road curvature (left / straight / right) from frozen features, against a random-init encoder and the raw pixels")
    probed = run_probe(cfg, baselines=("random", "pixels"))
    say("[bold]7/8 finetune[/]: the same labels, encoder trained end to end, against a random-init encoder")
    tuned = run_finetune(cfg, baselines=("random",), console=console)
    say("[bold]8/8 segmentation[/]: the same encoder judged per pixel (road, lane marking, car, pole, ...), frozen and fine-tuned")
    seg_probed = run_probe(seg_cfg, baselines=("random", "pixels"))
    seg_tuned = run_finetune(seg_cfg, baselines=("random",), console=console)
    table = task_of(cfg).table(probed, tuned) + "\n" + task_of(seg_cfg).table(seg_probed, seg_tuned)
    write_text(folder / "results.md", table)
    return dict(folder=str(folder), config=str(folder / CONFIG_NAME), store=extracted, pretrain=trained, visualize=shown, export=exported, probe=probed,
                finetune=tuned, segmentation=dict(probe=seg_probed, finetune=seg_tuned), table=table, results=str(folder / "results.md"))
