"""`loradar --help` and `loradar <command> --help` equal the snapshots in tests/cli/help/, and every command has one.

A change to an option or a help string shows up here as a diff to review. After an intended change, regenerate
every snapshot with one command (it also deletes the snapshots of removed commands):

    LORADAR_UPDATE_SNAPSHOTS=1 python -m pytest tests/cli/test_help_snapshots.py

Lists of registry names (`names.choices(names.ATTACKS)`, `' | '.join(names.SUITES)`, ...) are stored as
placeholders such as `{ATTACKS}`, and texts are compared with whitespace collapsed (wrapping follows the lists'
lengths): registering an attack, recipe, merge method or dataset needs no new snapshot, and `tests/test_names.py`
already checks those names.
"""

import os
import re
from pathlib import Path

import pytest
import typer

from loradar_cli import names
from loradar_cli.cli.app import app

HELP_DIR = Path(__file__).parent / "help"
ROOT = "loradar"
UPDATE = os.environ.get("LORADAR_UPDATE_SNAPSHOTS") == "1"


def _commands() -> list[str]:
    """Every command of the app as the user types it, from Click's command tree (not from a list kept here)."""
    return sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def _help(args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> str:
    """What `loradar ARGS --help` prints, at a fixed width and without colour or terminal features."""
    for key, value in {"COLUMNS": "100", "LINES": "40", "NO_COLOR": "1", "TERM": "dumb"}.items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    typer.main.get_command(app).main([*args, "--help"], prog_name=ROOT, standalone_mode=False)
    out, err = capsys.readouterr()
    assert err == ""
    return out


def _listing_pattern(items: tuple[str, ...], joiner: str) -> str:
    """Regex of a printed list of names, tolerant of the line breaks Click's wrapping puts after spaces and hyphens."""
    words = [r"-\s*".join(re.escape(part) for part in item.split("-")) for item in items]
    if joiner == "choices":
        return words[0] if len(words) == 1 else r",\s+".join(words[:-1]) + r"\s+or\s+" + words[-1]
    return r"\s+\|\s+".join(words)


def _with_placeholders(text: str) -> str:
    """Every printed list of a registry's names replaced by `{REGISTRY}` (longest lists first)."""
    registries = {key: value for key, value in vars(names).items() if key.isupper() and isinstance(value, tuple)}
    for key, items in sorted(registries.items(), key=lambda kv: -len(names.choices(kv[1]))):
        for joiner in ("choices", "bar"):
            text = re.sub(_listing_pattern(items, joiner), "{" + key + "}", text)
    return text


def _normalised(text: str) -> str:
    """Whitespace collapsed, and words that wrapping split after a hyphen joined again."""
    return " ".join(re.sub(r"(?<=\w)-\s+(?=\w)", "-", text).split())


def _snapshot(name: str) -> Path:
    return HELP_DIR / f"{name}.txt"


@pytest.mark.parametrize("command", [ROOT, *_commands()])
def test_help_matches_its_snapshot(command, capsys, monkeypatch):
    text = _with_placeholders(_help([] if command == ROOT else [command], capsys, monkeypatch))
    path = _snapshot(command)
    if UPDATE:
        HELP_DIR.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"no help snapshot for {command!r}: run LORADAR_UPDATE_SNAPSHOTS=1 pytest {__file__}"
    assert _normalised(text) == _normalised(path.read_text()), (
        f"`loradar {command} --help` changed; if intended, regenerate the snapshots"
    )


def test_registry_lists_become_placeholders_even_when_wrapped():
    """The placeholder rule itself, on a list wrapped across lines and split after a hyphen."""
    wrapped = "Attack: " + names.choices(names.ATTACKS).replace(", ", ",\n      ", 2).replace(
        "apgd-t-l2", "apgd-t-\n l2"
    )
    assert _with_placeholders(wrapped) == "Attack: {ATTACKS}"
    assert _with_placeholders(" | ".join(names.SUITES)) == "{SUITES}"
    assert _normalised("crop-\n   flip  and\n  more") == "crop-flip and more"


def test_every_snapshot_belongs_to_a_command():
    """A snapshot of a removed or renamed command fails too (regeneration deletes it)."""
    expected = {f"{name}.txt" for name in [ROOT, *_commands()]}
    stale = sorted(p.name for p in HELP_DIR.glob("*.txt") if p.name not in expected)
    if UPDATE:
        for name in stale:
            (HELP_DIR / name).unlink()
        stale = []
    assert not stale, f"snapshots without a command: {stale}"
    assert expected <= {p.name for p in HELP_DIR.glob("*.txt")}
