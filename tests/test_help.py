"""Every command's --help reads as written: section names such as [probe] survive, flags show no value."""

import re

import click
import typer

from maecli.cli import app


def commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    found = [(path, group)]
    for name, cmd in group.commands.items():
        found += commands(cmd, (*path, name)) if isinstance(cmd, click.Group) else [((*path, name), cmd)]
    return found


def test_every_help_keeps_its_sections_and_shows_flags_as_flags(runner):
    cli = typer.main.get_command(app)
    listed = commands(cli)
    assert len(listed) > 12  # the app, its commands, the store and export groups and theirs
    for path, cmd in listed:
        result = runner.invoke(app, [*path, "--help"], terminal_width=100)
        assert result.exit_code == 0, (path, result.output)
        text = " ".join(result.stdout.split())
        sections = re.findall(r"\[[a-z_]+\]", cmd.help or "")
        for section in sections:
            assert section in text, f"maecli {' '.join(path)} --help lost {section}"
        for param in cmd.params:
            for opt in [o for o in param.opts if o.startswith("--")] if isinstance(param, click.Option) else []:
                found = re.search(rf"{re.escape(opt)}\s+(\S+)", text)
                assert found, f"maecli {' '.join(path)} --help does not show {opt}"
                shown = found[1]  # what follows the flag: a value's name, or its help
                assert not (param.is_flag and shown.startswith("<")), f"maecli {' '.join(path)} --help shows {opt} as taking a value"
                assert not shown.startswith("<list["), f"maecli {' '.join(path)} --help shows {opt}'s value as a Python type"
    probe = runner.invoke(app, ["probe", "--help"], terminal_width=100).stdout
    assert "labeled set ([probe] train / val)" in " ".join(probe.split())  # the case that Rich markup used to eat
