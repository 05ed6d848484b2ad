"""The project file through the real CLI: init, config, overrides, and every bad-input message word for word."""

import json
import tomllib
from pathlib import Path

import pytest

from maecli.cli import app, gpu_here
from maecli.config import CONFIG_NAME, MaecliConfig, template


def write(folder: Path, text: str) -> Path:
    path = folder / CONFIG_NAME
    path.write_text(text)
    return path


def test_init_then_config_in_empty_folder(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["init"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / CONFIG_NAME).is_file()
    lines = result.stderr.splitlines()
    if gpu_here() is not False:  # a GPU, or no torch to ask (the extraction-only installs)
        assert len(lines) == 1
    else:  # its closing line says the defaults are a GPU's, and what fits a CPU
        assert lines[-1] == ("No GPU here: the defaults (ViT-B/16 at 224, 100 epochs) are sized for one and take days on a CPU; the quickstart's "
                             'CPU size is [model] preset = "vit_tiny", depth = 6, img_size = [48, 96], patch_size = 8 with [pretrain] steps = 1000 '
                             "(a few CPU-minutes)")
    result = runner.invoke(app, ["config", "--json"])
    assert result.exit_code == 0, result.output
    cfg = json.loads(result.stdout)
    assert cfg["model"]["preset"] == "vit_base"
    assert cfg["model"]["embed_dim"] == 768 and cfg["model"]["depth"] == 12 and cfg["model"]["num_heads"] == 12
    assert cfg["project"]["output_dir"] == str(tmp_path / "runs")  # relative paths resolve against the file's folder


def test_init_writes_every_option_commented_at_default(tmp_path):
    text = template()
    data = tomllib.loads(text)
    assert MaecliConfig.model_validate(data) == MaecliConfig()
    for name, section in MaecliConfig.model_fields.items():
        for key in section.annotation.model_fields:
            assert f"{key} = " in text, f"{name}.{key} is missing from the template"


def test_init_refuses_to_overwrite_unless_forced(runner, tmp_path):
    write(tmp_path, "# mine\n")
    result = runner.invoke(app, ["init", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr == f"{tmp_path / CONFIG_NAME}: already exists (use --force to overwrite)\n"
    assert (tmp_path / CONFIG_NAME).read_text() == "# mine\n"
    result = runner.invoke(app, ["init", str(tmp_path), "--force", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"config": str(tmp_path / CONFIG_NAME), "gpu": gpu_here()}
    assert (tmp_path / CONFIG_NAME).read_text() == template()


def test_init_creates_missing_folder(runner, tmp_path):
    result = runner.invoke(app, ["init", str(tmp_path / "new" / "project")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "new" / "project" / CONFIG_NAME).is_file()


def test_config_prints_resolved_toml_with_overrides(runner, tmp_path):
    path = write(tmp_path, '[project]\noutput_dir = "out/runs"\n[model]\npreset = "vit_small"\nimg_size = [128, 256]\n')
    result = runner.invoke(app, ["config", "-c", str(path), "--set", "model.depth=4", "--set", "project.name=dashcam"])
    assert result.exit_code == 0, result.output
    cfg = tomllib.loads(result.stdout)
    assert cfg["project"] == {"name": "dashcam", "output_dir": str(tmp_path / "out" / "runs"), "seed": 0, "device": "auto", "stop_timeout": 30.0}
    assert cfg["model"]["img_size"] == [128, 256]  # wide frames stay wide
    assert (cfg["model"]["embed_dim"], cfg["model"]["depth"], cfg["model"]["num_heads"]) == (384, 4, 6)
    # The printed config is itself a valid project file that resolves to the same values.
    again = runner.invoke(app, ["config", "-c", str(write(tmp_path, result.stdout)), "--json"])
    assert json.loads(again.stdout)["model"] == cfg["model"]


def test_config_accepts_the_folder(runner, tmp_path):
    write(tmp_path, "[project]\nseed = 7\n")
    result = runner.invoke(app, ["config", "-c", str(tmp_path), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["project"]["seed"] == 7


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[model]\nmask_ratio = 1.5\n", ["model.mask_ratio: must be less than 1 (got 1.5)"]),
        ("[model]\nmask_ratio = 0\n", ["model.mask_ratio: must be greater than 0 (got 0)"]),
        ("[model]\nmask_ratoi = 0.5\n", ["model.mask_ratoi: unknown key; did you mean 'mask_ratio'?"]),
        ("[modle]\ndepth = 2\n", ["modle: unknown key; did you mean 'model'?"]),
        ("[model]\nzzz = 1\n", ["model.zzz: unknown key"]),
        ('[pretrain]\ndevice = "cpu"\n', ["pretrain.device: moved to project.device"]),
        ("[visualize]\nfps = 5\n", ["visualize.fps: moved to extract.fps (every command samples a video as extract does)"]),
        ('[project]\ndevice = "gpu"\n', ["project.device: must be one of 'auto', 'cpu' or 'cuda' (got \"gpu\")"]),
        ('[model]\npatch_size = "big"\n', ['model.patch_size: must be an integer (got "big")']),
        ("[model]\nnorm_pix_loss = 3\n", ["model.norm_pix_loss: must be true or false (got 3)"]),
        ("[project]\nseed = -1\n", ["project.seed: must be at least 0 (got -1)"]),
        ('[project]\nname = ""\n', ['project.name: must not be empty (got "")']),
        ("model = 3\n", ["model: must be a table (got 3)"]),
        (
            '[model]\npreset = "vit_giant"\n',
            ["model.preset: must be one of 'vit_tiny', 'vit_small', 'vit_base', 'vit_large' or 'vit_huge' (got \"vit_giant\")"],
        ),
        ("[model]\nimg_size = [128, 256, 3]\n", ["model.img_size: must have 2 items (got [128, 256, 3])"]),
        ("[model]\nimg_size = [0, 32]\n", ["model.img_size: must be positive (got [0, 32])"]),
        (
            "[model]\nimg_size = [100, 128]\nembed_dim = 30\nnum_heads = 7\n",
            [
                "model.img_size: must be divisible by patch_size 16 (got [100, 128])",
                "model.num_heads: must divide embed_dim 30 (got 7)",
                "model.embed_dim: must be divisible by 4 for 2-D sin-cos position embeddings (got 30)",
            ],
        ),
        ("[model]\nimg_size = 32\npatch_size = 16\nmask_ratio = 0.8\n", ["model.mask_ratio: leaves no visible patch out of 4 (got 0.8)"]),
        (
            "[model]\nmask_ratio = 2\ndepth = 0\n[project]\nseed = 1.5\n",  # every problem at once
            ["project.seed: must be an integer (got 1.5)", "model.depth: must be greater than 0 (got 0)", "model.mask_ratio: must be less than 1 (got 2)"],
        ),
    ],
)
def test_bad_values_are_reported_one_line_each(runner, tmp_path, text, expected):
    path = write(tmp_path, text)
    result = runner.invoke(app, ["config", "-c", str(path)])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"{path}: {line}" for line in expected]
    assert "Traceback" not in result.output


def test_bad_toml_names_line_and_column(runner, tmp_path):
    path = write(tmp_path, "[model]\nmask_ratio = 0.5\ndepth == 2\n")
    result = runner.invoke(app, ["config", "-c", str(path)])
    assert result.exit_code == 2
    assert result.stderr == f"{path}: invalid TOML: Invalid value (at line 3, column 8)\n"


def test_missing_file(runner, tmp_path):
    result = runner.invoke(app, ["config", "-c", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2
    assert result.stderr == f"{tmp_path / 'nope.toml'}: file not found (create one with 'maecli init')\n"


def test_default_path_is_maecli_toml_in_cwd(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["config"])
    assert result.exit_code == 2
    assert result.stderr == "maecli.toml: file not found (create one with 'maecli init')\n"


@pytest.mark.parametrize(
    "sets, expected",
    [
        (["model.mask_ratio=1.5"], "--set: model.mask_ratio: must be less than 1 (got 1.5)"),
        (["model.depht=2"], "--set: model.depht: unknown key; did you mean 'depth'?"),
        (["mask_ratio"], "--set: expected section.key=value (got 'mask_ratio')"),
        (["mask_ratio=0.5"], "--set: expected section.key=value (got 'mask_ratio=0.5')"),
        (["model.depth.x=1"], "--set model.depth.x: model.depth is not a table"),
    ],
)
def test_bad_overrides_name_the_set_option(runner, tmp_path, sets, expected):
    path = write(tmp_path, "[model]\ndepth = 2\n")
    args = ["config", "-c", str(path)]
    for item in sets:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.stderr == expected + "\n"


def test_override_values_are_read_as_toml(runner, tmp_path):
    path = write(tmp_path, "")
    args = ["config", "-c", str(path), "--json", "--set", "model.img_size=[64, 128]", "--set", "model.norm_pix_loss=true", "--set", "project.name=my run"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    cfg = json.loads(result.stdout)
    assert cfg["model"]["img_size"] == [64, 128] and cfg["model"]["norm_pix_loss"] is True and cfg["project"]["name"] == "my run"


def test_help_and_version_do_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from maecli.cli import app; assert 'torch' not in sys.modules, 'cli imports torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-m", "maecli", "--version"], check=True, capture_output=True, text=True)
    assert out.stdout.startswith("maecli ")
