"""The one output decision every command takes: the name / JSON / table split between stdout and stderr.

With --json a command prints exactly one JSON document on stdout and nothing else there; without it, tables and
notes go to stderr (none under -q) and the bare result (a name, a path, one line per entry) to stdout, so commands
pipe into each other (`loradar merge ... | loradar trim - ...`).
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
    """--json: `data` as one JSON document on stdout, nothing else. Otherwise `human()` writes the tables and notes
    on stderr (skipped under -q), then `result` goes to stdout, one line per string."""
    if json_out:
        emit_json(data)
        return
    if human is not None and not quiet:
        human()
    for line in [result] if isinstance(result, str) else result or ():
        print(line)
