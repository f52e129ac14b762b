"""cli._output: tables on stderr (none under -q) in every mode; --json prints one JSON document on stdout and
nothing else there, otherwise the bare result goes to stdout."""

import json
import sys

import pytest

from loradar_cli.cli._output import show_result


def _human() -> None:
    print("a table", file=sys.stderr)


@pytest.mark.parametrize("quiet", [False, True])
def test_json_mode_prints_one_document_and_the_table_on_stderr(capsys, quiet):
    show_result(True, {"name": "m", "weights": [0.5, 0.5]}, quiet=quiet, human=_human, result="m")
    out, err = capsys.readouterr()
    assert json.loads(out) == {"name": "m", "weights": [0.5, 0.5]}, "no bare name beside the document"
    assert err == ("" if quiet else "a table\n")


def test_human_mode_writes_tables_to_stderr_and_the_result_to_stdout(capsys):
    show_result(False, {"ignored": True}, human=_human, result="m")
    assert capsys.readouterr() == ("m\n", "a table\n")
    show_result(False, {}, human=_human, result=["a", "b"])
    assert capsys.readouterr() == ("a\nb\n", "a table\n")


def test_quiet_drops_the_tables_but_keeps_the_result(capsys):
    show_result(False, {}, quiet=True, human=_human, result="m")
    assert capsys.readouterr() == ("m\n", "")
    show_result(False, {}, quiet=True, human=_human)
    assert capsys.readouterr() == ("", "")
