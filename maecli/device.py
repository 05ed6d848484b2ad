"""Where a command runs, and in which precision: one rule for every command (`project.device`).

"auto" takes CUDA when torch sees a GPU, else the CPU; "cuda" insists on a GPU; "cpu" never uses one. On CUDA
the work runs under bf16 autocast with TF32 matmuls; on the CPU in float32 (bf16 there is ~10x slower on CPUs
without native bf16 matmuls). Under torchrun each process takes the GPU of its LOCAL_RANK.
"""

import os

import torch

from maecli.errors import ConfigError


def pick_device(choice: str, *, gpus: int | None = None, field: str = "project.device") -> torch.device:
    """The device for `choice` ("auto", "cpu" or "cuda") in this process. `gpus`: the visible GPU count (default:
    what torch sees). Raises ConfigError when CUDA is asked for and absent, or torchrun started more processes on
    this machine than it has GPUs (they would share one and fail inside CUDA)."""
    if choice not in ("auto", "cpu", "cuda"):  # the project file's Literal checks it; --device arrives here unchecked
        raise ConfigError(f"{field}: must be auto, cpu or cuda (got {choice!r})")
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if choice == "cuda" and gpus == 0:
        raise ConfigError(f"{field}: 'cuda' was asked for but torch sees no CUDA device")
    if choice == "cpu" or gpus == 0:
        return torch.device("cpu")
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if local_world > gpus:
        raise ConfigError(
            f"{field}: torchrun started {local_world} processes on this machine but it has {gpus} GPU{'s' * (gpus != 1)}: "
            f"use --nproc_per_node={gpus}, or set {field} = \"cpu\""
        )
    device = torch.device(f"cuda:{local_rank}")
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return device


GRAPHS_BELOW_FLOPS = 1e12  # a training step this small runs in ~2 ms on a large GPU: the host's kernel launches set its pace


def compile_mode(choice: bool | str | None, mode: str, device: torch.device, step_flops: float = 0.0) -> str | None:
    """torch.compile's `mode` when a model runs compiled, None when it runs eager: compiled as set (`compile`), or
    for "auto" (None) on CUDA only (compiling on a CPU rarely pays). Mode "auto" picks CUDA graphs ("reduce-overhead")
    for a step of fewer than GRAPHS_BELOW_FLOPS FLOPs on CUDA (`step_flops`: one micro-step's, forward and backward):
    a ViT-Tiny's step is ~1 ms of an H200's work and ran 25 ms eager, launch by launch. Larger steps keep the GPU
    busy while the host queues the next kernels, and compile in the default mode, block by block
    (`loop.compile_scope`)."""
    compiled = device.type == "cuda" if choice in ("auto", None) else bool(choice)
    if not compiled:
        return None
    if mode == "auto":
        return "reduce-overhead" if device.type == "cuda" and step_flops < GRAPHS_BELOW_FLOPS else "default"
    return mode


def autocast_for(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA; a disabled context (float32) elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def precision(device: torch.device) -> str:
    """What `autocast_for(device)` computes matmuls in, for summaries."""
    return "bfloat16" if device.type == "cuda" else "float32"
