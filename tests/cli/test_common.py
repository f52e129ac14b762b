"""Option parsing shared by the commands: numbers, fractions and key=value options."""

import math

import pytest

from loradar_cli.cli._common import PlainProgress, _names_from_text, attack_options, parse_fraction, parse_key_values
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


@pytest.mark.parametrize("text", ["1e400", "-1e400", "Infinity", "NaN", "inf", "nan"])
def test_non_finite_option_values_are_refused(text):
    with pytest.raises(InvalidValueError, match="not a finite number"):
        parse_key_values([f"eps={text}"], "--attack-opt")


def test_plain_progress_writes_a_line_per_interval_and_at_the_end():
    lines, now = [], [0.0]
    progress = PlainProgress(lambda text, **_: lines.append(text), interval=5.0, clock=lambda: now[0])
    for done, t in [(1, 0.0), (2, 1.0), (3, 4.9), (4, 6.0), (5, 7.0), (10, 8.0)]:
        now[0] = t
        progress("eval", done, 10)
    # a line when the stage starts (t=0, no rate yet), the next one due 5 s later (t=6), then only the last one
    assert lines == ["eval: 1/10 (10 %), 0 s", "eval: 4/10 (40 %), 0.7/s, 6 s", "eval: 10/10 (100 %), 1.2/s, 8 s"]
    now[0] = 300.0  # the same stage name again (the next adapter of a pool): its rate starts over
    progress("eval", 2, 10)
    now[0] = 302.0
    progress("eval", 10, 10)
    assert lines[-2:] == ["eval: 2/10 (20 %), 0 s", "eval: 10/10 (100 %), 5.0/s, 2 s"]


def test_piped_tables_keep_long_names_whole(capsys):
    from rich.table import Table

    from loradar_cli.cli._common import console

    name = "an-adapter-name-of-sixty-four-characters-" + "x" * 23
    table = Table(title="store")
    table.add_column("name")
    table.add_column("val clean")
    table.add_row(name, "98.5")
    console.print(table)
    err = capsys.readouterr().err
    assert not console.is_terminal
    assert any(name in line and "98.5" in line for line in err.splitlines())
    assert max(len(line) for line in err.splitlines()) < 120  # as wide as the content, not padded to 1000


def test_attack_options_route_per_attack_keys_with_dashes_and_refuse_strays():
    routed = attack_options(["pgd", "pgd-l2", "fgsm"], "0.1", None, 5, ["pgd-l2.eps=0.5", "random-start=false"])
    assert routed == {
        "pgd": {"eps": 0.1, "steps": 5, "random_start": False},
        "pgd-l2": {"eps": 0.5, "steps": 5, "random_start": False},
        "fgsm": {"eps": 0.1},
    }
    with pytest.raises(InvalidValueError, match="applies to none of fgsm"):
        attack_options(["fgsm"], None, None, 5, None)
    with pytest.raises(InvalidValueError, match=r"unknown option.*bogus.*valid: .*alpha"):
        attack_options(["pgd"], None, None, None, ["pgd.bogus=1"])
    with pytest.raises(InvalidValueError, match="given twice"):
        attack_options(["pgd"], "0.1", None, None, ["eps=0.2"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"eps": True}, "must be a number"),
        ({"steps": True}, "must be a number"),
        ({"eps": float("inf")}, "must be finite"),
        ({"alpha": float("nan")}, "alpha"),
        ({"steps": "abc"}, "steps"),
        ({"bogus": 1}, "valid: eps"),
    ],
)
def test_build_attack_refuses_booleans_non_finite_and_unknown_keys(options, message):
    from loradar_cli.attacks import build_attack

    with pytest.raises(InvalidValueError, match=message):
        build_attack("pgd", **options)
    assert build_attack("pgd", random_start=False, steps=3).config.steps == 3


@pytest.mark.parametrize(
    ("text", "names"),
    [("a\n b \n\n", ["a", "b"]), ('{"name": "a"}', ["a"]), ('[{"name": "a"}, "b"]', ["a", "b"])],
)
def test_names_from_stdin(text, names):
    assert _names_from_text(text) == names


@pytest.mark.parametrize("text", ["{bad", '{"nome": 1}', "[1]", '[{"name": ""}]'])
def test_bad_json_names_are_one_line_errors(text):
    with pytest.raises(InvalidValueError):
        _names_from_text(text)


@pytest.mark.parametrize(
    ("error", "kind", "words"),
    [
        (MemoryError(), "LoradarError", "out of memory"),
        (
            RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4e10 bytes"),
            "LoradarError",
            "out of memory",
        ),
        (RuntimeError("Storage size calculation overflowed with sizes=[4, 1, 9, 9]"), "LoradarError", "out of memory"),
        (ValueError("plain bug"), None, None),
        (FileNotFoundError(2, "No such file or directory", "/x/y"), "NotFoundError", "/x/y: No such file"),
        (PermissionError(13, "Permission denied", "/r/out.json"), "LoradarError", "/r/out.json: Permission denied"),
        (OSError(28, "No space left on device", "/d/f"), "LoradarError", "/d/f: No space left"),
        (OSError(5, "Input/output error"), None, None),  # no path: nothing the user gave
    ],
)
def test_known_failures_become_loradar_errors(error, kind, words):
    from loradar_cli.cli._common import known_error

    known = known_error(error)
    assert (type(known).__name__ if known else None) == kind
    assert known is None or words in known.one_line()


def test_svd_of_nan_is_a_decomposition_error():
    import torch

    from loradar_cli.cli._common import known_error
    from loradar_cli.errors import IncompatibleError

    with pytest.raises(Exception) as err:
        torch.linalg.svd(torch.full((4, 3), float("nan"), dtype=torch.float64))
    known = known_error(err.value)
    assert isinstance(known, IncompatibleError) and "NaN" in known.one_line()


def test_output_files_that_cannot_be_written_are_refused_before_any_work(tmp_path, store):
    """--out into a file, onto a folder: exit 2 with one line naming the option, and the command never ran."""
    from tests.cli._invoke import call
    from tests.conftest import make_base

    make_base(store)
    (tmp_path / "a-file").write_text("")
    common = ["attack", "--base", "tiny", "--attack", "fgsm", "--eps", "0.1", "--data", "digits", "--limit", "4"]
    common += ["--store", str(store.root)]
    for out, reason in ((tmp_path / "a-file" / "x.safetensors", "is not a folder"), (tmp_path, "is a folder")):
        code, stdout, stderr = call([*common, "--out", str(out)])
        assert (
            code == 2
            and stdout == ""
            and stderr.strip().splitlines()
            == [f"error: --out {out}: cannot write there ({out.parent if 'not' in reason else out} {reason})"]
        )
    code, _, _ = call([*common, "--out", str(tmp_path / "new" / "deeper" / "x.safetensors")])
    assert code == 0 and (tmp_path / "new" / "deeper" / "x.safetensors").is_file()  # missing folders are made


def test_cannot_write_names_the_reason(tmp_path, monkeypatch):
    import os

    from loradar_cli.files import cannot_write

    assert cannot_write(tmp_path / "missing" / "out.json") is None
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # (tests may run as root, who may write anywhere)
    assert cannot_write(tmp_path / "missing" / "out.json") == f"no permission to write in {tmp_path}"
