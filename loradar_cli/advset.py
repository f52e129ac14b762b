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
    attack = metadata.get("attack")
    return AdvSet(x.float(), y.long(), None if attack == "clean" else attack, json.loads(metadata.get("info", "{}")))


def labelled_adv_sets(
    paths: Sequence[Path], input_size: Sequence[int] | None = None, taken: Iterable[str] = ()
) -> dict[str, AdvSet]:
    """Load sets keyed by file name (`name#2`, ... on repeats or names in `taken`); check the image size if given."""
    sets: dict[str, AdvSet] = {}
    used = set(taken)
    for path in map(Path, paths):
        adv = load_adv_set(path)
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
