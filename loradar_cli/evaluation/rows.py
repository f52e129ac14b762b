"""The report row of one evaluated model or ensemble decision (filled by `evaluation.report.evaluate_suite`)."""

from pydantic import BaseModel

from loradar_cli.evaluation.checks import SanityFlag
from loradar_cli.evaluation.suite import AttackRecord


class EvalRow(BaseModel):
    """One model's accuracies: clean, per white-box attack, per saved set, and the per-point worst case.

    Suite rows (early stopping) give in `attacks` the robust accuracy after each attack and all earlier ones,
    and record every attack's config, target and counts in `records`, and the sanity flags raised in `flags`.
    """

    model: str
    attacked: str = "white-box"
    n: int
    clean: float
    attacks: dict[str, float] = {}
    adv_sets: dict[str, float] = {}
    worst_case: float
    suite: str | None = None
    norm: str | None = None
    eps: float | None = None
    seed: int | None = None
    early_stop: bool | None = None
    records: list[AttackRecord] = []
    checks: list[str] = []
    flags: list[SanityFlag] = []
    sweep: list[tuple[float, float]] = []  # (eps, worst case) with --eps-sweep
