"""Engine throughput: train (PGD-7) and eval (PGD-10) images/s of a resnet18 at 32×32 on 1 and 2 processes,
a streamed image folder against pre-decoded tensors, `loradar --help` start-up, and quickstart end to end.
The eval rows run the one evaluation path (the suite streamed batch by batch, sharded over the processes) and
check that 2 processes report the rows of 1.

Every number comes from the CLI run as a user would run it (a subprocess, OMP_NUM_THREADS=1 per process);
images/s are the `run` records of the JSON reports. Data: the CIFAR-10 files under LORADAR_DATA (or
../shared/data) when present, else random 32×32 images in an npz file.
"""

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import cli_env, data_root

HELP_BUDGET_S = 0.5
QUICKSTART_BUDGET_S = 180.0


def _cli(*args: str, nproc: int = 1) -> dict[str, Any]:
    """Run `python -m loradar_cli ARGS --json` (under --nproc) and return its JSON document."""
    extra = ["--nproc", str(nproc)] if nproc > 1 else []
    done = subprocess.run(
        [sys.executable, "-m", "loradar_cli", *args, *extra, "--json"], capture_output=True, text=True, env=cli_env()
    )
    if done.returncode:
        raise RuntimeError(f"loradar {' '.join(args[:1])} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)


def _data_spec(tmp: Path) -> str:
    """cifar10 from the shared data folder, else a random npz of the same shape."""
    root = data_root()
    if (root / "cifar-10-batches-py").is_dir():
        return f"cifar10:{root}"
    rng = np.random.default_rng(0)
    path = tmp / "random.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (600, 32, 32, 3), dtype=np.uint8),
        y_train=rng.integers(0, 10, 600),
        x_test=rng.integers(0, 256, (600, 32, 32, 3), dtype=np.uint8),
        y_test=rng.integers(0, 10, 600),
    )
    return f"npz:{path}"


def _resnet18_base(store: Path) -> None:
    """A randomly initialised resnet18 base for 3×32×32 inputs (throughput does not depend on the weights)."""
    import timm
    import torch

    from loradar_cli.models import weights_fingerprint
    from loradar_cli.store.meta import BaseMeta
    from loradar_cli.store.store import Store

    torch.manual_seed(0)
    net = timm.create_model("resnet18", num_classes=10, in_chans=3)
    meta = BaseMeta(
        name="r18",
        timm_model="resnet18",
        num_classes=10,
        input_size=(3, 32, 32),
        mean=[0.5] * 3,
        std=[0.25] * 3,
        dataset="bench",
        fingerprint=weights_fingerprint(net.state_dict()),
    )
    Store(store).save_base(meta, net.state_dict(), overwrite=True)


