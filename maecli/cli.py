"""The `maecli` command line: parse, load the project file, call one function, print a summary.

Library code raises `MaecliError`; this module alone turns it into one line per problem on stderr and
an exit code (2: configuration or usage, 1: runtime). Heavy imports (torch, timm) happen inside commands.
"""

import errno
import functools
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from maecli import __version__
from maecli.config import CONFIG_NAME, MaecliConfig, dump_toml, load_config, write_template
from maecli.errors import ConfigError, MaecliError
from maecli.files import out_of_space
from maecli.methods import METHODS, listed
from maecli.report import console, print_bench, print_compare_table, print_finetune_table, print_lines, print_probe_table, print_quickstart, print_segmentation_table

app = typer.Typer(
    name="maecli",
    help="Masked Autoencoder pretraining on unlabeled video: extract, pretrain, visualize, export, probe, finetune, compare.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help as written: Rich markup would eat "[probe]", and its panels show flags as taking a value
)
store_app = typer.Typer(help="Inspect frame stores.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(store_app, name="store")
export_app = typer.Typer(help="Ship the encoder (timm or Hugging Face) and frozen-encoder features.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(export_app, name="export")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="The project file (or its folder).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", metavar="SECTION.KEY=VALUE", help="Override a project-file value: section.key=value (repeatable).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout.")]


def reports_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a MaecliError into its lines on stderr and its exit code; anything else keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MaecliError as err:
            for line in err.lines:
                console.print(line, markup=False, soft_wrap=True)
            raise typer.Exit(err.exit_code) from None
        except OSError as err:  # a full disk where no file write catches it (making a folder, a lock's few bytes): one line too
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            console.print(out_of_space(Path(err.filename or "."), str(err)).lines[0], markup=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"maecli {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version.")] = False,
) -> None:
    """Masked Autoencoder pretraining on unlabeled video."""


