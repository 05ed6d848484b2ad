"""The measuring tools behind the benchmarks: analytic FLOPs and the "mask tokens in the encoder" baseline."""

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from maecli.bench import MaskTokensInEncoder
from maecli.methods.mae import analytic_flops
from maecli.model import MaskedAutoencoder
from tests.conftest import TINY

BASE = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0)


@pytest.mark.parametrize("arch", [TINY, {**TINY, "img_size": (32, 64)}, BASE], ids=["tiny", "wide", "base"])
@pytest.mark.parametrize("mask_tokens", [False, True])
def test_analytic_flops_match_torch_counter(arch, mask_tokens):
    mae = MaskedAutoencoder(**arch)
    model = MaskTokensInEncoder(mae) if mask_tokens else mae
    imgs = torch.randn(2, 3, *mae.img_size)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:  # the math backend is made of matmuls the counter sees
        model(imgs, mask_ratio=0.75)[0].backward()
    counted = counter.get_total_flops() / 2
    assert analytic_flops(arch, 0.75, mask_tokens) == pytest.approx(counted, rel=0.01)


def test_mask_tokens_baseline_trains_every_parameter_on_the_same_mask():
    mae = MaskedAutoencoder(**TINY)
    baseline = MaskTokensInEncoder(mae)
    noise = torch.rand(2, mae.num_patches)
    loss, pred, mask = baseline(torch.randn(2, 3, 32, 32), mask_ratio=0.75, noise=noise)
    _, _, mae_mask = mae(torch.randn(2, 3, 32, 32), mask_ratio=0.75, noise=noise)
    assert torch.equal(mask, mae_mask) and pred.shape == (2, 16, 8 * 8 * 3)
    loss.backward()
    for name, p in baseline.named_parameters():
        if p.requires_grad and name != "mae.mask_token":  # the decoder's mask token is unused: the encoder fills every position
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", [TINY, BASE], ids=["tiny", "base"])
def test_contrastive_flops_match_torch_counter(arch):
    from maecli.methods.sections import SimclrConfig
    from maecli.methods.simclr import contrastive_flops
    from maecli.methods.simclr import SimCLR, draw_views, two_views

    model = SimCLR(**arch, proj_hidden=64, proj_dim=16)
    h, w = model.img_size
    draws = draw_views(np.random.default_rng(0), 2, (h, w), (h, w), SimclrConfig())
    v1, v2 = two_views(torch.randint(0, 256, (2, h, w, 3), dtype=torch.uint8), *(torch.from_numpy(a) for a in draws), (h, w))
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(v1, v2).backward()
    assert contrastive_flops(arch, 64, 16) == pytest.approx(counter.get_total_flops() / 2, rel=0.01)


def test_bench_command_reports_every_variant(runner, tmp_path):
    import json

    from maecli.cli import app

    args = ["bench", "--model", "vit_tiny", "--patch", "8", "--img", "32x64", "--batch", "4", "--steps", "2", "--warmup", "1",
            "--set", "model.embed_dim=32", "--set", "model.depth=2", "--set", "model.num_heads=2", "--set", "model.decoder_embed_dim=16",
            "--set", "model.decoder_depth=2", "--set", "model.decoder_num_heads=2", "--decoder-depth", "1", "--plot", str(tmp_path / "bench.png"),
            "--profile", str(tmp_path / "profiles"), "--json", "--device", "cpu"]  # CPU facts are asserted: test_device checks the GPU's
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert r["arch"]["embed_dim"] == 32 and r["arch"]["img_size"] == [32, 64] and r["batch"] == 4
    assert set(r["variants"]) == {"mae", "mae w/ [M]", "mae, decoder depth 1", "mae w/ [M], decoder depth 1", "contrastive (2 views)",
                                  "siammae (frame pair)", "cropmae (2 crops)"}
    for v in r["variants"].values():
        assert v["steps"] == 2 and v["step_s_min"] <= v["step_s_median"] <= v["step_s_max"]
        assert v["images_per_s"] > 0 and v["gflop_per_image"] > 0 and v["achieved_gflops"] > 0
    assert set(r["speedups"]) == {"mae vs mae w/ [M]", "mae, decoder depth 1 vs mae w/ [M], decoder depth 1", "mae vs contrastive (2 views)",
                                  "mae vs siammae (frame pair)", "mae vs cropmae (2 crops)"}
    assert all(s["measured"] > 0 and s["analytic"] > 1 for k, s in r["speedups"].items() if "[M]" in k)
    assert (tmp_path / "bench.png").stat().st_size > 0
    # MFU is rated against a spec peak only: on a CPU there is none, so it says "unknown" instead of a guess
    assert r["compiled"] is False and r["peak_gflops"] is None and r["peak_source"].startswith("unknown for this CPU")
    assert all(v["mfu"] is None and 0 < v["of_matmul"] for v in r["variants"].values())
    assert r["matmul_source"] == "float32 2048x2048 matmul" and r["matmul_gflops"] > 0
    assert '"traceEvents"' in (tmp_path / "profiles" / "trace-mae.json").read_text()  # the MAE step only: the others take minutes on a GPU
    assert "Self CPU" in (tmp_path / "profiles" / "ops-mae.txt").read_text()
    assert sorted(p.name for p in (tmp_path / "profiles").iterdir()) == ["ops-mae.txt", "trace-mae.json"]
    missing = runner.invoke(app, ["bench", "-c", str(tmp_path / "none.toml")])
    assert missing.exit_code == 2 and "give --model" in missing.stderr


def test_spec_peaks_by_gpu_name():
    from maecli.bench import spec_tflops

    assert spec_tflops("NVIDIA H200") == spec_tflops("NVIDIA H100 80GB HBM3") == 989
    assert spec_tflops("NVIDIA H100 PCIe") == 756 and spec_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert spec_tflops("NVIDIA L40S") == 362 and spec_tflops("NVIDIA L40") == 181 and spec_tflops("NVIDIA L4") == 121
    assert spec_tflops("Tesla V100-SXM2-16GB") is None  # no bf16 tensor cores: unknown, not a guess


@pytest.mark.parametrize("arch", [TINY, {**TINY, "img_size": (32, 64)}, BASE], ids=["tiny", "wide", "base"])
@pytest.mark.parametrize("mask_ratio", [0.75, 0.95])
def test_frame_pair_flops_match_torch_counter(arch, mask_ratio):
    from maecli.methods.siammae import SiameseMAE, pair_flops

    model = SiameseMAE(**arch)
    first, later = torch.randn(2, 3, *model.img_size), torch.randn(2, 3, *model.img_size)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(first, later, mask_ratio=mask_ratio)[0].backward()
    assert pair_flops(arch, mask_ratio) == pytest.approx(counter.get_total_flops() / 2, rel=0.01)
