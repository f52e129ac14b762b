"""The three kinds of store entry (bases, adapters, identifiers): the files that make each, and how each kind's file
contents are parsed and checked when read (schema, name, the tensors' sha256, PEFT config, factor shapes, finite
values). `Store` reads and writes them; bundles check imported entries with the same `check_entry_files`.
"""

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from torch import Tensor

from loradar_cli.errors import CorruptError, IncompatibleError, validation_message
from loradar_cli.lora.state import dense_key, factor_keys, head_prefix
from loradar_cli.models import weights_fingerprint
from loradar_cli.store.meta import AdapterMeta, BaseMeta, IdentifierMeta, newer_schema, peft_config

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_META = "loradar.json"
BASE_WEIGHTS = "model.safetensors"
BASE_META = "base.json"
IDENTIFIER_WEIGHTS = "identifier.safetensors"
IDENTIFIER_META = "identifier.json"
M = TypeVar("M", bound=BaseModel)

TensorCheck = Callable[[Any, Mapping[str, Tensor], Mapping[str, bytes], Path, str], None]
"""(meta, tensors, files, folder, label) -> None, raising CorruptError: what a kind checks beyond its schema."""


@dataclass(frozen=True)
class Adapter:
    meta: AdapterMeta
    tensors: dict[str, Tensor]


@dataclass(frozen=True)
class Base:
    meta: BaseMeta
    state: dict[str, Tensor]


def _check_base(meta: Any, tensors: Mapping[str, Tensor], files: Mapping[str, bytes], folder: Path, label: str) -> None:
    """A base's weights match the fingerprint adapters are checked against, and are finite."""
    if weights_fingerprint(tensors) != meta.fingerprint:
        raise CorruptError(f"{label}: weights do not match their recorded sha256 fingerprint")
    check_finite(tensors, label)


def _check_adapter(
    meta: Any, tensors: Mapping[str, Tensor], files: Mapping[str, bytes], folder: Path, label: str
) -> None:
    """An adapter's tensors match their sha256, its PEFT config agrees with loradar.json, its factors its spec."""
    _check_recorded_sha256(meta, tensors, label)
    check_peft_config(meta, files[ADAPTER_CONFIG], folder / ADAPTER_CONFIG)
    check_adapter_tensors(meta, tensors, label)


def _check_identifier(
    meta: Any, tensors: Mapping[str, Tensor], files: Mapping[str, bytes], folder: Path, label: str
) -> None:
    """An identifier's tensors match their sha256 and are finite."""
    _check_recorded_sha256(meta, tensors, label)
    check_finite(tensors, label)


@dataclass(frozen=True)
class Kind:
    """One kind of store entry: where it lives, which files make it, its schema and its own checks."""

    key: str
    folder: str | None
    meta_file: str
    weights_file: str
    meta_model: type[BaseModel]
    check: TensorCheck
    extra_files: tuple[str, ...] = ()

    @property
    def files(self) -> tuple[str, ...]:
        return (self.meta_file, *self.extra_files, self.weights_file)


KINDS: dict[str, Kind] = {
    "base": Kind("base", "bases", BASE_META, BASE_WEIGHTS, BaseMeta, _check_base),
    "adapter": Kind("adapter", None, ADAPTER_META, ADAPTER_WEIGHTS, AdapterMeta, _check_adapter, (ADAPTER_CONFIG,)),
    "identifier": Kind(
        "identifier", "identifiers", IDENTIFIER_META, IDENTIFIER_WEIGHTS, IdentifierMeta, _check_identifier
    ),
}


def check_entry_files(kind: str, name: str, files: Mapping[str, bytes], folder: Path) -> tuple[Any, dict[str, Any]]:
    """Parse and check an entry's file contents (already matched to its manifest): schema, name, tensors."""
    spec = KINDS[kind]
    for filename in spec.files:
        if filename not in files:
            raise CorruptError(f"{folder / filename} is missing")
    meta = parse_meta(files[spec.meta_file], folder / spec.meta_file, spec.meta_model)
    if getattr(meta, "name", name) != name:
        raise CorruptError(f"{folder / spec.meta_file} names {meta.name!r}, not {name!r}")
    tensors = parse_tensors(files[spec.weights_file], folder / spec.weights_file)
    spec.check(meta, tensors, files, folder, f"{kind} {name!r}")
    return meta, tensors


def _check_recorded_sha256(meta: Any, tensors: Mapping[str, Tensor], label: str) -> None:
    recorded = meta.tensors_sha256
    if recorded and weights_fingerprint(tensors) != recorded:
        raise CorruptError(f"{label}: tensors do not match their recorded sha256")


def check_peft_config(meta: AdapterMeta, data: bytes, path: Path) -> None:
    """adapter_config.json (what PEFT reads) must say what loradar.json says."""
    try:
        config = json.loads(data)
    except ValueError:
        raise CorruptError(f"{path} is not JSON") from None
    if not isinstance(config, dict):
        raise CorruptError(f"{path} is not a PEFT config")
    expected = json.loads(json.dumps(peft_config(meta)))
    wrong = [key for key, value in expected.items() if key != "inference_mode" and config.get(key) != value]
    if wrong:
        raise CorruptError(f"{path} disagrees with {ADAPTER_META} on {', '.join(wrong)}")


def check_adapter_tensors(meta: AdapterMeta, tensors: Mapping[str, Tensor], label: str) -> None:
    """Every factor the spec names is there with its rank, nothing else is, and every value is finite."""
    spec = meta.lora
    expected: set[str] = set()
    for module in spec.targets:
        a_key, b_key = factor_keys(module)
        expected |= {a_key, b_key}
        a, b = tensors.get(a_key), tensors.get(b_key)
        if a is None or b is None:
            raise CorruptError(f"{label}: factors of {module!r} are missing")
        r = spec.rank_of(module)
        if a.dim() not in (2, 4) or b.dim() != a.dim() or a.shape[0] != r or b.shape[1] != r:
            raise CorruptError(
                f"{label}: {module!r} factors have shapes {tuple(a.shape)} and {tuple(b.shape)}, not rank {r}"
            )
    expected |= {dense_key(module) for module in meta.dense_deltas}
    head = head_prefix(spec.head) if spec.head else None
    extra = sorted(k for k in set(tensors) - expected if not (head and k.startswith(head)))
    missing = sorted(k for k in expected if k not in tensors)
    if extra or missing:
        raise CorruptError(f"{label}: tensors do not match its LoRA spec (missing {missing[:2]}, extra {extra[:2]})")
    check_finite(tensors, label)


def check_finite(tensors: Mapping[str, Tensor], label: str) -> None:
    import torch

    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CorruptError(f"{label}: tensor {key!r} holds NaN or infinite values")


def tensor_bytes(tensors: Mapping[str, Tensor]) -> bytes:
    from safetensors.torch import save

    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return save(clean, metadata={"format": "pt"})


def parse_tensors(data: bytes, path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as err:
        raise CorruptError(f"{path} is not a readable safetensors file ({type(err).__name__})") from None


def parse_meta(data: bytes, path: Path, model: type[M]) -> M:
    try:
        raw = json.loads(data)
    except ValueError:
        raise CorruptError(f"{path} is not JSON") from None
    version = newer_schema(raw) if model is not IdentifierMeta else None
    if version is not None:
        raise IncompatibleError(
            f"{path} has schema version {version}, newer than this loradar reads (1)", hint="upgrade loradar"
        )
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise CorruptError(f"{path} is invalid: {validation_message(err, first=True, values=False)}") from None