@app.command()
@reports_errors
def init(
    directory: Annotated[Path, typer.Argument(help="Folder for the new project file.")] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing project file.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Write a commented maecli.toml with every option at its default (sized for a GPU; says so on a machine without one)."""
    path = write_template(directory, force=force)
    gpu = gpu_here()
    if json_out:
        print_json({"config": str(path), "gpu": gpu})
        return
    console.print(f"Wrote {path}. Edit it, then check it with: maecli config -c {path}", markup=False, soft_wrap=True)
    if gpu is False:
        from maecli.loop import CPU_SIZED

        console.print(f"No GPU here: the defaults (ViT-B/16 at 224, 100 epochs) are sized for one and take days on a CPU; the quickstart's "
                      f"CPU size is {CPU_SIZED}", markup=False, soft_wrap=True)


def gpu_here() -> bool | None:
    """Whether torch sees a CUDA device; None where torch is not installed (the extraction-only installs)."""
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    return torch.cuda.is_available()


@app.command("config")
@reports_errors
def show_config(config: ConfigOpt = Path(CONFIG_NAME), set_: SetOpt = None, json_out: JsonOpt = False) -> None:
    """Validate the project file and print the resolved config (overrides applied, paths absolute)."""
    cfg: MaecliConfig = load_config(config, set_ or [])
    if json_out:
        print_json(cfg.model_dump(mode="json"))
    else:
        typer.echo(dump_toml(cfg), nl=False)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@app.command()
@reports_errors
def extract(
    inputs: Annotated[list[str] | None, typer.Argument(help="Video files, folders or glob patterns (default: [extract] inputs).")] = None,
    config: ConfigOpt = Path(CONFIG_NAME),
    set_: SetOpt = None,
    shard: Annotated[str | None, typer.Option("--shard", help="Extract only part i of n of the videos, e.g. 2/4 (for many machines).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit with code 1 if any file fails.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Decode videos into the frame store: sampled, resized, deduplicated, split by video, resumable."""
    from maecli.extract import parse_shard, run_extract

    cfg = load_config(config, set_ or [])
    part = parse_shard(shard) if shard else None
    summary = run_extract(cfg.extract, [str(Path(i).absolute()) for i in inputs or []], part, console)
    if json_out:
        print_json(summary)
    else:
        frames = summary["frames"]
        lines = [
            f"{summary['store']}: {frames['train']} train + {frames['val']} val frames of {summary['size'][0]}x{summary['size'][1]} "
            f"from {summary['videos']} videos, {human_bytes(summary['bytes'])}",
            f"this run: {summary['videos_extracted']} videos extracted ({summary['new_frames']} frames, "
            f"{summary['dropped_duplicates']} near-duplicates dropped, {summary['frames_per_second']:.0f} decoded frames/s), "
            f"{summary['videos_skipped']} already in the store, {summary['videos_failed']} failed",
        ]
        lines += [f"failed: {f['path']}: {f['reason']}" for f in summary["failures"]]
        lines += [f"warning: {w['path']}: {w['message']}" for w in summary["warnings"]]
        print_lines(lines)
    if summary["frames"]["train"] + summary["frames"]["val"] == 0:
        print_lines(["nothing could be extracted"])
        raise typer.Exit(1)
    if strict and summary["failures"]:
        raise typer.Exit(1)


@store_app.command("info")
@reports_errors
def store_info(
    path: Annotated[str | None, typer.Argument(help="The store folder or URL (default: [extract] store of the project file).")] = None,
    config: ConfigOpt = Path(CONFIG_NAME),
    set_: SetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Describe a frame store: frame size, frames per split, videos, bytes on disk, extraction settings."""
    from maecli.store import FrameStore

    info = FrameStore(path if path is not None else load_config(config, set_ or []).extract.store).info()
    if json_out:
        print_json(info)
    else:
        settings = ", ".join(f"{k}={json.dumps(v)}" for k, v in info["settings"].items())
        print_lines([
            f"{info['store']} (frame store format {info['format_version']}, {info['format']} frames)",
            f"frames: {info['frames']['train']} train, {info['frames']['val']} val, {info['size'][0]}x{info['size'][1]} RGB",
            f"videos: {info['videos']}, {human_bytes(info['bytes'])} on disk",
            f"settings: {settings}",
        ])  # fmt: skip


@store_app.command("convert")
@reports_errors
def store_convert(
    source: Annotated[str, typer.Argument(help="The store to read (folder or URL).")],
    target: Annotated[str, typer.Argument(help="The store to write (folder or URL): new, or one this command was converting.")],
    format: Annotated[str, typer.Option("--format", help="jpeg or raw.")] = "jpeg",
    quality: Annotated[int, typer.Option("--quality", help="JPEG quality, 1-100.")] = 90,
    json_out: JsonOpt = False,
) -> None:
    """Copy a frame store into another format (raw <-> jpeg), video by video, the same records; resumable."""
    from maecli.extract import convert_store

    summary = convert_store(source, target, format, quality)
    if json_out:
        print_json(summary)
    else:
        print_lines([f"{summary['store']}: {summary['videos']} videos in {summary['format']} ({summary['videos_converted']} converted by this run), "
                     f"{human_bytes(summary['bytes'])}, from {human_bytes(summary['source_bytes'])}"])


@app.command(help=f"Pretrain on the frame store's train split (MAE; pretrain.method picks {listed(list(METHODS)[1:])} instead); resumes the run folder's "
             "latest checkpoint.")
@reports_errors
def pretrain(
    config: ConfigOpt = Path(CONFIG_NAME),
    set_: SetOpt = None,
    restart: Annotated[bool, typer.Option("--restart", help="Delete this run's checkpoints and start over.")] = False,
    json_out: JsonOpt = False,
) -> None:
    from maecli.train import pretrain as run_pretrain

    cfg = load_config(config, set_ or [])
    summary = run_pretrain(cfg, restart=restart, console=console)
    if summary is None:  # not the main process under torchrun
        return
    if json_out:
        print_json(summary)
    else:
        print_lines(summary["notes"] + [
            f"{summary['run_dir']}: {summary['steps']} steps ({summary['epochs']} epochs, effective batch {summary['effective_batch']}) "
            f"on {summary['device']} x {summary['world_size']}",
            f"final loss {summary['final_loss']:.4f}, {summary['seconds']:.1f} s, {summary['images_per_s']:.1f} images/s "
            f"(data wait {100 * summary['data_wait_fraction']:.1f}% of the time)",
            f"checkpoint: {summary['checkpoint']}",
            f"loss curve: {summary['loss_curve']}",
        ] + ([f"reconstructions: {summary['snapshot']}"] if summary["snapshot"] else []))  # fmt: skip


CheckpointOpt = Annotated[str | None, typer.Option("--checkpoint", help="Weights to use: a maecli checkpoint, an official MAE .pth or a HF folder (default: the run's latest).")]


@app.command()
@reports_errors
def visualize(
    inputs: Annotated[list[str] | None, typer.Argument(help="Image files or one video (default: frames from the store's [visualize] split).")] = None,
    config: ConfigOpt = Path(CONFIG_NAME),
    set_: SetOpt = None,
    checkpoint: CheckpointOpt = None,
    mask_ratio: Annotated[float | None, typer.Option("--mask-ratio", help="Fraction of patches removed (default: [visualize] or the model's).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="The PNG to write (default: reconstructions.png in the run folder).")] = None,
    video: Annotated[Path | None, typer.Option("--video", help="Render the input video side by side into this MP4 instead.")] = None,
    start: Annotated[float | None, typer.Option("--start", help="Seconds into the video to begin (default: [extract] start).")] = None,
    end: Annotated[float | None, typer.Option("--end", help="Seconds into the video to stop, 0: its end (default: [extract] end).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Show what the model sees and fills in: original | masked | reconstruction | reconstruction + visible."""
    from maecli.visualize import run_visualize

    cfg = load_config(config, set_ or [])
    summary = run_visualize(cfg, [str(Path(i).absolute()) for i in inputs or []], checkpoint=checkpoint, mask_ratio=mask_ratio, out=out,
                            video_out=video, start=start, end=end)
    if json_out:
        print_json(summary)
    else:
        what = f"{summary['image']} ({summary['rows']} rows)" if "image" in summary else f"{summary['video']} ({summary['frames']} frames at {summary['fps']:g} fps)"
        stats = f", {summary['stats']}-patch statistics" if summary["stats"] else ""
        print_lines(summary["notes"] + [f"wrote {what}: mask ratio {summary['mask_ratio']:g}{stats}, weights {summary['checkpoint']}"])


OutOpt = Annotated[str | None, typer.Option("--out", help="Output folder (default: [export] out, else export/ in the run folder).")]


@export_app.command("encoder")
@reports_errors
def export_encoder(
    config: ConfigOpt = Path(CONFIG_NAME),
    set_: SetOpt = None,
    checkpoint: CheckpointOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="timm: encoder.safetensors + encoder.json; hf: a Hugging Face ViTMAE folder.")] = "timm",
    out: OutOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Write the encoder as timm-loadable safetensors (or a Hugging Face ViTMAE folder)."""
    from maecli.export import export_encoder as run_export

    if fmt not in ("timm", "hf"):
        raise ConfigError(f"--format: must be 'timm' or 'hf' (got {fmt!r})")
    summary = run_export(load_config(config, set_ or []), checkpoint=checkpoint, fmt=fmt, out=out)
    if json_out:
        print_json(summary)
    else:
        print_lines(summary["notes"] + [f"wrote {summary['path']} (from {summary['checkpoint']})", f"load it with: {summary['snippet']}"])


@export_app.command("features")
@reports_errors
def export_features(
    inputs: Annotated[list[str] | None, typer.Argument(help="Image files or folders (class = sub-folder), or one video (default: the store).")] = None,
    config: ConfigOpt = Path(CONFIG_NAME),
    set_: SetOpt = None,
    checkpoint: CheckpointOpt = None,
    out: OutOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Embed frames or images with the frozen encoder into features.safetensors plus a provenance index."""
    from maecli.export import export_features as run_export

    summary = run_export(load_config(config, set_ or []), [str(Path(i).absolute()) for i in inputs or []], checkpoint=checkpoint, out=out, console=console)
    if json_out:
        print_json(summary)
    else:
        shape = "x".join(map(str, summary["shape"]))
        print_lines(summary["notes"] + [f"wrote {summary['path']}: {shape} {summary['dtype']} ({summary['pool']} pooling, from the {summary['source']})",
                                        f"index: {summary['index']}"])


def chosen_baselines(given: list[str] | None, known: tuple[str, ...]) -> tuple[str, ...]:
    """The --baseline values, each once, in the order given; an unknown one is a usage error naming the choices."""
    unknown = [b for b in given or [] if b not in known]
    if unknown:
        raise ConfigError(f"--baseline: must be {' or '.join(map(repr, known))} (got {unknown[0]!r})")
    return tuple(dict.fromkeys(given or []))


@app.command()
@reports_errors
def probe(
    config: ConfigOpt = Path(CONFIG_NAME),
    set_: SetOpt = None,
    checkpoint: CheckpointOpt = None,
    baseline: Annotated[list[str] | None, typer.Option("--baseline", metavar="NAME", help="Also probe 'random' (a random-init encoder of the same shape) or 'pixels' (the input pixels); repeatable.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Judge the frozen encoder on the labeled set ([probe] train / val): linear-probe and k-NN accuracy on a class
    folder, or segmentation mIoU (a linear head on the patch tokens) on images/ + masks/."""
    from maecli.probe import BASELINES, run_probe

    report = run_probe(load_config(config, set_ or []), checkpoint=checkpoint, baselines=chosen_baselines(baseline, BASELINES))
    if json_out:
        print_json(report)
        return
    print_lines(report["notes"])
    if report["task"] == "segmentation":
        print_segmentation_table(report, f"frozen encoders, last {report['layers']} block{'s' * (report['layers'] > 1)}")
        print_lines([f"report: {report['report']}", f"per-class IoU: {report['iou_png']}", f"predictions: {report['predictions_png']}"])
        return
    print_probe_table(report)
    print_lines([f"report: {report['report']}", f"confusion matrix: {report['results']['pretrained']['confusion_png']}"])


@app.command()
@reports_errors
def finetune(
    config: ConfigOpt = Path(CONFIG_NAME),
    set_: SetOpt = None,
    checkpoint: CheckpointOpt = None,
    baseline: Annotated[list[str] | None, typer.Option("--baseline", metavar="NAME", help="Also fine-tune 'random': a random-init encoder of the same shape, same recipe.")] = None,
    restart: Annotated[bool, typer.Option("--restart", help="Delete these fine-tuning runs and start over.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Fine-tune the encoder with a linear head (on the class token, or on every patch token for segmentation) on the
    labeled set ([probe] train / val, recipe in [finetune]); resumes."""
    from maecli.finetune import BASELINES, run_finetune

    report = run_finetune(load_config(config, set_ or []), checkpoint=checkpoint, baselines=chosen_baselines(baseline, BASELINES), restart=restart,
                          console=console)
    if report is None:  # not the main process under torchrun
        return
    if json_out:
        print_json(report)
        return
    print_lines(report["notes"] + [n for r in report["results"].values() for n in r["notes"]])
    print_finetune_table(report)
    kind = "segmenter" if report["task"] == "segmentation" else "classifier"
    print_lines([f"report: {report['report']}", f"learning curves: {report['curves_png']}"]
                + [f"{name}: {r[kind]}; load it with: {r['snippet']}" + (f"; then {r['predict']}" if "predict" in r else "") for name, r in report["results"].items()])


@app.command()
@reports_errors
def compare(
    config: ConfigOpt = Path(CONFIG_NAME),
    set_: SetOpt = None,
    budget: Annotated[str | None, typer.Option("--budget", help="Training time per method on this device: 90s, 20m, 2h (sets compare.budget).")] = None,
    budget_flops: Annotated[float | None, typer.Option("--budget-flops", help="Training FLOPs per method, e.g. 1e15 (sets compare.budget_flops).")] = None,
    budget_steps: Annotated[int | None, typer.Option("--budget-steps", help="Steps of the first method; the others get its FLOPs (sets compare.budget_steps).")] = None,
    method: Annotated[list[str] | None, typer.Option("--method", metavar="NAME", help=f"A method to compare: {listed(list(METHODS))}; repeatable (sets compare.methods).")] = None,
    finetune_epochs: Annotated[int | None, typer.Option("--finetune-epochs", help="Also fine-tune each final encoder for this many epochs (sets compare.finetune_epochs).")] = None,
    restart: Annotated[bool, typer.Option("--restart", help="Delete this comparison (plan, runs, probes) and start over.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Which pretraining for this data at this budget: pretrain each method on the store under one compute budget,
    probe each at 1/8, 1/4, 1/2 and all of it ([probe]'s labeled set), against random init and raw pixels; resumes."""
    from maecli.compare import run_compare

    overrides = list(set_ or [])
    given = {"budget": budget, "budget_flops": budget_flops, "budget_steps": budget_steps}
    if any(v is not None for v in given.values()):  # a budget on the command line replaces the project file's
        unset = {"budget": '""', "budget_flops": "0", "budget_steps": "0"}
        overrides += [f"compare.{k}={json.dumps(v) if v is not None else unset[k]}" for k, v in given.items()]
    if method:
        overrides.append(f"compare.methods={json.dumps(method)}")
    if finetune_epochs is not None:
        overrides.append(f"compare.finetune_epochs={finetune_epochs}")
    report = run_compare(load_config(config, overrides), restart=restart, console=console)
    if json_out:
        print_json(report)
        return
    print_lines(report["notes"])
    print_compare_table(report)
    print_lines([f"report: {report['report']}", f"quality vs compute: {report['plot']}"])


@app.command()
@reports_errors
def quickstart(
    directory: Annotated[Path, typer.Argument(help="Folder for the demo project (created; a rerun continues).")] = Path("maecli-quickstart"),
    set_: SetOpt = None,
    clips: Annotated[int, typer.Option("--clips", min=1, help="Synthetic clips to generate (12 s each).")] = 16,
    per_class: Annotated[int, typer.Option("--per-class", min=2, help="Labeled training stills per class (val: half).")] = 200,
    json_out: JsonOpt = False,
) -> None:
    """The whole lifecycle on built-in synthetic dashcam video: generate, extract, pretrain, visualize, export, probe, finetune."""
    from maecli.quickstart import quickstart as run_quickstart

    s = run_quickstart(directory, overrides=set_ or [], clips=clips, per_class=per_class, console=console)
    if json_out:
        print_json(s)
        return
    print_quickstart(s)


@app.command()
@reports_errors
def bench(
    config: ConfigOpt = Path(CONFIG_NAME),
    set_: SetOpt = None,
    model: Annotated[str | None, typer.Option("--model", help="A size preset, e.g. vit_base (default: the [model] section).")] = None,
    patch: Annotated[int | None, typer.Option("--patch", help="Patch size (with --model; default 16).")] = None,
    img: Annotated[str | None, typer.Option("--img", help="Input size, 224 or HxW like 128x256 (with --model; default 224).")] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Images per step.")] = 8,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Timed steps per variant (interleaved).")] = 5,
    warmup: Annotated[int, typer.Option("--warmup", min=1, help="Untimed steps per variant first.")] = 2,
    decoder_depth: Annotated[list[int] | None, typer.Option("--decoder-depth", metavar="DEPTH", help="Also time MAE with this decoder depth (repeatable).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    peak_tflops: Annotated[float | None, typer.Option("--peak-tflops", help="Peak for MFU in TFLOP/s (default: the GPU's dense bf16 spec, if known).")] = None,
    compile: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile every variant (default: as pretrain, on CUDA only).")] = None,
    profile: Annotated[Path | None, typer.Option("--profile", help="Also write a torch.profiler trace and the top operators of the MAE step here.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a bar chart PNG of images/s here.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Measure MAE's step against mask tokens in the encoder and every other method's step (contrastive, frame pairs) on this machine."""
    from maecli.bench import bench_setup, run_bench
    from maecli.figures import plot_bench

    cfg, dev = bench_setup(config, set_ or [], model=model, patch=patch, img=img, device=device)
    result = run_bench(cfg, batch=batch, steps=steps, warmup=warmup, decoder_depths=decoder_depth or [], device=dev, peak_tflops=peak_tflops,
                       compile=compile, profile=profile)
    if plot is not None:
        plot_bench(result, plot)
        result["plot"] = str(plot)
    if json_out:
        print_json(result)
        return
    print_bench(result, batch=batch, steps=steps, warmup=warmup, plot=plot, profile=profile)
