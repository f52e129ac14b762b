"""The one output decision every command takes: the name / JSON / table split between stdout and stderr.

Tables and notes always go to stderr (none under -q), with or without --json, so a user who sends the JSON to a
file still sees them. With --json a command prints exactly one JSON document on stdout and nothing else there;
without it the bare result (a name, a path, one line per entry) goes to stdout, so commands pipe into each other
(`loradar merge ... | loradar trim - ...`).
"""

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any


def emit_json(data: Any) -> None:
    """The command's machine result: exactly one JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def show_result(
    json_out: bool,
    data: Any,
    *,
    quiet: bool = False,
    human: Callable[[], None] | None = None,
    result: str | Sequence[str] | None = None,
) -> None:
    """`human()` writes the tables and notes on stderr (skipped under -q); then --json puts `data` as one JSON
    document on stdout, nothing else, and without it `result` goes to stdout, one line per string."""
    if human is not None and not quiet:
        human()
    if json_out:
        emit_json(data)
        return
    for line in [result] if isinstance(result, str) else result or ():
        print(line)
