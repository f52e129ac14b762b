"""Saved adversarial sets: images, labels and the attack's provenance in one safetensors file."""

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from loradar_cli.errors import CorruptError, IncompatibleError, NotFoundError
from loradar_cli.files import atomic_path

FORMAT = "loradar.advset.v1"


@dataclass
class AdvSet:
    """x_adv [N, C, H, W] in [0, 1], labels [N]; `attack` names its family (None = clean inputs)."""

    x: Tensor
    y: Tensor
    attack: str | None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.attack or "clean"


def save_adv_set(path: Path, adv: AdvSet) -> Path:
    """Write atomically (temp file + rename), so a failed run leaves no partial file behind."""
    from safetensors.torch import save_file

    metadata = {
        "format": "pt",
        "loradar.format": FORMAT,
        "attack": adv.attack or "clean",
        "info": json.dumps(adv.info, default=str),
    }
    with atomic_path(Path(path)) as tmp:
        save_file(
            {"x_adv": adv.x.detach().cpu().contiguous(), "y": adv.y.detach().cpu().contiguous()},
            str(tmp),
            metadata=metadata,
        )
    return path


def load_adv_set(path: Path) -> AdvSet:
    """Read a set written by `save_adv_set`; anything else is a one-line CorruptError."""
    from safetensors import safe_open

    if not path.is_file():
        raise NotFoundError(f"adversarial set {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            x, y = f.get_tensor("x_adv"), f.get_tensor("y")
    except Exception as err:
        raise CorruptError(f"{path} is not a loradar adversarial set ({type(err).__name__})") from None
    if metadata.get("loradar.format") != FORMAT or x.dim() != 4 or len(x) != len(y):
        raise CorruptError(f"{path} is not a loradar adversarial set")
    check_set_tensors(path, x, y)
    try:
        info = json.loads(metadata.get("info", "{}"))
    except ValueError:
        raise CorruptError(f"{path}: its 'info' metadata is not JSON") from None
    attack = metadata.get("attack")
    return AdvSet(x.float(), y.long(), None if attack == "clean" else attack, info if isinstance(info, dict) else {})


def check_set_tensors(path: Path, x: Tensor, y: Tensor, num_classes: int | None = None) -> None:
    """Labels: 1-D integers in [0, num_classes); images: floating point, finite, in [0, 1]. Else CorruptError."""
    import torch

    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise CorruptError(f"{path}: labels must be a 1-D integer tensor, got {y.dtype} of shape {tuple(y.shape)}")
    if len(y) and int(y.min()) < 0:
        raise CorruptError(f"{path}: labels must be >= 0, found {int(y.min())}")
    if num_classes is not None and len(y) and int(y.max()) >= num_classes:
        raise CorruptError(f"{path}: label {int(y.max())} is out of range for a base with {num_classes} classes")
    if not x.dtype.is_floating_point or (x.numel() and not (torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1)):
        raise CorruptError(f"{path}: images must be finite floats in [0, 1]")


def labelled_adv_sets(
    paths: Sequence[Path],
    input_size: Sequence[int] | None = None,
    taken: Iterable[str] = (),
    num_classes: int | None = None,
) -> dict[str, AdvSet]:
    """Load sets keyed by file name (`name#2`, ... on repeats or names in `taken`); check image size and labels."""
    sets: dict[str, AdvSet] = {}
    used = set(taken)
    for path in map(Path, paths):
        adv = load_adv_set(path)
        check_set_tensors(path, adv.x, adv.y, num_classes)
        if input_size is not None and tuple(adv.x.shape[1:]) != tuple(input_size):
            raise IncompatibleError(
                f"{path} holds images {tuple(adv.x.shape[1:])}, the model takes {tuple(input_size)}"
            )
        label, i = path.name, 2
        while label in used:
            label, i = f"{path.name}#{i}", i + 1
        used.add(label)
        sets[label] = adv
    return sets
