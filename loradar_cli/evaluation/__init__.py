"""Robustness evaluation: report rows, attack suites with early stopping, and sanity checks."""

from loradar_cli.evaluation.checks import SanityFlag
from loradar_cli.evaluation.report import evaluate_suite
from loradar_cli.evaluation.rows import EvalRow, attacked_correct, evaluate, evaluate_group
from loradar_cli.evaluation.suite import SUITES, AttackRecord, SuiteResult, run_suite, suite_attacks

__all__ = [
    "SUITES",
    "AttackRecord",
    "EvalRow",
    "SanityFlag",
    "SuiteResult",
    "attacked_correct",
    "evaluate",
    "evaluate_group",
    "evaluate_suite",
    "run_suite",
    "suite_attacks",
]
