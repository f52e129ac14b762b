"""A table of malformed invocations, run in-process: each must fail with one stderr line and change nothing.

The table is generated from the commands' own option declarations (every number option gets non-numbers,
non-finite values and values below its bound), from the registries (unknown names next to every valid one),
from each attack's config fields, and from corrupt files built here (npz, idx, image folders, CIFAR
pickles, adversarial sets, checkpoints, a NaN adapter and an entry whose metadata is not JSON).
"""

import gzip
import io
import json
import math
import os
import pickle
import struct
import typing
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from safetensors.torch import save_file

from loradar_cli.advset import FORMAT
from loradar_cli.cli.app import app, run
from loradar_cli.errors import EXIT_CODES
from tests.cli._invoke import call
from tests.conftest import make_adapter, make_base

# the smallest valid arguments of each command, so that the malformed option is what fails
BASE_ARGS: dict[str, list[str]] = {
    "quickstart": ["--epochs", "1", "--eval-limit", "8"],
    "finetune": ["--name", "newbase", "--epochs", "0", "--limit", "16"],
    "train": [
        "--base",
        "tiny",
        "--attack",
        "fgsm",
        "--name",
        "new",
        "--epochs",
        "1",
        "--limit",
        "8",
        "--val-limit",
        "8",
    ],
    "attack": ["--base", "tiny", "--attack", "fgsm", "--out", "OUT/set.safetensors", "--limit", "8"],
    "eval": ["--base", "tiny", "--limit", "8"],
    "list": [],
    "show": [],
    "merge": ["ad", "ad2", "--name", "merged"],
    "trim": ["ad", "--name", "trimmed", "--rank", "1"],
    "ensemble-vote": ["ad", "ad2", "--data", "digits", "--limit", "8", "--out", "OUT/votes.json"],
    "identify-attack": ["ad", "ad2", "--data", "digits", "--limit", "8", "--out", "OUT/ids.json"],
    "fit-identifier": ["ad", "ad2", "--name", "idn", "--data", "digits", "--limit", "8", "--epochs", "1"],
    "import-base": ["OUT/none.safetensors", "--model", "test_resnet", "--name", "ib", "--num-classes", "10"],
}
NO_STORE = {"quickstart"}  # given --store per case (quickstart would fill the shared store)
ISSUE_EXAMPLES: set[str] = set()  # the issue's listed examples this table covers, by short name


def _commands() -> dict[str, typing.Callable[..., typing.Any]]:
    """Command name -> its function, from the app's registrations (groups as 'group sub')."""
    found = {info.name: info.callback for info in app.registered_commands}
    for group in app.registered_groups:
        for info in group.typer_instance.registered_commands:
            found[f"{group.name} {info.name}"] = info.callback
    return found


def _number_options(func: typing.Callable[..., typing.Any]) -> list[tuple[str, type, float | None]]:
    """(flag, int or float, declared minimum) of every number option of a command, from its annotations."""
    out = []
    for name, hint in typing.get_type_hints(func, include_extras=True).items():
        if typing.get_origin(hint) is not typing.Annotated:
            continue
        base, *extras = typing.get_args(hint)
        info = next((e for e in extras if isinstance(e, typer.models.OptionInfo)), None)
        kinds = {t for t in (typing.get_args(base) or (base,)) if t in (int, float)}
        if info is None or not kinds or bool in (typing.get_args(base) or (base,)):
            continue
        flag = max(info.param_decls, key=len) if info.param_decls else "--" + name.replace("_", "-")
        out.append((flag, kinds.pop(), info.min))
    return out


def _option_cases() -> list[tuple[str, list[str], str, bool]]:
    """Every number option of every command with values no number option accepts (and below its minimum)."""
    cases = []
    for command, func in _commands().items():
        for flag, kind, minimum in _number_options(func):
            bad = ["abc", "", "nan", "inf", "-inf", "1e400", "0x"]
            if kind is int:
                bad += ["1.5", str(2**64)] if flag == "--seed" else ["1.5"]  # a huge --epochs is valid, only slow
            if minimum is not None:
                bad.append(str(minimum - 1))
            bad += ["0", "-1"] if flag in POSITIVE else []
            first = ["nan" if kind is float else "1.5", str(minimum - 1) if minimum is not None else "abc"]
            ordered = dict.fromkeys([*first, *bad])
            # a command without BASE_ARGS may fail on a missing option first: any one-line failure will do
            expect = flag if command in BASE_ARGS else ""
            cases += [(command, [flag, value], expect, i >= 1) for i, value in enumerate(ordered)]
    return cases


