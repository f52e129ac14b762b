"""Robustness evaluation: report rows, attack suites with early stopping over a stream, and sanity checks."""

from loradar_cli.evaluation.checks import SanityFlag
from loradar_cli.evaluation.report import evaluate_suite
from loradar_cli.evaluation.rows import EvalRow
from loradar_cli.evaluation.suite import SUITES, AttackRecord, SuiteResult, run_suite, stream_suite, suite_attacks

__all__ = [
    "SUITES",
    "AttackRecord",
    "EvalRow",
    "SanityFlag",
    "SuiteResult",
    "evaluate_suite",
    "run_suite",
    "stream_suite",
    "suite_attacks",
]
