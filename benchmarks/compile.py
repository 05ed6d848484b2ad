"""torch.compile's cold start and steady step, whole model vs the transformer blocks (regional), side by side.

    python benchmarks/compile.py [--sizes tiny6 vit_s] [--batch 64 8] [--steps 10] [--modes eager model blocks] [--limit 600] [--no-cached]

Each cell is one fresh process timing `maecli pretrain`'s MAE step (`bench.train_step_fn`: augmentation, forward and
backward under autocast, fused AdamW), compiled as `loop.for_training` compiles it:
  eager     no compile
  model     torch.compile of the whole model (what every run did before regional compilation)
  blocks    each transformer block compiled in place; blocks of one shape share one graph
  graphs    the whole model in mode reduce-overhead (CUDA graphs; on a CPU the same as `model`)
"first step" is the cold start (the compile and one step), with an empty inductor cache (a folder of its own), then
"cached": a second process on the same cache (what a resumed run or the next run of the same model pays). "step" is
the median of --steps steps after 3 more. A cell past --limit seconds is cut and says so. Prints a markdown table.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {  # the CamVid recipe's model, ViT-S/16 and ViT-B/16 at 224
    "tiny6": dict(preset="vit_tiny", depth=6, img_size=[96, 128], patch_size=8, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    "vit_s": dict(preset="vit_small", img_size=224, patch_size=16),
    "vit_b": dict(preset="vit_base", img_size=224, patch_size=16),
}
MODES = {"eager": None, "model": "default", "blocks": "default", "graphs": "reduce-overhead"}


def one(size: str, scope: str, batch: int, steps: int) -> dict:
    """One cell, in this process: cold start and steady step time."""
    import torch

    from maecli.bench import sync, train_step_fn
    from maecli.config import validate_config
    from maecli.loop import compiled_graphs
    from maecli.methods import method_of

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = validate_config({"model": SIZES[size]}, root=Path.cwd(), source="benchmarks/compile.py")
    method = method_of(cfg, "mae")
    torch.manual_seed(0)
    model = method.build().to(device)
    if scope == "model":  # the whole model in the default mode, as regional compilation's baseline
        model = torch.compile(model, dynamic=False)
    frames = torch.randint(0, 256, (batch, *cfg.model.img_size, 3), dtype=torch.uint8, device=device)
    step = train_step_fn(model, method, frames, compile=MODES[scope] if scope != "model" else None)
    t = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    return dict(first_s=first, step_s=statistics.median(times), graphs=compiled_graphs() if scope != "eager" else 0, device=str(device))


def cell(size: str, scope: str, batch: int, steps: int, cache: Path, limit: float) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, __file__, "--one", size, scope, str(batch), str(steps)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env)
    except subprocess.TimeoutExpired:
        return dict(cut=limit)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if proc.returncode == 0 and lines else dict(failed=(proc.stderr.strip().splitlines() or ["?"])[-1][:120])


def show(r: dict, key: str, scale: float, fmt: str) -> str:
    if not r:
        return "-"
    if "cut" in r:
        return f"cut at {r['cut']:.0f} s"
    if "failed" in r:
        return "failed: " + r["failed"]
    return fmt.format(r[key] * scale)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny6", "vit_s"], choices=list(SIZES))
    ap.add_argument("--batch", nargs="+", type=int, default=[64, 8], help="One per size.")
    ap.add_argument("--modes", nargs="+", default=["eager", "model", "blocks"], choices=list(MODES))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--limit", type=float, default=600, help="Seconds a cell may take.")
    ap.add_argument("--no-cached", action="store_true", help="Leave out the second process on the same cache.")
    ap.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        size, scope, batch, steps = args.one
        print(json.dumps(one(size, scope, int(batch), int(steps))), flush=True)
        return
    print("| model | batch | compiled | first step (cold) | first step (cached) | step | img/s | graphs |")
    print("|---|---:|---|---:|---:|---:|---:|---:|", flush=True)
    for size, batch in zip(args.sizes, args.batch, strict=True):
        for scope in args.modes:
            with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
                cold = cell(size, scope, batch, args.steps, Path(cache), args.limit)
                warm = cell(size, scope, batch, args.steps, Path(cache), args.limit) if scope != "eager" and "first_s" in cold and not args.no_cached else {}
            ips = f"{batch / cold['step_s']:.0f}" if "step_s" in cold else "-"
            print(f"| {size} | {batch} | {scope} | {show(cold, 'first_s', 1, '{:.1f} s')} | {show(warm, 'first_s', 1, '{:.1f} s') if warm else '-'} | "
                  f"{show(cold, 'step_s', 1000, '{:.1f} ms')} | {ips} | "
                  f"{cold.get('graphs', '-')} |", flush=True)


if __name__ == "__main__":
    main()