POSITIVE = {"--lr", "--lora-alpha", "--density", "--energy", "--keep", "--rank", "--batch-size", "--steps"}
STDIN_ARGS: dict[str, list[str]] = {
    "merge": ["-", "--name", "merged"],
    "trim": ["-", "--name", "trimmed", "--rank", "1"],
    "ensemble-vote": ["-", "--data", "digits", "--limit", "8"],
    "identify-attack": ["-", "--data", "digits", "--limit", "8"],
    "fit-identifier": ["-", "--name", "idn", "--data", "digits", "--limit", "8"],
    "eval": ["--base", "tiny", "--adapter", "-"],
}


def _hub_unreachable() -> bool:
    import socket

    from loradar_cli.models import HUB_HOST

    try:
        socket.create_connection((HUB_HOST, 443), timeout=3).close()
    except OSError:
        return True
    return False


def _registry_cases() -> list[tuple[str, list[str], str]]:
    """Unknown names next to every registry: attacks, recipes, datasets, splits, merge/vote methods, presets."""
    from loradar_cli.attacks import ATTACKS
    from loradar_cli.data import DATASET_KINDS, SPLITS
    from loradar_cli.recipes import RECIPES

    cases = []
    for name in [*ATTACKS.names(), "nosuch"]:
        wrong = name.upper() if name != "nosuch" else name
        cases += [
            ("train", ["--attack", wrong], wrong),
            ("attack", ["--attack", wrong], wrong),
            ("eval", ["--attack", wrong], wrong),
        ]
    for name in [*RECIPES.names(), "trades"]:
        cases.append(("train", ["--recipe", name + "x"], name + "x"))
    for kind in DATASET_KINDS:
        cases.append(("eval", ["--data", f"{kind}x:/nowhere"], f"{kind}x"))
        if kind != "digits":
            cases.append(("eval", ["--data", kind], kind))  # needs a path
            cases.append(("eval", ["--data", f"{kind}:/does/not/exist"], "/does/not/exist"))
    for split in SPLITS:
        cases.append(("eval", ["--split", split + "x"], split + "x"))
        cases.append(("ensemble-vote", ["--split", split.upper()], split.upper()))
    for method in ("tts", "linear", "ties", "cat", "sum"):
        cases.append(("merge", ["--method", method + "x"], method + "x"))
    for method in ("majority", "weighted", "soft", "route"):
        cases.append(("ensemble-vote", ["--method", method + "x"], method + "x"))
        cases.append(("eval", ["--vote", method + "x", "--members", "ad,ad2"], method + "x"))
    for select in ("robust", "clean", "last"):
        cases.append(("train", ["--select", select + "x"], select + "x"))
    for mode in ("rule", "calibrated"):
        cases.append(("identify-attack", ["--mode", mode + "x"], mode + "x"))
    return cases


