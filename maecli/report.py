"""What the commands print on the terminal (stderr; `--json` puts the machine-readable summary on stdout): plain
lines and the rich tables of probe, finetune, segmentation, compare, bench and the quickstart's summary."""

from pathlib import Path
from typing import Any

from rich.console import Console

console = Console(stderr=True, highlight=False)


def print_lines(lines: list[str]) -> None:
    for line in lines:
        console.print(line, markup=False, soft_wrap=True)


def print_finetune_table(report: dict[str, Any]) -> None:
    from rich.table import Table

    recipe = report["recipe"]
    blocks = "all blocks" if recipe["blocks"] < 0 else "the head only" if recipe["blocks"] == 0 else f"the last {recipe['blocks']} blocks"
    if report["task"] == "segmentation":
        print_segmentation_table(report, f"fine-tuned ({blocks}, {recipe['epochs']} epochs)")
        return
    table = Table(title=f"fine-tuned ({blocks}, {recipe['epochs']} epochs): {len(report['classes'])} classes, "
                        f"{report['train_images']} train / {report['val_images']} val images")
    for col in ["encoder", "top-1"] + (["top-5"] if len(report["classes"]) > 5 else []) + ["best epoch on val", "train img/s"]:
        table.add_column(col, justify="left" if col == "encoder" else "right")
    for name, r in report["results"].items():
        best = f"{100 * r['best_val_top1']:.1f}% (epoch {r['best_epoch']})" if r["best_epoch"] else "-"
        table.add_row(name, f"{100 * r['top1']:.1f}%", *([f"{100 * r['top5']:.1f}%"] if "top5" in r else []), best,
                      f"{r['images_per_s']:.0f}" if r["images_per_s"] else "-")
    console.print(table)


def print_segmentation_table(report: dict[str, Any], what: str) -> None:
    """mIoU, pixel accuracy and mean class accuracy per encoder, then the IoU of each class (rows) per encoder."""
    from rich.table import Table

    h, w = report["input_size"]
    table = Table(title=f"segmentation, {what}: {len(report['classes'])} classes, {report['train_images']} train / {report['val_images']} val frames at {h}x{w}")
    for col in ("encoder", "mIoU", "pixel accuracy", "mean class accuracy"):
        table.add_column(col, justify="left" if col == "encoder" else "right")
    for name, r in report["results"].items():
        table.add_row(name, percent(r["miou"]), percent(r["pixel_acc"]), percent(r["mean_class_acc"]))
    console.print(table)
    per_class = Table(title="IoU per class (%)")
    per_class.add_column("class")
    for name in report["results"]:
        per_class.add_column(name, justify="right")
    for c in report["classes"]:
        per_class.add_row(c, *[f"{100 * r['per_class_iou'][c]:.1f}" if r["per_class_iou"][c] is not None else "-" for r in report["results"].values()])
    console.print(per_class)


def print_probe_table(report: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"{len(report['classes'])} classes, {report['train_images']} train / {report['val_images']} val images, {report['pool']} token")
    table.add_column("encoder")
    for method in ("linear", "knn"):
        table.add_column(f"{'linear probe' if method == 'linear' else 'k-NN (k=' + str(report['k']) + ')'} top-1", justify="right")
        if len(report["classes"]) > 5:
            table.add_column("top-5", justify="right")
    for name, result in report["results"].items():
        cells = []
        for method in ("linear", "knn"):
            cells.append(f"{100 * result[method]['top1']:.1f}%")
            if "top5" in result[method]:
                cells.append(f"{100 * result[method]['top5']:.1f}%")
        table.add_row(name, *cells)
    console.print(table)


def percent(value: float | None) -> str:
    return f"{100 * value:.1f}%" if value is not None else "-"


def print_compare_table(report: dict[str, Any]) -> None:
    from fractions import Fraction

    from rich.table import Table

    from maecli.compare import FRACTIONS

    cost = Table(title=f"budget: {report['budget']['text']}, batch {report['batch']}, {report['device']}")
    for col in ("method", "ms/step", "GFLOP/step", "steps", "images seen", "PFLOP", "train s"):
        cost.add_column(col, justify="left" if col == "method" else "right")
    for name, m in report["methods"].items():
        cost.add_row(name, f"{1000 * m['step_seconds']:.0f}" if m["step_seconds"] else "-", f"{m['flops_per_step'] / 1e9:.3g}", str(m["steps"]),
                     f"{m['images_seen']:,}", f"{m['flops'] / 1e15:.3g}", f"{m['train_seconds']:.0f}")
    console.print(cost)
    tuned, dense = report["finetune_epochs"] > 0, report["task"] == "segmentation"
    what = "mIoU (%), frozen-encoder segmentation probe" if dense else "top-1 (%), linear probe/k-NN"
    quality = Table(title=f"{what}, at each fraction of the budget; {report['classes']} classes, {report['train_images']} "
                          f"train / {report['val_images']} val {'frames' if dense else 'images'}" + (f"; fine-tuned {report['finetune_epochs']} epochs" if tuned else ""))
    for col in ["encoder", *[f"at {Fraction(f)}" for f in FRACTIONS], *(["fine-tuned"] if tuned else [])]:
        quality.add_column(col, justify="left" if col == "encoder" else "right", no_wrap=True)
    both = (lambda r: f"{100 * r['miou']:.1f}") if dense else (lambda r: f"{100 * r['linear']:.1f}/{100 * r['knn']:.1f}")  # noqa: E731
    for name, m in report["methods"].items():
        quality.add_row(name, *[both(p) for p in m["points"]], *([percent(m.get("finetuned"))] if tuned else []))
    for name, f in report["floors"].items():
        quality.add_row(name, *[both(f)] * len(FRACTIONS), *([percent(f["finetuned"])] if tuned else []))
    console.print(quality)


