"""The method contract: every registered method goes through the whole lifecycle with nothing but its module, and a
method registered at run time (a copy of MAE under a new name) trains, shows and exports with no other file touched."""

import json
import math

import pytest

from maecli.cli import app
from maecli.methods import METHODS
from tests.conftest import write_project


def lifecycle(runner, tmp_path, store, name):
    """pretrain (2 steps), the checkpoint read back, visualize and both exports for method `name`; returns the
    method, the summary and the exit codes of visualize and export --format hf."""
    import torch
    from safetensors.torch import load_file

    from maecli.weights import HEADS, load_model
    from maecli.config import load_config
    from maecli.methods import method_of

    from maecli.config import MaecliConfig

    sections = MaecliConfig.model_fields
    own_ratio = {n: {"mask_ratio": 0.75} for n in METHODS if n in sections and "mask_ratio" in sections[n].annotation.model_fields}  # 4 of 16 patches seen
    config = write_project(tmp_path, store, pretrain={"method": name, "batch_size": 4, "steps": 2, "checkpoint_every": 2}, **own_ratio)
    method = method_of(load_config(config))
    assert method.name == name and method.flops_per_image() > 0 and method.lr(256) > 0
    result = runner.invoke(app, ["pretrain", "-c", str(config), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["method"] == name and summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    assert (summary["snapshot"] is not None) == (method.reconstructs == "frames")

    # the checkpoint round trip: rebuilt as the method's model, every tensor as written
    ckpt = tmp_path / "runs" / "pretrain" / "checkpoints" / "step-00000002.safetensors"
    model, _ = load_model(ckpt, encoder_only_ok=not method.reconstructs)
    assert model.method == name and type(model) is (method.model_class if method.reconstructs else type(model))
    saved, own = load_file(ckpt), model.state_dict()
    kept = set(saved) if method.reconstructs else {k for k in saved if not k.startswith(HEADS)}  # else: the encoder alone
    assert kept <= set(own) and len(kept) > 0
    for key in kept:
        assert torch.equal(own[key], saved[key]), key

    shown = runner.invoke(app, ["visualize", "-c", str(config), "--json"])
    if method.reconstructs:
        assert shown.exit_code == 0, shown.output
        assert json.loads(shown.stdout)["rows"] > 0
    else:  # nothing to reconstruct: one line, a usage error
        assert shown.exit_code == 2 and shown.stderr.count("\n") == 1 and f"({name}) checkpoint" in shown.stderr
    timm = runner.invoke(app, ["export", "encoder", "-c", str(config), "--out", str(tmp_path / "timm"), "--json"])
    assert timm.exit_code == 0, timm.output
    assert set(load_file(tmp_path / "timm" / "encoder.safetensors")) == {k for k in saved if not k.startswith(HEADS)}
    hf = runner.invoke(app, ["export", "encoder", "-c", str(config), "--format", "hf", "--out", str(tmp_path / "hf")])
    assert (hf.exit_code == 0) == (not method.not_hf), hf.output
    if hf.exit_code:
        assert hf.exit_code == 2 and hf.stderr.count("\n") == 1
    return method, summary


@pytest.mark.parametrize("name", list(METHODS))
def test_every_registered_method_builds_trains_checkpoints_shows_and_exports(runner, tmp_path, store, name):
    lifecycle(runner, tmp_path, store, name)


def test_a_method_registered_at_run_time_trains_shows_and_exports(runner, tmp_path, store, monkeypatch):
    from maecli.methods import method_class, register

    mae = method_class("mae")

    class Copy(mae):  # MAE under another name: nothing else in maecli is told about it
        name, label, loss_name = "mae_copy", "mae copy", "MSE on masked patches (a copy)"

    monkeypatch.setitem(METHODS, "mae_copy", None)  # taken out again after the test
    register(Copy)
    _, summary = lifecycle(runner, tmp_path, store, "mae_copy")
    assert summary["snapshot"].endswith("step-00000002.png")

    # the project file takes it wherever a method is named; a name never registered is still refused
    from pathlib import Path

    from maecli.config import validate_config
    from maecli.errors import ConfigError

    assert validate_config({"compare": {"methods": ["mae", "mae_copy"]}}, root=Path("."), source="m.toml").compare.methods == ["mae", "mae_copy"]
    with pytest.raises(ConfigError, match="compare.methods.1: must be one of 'mae', 'simclr', 'siammae', 'cropmae' or 'mae_copy'"):
        validate_config({"compare": {"methods": ["mae", "mae_copy2"]}}, root=Path("."), source="m.toml")