def _attack_opt_cases() -> list[tuple[str, list[str], str]]:
    """Per attack and config field: words, booleans, non-finite and out-of-range values; unknown keys."""
    from loradar_cli.attacks import ATTACKS

    cases = []
    for name in ATTACKS.names():
        fields = ATTACKS.get(name).config_cls.model_fields
        base = ["--attack", name]
        for field, info in fields.items():
            kinds = set(typing.get_args(info.annotation) or (info.annotation,))
            if not kinds & {int, float} or bool in kinds:
                continue
            for value in ("true", "-1", "abc", "1e400", "Infinity", "NaN", "[1]"):
                if value == "-1" and field == "seed":
                    continue
                cases.append(
                    ("attack", [*base, "--attack-opt", f"{field}={value}"], field, value not in ("true", "-1"))
                )
            cases.append(("eval", ["--attack", name, "--attack-opt", f"{name}.{field}=abc"], field))
        cases.append(("train", [*base, "--attack-opt", "bogus=1"], "bogus"))
        cases.append(("attack", [*base, "--attack-opt", f"{name}.bogus=1"], "bogus"))
        cases.append(("eval", [*base, "--attack-opt", "other.eps=0.1"], "other"))
    for item in ("=1", "noequals", ".eps=1", "eps=1e999"):
        cases.append(("train", ["--attack", "pgd", "--attack-opt", item], "--attack-opt"))
    cases.append(("train", ["--attack", "fgsm", "--attack-opt", "steps=abc"], "steps"))
    cases.append(("train", ["--attack", "fgsm", "--steps", "5"], "steps"))
    for value in ("-1", "eight", "1/0", "inf", "nan", "8/"):
        cases.append(("eval", ["--attack", "pgd", "--eps", value], "--eps"))
        cases.append(("train", ["--attack", "pgd", "--alpha", value], "--alpha"))
    return cases


def _semantic_cases() -> list[tuple[str, list[str], str]]:
    """The issue's examples and neighbours: ranks, targets, seeds, names, model kwargs, checkpoints."""
    ISSUE_EXAMPLES.update(
        {
            "rank huge",
            "rank overflow",
            "lora-alpha 0/-1/nan/inf",
            "seed -1",
            "seed huge",
            "targets (((",
            "targets bn1",
            "targets ''",
            "drop_rate=abc",
            "checkpoint_path",
            "pretrained offline",
            "img-size rounds to 0",
            "lr inf",
            "in-chans 2",
            "base named bases",
            "density -1/2/nan",
            "attack-opt eps=1e400/Infinity/true",
            "attack-opt bogus=1",
            "attack-opt steps=abc",
        }
    )
    return [
        ("train", ["--rank", "1000000000"], "rank"),
        ("train", ["--rank", "99999999999999999999"], "rank"),
        ("train", ["--lora-alpha", "0"], "--lora-alpha"),
        ("train", ["--lora-alpha", "inf"], "--lora-alpha"),
        ("train", ["--seed", str(2**64)], "--seed"),
        ("train", ["--targets", "((("], "((("),
        ("train", ["--targets", "bn1"], "bn1"),
        ("train", ["--targets", "no.such.layer"], "no.such.layer"),
        ("train", ["--targets", ""], "--targets"),
        ("train", ["--targets", "   "], "--targets"),
        ("train", ["--targets", "conv[0-9"], "conv[0-9"),
        ("train", ["--name", "bases"], "bases"),
        ("train", ["--name", "../escape"], "../escape"),
        ("train", ["--name", ""], "name"),
        ("train", ["--name", "ad"], "already exists"),
        ("train", ["--base", "nope"], "nope"),
        ("train", ["--base", "bases"], "bases"),
        ("eval", ["--base", "nope"], "nope"),
        ("eval", ["--base", "tiny", "--adapter", "nope"], "nope"),
        ("show", ["nope"], "nope"),
        ("show", ["../../etc"], "../../etc"),
        ("finetune", ["--name", "bases"], "bases"),
        ("finetune", ["--name", "identifiers"], "identifiers"),
        ("finetune", ["--name", "tiny"], "already exists"),
        ("finetune", ["--model", "no_such_model_xyz"], "no_such_model_xyz"),
        ("finetune", ["--model-kwarg", "drop_rate=abc"], "drop_rate"),
        ("finetune", ["--model-kwarg", "drop_rate=2"], "drop_rate"),
        ("finetune", ["--model-kwarg", "checkpoint_path=/nonexistent.pt"], "checkpoint_path"),
        ("finetune", ["--model-kwarg", "num_classes=3"], "num_classes"),
        ("finetune", ["--model-kwarg", "img_size=0.4"], "img_size"),
        ("finetune", ["--model-kwarg", "img_size=0"], "img_size"),
        ("finetune", ["--model-kwarg", "global_pool=bogus"], "bogus"),
        ("finetune", ["--model-kwarg", "noequals"], "--model-kwarg"),
        ("finetune", ["--model-kwarg", "drop_rate=1e400"], "drop_rate"),
        ("finetune", ["--in-chans", "2"], "channels"),
        ("finetune", ["--in-chans", "5"], "channels"),
        ("finetune", ["--checkpoint", "/nonexistent.pt"], "/nonexistent.pt"),
        ("finetune", ["--checkpoint", "BAD/garbage.pt"], "garbage.pt"),
        ("finetune", ["--checkpoint", "BAD/garbage.safetensors"], "garbage.safetensors"),
        ("finetune", ["--checkpoint", "BAD/checkpoint.txt"], "checkpoint.txt"),
        ("finetune", ["--checkpoint", "BAD/wrong-shapes.safetensors"], "wrong-shapes"),
        *([("finetune", ["--pretrained", "--model", "test_resnet"], "pretrained")] if _hub_unreachable() else []),
        ("merge", ["--density", "-1", "--method", "ties"], "--density"),
        ("merge", ["--density", "2", "--method", "ties"], "--density"),
        ("merge", ["--density", "nan", "--method", "ties"], "--density"),
        ("merge", ["--weights", "1,abc"], "--weights"),
        ("merge", ["--weights", "1,inf"], "--weights"),
        ("merge", ["--weights", "1"], "weight"),
        ("merge", ["--name", "ad"], "already exists"),
        ("merge", ["--base", "nope"], "nope"),
        ("trim", ["--energy", "0"], "--energy"),
        ("trim", ["--energy", "1.5"], "--energy"),
        ("trim", ["--keep", "0", "--full-weight"], "--keep"),
        ("trim", ["--full-weight", "--layers", "((("], "((("),
        ("eval", ["--members", "ad,ad2"], "--vote"),
        ("eval", ["--split", ""], "split"),
        ("identify-attack", ["--mode", "calibrated"], "identifier"),
        ("identify-attack", ["--margin", "-0.5"], "--margin"),
        ("identify-attack", ["--clean", "nosuch"], "nosuch"),
        ("fit-identifier", ["--name", "bad/name"], "bad/name"),
        ("ensemble-vote", ["--weights", "1,2,3", "--method", "weighted"], "weight"),
        ("ensemble-vote", ["--identifier", "nope", "--method", "route"], "nope"),
    ]


