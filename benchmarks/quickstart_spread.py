"""Where quickstart runs part: the quickstart under the conditions that differ between users' CPUs, side by side.

    python benchmarks/quickstart_spread.py [--work /tmp/spread] [--conditions base threads1 avx2 nodnn seed1 seed2]

Each condition is one fresh `maecli quickstart` process in a folder of its own (the generated clips and stills are
the same bytes in every condition, so they are copied from the first one rather than rendered again):
  base      this machine as it is (every core torch finds, its widest instruction set)
  threads1  OMP_NUM_THREADS=1: one intra-op thread instead of the machine's count
  avx2      ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2, OPENBLAS_CORETYPE=Haswell: a CPU without AVX-512
  nodnn     torch.backends.mkldnn off (oneDNN's kernels replaced by ATen's)
  seed1     [project] seed = 1: other masks, crops, permutations, heads (the same world)
  seed2     [project] seed = 2
Prints one markdown table: every figure of the quickstart's results.md per condition, and its spread (max - min).
A finished condition is kept (its results.md), so a rerun continues.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / ".ci"))
from quickstart_verdict import scores  # noqa: E402

AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "OPENBLAS_CORETYPE": "Haswell"}
CONDITIONS = {  # name: (environment, --set overrides, Python run before the command)
    "base": ({}, [], ""),
    "threads1": ({"OMP_NUM_THREADS": "1"}, [], ""),
    "avx2": (AVX2, [], ""),
    "nodnn": ({}, [], "import torch; torch.backends.mkldnn.enabled = False; "),
    "seed1": ({}, ["project.seed=1"], ""),
    "seed2": ({}, ["project.seed=2"], ""),
}
GENERATED = ("videos", "labeled", "segmentation")


def run(name: str, folder: Path, first: Path | None) -> float:
    """One condition's quickstart in `folder`; seconds it took (0 when it had finished before)."""
    if (folder / "results.md").exists():
        return 0.0
    env, overrides, prelude = CONDITIONS[name]
    if first is not None:
        for sub in GENERATED:
            if not (folder / sub).exists():
                shutil.copytree(first / sub, folder / sub)
    argv = ["quickstart", str(folder), *[a for o in overrides for a in ("--set", o)]]
    code = f"{prelude}import sys; from maecli.cli import app; sys.argv = ['maecli', *{argv!r}]; app()"
    start = time.perf_counter()
    with open(folder.parent / f"{name}.log", "w") as log:
        subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/quickstart-spread"))
    ap.add_argument("--conditions", nargs="+", choices=list(CONDITIONS), default=list(CONDITIONS))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    tables, seconds, first = {}, {}, None
    for name in args.conditions:
        folder = args.work / name
        folder.mkdir(exist_ok=True)
        seconds[name] = run(name, folder, first)
        first = first or folder
        tables[name] = scores((folder / "results.md").read_text())
        print(f"{name}: done ({seconds[name]:.0f} s)", file=sys.stderr, flush=True)
    cells = list(tables[args.conditions[0]])
    print("| figure | " + " | ".join(args.conditions) + " | spread |")
    print("|---|" + "---:|" * (len(args.conditions) + 1))
    for column, row in cells:
        values = [tables[c].get((column, row)) for c in args.conditions]
        shown = " | ".join("-" if v is None else f"{v:.1f}" for v in values)
        present = [v for v in values if v is not None]
        print(f"| {row}: {column} | {shown} | {max(present) - min(present):.1f} |")
    print("| seconds (whole quickstart) | " + " | ".join(f"{seconds[c]:.0f}" if seconds[c] else "(kept)" for c in args.conditions) + " | |")


if __name__ == "__main__":
    main()
