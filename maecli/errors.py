"""Errors a user can fix. Library code raises them; only `maecli/cli.py` turns them into exit codes."""


class MaecliError(Exception):
    """A problem with the user's input or environment: printed as one line each, without a traceback."""

    exit_code = 1

    def __init__(self, *lines: str) -> None:
        assert lines, "a MaecliError needs at least one line of text"
        super().__init__("\n".join(lines))
        self.lines = lines


class ConfigError(MaecliError):
    """The project file, a --set override or a command-line argument is wrong (exit code 2)."""

    exit_code = 2


class Interrupted(MaecliError):
    """Ctrl-C or SIGTERM: the job stopped cleanly and can be resumed by running the same command (exit code 128 + the
    signal's number, as a shell reports a process the signal ended: 130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, *lines: str, signum: int = 2) -> None:
        super().__init__(*lines)
        self.exit_code = 128 + signum


class CheckpointError(MaecliError):
    """A weights file cannot be read or does not fit the model (exit code 1)."""


class NonFiniteLoss(MaecliError):
    """Training diverged (a NaN or infinite loss): the job stops, naming the step and its last good checkpoint."""