def _fixture_cases() -> list[tuple[str, list[str], str]]:
    """Corrupt files built by the `world` fixture, fed to the readers through the commands that read them."""
    ISSUE_EXAMPLES.update(
        {
            "npz empty",
            "npz truncated",
            "npz strings",
            "npz NaN labels",
            "npz negative labels",
            "npz label length",
            "cifar missing keys",
            "cifar wrong shape",
            "idx ndim 0",
            "idx header count",
            "imagefolder corrupt png",
            "loradar.json not JSON",
            "NaN adapter svd",
            "adv labels >= classes",
            "adv labels negative",
            "adv labels float",
            "cat dense",
            "merge - empty stdin",
            "eval --adapter - empty stdin",
            "quickstart --store FILE",
            "list --store /dev/null",
            "list --store FILE",
        }
    )
    cases = []
    for name in BAD_NPZ:
        cases.append(("eval", ["--data", f"npz:BAD/{name}.npz"], f"{name}.npz"))
        cases.append(("finetune", ["--data", f"npz:BAD/{name}.npz"], f"{name}.npz"))
    for name in BAD_IDX:
        cases.append(("eval", ["--data", f"mnist:BAD/idx-{name}"], "idx"))
    cases.append(("eval", ["--data", "imagefolder:BAD/images"], "broken.png"))
    # finetune streams the train split only (decoded lazily), so the broken test image is eval's to find
    cases.append(("attack", ["--data", "imagefolder:BAD/images"], "broken.png"))
    cases.append(("eval", ["--data", "imagefolder:BAD/empty-images"], "empty-images"))
    for name in BAD_CIFAR:
        cases.append(("eval", ["--data", f"cifar10:BAD/cifar-{name}"], "cifar"))
    for name in BAD_ADV:
        path = f"BAD/adv-{name}.safetensors"
        cases += [
            ("eval", ["--adv-set", path], f"adv-{name}"),
            ("ensemble-vote", ["--adv-set", path], f"adv-{name}"),
            ("identify-attack", ["--adv-set", path], f"adv-{name}"),
        ]
    cases += [
        ("merge!", ["nan-ad", "ad", "--name", "m2"], "nan-ad"),
        ("merge!", ["nan-ad", "ad", "--name", "m3", "--method", "ties"], "nan-ad"),
        ("trim!", ["nan-ad", "--name", "t2", "--rank", "1"], "nan-ad"),
        ("merge!", ["dense", "ad", "--name", "m4", "--method", "cat"], "dense"),
        ("eval", ["--adapter", "ad", "--store", "BROKEN"], "loradar.json"),
        ("show", ["ad", "--store", "BROKEN"], "loradar.json"),
        ("list", ["--store", "/dev/null"], "/dev/null"),
        ("list", ["--store", "BAD/garbage.pt"], "not a folder"),
        ("quickstart", ["--store", "BAD/garbage.pt"], "not a folder"),
        ("quickstart", ["--store", "BAD/garbage.pt/sub"], "not a folder"),
        ("eval", ["--adv-set", "BAD/garbage.pt"], "garbage.pt"),
        ("eval", ["--adv-set", "/does/not/exist.safetensors"], "does not exist"),
    ]
    for command in ("merge", "trim", "ensemble-vote", "identify-attack", "fit-identifier"):
        for text in ("", "\n\n", "{bad json", '{"nome": 1}', "[1, 2]"):
            cases.append((command, [], "STDIN:" + text))
    for text in ("", "{", '[{"name": ""}]'):
        cases.append(("eval", [], "STDIN:" + text))
    cases.append(("trim", [], "STDIN:ad\nad2\n"))
    return cases


