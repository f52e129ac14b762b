"""Speed goals of loradar as ratios against a baseline measured in the same run (`python -m benchmarks`).

Each `bench_<group>.py` module defines `rows(quick: bool) -> list[dict]`; every row has the keys of `ROW_KEYS`.
"""

import os
from pathlib import Path

from torch import Tensor, nn

REPO = Path(__file__).resolve().parent.parent
ROW_KEYS = ("row", "baseline", "ratio", "goal", "met", "threads", "device", "detail")


def data_root() -> Path:
    """Where the real data sets are: LORADAR_DATA, else ../shared/data beside the checkout (it may not exist)."""
    return Path(os.environ.get("LORADAR_DATA") or REPO.parent / "shared" / "data")


def cli_env() -> dict[str, str]:
    """The environment of a CLI subprocess: this checkout's package, one thread, the CPU, outside any torchrun."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "LORADAR_DEVICE": "cpu"}
    env.pop("WORLD_SIZE", None)
    return env


class Counting(nn.Module):
    """Counts the images each forward pass sees (a backward pass follows at most as many): the work an attack does."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.seen = model, 0

    def forward(self, x: Tensor) -> Tensor:
        self.seen += len(x)
        return self.model(x)
