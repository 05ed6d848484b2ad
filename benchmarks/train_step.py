"""Training-step speed, measured side by side in one process, steps interleaved.

    python benchmarks/train_step.py [--sizes tiny base] [--videos ../shared/data/driving_video]

For each size, three `maecli pretrain` steps (augmentation, forward, backward, fused AdamW) on the same frames:
  maecli            MaskedAutoencoder at mask ratio 0.75 (encoder on the visible 25% only)
  hf                transformers' ViTMAEForPreTraining, same sizes, same optimizer
  maecli w/ [M]     the same model with mask tokens through the encoder (the paper's baseline)
and the achieved FLOP/s (analytic FLOPs) against a matmul peak measured in the same run. Then a short real
`maecli pretrain` run on a frame store of the dashcam clips, for images/s and the fraction of time the
step waited on data.
"""

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from maecli.bench import MaskTokensInEncoder, device_peak, interleaved, matmul_peak, train_step_fn  # noqa: E402
from maecli.config import validate_config  # noqa: E402
from maecli.methods.mae import MAE, analytic_flops  # noqa: E402

SIZES = {
    "tiny": (dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, mlp_ratio=4.0), [8, 64], 3, 10),
    "base": (dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0), [8], 1, 4),
}


def hf_model(arch: dict) -> torch.nn.Module:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    cfg = ViTMAEConfig(image_size=arch["img_size"], patch_size=arch["patch_size"], hidden_size=arch["embed_dim"], num_hidden_layers=arch["depth"],
                       num_attention_heads=arch["num_heads"], intermediate_size=int(arch["embed_dim"] * arch["mlp_ratio"]),
                       decoder_hidden_size=arch["decoder_embed_dim"], decoder_num_hidden_layers=arch["decoder_depth"],
                       decoder_num_attention_heads=arch["decoder_num_heads"], decoder_intermediate_size=int(arch["decoder_embed_dim"] * arch["mlp_ratio"]),
                       layer_norm_eps=1e-6, mask_ratio=0.75)
    return ViTMAEForPreTraining(cfg).train()


class HFMAE(MAE):
    """MAE's draws and inputs, Hugging Face's forward: given the same noise, ViTMAE removes the same patches."""

    def loss(self, model: torch.nn.Module, imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=imgs, noise=noise).loss


def bench_size(name: str, device: torch.device, peak: float, batches: list[int] | None, compile: str | None) -> list[str]:
    arch, default_batches, warmup, steps = SIZES[name]
    lines = []
    for batch in batches or default_batches:
        torch.manual_seed(0)
        cfg = validate_config({"model": {"preset": "vit_base", **arch}}, root=Path.cwd(), source="benchmark")
        mae, hf = MAE(cfg), HFMAE(cfg)
        frames = torch.randint(0, 256, (batch, arch["img_size"], arch["img_size"], 3), dtype=torch.uint8, device=device)
        fns = {
            "maecli": train_step_fn(mae.build().to(device), mae, frames, compile=compile),
            "hf": train_step_fn(hf_model(arch).to(device), hf, frames, compile=compile),
            "maecli w/ [M]": train_step_fn(MaskTokensInEncoder(mae.build()).to(device), mae, frames, compile=compile),
        }
        times = interleaved(fns, steps, warmup, device)
        med = {k: statistics.median(v) for k, v in times.items()}
        flops = {"maecli": analytic_flops(arch, 0.75), "hf": analytic_flops(arch, 0.75), "maecli w/ [M]": analytic_flops(arch, 0.75, True)}
        for k in fns:
            achieved = flops[k] * batch / med[k]
            lines.append(f"| {name} | {batch:>5} | {k:<13} | {med[k] * 1000:>9.1f} | {min(times[k]) * 1000:>7.1f}-{max(times[k]) * 1000:<7.1f} | "
                         f"{batch / med[k]:>8.1f} | {flops[k] / 1e9:>9.2f} | {achieved / 1e9:>7.1f} | {100 * achieved / peak:>5.0f}% |")
        lines.append(f"| {name} | {batch:>5} | ratios        | maecli vs hf: **{med['hf'] / med['maecli']:.2f}x** faster; "
                     f"MAE vs w/ [M]: **{med['maecli w/ [M]'] / med['maecli']:.2f}x** (analytic FLOP ratio {flops['maecli w/ [M]'] / flops['maecli']:.2f}x, "
                     f"{med['maecli w/ [M]'] / med['maecli'] / (flops['maecli w/ [M]'] / flops['maecli']):.2f} of it) | | | | | |")
    return lines


def bench_pretrain(videos: Path) -> str:
    from maecli.config import validate_config
    from maecli.extract import run_extract
    from maecli.train import pretrain

    with tempfile.TemporaryDirectory() as tmp:
        arch = {k: v for k, v in SIZES["tiny"][0].items()}
        data = {
            "model": {"preset": "vit_tiny", **arch},
            "extract": {"store": "frames", "size": [72, 128], "fps": 10, "workers": 1},
            "pretrain": {"batch_size": 64, "steps": 60, "warmup_steps": 5, "checkpoint_every": 1000, "log_every": 20},
        }
        cfg = validate_config(data, root=Path(tmp), source="benchmark")
        run_extract(cfg.extract, [str(v) for v in sorted(videos.glob("*.mp4"))])
        s = pretrain(cfg)
        return (f"maecli pretrain, tiny size, batch 64, {s['steps']} steps on {s['device']}: {s['images_per_s']:.0f} images/s including checkpoint "
                f"and snapshot; the step waited on data {100 * s['data_wait_fraction']:.1f}% of the time")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--batch", type=int, nargs="+", help="Batch sizes (default: 8 and 64 for tiny, 8 for base).")
    ap.add_argument("--compile", action="store_true", help="torch.compile every variant (what maecli pretrain does on CUDA).")
    ap.add_argument("--compile-mode", default="default", help="torch.compile's mode with --compile (pretrain.compile_mode).")
    ap.add_argument("--peak-tflops", type=float, help="Rate against this peak instead of the device's spec (maecli.bench.DENSE_BF16_TFLOPS).")
    ap.add_argument("--videos", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "driving_video")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    measured, measured_source = matmul_peak(device)
    spec, spec_source = device_peak(device, args.peak_tflops)
    peak = spec or measured
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {name}; measured now: {measured / 1e9:.0f} GFLOP/s ({measured_source}); 'of peak' is against "
          f"{spec_source if spec else 'that measured matmul (no spec peak known)'}; compiled: {args.compile}; bf16 autocast: {device.type == 'cuda'}")
    print("| size | batch | variant       | step (ms) | min-max (ms)    | images/s | GFLOP/img | GFLOP/s | of peak |")
    print("|------|------:|---------------|----------:|-----------------|---------:|----------:|--------:|--------:|")
    for name in args.sizes:
        for line in bench_size(name, device, peak, args.batch, args.compile_mode if args.compile else None):
            print(line, flush=True)
    if args.videos.is_dir():
        print(bench_pretrain(args.videos))
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
