"""`maecli bench`: what a training step costs, measured. Analytic FLOPs (`maecli.methods`); the paper's "mask tokens
through the encoder" baseline; the SimCLR step that `pretrain` trains (`maecli.simclr`: two views, NT-Xent) on the
same encoder; a matmul peak; interleaved timing (A, B, C, A, B, C, ...) so ratios hold on a noisy machine."""

import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from maecli.config import ModelConfig, SimclrConfig, apply_overrides, load_config, validate_config
from maecli.data import augment
from maecli.device import autocast_for, compiles, pick_device
from maecli.errors import ConfigError
from maecli.methods import analytic_flops, contrastive_flops
from maecli.model import MaskedAutoencoder, to_2tuple
from maecli.simclr import SimCLR, draw_views, two_views


class MaskTokensInEncoder(nn.Module):
    """The MAE paper's "w/ [M] in encoder" baseline (Table 1c): the same model, but the encoder sees every
    position, with a learned mask token where a patch was removed. Same loss, same decoder."""

    def __init__(self, mae: MaskedAutoencoder) -> None:
        super().__init__()
        self.mae = mae
        self.enc_mask_token = nn.Parameter(torch.zeros(1, 1, mae.pos_embed.shape[-1]))
        nn.init.normal_(self.enc_mask_token, std=0.02)

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.mae
        x = m.patch_embed(imgs)  # (N, L, D)
        _, mask, _ = m.random_masking(x, mask_ratio, noise)  # (N, L) 1 = removed
        x = torch.where(mask.bool().unsqueeze(-1), self.enc_mask_token.to(x.dtype), x) + m.pos_embed[:, 1:, :]  # (N, L, D)
        cls = (m.cls_token + m.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # (N, 1 + L, D)
        for blk in m.blocks:
            x = blk(x)
        x = m.decoder_embed(m.norm(x)) + m.decoder_pos_embed  # (N, 1 + L, Dd), already in patch order
        for blk in m.decoder_blocks:
            x = blk(x)
        pred = m.decoder_pred(m.decoder_norm(x))[:, 1:, :]  # (N, L, p*p*3)
        return m.forward_loss(imgs, pred, mask), pred, mask


def simclr_views(frames: torch.Tensor, out_hw: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views of uint8 frames (N, H, W, 3) with [simclr]'s default augmentations, on their device."""
    draws = draw_views(np.random.default_rng(seed), len(frames), tuple(frames.shape[1:3]), out_hw, SimclrConfig())
    return two_views(frames, *(torch.from_numpy(a) for a in draws), out_hw)


def train_step_fn(model: nn.Module, imgs: torch.Tensor, mask_ratio: float, *, hf: bool = False,
                  views: tuple[torch.Tensor, torch.Tensor] | None = None, compile: bool = False) -> Callable[[], None]:
    """One full training step (forward, backward, fused AdamW step) on a fixed batch; `views` for a SimCLR model;
    `compile`: the model through torch.compile, as `maecli pretrain` runs it."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95), fused=True)
    model = torch.compile(model) if compile else model
    autocast = autocast_for(imgs.device)

    def step() -> None:
        with autocast:
            if views is not None:
                loss = model(*views)
            else:
                loss = model(pixel_values=imgs).loss if hf else model(imgs, mask_ratio=mask_ratio)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], None]], steps: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each function, measured A, B, C, A, B, C, ... after `warmup` rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + steps):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    return times


# Dense bf16 tensor-core peaks from the vendors' spec sheets, TFLOP/s without sparsity, matched as substrings of the
# CUDA device name, most specific first. MFU is rated against these, never against a matmul timed here.
DENSE_BF16_TFLOPS = (("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("A100", 312), ("L40S", 362), ("L40", 181),
                     ("L4", 121), ("RTX 4090", 165))


def spec_tflops(gpu_name: str) -> float | None:
    """A GPU's dense bf16 spec peak in TFLOP/s by its CUDA name, or None when the table does not know it."""
    return next((tflops for key, tflops in DENSE_BF16_TFLOPS if key in gpu_name), None)


def device_peak(device: torch.device, peak_tflops: float | None) -> tuple[float | None, str]:
    """The peak FLOP/s that MFU is rated against, and where it comes from ("unknown" rather than a guess)."""
    if peak_tflops:
        return peak_tflops * 1e12, f"--peak-tflops {peak_tflops:g}"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "this CPU"
    tflops = spec_tflops(name) if device.type == "cuda" else None
    if tflops is None:
        return None, f"unknown for {name} (give --peak-tflops for an MFU)"
    return tflops * 1e12, f"{name}: dense bf16 spec, {tflops} TFLOP/s"


def matmul_peak(device: torch.device, reps: int = 10) -> tuple[float, str]:
    """FLOP/s of one large square matmul in the precision training uses (bf16 8192^2 on CUDA, float32 2048^2 on
    a CPU), median of `reps`: what this device delivers at best, beside its spec."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = interleaved({"mm": lambda: a @ b}, reps, 2, device)["mm"]
    return 2 * n**3 / statistics.median(times), f"{str(dtype).removeprefix('torch.')} {n}x{n} matmul"


def bench_setup(config: Path, overrides: list[str], *, model: str | None, patch: int | None, img: str | None,
                device: str) -> tuple[ModelConfig, torch.device]:
    """What `maecli bench` measures: the model (a preset with --patch/--img, else the project's [model]; --set applies
    on top) and the device."""
    dev = pick_device(device, field="--device")
    if model is not None:
        try:
            size = [int(v) for v in (img or "224").lower().split("x")]
        except ValueError:
            raise ConfigError(f"--img: expected a size like 224 or 128x256 (got {img!r})") from None
        data = {"model": {"preset": model, "patch_size": patch or 16, "img_size": size[0] if len(size) == 1 else size}}
        overridden = apply_overrides(data, overrides)  # --set model.decoder_depth=1 and friends apply on top
        mc = validate_config(data, root=Path.cwd(), source="--model/--patch/--img", overridden=overridden).model
    elif Path(config).exists() or overrides:
        mc = load_config(config, overrides).model
    else:
        raise ConfigError(f"{config}: file not found (give --model, e.g. --model vit_base --patch 16 --img 224, or a project file)")
    return mc, dev


def run_bench(arch: dict[str, Any], *, batch: int, steps: int, warmup: int, mask_ratio: float, decoder_depths: list[int],
              device: torch.device, peak_tflops: float | None = None, compile: bool | None = None, profile: Path | None = None,
              seed: int = 0) -> dict[str, Any]:
    """MAE, MAE with mask tokens in the encoder, and a two-view SimCLR step on the same encoder, timed interleaved.

    `decoder_depths` adds MAE and w/ [M] pairs with other decoder depths. Every variant is compiled when `compile`
    is true (None: as `maecli pretrain` would, on CUDA). Returns every variant's step times and derived numbers (MFU
    against the device's spec peak, and the share of a measured matmul peak), the speed-ups of MAE over the
    baselines with the analytic FLOP ratios beside them, and with `profile` a trace of each variant in that folder.
    """
    compile = compiles(compile, device)
    peak, peak_source = device_peak(device, peak_tflops)
    matmul, matmul_source = matmul_peak(device)
    torch.manual_seed(seed)
    h, w = to_2tuple(arch["img_size"])
    frames = torch.randint(0, 256, (batch, h, w, 3), dtype=torch.uint8, device=device)  # stand-in frames at the input size
    imgs = augment(frames, torch.eye(2, 3).expand(batch, 2, 3), (h, w))
    fns, flops = {}, {}
    for depth in [arch["decoder_depth"], *[d for d in decoder_depths if d != arch["decoder_depth"]]]:
        tag = "" if depth == arch["decoder_depth"] else f", decoder depth {depth}"
        a = {**arch, "decoder_depth": depth}
        fns[f"mae{tag}"] = train_step_fn(MaskedAutoencoder(**a).to(device), imgs, mask_ratio, compile=compile)
        fns[f"mae w/ [M]{tag}"] = train_step_fn(MaskTokensInEncoder(MaskedAutoencoder(**a)).to(device), imgs, mask_ratio, compile=compile)
        flops[f"mae{tag}"], flops[f"mae w/ [M]{tag}"] = analytic_flops(a, mask_ratio), analytic_flops(a, mask_ratio, True)
    sc = SimclrConfig()
    simclr = SimCLR(**arch, proj_hidden=sc.proj_hidden, proj_dim=sc.proj_dim, temperature=sc.temperature).to(device)
    fns["contrastive (2 views)"] = train_step_fn(simclr, imgs, mask_ratio, views=simclr_views(frames, (h, w), seed), compile=compile)
    flops["contrastive (2 views)"] = contrastive_flops(arch, sc.proj_hidden, sc.proj_dim)

    peak_mem = {}
    for name, fn in fns.items():  # one step alone per variant for its peak memory (CUDA only)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        fn()
        peak_mem[name] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None
    times = interleaved(fns, steps, max(0, warmup - 1), device)
    variants = {}
    for name, t in times.items():
        med = statistics.median(t)
        achieved = flops[name] * batch / med  # FLOP/s
        variants[name] = dict(step_s_median=med, step_s_min=min(t), step_s_max=max(t), steps=len(t), images_per_s=batch / med,
                              peak_mem_mib=peak_mem[name], gflop_per_image=flops[name] / 1e9, achieved_gflops=achieved / 1e9,
                              mfu=achieved / peak if peak else None, of_matmul=achieved / matmul)
    speedups = {}
    for name in variants:
        if name.startswith("mae w/ [M]"):
            mae = "mae" + name.removeprefix("mae w/ [M]")
            speedups[f"{mae} vs {name}"] = dict(measured=variants[name]["step_s_median"] / variants[mae]["step_s_median"], analytic=flops[name] / flops[mae])
    speedups["mae vs contrastive (2 views)"] = dict(measured=variants["contrastive (2 views)"]["step_s_median"] / variants["mae"]["step_s_median"],
                                                    analytic=flops["contrastive (2 views)"] / flops["mae"])
    if profile is not None:
        profile_steps(fns, Path(profile), device)
    return dict(arch=arch, batch=batch, mask_ratio=mask_ratio, device=str(device), compiled=compile, steps=steps, warmup=warmup,
                peak_gflops=peak / 1e9 if peak else None, peak_source=peak_source, matmul_gflops=matmul / 1e9, matmul_source=matmul_source,
                variants=variants, speedups=speedups, profile=str(profile) if profile is not None else None)


def profile_steps(fns: dict[str, Callable[[], None]], folder: Path, device: torch.device, steps: int = 3) -> None:
    """torch.profiler over `steps` steps of each variant: a Chrome/Perfetto trace and the top operators as text."""
    from torch.profiler import ProfilerActivity, profile

    folder.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name, fn in fns.items():
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")  # "mae w/ [M]" -> "mae-w-m"
        with profile(activities=activities, record_shapes=True) as prof:
            for _ in range(steps):
                fn()
            sync(device)
        prof.export_chrome_trace(str(folder / f"trace-{slug}.json"))
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        (folder / f"ops-{slug}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=30) + "\n")
