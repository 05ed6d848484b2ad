"""`maecli bench`: what a training step costs, measured. The step is `pretrain`'s, for any method of `maecli.methods`
(augmentation on the device, forward, backward, AdamW), and the paper's "mask tokens
through the encoder" baseline runs through MAE's; analytic FLOPs; a matmul peak; interleaved timing (A, B, C, A, B, C, ...) so ratios hold
on a noisy machine. `compare` and `benchmarks/` time their steps with the same function."""

import re
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from maecli.config import MaecliConfig, apply_overrides, load_config, validate_config
from maecli.device import autocast_for, compile_mode, pick_device
from maecli.errors import ConfigError
from maecli.loop import for_training, param_groups
from maecli.methods import METHODS, method_of
from maecli.methods.mae import analytic_flops
from maecli.model import MaskedAutoencoder, to_2tuple


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


def train_step_fn(model: nn.Module, method: Any, frames: torch.Tensor, *, seed: int = 0, weight_decay: float = 0.05,
                  compile: str | None = None) -> Callable[[], None]:
    """One `pretrain` step of `method` on fixed uint8 frames (B, H, W, 3) (paired with the next frame of the batch for
    the methods of frame pairs) and one fixed draw of its randomness, as a function to time: augmentation on the frames' device, forward under autocast, backward, fused AdamW with
    pretrain's parameter groups. `model` may be any module the method's loss can call (a baseline, Hugging Face's
    ViTMAE); `compile`: torch.compile's mode ("default", "reduce-overhead", ...), compiled as `maecli pretrain`
    compiles it (`loop.for_training`), or None for eager."""
    device = frames.device
    frames = torch.stack([frames, frames.roll(-1, 0)], dim=1)  # (B, 2, H, W, 3): methods of single frames read the first
    draws = [torch.from_numpy(a).to(device) for a in method.draw(np.random.default_rng(seed), len(frames), tuple(frames.shape[1:3]))]
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=1e-6, betas=(0.9, 0.95), fused=True)
    compiled = for_training(model, device, 1, compile)
    graphs = compile == "reduce-overhead"
    autocast = autocast_for(device)

    def step() -> None:
        inputs = method.inputs(frames, *draws)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast:
            loss = method.loss(compiled, *inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


class OperatorCount(TorchDispatchMode):
    """Counts the operators torch dispatches in this thread inside the block (`count`; by name in `names`), below
    autograd: the backward's too. The host's cost of a small step on a GPU is about one kernel launch per operator
    outside a compiled graph: what `benchmarks/step_ops.py` counts and a test holds to its recorded figure."""

    def __init__(self) -> None:
        super().__init__()
        self.names: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return sum(self.names.values())

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.names[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


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
                device: str) -> tuple[MaecliConfig, torch.device]:
    """What `maecli bench` measures: the model (a preset with --patch/--img, else the project's [model]; --set applies
    on top) with the project's (or the default) [pretrain] and method settings, and the device."""
    dev = pick_device(device, field="--device")
    if model is not None:
        try:
            size = [int(v) for v in (img or "224").lower().split("x")]
        except ValueError:
            raise ConfigError(f"--img: expected a size like 224 or 128x256 (got {img!r})") from None
        data = {"model": {"preset": model, "patch_size": patch or 16, "img_size": size[0] if len(size) == 1 else size}}
        overridden = apply_overrides(data, overrides)  # --set model.decoder_depth=1 and friends apply on top
        return validate_config(data, root=Path.cwd(), source="--model/--patch/--img", overridden=overridden), dev
    if Path(config).exists() or overrides:
        return load_config(config, overrides), dev
    raise ConfigError(f"{config}: file not found (give --model, e.g. --model vit_base --patch 16 --img 224, or a project file)")


def run_bench(cfg: MaecliConfig, *, batch: int, steps: int, warmup: int, decoder_depths: list[int], device: torch.device,
              peak_tflops: float | None = None, compile: bool | None = None, profile: Path | None = None) -> dict[str, Any]:
    """The `pretrain` step of MAE, of MAE with mask tokens in the encoder and of every other registered method (each
    under its `label`) on the same encoder, for [model] with [pretrain]'s and each method's settings, timed
    interleaved on the same frames.

    `decoder_depths` adds MAE and w/ [M] pairs with other decoder depths. Every variant is compiled (in
    `pretrain.compile_mode`) when `compile` is true (None: as `pretrain.compile` says). Returns every variant's step
    times and derived numbers (MFU against the device's spec peak, and the share of a measured matmul peak), the
    speed-ups of MAE over the baselines with the analytic FLOP ratios beside them, and with `profile` a trace of
    the MAE step in that folder.
    """
    arch, mask_ratio, seed, wd = cfg.model.mae_kwargs, cfg.model.mask_ratio, cfg.project.seed, cfg.pretrain.weight_decay
    mode = compile_mode(cfg.pretrain.compile if compile is None else compile, cfg.pretrain.compile_mode, device,
                        method_of(cfg, "mae").flops_per_image() * batch)
    peak, peak_source = device_peak(device, peak_tflops)
    matmul, matmul_source = matmul_peak(device)
    torch.manual_seed(seed)
    frames = torch.randint(0, 256, (batch, *to_2tuple(arch["img_size"]), 3), dtype=torch.uint8, device=device)  # stand-ins at the input size
    fns, flops = {}, {}
    for depth in [arch["decoder_depth"], *[d for d in decoder_depths if d != arch["decoder_depth"]]]:
        tag = "" if depth == arch["decoder_depth"] else f", decoder depth {depth}"
        mae = method_of(cfg.model_copy(update=dict(model=cfg.model.model_copy(update=dict(decoder_depth=depth)))), "mae")
        fns[f"mae{tag}"] = train_step_fn(mae.build().to(device), mae, frames, seed=seed, weight_decay=wd, compile=mode)
        fns[f"mae w/ [M]{tag}"] = train_step_fn(MaskTokensInEncoder(mae.build()).to(device), mae, frames, seed=seed, weight_decay=wd, compile=mode)
        flops[f"mae{tag}"], flops[f"mae w/ [M]{tag}"] = mae.flops_per_image(), analytic_flops(mae.arch, mask_ratio, True)
    others = [method_of(cfg, name) for name in METHODS if name != "mae"]
    for method in others:
        fns[method.label] = train_step_fn(method.build().to(device), method, frames, seed=seed, weight_decay=wd, compile=mode)
        flops[method.label] = method.flops_per_image()

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
            mae_name = "mae" + name.removeprefix("mae w/ [M]")
            speedups[f"{mae_name} vs {name}"] = dict(measured=variants[name]["step_s_median"] / variants[mae_name]["step_s_median"],
                                                     analytic=flops[name] / flops[mae_name])
    for other in (method.label for method in others):
        speedups[f"mae vs {other}"] = dict(measured=variants[other]["step_s_median"] / variants["mae"]["step_s_median"], analytic=flops[other] / flops["mae"])
    if profile is not None:  # the step users ask about; a trace of every variant takes minutes on a GPU
        profile_steps({"mae": fns["mae"]}, Path(profile), device)
    return dict(arch=arch, batch=batch, mask_ratio=mask_ratio, device=str(device), compiled=mode is not None, compile_mode=mode, steps=steps, warmup=warmup,
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
