"""The CamVid dense benchmark's project: pretrain on the shared dashcam clips plus CamVid's train frames as video,
then judge the encoder by semantic segmentation of CamVid (11 classes, void ignored).

    python benchmarks/camvid.py WORKDIR [--data ../shared/data]
    cd WORKDIR && maecli extract -c . && maecli pretrain -c .
    maecli probe -c . --baseline random --baseline pixels [--set probe.layers=4] [--set probe.frames=30]
    maecli finetune -c . --baseline random
    maecli compare -c .
    # does time help? the frame-pair study of docs/benchmarks.md (400 MAE steps' FLOPs each; the gap swept)
    maecli compare -c . --method mae --method siammae --method cropmae --method simclr --budget-flops 3.7051e13 \
        --finetune-epochs 10 --set compare.run=pairs
    maecli compare -c . --method siammae --budget-flops 3.7051e13 --set 'siammae.gap=[0.03,0.5]' --set compare.run=pairs-gap-short
    maecli compare -c . --method siammae --budget-flops 3.7051e13 --set 'siammae.gap=[1.0,3.0]' --set compare.run=pairs-gap-long

CamVid's frames are stills taken at 1 Hz from three drives; each drive (the file-name prefix: 0001TP, 0006R0,
0016E5) becomes one 1-fps H.264 video, so `maecli extract` treats them as the footage a team owns and labels a few
frames of. The dashcam clips are extracted at 30 fps, so SiamMAE's pairs come from them at any gap and from the
CamVid drives at whole seconds. The project file written holds the recipe docs/benchmarks.md reports; nothing of the data is copied
into the project.
"""

import argparse
import itertools
from pathlib import Path

import numpy as np
from PIL import Image

from maecli.video import write_h264

PROJECT = """\
# CamVid dense benchmark (benchmarks/camvid.py): a ViT-Tiny x 6 MAE at 96x128 (patch 8: a 12 x 16 token grid),
# pretrained on {clips} dashcam clips + CamVid's 367 train frames, probed and fine-tuned on CamVid segmentation.
[project]
name = "camvid"
device = "cpu"

[model]
preset = "vit_tiny"
depth = 6
img_size = [96, 128]
patch_size = 8
decoder_embed_dim = 128
decoder_depth = 2
decoder_num_heads = 4
norm_pix_loss = true

[extract]
inputs = ["{driving}", "camvid_video"]
fps = 30.0
size = [144, 192]
val_fraction = 0.0

[pretrain]
batch_size = 64
steps = {steps}
warmup_steps = {warmup}
lr = 1.5e-3
crop_scale = [0.5, 1.0]
checkpoint_every = {every}
keep_last = 8

[probe]
train = "{data}/segmentation/camvid_train"
val = "{data}/segmentation/camvid_val"
ignore_index = 11

[finetune]
epochs = 30
batch_size = 32
checkpoint_every = 5

[compare]
methods = ["mae", "simclr"]
budget_steps = {half}   # half the pretraining run's steps of MAE; SimCLR gets the same FLOPs
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--steps", type=int, default=1600)
    args = parser.parse_args()
    work, data = args.workdir.absolute(), args.data.resolve()
    (work / "camvid_video").mkdir(parents=True, exist_ok=True)
    frames = sorted((data / "segmentation" / "camvid_train" / "images").glob("*.jpg"))
    for drive, group in itertools.groupby(frames, key=lambda p: p.name.split("_")[0]):
        images = [np.asarray(Image.open(p).convert("RGB")) for p in group]
        write_h264(work / "camvid_video" / f"{drive}.mp4", images, fps=1, size=images[0].shape[:2])
        print(f"camvid_video/{drive}.mp4: {len(images)} frames at 1 fps")
    clips = len(list((data / "driving_video").glob("*.mp4")))
    (work / "maecli.toml").write_text(PROJECT.format(clips=clips, driving=data / "driving_video", data=data, steps=args.steps,
                                                      warmup=args.steps // 20, every=args.steps // 8, half=args.steps // 2))
    print(f"wrote {work / 'maecli.toml'}")


if __name__ == "__main__":
    main()
