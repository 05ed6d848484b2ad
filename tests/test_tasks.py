"""The contract of a kind of labeled set (`maecli.tasks`): every registered kind is recognised by its layout and runs
through probe (with its floors), fine-tuning (its head exported and reloaded by the line the tool prints), compare
and the quickstart's table, on a tiny set of its own. A new kind adds its tiny set to SETS."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maecli.cli import app
from maecli.config import load_config
from maecli.data import to_input
from maecli.tasks import TASKS, task_of
from tests.conftest import write_project
from tests.test_probe import make_set
from tests.test_segmentation import make_seg_set

SETS = {  # kind -> (train set, val set) of a tiny labeled set of that kind, made in a folder
    "classification": lambda d: (make_set(d / "train", 8, 0), make_set(d / "val", 4, 1)),
    "segmentation": lambda d: (make_seg_set(d / "train", 24, 0), make_seg_set(d / "val", 6, 1, size=40)),
}


def run(runner, config, *args):
    result = runner.invoke(app, [*args, "-c", str(config), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("kind", list(TASKS))
def test_every_kind_probes_finetunes_and_compares(runner, tmp_path, trained, store, kind):
    train, val = SETS[kind](tmp_path / "set")
    weights = sorted((trained / "runs" / "pretrain" / "checkpoints").glob("step-*.safetensors"))[-1]
    config = write_project(tmp_path, store, pretrain={"log_every": 4}, probe={"train": str(train), "val": str(val), "epochs": 5},
                           finetune={"checkpoint": str(weights), "epochs": 2, "batch_size": 8})
    task = task_of(load_config(config))
    assert task.name == kind  # recognised by its layout

    probed = run(runner, config, "probe", "--checkpoint", str(weights), "--baseline", "random", "--baseline", "pixels")
    floors = list(probed["results"])[3:]  # the kind's own floors (segmentation: the majority class), after the encoders'
    assert probed["task"] == kind and list(probed["results"])[:3] == ["pretrained", "random init", "raw pixels"]
    for name, result in probed["results"].items():
        assert all(0 <= v <= 1 for v in task.frozen_scores(result).values()), name

    tuned = run(runner, config, "finetune", "--baseline", "random")
    assert tuned["task"] == kind and list(tuned["results"]) == ["pretrained", "random init"]
    for name, result in tuned["results"].items():
        assert 0 <= result[task.score] <= 1 and [row["epoch"] for row in result["curve"]] == [1, 2]
        assert Path(result[task.head]).name == f"{task.head}.safetensors" and result[f"best_val_{task.score}"] >= result["curve"][-1][f"val_{task.score}"]
        namespace = {}
        exec(result["snippet"], namespace)  # the exported model, loaded as the tool says
        images = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB").resize((32, 32))) for p in sorted(val.rglob("*.png"))[:2]]))
        with torch.no_grad():
            out = namespace["m"].eval()(to_input(images))
        assert out.shape[0] == 2 and out.shape[-1] == len(tuned["classes"])  # logits per image, or per token

    table = task.table(probed, tuned)  # the quickstart's table of these results: a header, a rule, a row per probed encoder
    assert len(table.splitlines()) == 2 + len(probed["results"]) and "pretrained" in table.splitlines()[2]

    compared = run(runner, config, "compare", "--method", "mae", "--budget-steps", "16", "--finetune-epochs", "1")
    assert compared["task"] == kind and list(compared["floors"]) == ["random init", "raw pixels", *floors]
    points = compared["methods"]["mae"]["points"]
    assert [p["step"] for p in points] == [2, 4, 8, 16] and all(set(task.frozen_scores(probed["results"]["pretrained"])) <= set(p) for p in points)
    assert 0 <= compared["methods"]["mae"]["finetuned"] <= 1 and compared["floors"]["random init"]["finetuned"] is not None
