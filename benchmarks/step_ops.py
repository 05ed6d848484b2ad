"""Operators dispatched per training step: the host's share of a small model's step, counted on the CPU.

    python benchmarks/step_ops.py [--methods mae simclr siammae cropmae] [--batch 64]

On a GPU each operator outside a compiled graph is a kernel launch, ~5-20 us of Python and dispatcher time on the
host: a step of ViT-Tiny x 6 (the CamVid recipe: 96x128, patch 8, decoder 128 x 2) is ~1 ms of an H200's work, so a few
hundred operators set its pace. Counted with `maecli.bench.OperatorCount` (a TorchDispatchMode: every operator below
autograd, backward included), in two ways:
  loop    the real `maecli pretrain` loop, black box: runs of 7 and 15 steps on one store, the difference / 8 (the
          setup, the first steps' timing and the last step's log and checkpoint cancel out): a plain step
  phases  one step's phases, through the functions the loop calls (the loader, `method.inputs`, `method.loss`,
          backward, `train.clip_grads`, AdamW): where the operators go; "log step" adds what a step that logs adds
Eager, as the loop runs on a CPU; `reduce-overhead` on CUDA replays forward and backward as one graph instead.
"""

import argparse
import tempfile
from pathlib import Path

import torch
from typer.testing import CliRunner

from maecli.bench import OperatorCount
from maecli.cli import app
from maecli.config import load_config
from maecli.data import Loader, Plan
from maecli.loop import param_groups
from maecli.methods import method_of
from maecli.store import FrameStore
from maecli.synthetic import generate_clips
from maecli.train import checked_loss, clip_grads

RECIPE = """[project]
device = "cpu"
[model]
preset = "vit_tiny"
depth = 6
img_size = [96, 128]
patch_size = 8
decoder_embed_dim = 128
decoder_depth = 2
decoder_num_heads = 4
[extract]
inputs = ["videos"]
size = [96, 128]
fps = 10
val_fraction = 0
[pretrain]
batch_size = {batch}
log_every = 1000
checkpoint_every = 1000
warmup_steps = 2
"""


def loop_ops(folder: Path, method: str, steps: int) -> int:
    with OperatorCount() as ops:
        result = CliRunner().invoke(app, ["pretrain", "-c", str(folder), "--restart", "--set", f"pretrain.method={method}", "--set",
                                          f"pretrain.run={method}-{steps}", "--set", f"pretrain.steps={steps}"])
    assert result.exit_code == 0, result.output
    return ops.count


def phase_ops(folder: Path, method_name: str) -> dict[str, int]:
    cfg = load_config(folder, [f"pretrain.method={method_name}"])
    method, device = method_of(cfg), torch.device("cpu")
    store = FrameStore(cfg.extract.store, split="train")
    samples, _ = method.samples(store)
    plan = Plan(num_frames=len(samples.first), batch_size=cfg.pretrain.batch_size, world_size=1, rank=0, seed=0)
    torch.manual_seed(0)
    model = method.build()
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=True)
    loader = Loader(store, samples, plan, 0, device, method.draw)
    counts: dict[str, int] = {}

    def count(name: str, fn):
        with OperatorCount() as ops:
            out = fn()
        counts[name] = counts.get(name, 0) + ops.count
        return out

    first_bad = torch.tensor(-1)
    for step in range(3):  # the last one counted (the first ones create the optimizer's state)
        counts.clear()
        frames, *draws = count("loader", loader.next)
        inputs = count("inputs (augmentation)", lambda: method.inputs(frames, *draws))
        loss = count("forward", lambda: method.loss(model, *inputs))
        count("backward", loss.backward)
        step_loss = loss.detach().float()
        if step == 2:  # what a step that logs adds: the gradients' norm (without clipping, only then) and the loss's check
            count("log step: grad norm, loss check", lambda: clip_grads(model, 0.0, True))
        count("optimizer (AdamW, zero_grad)", lambda: (clip_grads(model, 0.0, False), optimizer.step(), optimizer.zero_grad(set_to_none=True)))
        first_bad = count("loss bookkeeping", lambda: torch.where((first_bad < 0) & ~torch.isfinite(step_loss), step, first_bad))
    count("log step: grad norm, loss check", lambda: checked_loss(step_loss, first_bad, 1, None))
    loader.close()
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["mae", "simclr", "siammae", "cropmae"])
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="step-ops-"))
    generate_clips(folder / "videos", count=4, seconds=4.0, fps=10, size=(96, 128))
    (folder / "maecli.toml").write_text(RECIPE.format(batch=args.batch))
    assert CliRunner().invoke(app, ["extract", "-c", str(folder)]).exit_code == 0
    torch.set_num_threads(2)
    rows = {}
    for name in args.methods:
        loop = (loop_ops(folder, name, 15) - loop_ops(folder, name, 7)) / 8
        rows[name] = (loop, phase_ops(folder, name))
    phases = list(next(iter(rows.values()))[1])
    print(f"operators per step, ViT-Tiny x 6 at 96x128 (patch 8), batch {args.batch}, eager, torch {torch.__version__}")
    print(f"| | loop (plain step) | {' | '.join(phases)} |")
    print("|---|" + "---:|" * (len(phases) + 1))
    for name, (loop, counts) in rows.items():
        print(f"| {name} | {loop:.1f} | {' | '.join(str(counts[p]) for p in phases)} |")


if __name__ == "__main__":
    main()
