"""The built-in dashcam world and `maecli quickstart`, and the README's fresh-machine commands."""

import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import typer
from PIL import Image

from maecli.cli import app
from maecli.synthetic import CURVES, SEG_CLASSES, generate_clips, generate_labeled, generate_segmentation

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--clips", "2", "--per-class", "6", "--set", "model.embed_dim=32", "--set", "model.depth=1", "--set", "model.num_heads=2",
         "--set", "model.decoder_embed_dim=16", "--set", "model.decoder_depth=1", "--set", "model.decoder_num_heads=2",
         "--set", "pretrain.steps=4", "--set", "pretrain.batch_size=8", "--set", "pretrain.warmup_steps=1", "--set", "pretrain.checkpoint_every=2",
         "--set", "probe.epochs=2", "--set", "extract.fps=2", "--set", "project.device=cpu", "--set", "finetune.epochs=1", "--set", "finetune.batch_size=8"]


def test_generator_is_deterministic_and_decodable(tmp_path):
    a = generate_clips(tmp_path / "a", count=2, seconds=1.5, fps=10, size=(72, 128), seed=3)
    b = generate_clips(tmp_path / "b", count=2, seconds=1.5, fps=10, size=(72, 128), seed=3)
    c = generate_clips(tmp_path / "c", count=1, seconds=1.5, fps=10, size=(72, 128), seed=4)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert a[0].read_bytes() != a[1].read_bytes() and a[0].read_bytes() != c[0].read_bytes()
    with av.open(str(a[0])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert container.streams.video[0].codec_context.name == "h264"
    assert len(frames) == 15 and frames[0].shape == (72, 128, 3)
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 2  # the world moves
    counts = generate_labeled(tmp_path / "l", per_class=3, size=(48, 96), seed=1)
    assert counts == {name: 3 for name in CURVES}
    again = generate_labeled(tmp_path / "l2", per_class=3, size=(48, 96), seed=1)
    assert again == counts
    for name in CURVES:
        for i in range(3):
            one, two = tmp_path / "l" / name / f"{i:05d}.png", tmp_path / "l2" / name / f"{i:05d}.png"
            assert one.read_bytes() == two.read_bytes() and Image.open(one).size == (96, 48)


def test_curvature_labels_are_visible_in_the_pixels(tmp_path):
    """The far road's side says the class: the mean column of road-marking pixels moves left to right."""
    generate_labeled(tmp_path, per_class=8, size=(96, 192), seed=5)
    centre = {}
    for name in CURVES:
        xs = []
        for path in sorted((tmp_path / name).iterdir()):
            img = np.asarray(Image.open(path)).astype(int)
            band = img[44:52]  # rows just below the horizon: the far road
            bright = (band.min(axis=2) > 150) & (np.ptp(band, axis=2) < 40)  # white paint
            cols = np.nonzero(bright)[1]
            if len(cols):
                xs.append(cols.mean())
        centre[name] = np.mean(xs)
    assert centre["curve_left"] < centre["straight"] < centre["curve_right"]


def test_shortened_quickstart_produces_every_artifact_and_continues(runner, tmp_path):
    result = runner.invoke(app, ["quickstart", str(tmp_path / "qs"), *SMALL, "--json"])
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    qs = tmp_path / "qs"
    for path in [s["config"], s["pretrain"]["checkpoint"], s["pretrain"]["loss_curve"], s["pretrain"]["snapshot"], s["visualize"]["image"],
                 s["export"]["path"], s["export"]["spec"], s["probe"]["report"], s["probe"]["results"]["pretrained"]["confusion_png"],
                 s["finetune"]["report"], s["finetune"]["curves_png"], s["finetune"]["results"]["pretrained"]["classifier"],
                 s["segmentation"]["probe"]["predictions_png"], s["segmentation"]["probe"]["iou_png"],
                 s["segmentation"]["finetune"]["results"]["pretrained"]["segmenter"], s["segmentation"]["finetune"]["results"]["pretrained"]["predictions_png"]]:
        assert Path(path).stat().st_size > 0, path
    assert len(list((qs / "videos").glob("*.mp4"))) == 2 and s["store"]["frames"]["train"] + s["store"]["frames"]["val"] > 0
    assert set(s["probe"]["results"]) == {"pretrained", "random init", "raw pixels"} and s["probe"]["classes"] == sorted(CURVES)
    assert set(s["finetune"]["results"]) == {"pretrained", "random init"} and s["finetune"]["results"]["pretrained"]["steps"] == 2  # 18 stills, batch 8
    assert (qs / "results.md").read_text() == s["table"]
    rows, seg_rows = [t.splitlines() for t in s["table"].split("\n\n")]
    assert [r.split(" | ")[0] for r in rows[2:]] == ["| pretrained", "| random init", "| raw pixels"]
    ft = s["finetune"]["results"]["pretrained"]["top1"]
    assert rows[2].endswith(f" {100 * ft:.1f}% |") and rows[4].endswith(" - |")  # the pixels are not fine-tuned
    seg = s["segmentation"]
    assert seg["probe"]["task"] == "segmentation" and seg["probe"]["classes"] == list(SEG_CLASSES) and seg["probe"]["train_images"] == 8
    assert [r.split(" | ")[0] for r in seg_rows[2:]] == ["| pretrained", "| random init", "| raw pixels", "| majority class"]
    assert seg_rows[2].endswith(f" {100 * seg['finetune']['results']['pretrained']['miou']:.1f}% |") and seg_rows[5].endswith(" - |")
    assert (qs / "runs" / "pretrain" / "probe" / "report.json").exists() and (qs / "runs" / "pretrain" / "probe-segmentation" / "report.json").exists()
    assert s["pretrain"]["steps"] == 4
    mtimes = {p: p.stat().st_mtime_ns for p in (qs / "videos").iterdir()}
    again = runner.invoke(app, ["quickstart", str(qs), *SMALL, "--json"])
    assert again.exit_code == 0, again.output
    s2 = json.loads(again.stdout)
    assert s2["pretrain"]["steps_this_run"] == 0 and s2["store"]["videos_skipped"] == 2  # continued, nothing redone
    assert {p: p.stat().st_mtime_ns for p in (qs / "videos").iterdir()} == mtimes
    text = runner.invoke(app, ["quickstart", str(qs), *SMALL])
    assert text.exit_code == 0 and "pretraining gain over a random-init encoder" in text.stderr and "linear probe top-1" in text.stderr
    assert "segmentation: pretrained vs random init" in text.stderr


def fresh_machine_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## On a fresh machine", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_fresh_machine_commands_are_true():
    run_main, run_tests = fresh_machine_commands()[:2]
    assert run_main.endswith("pip install . && maecli quickstart")
    assert run_tests.endswith('pip install ".[test]" && pytest')
    assert 'pip install ".[test]" && pytest' in (ROOT / ".ci" / "run").read_text()  # CI runs the README's test command
    # the maecli part parses against the real command line (running it is the shortened test above)
    args = run_main.split("&& maecli ", 1)[1].split()
    command = typer.main.get_command(app)
    ctx = command.make_context("maecli", list(args))
    sub = command.get_command(ctx, args[0])
    assert sub is not None and sub.make_context(args[0], args[1:]).params["directory"] == Path("maecli-quickstart")


def verdict(tmp_path: Path, tables: str) -> subprocess.CompletedProcess:
    """CI's check of the README's claims (`.ci/quickstart_verdict.py`) on `tables` as a fresh run's results.md."""
    (tmp_path / "results.md").write_text(tables)
    return subprocess.run([sys.executable, str(ROOT / ".ci" / "quickstart_verdict.py"), str(tmp_path / "results.md"), str(ROOT / "README.md")],
                          capture_output=True, text=True)


def readme_tables() -> str:
    ci = runpy.run_path(str(ROOT / ".ci" / "quickstart_verdict.py"))
    return ci["between"]((ROOT / "README.md").read_text(), ci["TABLES"])


def test_readme_quotes_a_quickstart_table_whose_claims_hold(tmp_path):
    """The README quotes one run's tables (the shape the classification and segmentation kinds' `table` write, so CI compares
    numbers only) and claims about them; CI's check passes on that run, every claim with its lead."""
    from maecli.tasks.classification import Classification
    from maecli.tasks.segmentation import Segmentation

    results_table, segmentation_table = Classification().table, Segmentation().table

    tables = readme_tables()
    quoted = tables.split("\n\n")
    probed = {"k": 20, "results": {name: {"linear": {"top1": 0.5}, "knn": {"top1": 0.5}} for name in ("pretrained", "random init", "raw pixels")}}
    tuned = {"recipe": {"epochs": 10}, "results": {name: {"top1": 0.5} for name in ("pretrained", "random init")}}
    seg_probed = {"classes": list(SEG_CLASSES), "results": {name: {"miou": 0.5, "pixel_acc": 0.5} for name in ("pretrained", "random init", "raw pixels", "majority class")}}
    seg_tuned = {"recipe": {"epochs": 20}, "results": {name: {"miou": 0.5} for name in ("pretrained", "random init")}}
    assert len(quoted) == 2
    for table, shape in zip(quoted, (results_table(probed, tuned), segmentation_table(seg_probed, seg_tuned)), strict=True):
        table, shape = table.splitlines(), shape.splitlines()
        assert table[:2] == shape[:2] and [r.split(" | ")[0] for r in table[2:]] == [r.split(" | ")[0] for r in shape[2:]]
    result = verdict(tmp_path, tables)
    claims = [line for line in result.stdout.splitlines() if line.startswith(("ok", "FAILS"))]
    assert result.returncode == 0 and len(claims) >= 4 and all(line.startswith("ok") for line in claims), result.stdout


def test_ci_fails_when_a_claim_of_the_readme_stops_holding(tmp_path):
    """A planted run where pretraining lost its lead over random init after fine-tuning (the two rows' figures
    swapped), and one whose results lack the segmentation table: CI's check fails and names the claim."""
    lines = readme_tables().splitlines()
    pre, rnd = (next(i for i, line in enumerate(lines) if line.startswith(f"| {name} |")) for name in ("pretrained", "random init"))
    a, b = lines[pre].split(" | "), lines[rnd].split(" | ")
    a[3], b[3] = b[3], a[3]  # the fine-tuned column
    lines[pre], lines[rnd] = " | ".join(a), " | ".join(b)
    result = verdict(tmp_path, "\n".join(lines))
    assert result.returncode == 1 and "does not hold" in result.stderr
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILS")]
    assert len(failed) == 1 and failed[0].startswith("FAILS fine-tuned top-1: pretrained ahead of random init"), result.stdout
    assert "this fresh run's:" in result.stdout and lines[pre] in result.stdout  # the fresh table printed beside the README's
    no_segmentation = verdict(tmp_path, readme_tables().split("\n\n")[0])
    assert no_segmentation.returncode == 1 and "FAILS frozen probe mIoU" in no_segmentation.stdout and "this run -" in no_segmentation.stdout


def test_segmentation_stills_label_what_they_show(tmp_path):
    """Per-pixel labels: deterministic, every class of the world present over a few frames, the sky on top and the
    road at the bottom centre, and the lane paint where the pixels are white."""
    assert generate_segmentation(tmp_path / "a", count=6, seed=3) == 6
    generate_segmentation(tmp_path / "b", count=6, seed=3)
    masks = []
    for i in range(6):
        for kind in ("images", "masks"):
            assert (tmp_path / "a" / kind / f"{i:05d}.png").read_bytes() == (tmp_path / "b" / kind / f"{i:05d}.png").read_bytes()
        img = np.asarray(Image.open(tmp_path / "a" / "images" / f"{i:05d}.png")).astype(int)
        mask = np.asarray(Image.open(tmp_path / "a" / "masks" / f"{i:05d}.png"))
        assert mask.shape == img.shape[:2] == (96, 192) and mask[0, 96] == SEG_CLASSES.index("sky") and mask[-1, 96] == SEG_CLASSES.index("road")
        paint = mask == SEG_CLASSES.index("lane marking")
        assert paint.any() and img[paint].mean() > img[mask == SEG_CLASSES.index("road")].mean() + 60  # paint is bright, asphalt dark
        masks.append(mask)
    assert set(np.unique(np.stack(masks)).tolist()) == set(range(len(SEG_CLASSES)))
    assert (tmp_path / "a" / "classes.csv").read_text().splitlines()[:2] == ["class_id,name,r,g,b", "0,sky,70,130,180"]
