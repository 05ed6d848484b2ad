"""What every section of the project file is built from: the `Section` base (unknown keys refused, values frozen,
defaults validated) and the validators sections share. Torch-free: `maecli.config` and the methods' own sections
(`maecli.methods.sections`) import it."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def positive_range(value: tuple[float, float]) -> tuple[float, float]:
    if not 0 < value[0] <= value[1]:
        raise ValueError(f"must be [low, high] with 0 < low <= high (got {list(value)})")
    return value


def area_range(value: tuple[float, float]) -> tuple[float, float]:
    if not 0 < value[0] <= value[1] <= 1:
        raise ValueError(f"must be [low, high] with 0 < low <= high <= 1 (got {list(value)})")
    return value