def print_quickstart(s: dict[str, Any]) -> None:
    """The quickstart's summary: where everything went, its tables, and what pretraining bought."""
    probe = s["probe"]
    pre, rnd = probe["results"]["pretrained"]["linear"]["top1"], probe["results"]["random init"]["linear"]["top1"]
    store = s["store"]
    print_lines([
        "",
        f"project:          {s['config']}",
        f"frame store:      {store['store']} ({store['frames']['train']} train + {store['frames']['val']} val frames)",
        f"pretraining:      {s['pretrain']['steps']} steps, final loss {s['pretrain']['final_loss']:.4f} ({s['pretrain']['run_dir']})",
        f"loss curve:       {s['pretrain']['loss_curve']}",
        f"reconstructions:  {s['visualize']['image']}",
        f"encoder for timm: {s['export']['path']}",
        f"probe report:     {probe['report']}",
        f"fine-tuning:      {s['finetune']['report']} (curves: {s['finetune']['curves_png']})",
        f"segmentation:     {s['segmentation']['probe']['predictions_png']}, {s['segmentation']['finetune']['report']}",
        f"results table:    {s['results']}",
    ])  # fmt: skip
    print_probe_table(probe)
    print_finetune_table(s["finetune"])
    seg = s["segmentation"]
    print_segmentation_table(seg["probe"], "frozen encoders")
    print_finetune_table(seg["finetune"])
    tuned = {name: r["top1"] for name, r in s["finetune"]["results"].items()}
    pixels = probe["results"]["raw pixels"]["linear"]["top1"]
    print_lines([f"pretraining gain over a random-init encoder: {100 * (pre - rnd):+.1f} points of top-1 on the linear probe, "
                 f"{100 * (tuned['pretrained'] - tuned['random init']):+.1f} fine-tuned",
                 f"against the raw pixels (linear probe {100 * pixels:.1f}%): frozen {100 * (pre - pixels):+.1f}, fine-tuned "
                 f"{100 * (tuned['pretrained'] - pixels):+.1f} points",
                 f"segmentation: pretrained vs random init {100 * (seg['probe']['results']['pretrained']['miou'] - seg['probe']['results']['random init']['miou']):+.1f} "
                 f"points of mIoU frozen, {100 * (seg['finetune']['results']['pretrained']['miou'] - seg['finetune']['results']['random init']['miou']):+.1f} fine-tuned"])


def print_bench(result: dict[str, Any], *, batch: int, steps: int, warmup: int, plot: Path | None, profile: Path | None) -> None:
    from rich.table import Table

    a = result["arch"]
    print_lines([f"training step: ViT {a['embed_dim']} x {a['depth']}, decoder {a['decoder_embed_dim']} x {a['decoder_depth']}, patch {a['patch_size']}, "
                 f"{a['img_size'][0]}x{a['img_size'][1]}, batch {batch}, mask {result['mask_ratio']:g}, {result['device']}"
                 f"{', compiled (' + result['compile_mode'] + ')' if result['compiled'] else ', eager'}; median of {steps} interleaved steps after {warmup} warm-up"])
    table = Table()
    for col in ("variant", "ms/step", "range", "img/s", "MiB", "GFLOP/img", "GFLOP/s", "MFU", "of matmul"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name, v in result["variants"].items():
        table.add_row(name, f"{1000 * v['step_s_median']:.1f}", f"{1000 * v['step_s_min']:.0f}-{1000 * v['step_s_max']:.0f}", f"{v['images_per_s']:.1f}",
                      f"{v['peak_mem_mib']:.0f}" if v["peak_mem_mib"] is not None else "-", f"{v['gflop_per_image']:.2f}", f"{v['achieved_gflops']:.1f}",
                      f"{100 * v['mfu']:.1f}%" if v["mfu"] is not None else "unknown", f"{100 * v['of_matmul']:.0f}%")
    console.print(table)
    lines = [f"{name}: {s['measured']:.2f}x the speed (analytic FLOP ratio {s['analytic']:.2f}x)" for name, s in result["speedups"].items()]
    lines += [f"MFU peak: {result['peak_source']}", f"of matmul: against a {result['matmul_source']} timed now, {result['matmul_gflops']:,.0f} GFLOP/s"]
    print_lines(lines + (["peak memory is measured on CUDA only"] if result["device"] == "cpu" else []) + ([f"plot: {plot}"] if plot else [])
                + ([f"profiles: {profile}"] if profile else []))
