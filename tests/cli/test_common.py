"""Option parsing shared by the commands: numbers, fractions and key=value options."""

import math

import pytest

from loradar_cli.cli._common import parse_fraction, parse_key_values
from loradar_cli.errors import InvalidValueError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8/255", 8 / 255),
        ("0.5/255", 0.5 / 255),
        (" 0.03 ", 0.03),
        ("2e-2", 0.02),
        ("1e-1/2", 0.05),
        ("0", 0.0),
    ],
)
def test_fractions_parse_like_python_division(text, expected):
    assert math.isclose(parse_fraction(text), expected, rel_tol=1e-12)


@pytest.mark.parametrize("text", ["eight", "1/0", "inf", "nan", "1/2/3", "-0.1", "", "8/"])
def test_nonsense_numbers_are_refused(text):
    with pytest.raises(InvalidValueError):
        parse_fraction(text)


def test_key_values_coerce_numbers_and_keep_strings():
    parsed = parse_key_values(["alpha=0.5/255", "steps=7", "layer=layer2", "search=exhaustive"], "--attack-opt")
    assert parsed == {"alpha": pytest.approx(0.5 / 255), "steps": 7, "layer": "layer2", "search": "exhaustive"}


def test_progress_on_a_redirected_stderr_is_plain_lines_with_a_rate(monkeypatch):
    import io
    import re

    from rich.console import Console

    from loradar_cli.cli import _common

    buffer = io.StringIO()
    monkeypatch.setattr(_common, "console", Console(file=buffer, force_terminal=False, width=200))
    monkeypatch.setattr(_common, "PLAIN_PROGRESS_EVERY_S", 0.0)
    with _common.progress_bar(True) as progress:
        progress("epoch 1/2", 64, 128)
        progress("epoch 1/2", 128, 128)
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 2
    assert all(re.fullmatch(r"epoch 1/2: \d+/128 \([\d,]+ img/s\)", line) for line in lines), lines
    monkeypatch.setattr(_common, "PLAIN_PROGRESS_EVERY_S", 3600.0)
    with _common.progress_bar(True) as progress:
        progress("quiet stage", 1, 2)
    assert len(buffer.getvalue().splitlines()) == 2  # nothing new within the interval