BAD_NPZ = (
    "empty",
    "truncated",
    "strings",
    "nan-labels",
    "negative-labels",
    "short-labels",
    "float-labels",
    "object",
    "no-keys",
    "images-2d",
    "images-out-of-range",
    "images-nan",
    "zero-length",
    "npy-file",
)
BAD_IDX = ("ndim0", "count", "magic", "short", "mismatch")
BAD_CIFAR = ("missing-keys", "wrong-shape", "code")
BAD_ADV = ("labels-big", "labels-negative", "labels-float", "images-nan", "not-advset", "size", "info")


def _write_npz(folder: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 8, 8), dtype=np.uint8)
    y = rng.integers(0, 10, 20)
    (folder / "empty.npz").write_bytes(b"")
    np.savez(folder / "full.npz", x=x, y=y)
    data = (folder / "full.npz").read_bytes()
    (folder / "truncated.npz").write_bytes(data[: len(data) // 2])
    np.savez(folder / "strings.npz", x=np.array([["a"] * 8] * 20), y=y)
    np.savez(folder / "nan-labels.npz", x=x, y=np.where(np.arange(20) == 3, np.nan, y.astype(float)))
    np.savez(folder / "negative-labels.npz", x=x, y=y - 5)
    np.savez(folder / "short-labels.npz", x=x, y=y[:15])
    np.savez(folder / "float-labels.npz", x=x, y=y + 0.5)
    np.savez(folder / "object.npz", x=x, y=np.array([object()] * 20, dtype=object))
    np.savez(folder / "no-keys.npz", images=x, labels=y)
    np.savez(folder / "images-2d.npz", x=x.reshape(20, 64), y=y)
    np.savez(folder / "images-out-of-range.npz", x=x.astype(np.float32), y=y)
    np.savez(folder / "images-nan.npz", x=np.full((20, 8, 8), np.nan, np.float32), y=y)
    np.savez(folder / "zero-length.npz", x=x[:0], y=y[:0])
    np.save(folder / "npy-file.npz.npy", x)
    os.replace(folder / "npy-file.npz.npy", folder / "npy-file.npz")


def _idx(array: np.ndarray, dims: tuple[int, ...] | None = None, magic: int = 0x08) -> bytes:
    dims = array.shape if dims is None else dims
    header = struct.pack(">HBB", 0, magic, len(dims)) + struct.pack(f">{len(dims)}I", *dims)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def _write_idx(folder: Path) -> None:
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (12, 8, 8)), rng.integers(0, 10, 12)
    variants = {
        "ndim0": {"t10k-labels-idx1-ubyte.gz": _idx(np.zeros(0), dims=())},
        "count": {"t10k-labels-idx1-ubyte.gz": _idx(labels, dims=(20,))},
        "magic": {"t10k-images-idx3-ubyte.gz": _idx(images, magic=0x0D)},
        "short": {"t10k-images-idx3-ubyte.gz": _idx(images)[:40]},
        "mismatch": {"t10k-labels-idx1-ubyte.gz": _idx(labels[:5])},
    }
    for name, override in variants.items():
        raw = folder / f"idx-{name}" / "raw"
        raw.mkdir(parents=True)
        files = {
            "train-images-idx3-ubyte.gz": _idx(images),
            "train-labels-idx1-ubyte.gz": _idx(labels),
            "t10k-images-idx3-ubyte.gz": _idx(images),
            "t10k-labels-idx1-ubyte.gz": _idx(labels),
            **override,
        }
        for filename, data in files.items():
            (raw / filename).write_bytes(data)


def _write_images(folder: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            sub = folder / "images" / split / cls
            sub.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(sub / f"{i}.png")
    (folder / "images" / "val" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    for split in ("train", "val"):
        (folder / "empty-images" / split / "a").mkdir(parents=True)


class _Canary:
    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {CANARY}",))


CANARY = Path("/tmp/loradar-malformed-canary")


def _write_cifar(folder: Path) -> None:
    good = {"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 3]}
    variants = {
        "missing-keys": {"data": good["data"]},
        "wrong-shape": {"data": np.zeros((4, 100), np.uint8), "labels": [0, 1, 2, 3]},
        "code": {"data": good["data"], "labels": _Canary()},
    }
    for name, bad in variants.items():
        sub = folder / f"cifar-{name}"
        sub.mkdir()
        (sub / "data_batch_1").write_bytes(pickle.dumps(good))
        (sub / "test_batch").write_bytes(pickle.dumps(bad))


def _write_adv(folder: Path) -> None:
    x, y = torch.rand(4, 1, 16, 16), torch.tensor([0, 1, 2, 3])
    meta = {"format": "pt", "loradar.format": FORMAT, "attack": "pgd", "info": "{}"}
    variants = {
        "labels-big": ({"x_adv": x, "y": torch.tensor([0, 1, 2, 10])}, meta),
        "labels-negative": ({"x_adv": x, "y": torch.tensor([0, -1, 2, 3])}, meta),
        "labels-float": ({"x_adv": x, "y": y.float() + 0.5}, meta),
        "images-nan": ({"x_adv": torch.full_like(x, float("nan")), "y": y}, meta),
        "not-advset": ({"x_adv": x, "y": y}, {"format": "pt"}),
        "size": ({"x_adv": torch.rand(4, 3, 32, 32), "y": y}, meta),
        "info": ({"x_adv": x, "y": y}, {**meta, "info": "{not json"}),
    }
    for name, (tensors, metadata) in variants.items():
        save_file(tensors, str(folder / f"adv-{name}.safetensors"), metadata=metadata)


def _write_checkpoints(folder: Path) -> None:
    (folder / "garbage.pt").write_bytes(b"not a checkpoint at all")
    (folder / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    (folder / "checkpoint.txt").write_text("weights")
    save_file({"fc.weight": torch.zeros(3, 3)}, str(folder / "wrong-shapes.safetensors"))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("x.npy", b"junk")
    (folder / "zip-junk.npz").write_bytes(buffer.getvalue())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny store (base, two adapters, a NaN adapter, a dense-delta adapter), a broken store, corrupt files."""
    from loradar_cli.jobs.trim import trim_adapter
    from loradar_cli.store.store import Store

    root = tmp_path_factory.mktemp("malformed")
    store = Store(root / "store")
    base = make_base(store)
    make_adapter(store, base.name, "ad", attack="pgd")
    make_adapter(store, base.name, "ad2", seed=2, attack="fgsm")
    make_adapter(store, base.name, "nan-ad", seed=3)
    adapter = store.load_adapter("nan-ad")
    poisoned = {k: torch.full_like(v, float("nan")) if "lora_B" in k else v for k, v in adapter.tensors.items()}
    from safetensors.torch import save_file  # the store refuses to write NaN: poison the file behind its back

    save_file(poisoned, str(store.adapter_dir("nan-ad") / "adapter_model.safetensors"))
    trim_adapter(store, "ad", out_name="dense", full_weight=True, keep=0.3)
    broken = Store(root / "broken")
    make_base(broken)
    make_adapter(broken, "tiny", "ad")
    (broken.adapter_dir("ad") / "loradar.json").write_text("{ this is not json")
    bad = root / "bad"
    bad.mkdir()
    for writer in (_write_npz, _write_idx, _write_images, _write_cifar, _write_adv, _write_checkpoints):
        writer(bad)
    out = root / "out"
    out.mkdir()
    return {"store": store.root, "broken": broken.root, "bad": bad, "out": out, "root": root, "nan": True}


def _listing(folder: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


def _table() -> list:
    """All cases; the exhaustive value sweeps (same code paths as the fast rows) are marked slow."""
    cases = _option_cases() + _registry_cases() + _attack_opt_cases() + _semantic_cases() + _fixture_cases()
    return [
        pytest.param(*case[:3], marks=pytest.mark.slow) if len(case) == 4 and case[3] else case[:3] for case in cases
    ]


CASES = _table()
FAST = sum(not isinstance(case, type(pytest.param(0))) or not case.marks for case in CASES)
RESULTS: dict[str, int] = {"tried": 0, "tracebacks": 0, "exit 0": 0, "internal": 0, "partial files": 0}


def _argv(command: str, extra: list[str], world: dict[str, Path], stdin: bool) -> list[str]:
    raw, command = command.endswith("!"), command.rstrip("!")  # 'cmd!': the case gives all arguments itself
    fixed = [] if raw else STDIN_ARGS[command] if stdin else BASE_ARGS.get(command, [])
    args = [*command.split(), *fixed, *extra, "--json"]
    if "--store" not in extra:
        args += ["--store", str(world["out"] / "qs" if command in NO_STORE else world["store"])]
    subst = {"BAD": str(world["bad"]), "OUT": str(world["out"]), "BROKEN": str(world["broken"])}
    return [_subst(a, subst) for a in args]


def _subst(arg: str, subst: dict[str, str]) -> str:
    for key, value in subst.items():
        if arg == key or arg.startswith(key + "/") or arg.startswith(f"npz:{key}/") or ":" + key + "/" in arg:
            arg = arg.replace(key, value, 1)
    return arg


def _ids() -> list[str]:
    rows = [case.values if hasattr(case, "values") else case for case in CASES]
    return [f"{i:03d}-{c}-{' '.join(a)[:40]}" for i, (c, a, _) in enumerate(rows)]


@pytest.mark.parametrize(("command", "extra", "expect"), CASES, ids=_ids())
def test_malformed_invocation_fails_cleanly(world, command, extra, expect, monkeypatch):
    monkeypatch.delenv("LORADAR_DEBUG", raising=False)
    stdin = expect[len("STDIN:") :] if expect.startswith("STDIN:") else None
    if "nan-ad" in extra and not world["nan"]:
        pytest.skip("the store refuses NaN tensors when they are written (asserted in the fixture)")
    args = _argv(command, extra, world, stdin is not None)
    before = {name: _listing(world[name]) for name in ("store", "broken", "bad", "out")}
    code, stdout, stderr = call(args, stdin or "")
    RESULTS["tried"] += 1
    RESULTS["tracebacks"] += "Traceback" in stdout + stderr
    RESULTS["exit 0"] += code == 0
    RESULTS["internal"] += code == 70
    after = {name: _listing(world[name]) for name in before}
    RESULTS["partial files"] += after != before
    assert code != 0, f"exit 0 on {args}"
    assert code in {*EXIT_CODES.values()}, f"exit {code} (internal error?) on {args}: {stderr}"
    assert "Traceback" not in stdout + stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("error:")
    assert stdout == ""
    assert after == before
    if stdin is None:
        assert expect.lower() in stderr.lower(), f"{expect!r} not named in: {stderr}"
    assert not CANARY.exists()


def test_table_size_and_figures(capsys):
    """At least 200 invocations; the figures are printed for the report (run with -s to see them)."""
    assert FAST >= 200
    with capsys.disabled():
        print(
            f"\nmalformed invocations: {len(CASES)} ({FAST} not slow); issue examples: {len(ISSUE_EXAMPLES)}; {RESULTS}"
        )


def test_interrupt_exits_130_with_one_line(world, monkeypatch):
    """Ctrl-C during a job: exit 130, one line, and the store unchanged."""
    import loradar_cli.jobs.evaluate as job

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "evaluate_models", interrupted)
    before = _listing(world["store"])
    code, _, stderr = call(["eval", "--base", "tiny", "--store", str(world["store"])])
    assert code == 130 and len(stderr.strip().splitlines()) == 1 and stderr.startswith("interrupted:")
    assert _listing(world["store"]) == before


def test_internal_errors_are_one_line_and_debug_shows_the_traceback(world, monkeypatch):
    """A bug (any non-loradar exception) exits 70 with one line; LORADAR_DEBUG=1 lets the traceback through."""
    import loradar_cli.jobs.evaluate as job

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(job, "evaluate_models", broken)
    args = ["eval", "--base", "tiny", "--store", str(world["store"])]
    code, _, stderr = call(args)
    assert code == 70
    assert stderr.strip() == (
        "error: internal error: ZeroDivisionError: division by zero (set LORADAR_DEBUG=1 for the traceback)"
    )
    monkeypatch.setenv("LORADAR_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        run(args)


@pytest.mark.parametrize(
    ("error", "code"),
    [("InvalidValueError", 2), ("NotFoundError", 3), ("ExistsError", 4), ("CorruptError", 5), ("IncompatibleError", 6)],
)
def test_each_error_class_has_its_exit_code(world, monkeypatch, error, code):
    import loradar_cli.errors as errors
    import loradar_cli.jobs.evaluate as job

    def failing(*args, **kwargs):
        raise getattr(errors, error)("boom", hint="a hint")

    monkeypatch.setattr(job, "evaluate_models", failing)
    assert call(["eval", "--base", "tiny", "--store", str(world["store"])])[::2] == (code, "error: boom (a hint)\n")


def test_provenance_mismatch_warns_and_strict_refuses(world):
    """A base fitted on digits, evaluated on an npz of other statistics: a warning; with --strict, an error."""
    rng = np.random.default_rng(0)
    path = world["out"] / "other.npz"
    np.savez(path, x=rng.integers(200, 256, (40, 16, 16), dtype=np.uint8), y=rng.integers(0, 10, 40))
    args = ["eval", "--base", "tiny", "--data", f"npz:{path}", "--limit", "4", "--store", str(world["store"]), "-q"]
    code, stdout, warning = call([*args, "--json"])
    assert code == 0 and warning.startswith("warning:") and len(warning.strip().splitlines()) == 1
    assert "npz" in warning and "digits" in warning and "mean/std" in warning
    assert json.loads(stdout)["rows"][0]["n"] == 4
    code, stdout, stderr = call(["--strict", *args])
    assert code == 6 and stderr.startswith("error:") and "--strict" in stderr and stdout == ""
    code, stdout, stderr = call(
        ["eval", "--base", "tiny", "--limit", "5000", "--store", str(world["store"]), "-q", "--json"]
    )
    assert code == 0 and "--limit 5000 is more than the 359 examples" in stderr
    assert math.isfinite(json.loads(stdout)["rows"][0]["clean"])
