"""TensorBoard, for a run to watch: scalars and pictures beside `metrics.jsonl` (which stays the record), in
`<run folder>/tensorboard`, when the `tensorboard` package is installed (`pip install ".[tensorboard]"`); without
it, nothing is written and nothing is said. `tensorboard --logdir runs` then shows every run of a project.

A resumed run purges the events past the step it resumes from, as `metrics.jsonl` drops its lines: a killed run's
extra points do not stay on the curves.
"""

from pathlib import Path

import numpy as np
from PIL import Image


class Board:
    def __init__(self, folder: Path, start: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the optional extra is not installed
            self.writer = None
            return
        self.writer = SummaryWriter(str(folder / "tensorboard"), purge_step=start + 1 if start > 0 else None)  # steps up to `start` stay

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        """One point per value ("train/loss", "perf/images_per_s", ...); None values are left out."""
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def picture(self, tag: str, png: Path, step: int) -> None:
        """A picture the run wrote (a reconstruction snapshot), as TensorBoard's image at `step`."""
        if self.writer is None:
            return
        self.writer.add_image(tag, np.asarray(Image.open(png).convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
