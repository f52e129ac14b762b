"""Speed goals of loradar as ratios against a baseline measured in the same run (`python -m benchmarks`).

Each `bench_<group>.py` module defines `rows(quick: bool) -> list[dict]`; every row has the keys of `ROW_KEYS`.
"""

from torch import Tensor, nn

ROW_KEYS = ("row", "baseline", "ratio", "goal", "met", "threads", "device", "detail")


class Counting(nn.Module):
    """Counts the images each forward pass sees (a backward pass follows at most as many): the work an attack does."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.seen = model, 0

    def forward(self, x: Tensor) -> Tensor:
        self.seen += len(x)
        return self.model(x)
