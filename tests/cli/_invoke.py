"""Run the CLI in-process exactly as the `loradar` script does (Click's usage errors on one line included)."""

from typer.testing import CliRunner

from loradar_cli.cli.app import run


def call(args: list[str], stdin: str = "") -> tuple[int, str, str]:
    """`loradar ARGS` in-process: exit code, stdout, stderr."""
    with CliRunner().isolation(input=stdin) as streams:
        code = run(args)
        return code, streams[0].getvalue().decode(), streams[1].getvalue().decode()
