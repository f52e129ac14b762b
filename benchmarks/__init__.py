"""Speed goals of loradar as ratios against a baseline measured in the same run (`python -m benchmarks`).

Each `bench_<group>.py` module defines `rows(quick: bool) -> list[dict]`; every row has the keys of `ROW_KEYS`.
"""

ROW_KEYS = ("row", "baseline", "ratio", "goal", "met", "threads", "device", "detail")