def _labelled_by_base(spec: str, store: Path, tmp: Path, n: int) -> str:
    """`spec`'s first n train and test images as an npz data set, the test images labelled with the base's predictions.

    The evaluation attacks only points the model gets right: on its true labels the random base is right on about a
    tenth and the eval rows would time start-up alone. On its own predictions every test point is attacked, as on a
    trained model (PGD-10 at 8/255 leaves about 15 % of them, fooling the rest over the steps). The train labels cycle
    through the classes: training cost does not depend on them, and the class count stays the base's.
    """
    from loradar_cli.data import load_data
    from loradar_cli.loading import load_model
    from loradar_cli.metrics import predict_logits
    from loradar_cli.store.store import Store

    stored = Store(store)
    train, test = load_data(spec, "train", limit=n), load_data(spec, "test", limit=n)
    predicted = predict_logits(load_model(stored, "r18"), test.x).argmax(1)
    classes = stored.base_meta("r18").num_classes
    arrays = {"y_train": np.arange(len(train.y)) % classes, "y_test": predicted.numpy()}
    for split, data in (("train", train), ("test", test)):
        arrays[f"x_{split}"] = (data.x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    path = tmp / "labelled-by-base.npz"
    np.savez(path, **arrays)
    return f"npz:{path}"


def _png_folder(spec: str, root: Path, n: int) -> str:
    """The first n test images of `spec` written as PNG files in an image folder (one train image per class)."""
    from PIL import Image

    from loradar_cli.data import load_data

    test = load_data(spec, "test", limit=n)
    train = load_data(spec, "train", limit=200)
    for split, data in (("test", test), ("train", train)):
        seen: set[int] = set()
        for i, (x, y) in enumerate(zip(data.x, data.y.tolist(), strict=True)):
            if split == "train" and y in seen:
                continue
            seen.add(y)
            folder = root / split / f"c{y}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"{i:05d}.png")
    return f"imagefolder:{root}"


def _row(name: str, baseline: str, ratio: float, goal: str, met: bool, detail: Any, device: str = "cpu") -> dict:
    return {
        "row": name,
        "baseline": baseline,
        "ratio": ratio,
        "goal": goal,
        "met": met,
        "threads": 1,
        "device": device,
        "detail": detail,
    }


def _scaling_rows(store: Path, spec: str, quick: bool) -> list[dict]:
    train = ["train", "--base", "r18", "--attack", "pgd", "--eps", "8/255", "--alpha", "2/255", "--steps", "7"]
    train += ["--data", spec, "--limit", "64" if quick else "128", "--val-limit", "16", "--epochs", "1"]
    train += ["--batch-size", "32", "--augment", "none", "--store", str(store), "--overwrite", "--quiet"]
    evals = ["eval", "--base", "r18", "--attack", "pgd", "--eps", "8/255", "--alpha", "2/255", "--steps", "10"]
    evals += ["--data", spec, "--limit", "64" if quick else "128", "--batch-size", "32", "--store", str(store)]
    evals += ["--quiet"]
    rows = []
    for what, args, key in (("train PGD-7", train, "combination"), ("eval PGD-10", evals, None)):
        ips, reports = {}, {}
        for n in (1, 2):
            reports[n] = _cli(*args, *(["--name", f"b{n}"] if key else []), nproc=n)
            ips[n] = (reports[n][key]["run"] if key else reports[n]["run"])["images_per_s"]
        detail: dict[str, Any] = {"images_per_s": ips, "nproc": [1, 2]}
        if key is None:  # the streamed, sharded suite: 2 processes must report what 1 does
            detail["rows_equal"] = _eval_rows(reports[1]) == _eval_rows(reports[2])
        rows.append(
            _row(
                f"{what} resnet18 32×32: 2 processes vs 1 (images/s)",
                f"1 process: {ips[1]:.1f} img/s",
                ips[2] / ips[1],
                "> 1 (two cores used)" + ("; same rows" if key is None else ""),
                ips[2] > ips[1] and detail.get("rows_equal", True),
                detail,
            )
        )
    return rows


def _eval_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """An eval report's rows without the compute seconds of each attack (the one field that may differ)."""
    return [{**row, "records": [{**r, "seconds": None} for r in row["records"]]} for row in report["rows"]]


def _loader_row(store: Path, spec: str, tmp: Path, quick: bool) -> dict:
    """Clean eval, where decoding weighs most: an image folder of PNGs against the same images pre-decoded."""
    n = 256 if quick else 846
    folder = _png_folder(spec, tmp / "folder", n)
    common = ["--base", "r18", "--limit", str(n), "--batch-size", "128", "--store", str(store), "--quiet"]
    tensor_ips = _cli("eval", "--data", spec, *common)["run"]["images_per_s"]
    folder_ips = _cli("eval", "--data", folder, *common)["run"]["images_per_s"]
    return _row(
        "clean eval resnet18 32×32: streamed PNG folder vs pre-decoded tensors (images/s)",
        f"tensors: {tensor_ips:.0f} img/s",
        folder_ips / tensor_ips,
        ">= 0.5 (decoding costs at most the model's time)",
        folder_ips / tensor_ips >= 0.5,
        {"tensor_images_per_s": tensor_ips, "folder_images_per_s": folder_ips, "n": n},
    )


def _seconds(command: list[str], repeat: int = 3) -> tuple[float, float]:
    """Best wall seconds and best CPU seconds (user + system, unaffected by other jobs on the machine) of a run."""
    wall, cpu = float("inf"), float("inf")
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, env=cli_env(), check=True)
        wall = min(wall, time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = min(cpu, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return wall, cpu


def _help_row() -> dict:
    """Start-up of `loradar --help` in CPU seconds: on a shared machine wall time measures the neighbours."""
    help_wall, help_cpu = _seconds([sys.executable, "-m", "loradar_cli", "--help"])
    bare_wall, bare_cpu = _seconds([sys.executable, "-c", "pass"])
    return _row(
        "loradar --help start-up (CPU s) / 0.5 s",
        f"bare interpreter {bare_cpu:.3f} CPU s",
        help_cpu / HELP_BUDGET_S,
        "<= 1 (help within 0.5 s)",
        help_cpu <= HELP_BUDGET_S,
        {"help_cpu_s": help_cpu, "help_wall_s": help_wall, "bare_cpu_s": bare_cpu, "bare_wall_s": bare_wall},
    )


def _quickstart_row(tmp: Path) -> dict:
    start = time.perf_counter()
    _cli("quickstart", "--store", str(tmp / "qs"), "--quiet")
    seconds = time.perf_counter() - start
    return _row(
        "quickstart end to end (s) / 180 s",
        "3-minute budget",
        seconds / QUICKSTART_BUDGET_S,
        "<= 1",
        seconds <= QUICKSTART_BUDGET_S,
        {"seconds": seconds},
    )


def rows(quick: bool) -> list[dict]:
    """The engine's rows; --quick uses fewer images and skips quickstart."""
    with tempfile.TemporaryDirectory(prefix="loradar-bench-") as name:
        tmp = Path(name)
        store = tmp / "store"
        _resnet18_base(store)
        spec = _data_spec(tmp)
        labelled = _labelled_by_base(spec, store, tmp, 128)
        out = [_help_row(), *_scaling_rows(store, labelled, quick), _loader_row(store, spec, tmp, quick)]
        if not quick:
            out.append(_quickstart_row(tmp))
        return out
