"""Where a command runs: --device, --precision, --channels-last, --workers, --augment and --nproc, declared once.

Torch-free at import (so `loradar --help` stays fast): the choice lists are static tuples that a test keeps equal
to the registries (`loradar_cli.device.PRECISIONS`, `loradar_cli.loader.AUGMENTS`).
"""

import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from loradar_cli.cli._common import RANK_ERRORS_ENV, console, rank_error_file

PRECISION_NAMES = ("bf16", "fp16", "fp32")
AUGMENT_NAMES = ("crop-flip", "none")
NPROC_ENV = "LORADAR_LAUNCHED"  # set in the processes `--nproc` starts, so they do not start torchrun again
STDIN_ENV = "LORADAR_STDIN"  # in the processes `--nproc` starts: a file holding the launcher's standard input

DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device",
        help="auto | cpu | cuda | cuda:N | mps [env LORADAR_DEVICE; default auto: cuda, then mps, then cpu]. "
        "A device that is not there is an error, never a silent fallback.",
        show_default=False,
    ),
]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        help=f"{' | '.join(PRECISION_NAMES)}: autocast dtype of training (fp16 adds gradient scaling).",
    ),
]
EvalPrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        help=f"{' | '.join(PRECISION_NAMES)}: autocast dtype of predictions and attacks, recorded in the report. "
        "Keep fp32 for robustness numbers: low-precision gradients weaken attacks and overstate robustness.",
    ),
]
ChannelsLastOpt = Annotated[
    bool, typer.Option("--channels-last", help="NHWC memory format (faster convolutions on recent GPUs).")
]
WorkersOpt = Annotated[
    int, typer.Option("--workers", min=0, help="DataLoader worker processes decoding batches (0: in this process).")
]
AugmentOpt = Annotated[
    str | None,
    typer.Option(
        "--augment",
        help=f"Training augmentation: {' | '.join(AUGMENT_NAMES)} (crop-flip: 4-pixel padded random crop and "
        "horizontal flip) [default: crop-flip for 3-channel data, none for 1-channel].",
        show_default=False,
    ),
]
NprocOpt = Annotated[
    int,
    typer.Option(
        "--nproc",
        min=1,
        help="Run as N processes on this machine (starts torchrun --standalone; one GPU per process on CUDA).",
    ),
]


def engine_from(device: str | None, precision: str = "fp32", channels_last: bool = False, workers: int = 0) -> Any:
    """The job's Engine (joins torchrun's process group when started by torchrun)."""
    from loradar_cli.device import engine_for

    return engine_for(device, precision, channels_last=channels_last, workers=workers)


_STDIN: dict[int, tuple[object, str]] = {}  # the text read from each stdin object: `--nproc` reads it again


def stdin_text() -> str:
    """Standard input, read once (a second call gives the same text); under `--nproc`, the launcher's, from a file.

    The processes torchrun starts share one stdin, which only one of them could read: the launcher reads it and
    passes a copy to all.
    """
    saved = os.environ.get(STDIN_ENV)
    if saved:
        return Path(saved).read_text()
    source = sys.stdin
    if id(source) not in _STDIN or _STDIN[id(source)][0] is not source:
        _STDIN.clear()  # one stdin at a time (test runners swap sys.stdin per invocation)
        _STDIN[id(source)] = (source, source.read())
    return _STDIN[id(source)][1]


def launch_nproc(nproc: int) -> None:
    """With --nproc N > 1 outside torchrun, run this same command under torchrun and exit with its status.

    An argument '-' (names read from stdin) gets the launcher's stdin, saved to a temporary file for every process.
    A failure ends in one stderr line, as in one process: rank 0 prints its own error, the other ranks leave theirs
    in a file, which the launcher prints when rank 0 did not fail first; torchrun's failure report is not shown.
    """
    if nproc <= 1 or "WORLD_SIZE" in os.environ or os.environ.get(NPROC_ENV):
        return
    args = _without_nproc(sys.argv[1:])
    torchrun = ["--standalone", f"--nproc-per-node={nproc}", "-m", "loradar_cli", *args]
    with tempfile.TemporaryDirectory(prefix="loradar-nproc-") as folder:
        env = {NPROC_ENV: "1", RANK_ERRORS_ENV: folder}
        if any(arg == "-" or arg.endswith("=-") for arg in args):
            saved = Path(folder) / "stdin"
            saved.write_text(stdin_text())
            env[STDIN_ENV] = str(saved)
        status = _run_torchrun(torchrun, env, Path(folder))
    raise typer.Exit(status)


def _run_torchrun(argv: list[str], env: dict[str, str], errors: Path) -> int:
    """torchrun ARGV in this process with `env` added to the workers' environment; the first failure's exit code."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)  # the ranks report for themselves
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        run(get_args_parser().parse_args(argv))
    except ChildFailedError as err:
        return _failure_status(err.failures, errors)
    except SignalException as err:  # Ctrl-C or a kill reached the launcher; torchrun stopped the ranks
        return 128 + int(err.sigval)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return 0


def _failure_status(failures: Mapping[int, Any], errors: Path) -> int:
    """The exit code of a failed run, printing the error of a rank other than 0 when rank 0 did not print one."""
    main = failures.get(0)
    if main is not None and main.exitcode > 0:
        return int(main.exitcode)  # rank 0 printed its own error line
    rank = min(failures, key=lambda r: (failures[r].timestamp, r))
    failure = failures[rank]
    left = rank_error_file(errors, rank)
    if left.is_file():
        console.print(left.read_text().strip(), highlight=False, soft_wrap=True, markup=False)
    elif failure.exitcode < 0:
        console.print(f"error: process {rank} was stopped by {failure.signal_name()}", highlight=False, markup=False)
    return int(failure.exitcode) if failure.exitcode > 0 else 1


def _without_nproc(args: list[str]) -> list[str]:
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
