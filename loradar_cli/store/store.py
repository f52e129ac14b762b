"""Store: `<root>/<adapter>/` in PEFT's layout plus loradar.json, bases in `<root>/bases/<name>/`.

Every write goes to a hidden temporary folder first and is renamed into place, so an interrupted or failed
write never leaves a half-written entry. Reads verify the metadata schema and the tensors' sha256.
"""

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from torch import Tensor

from loradar_cli.errors import CorruptError, ExistsError, InvalidValueError, NotFoundError
from loradar_cli.models import weights_fingerprint
from loradar_cli.store.meta import RESERVED_NAMES, AdapterMeta, BaseMeta, Name, peft_config

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_META = "loradar.json"
BASE_WEIGHTS = "model.safetensors"
BASE_META = "base.json"
IDENTIFIER_WEIGHTS = "identifier.safetensors"
IDENTIFIER_META = "identifier.json"
DEFAULT_STORE = Path("adapters")
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Adapter:
    meta: AdapterMeta
    tensors: dict[str, Tensor]


@dataclass(frozen=True)
class Base:
    meta: BaseMeta
    state: dict[str, Tensor]


def default_root() -> Path:
    return Path(os.environ.get("LORADAR_STORE", DEFAULT_STORE))


def check_name(name: str, what: str = "adapter") -> str:
    from pydantic import TypeAdapter

    try:
        TypeAdapter(Name).validate_python(name)
    except ValidationError:
        raise InvalidValueError(
            f"invalid {what} name {name!r}: use letters, digits, '.', '_' and '-' (max 64)"
        ) from None
    if name in RESERVED_NAMES:  # `show NAME` looks up adapters and bases alike, so no kind may use these
        raise InvalidValueError(f"{name!r} is reserved in the store; pick another {what} name")
    return name


class Store:
    """Bases and adapters under one root folder."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        for folder in (self.root, *self.root.parents):  # the nearest existing path must be a folder
            if folder.exists():
                if not folder.is_dir():
                    inside = "" if folder == self.root else f" ({folder} is not a folder)"
                    raise InvalidValueError(f"store {self.root} is not a folder{inside}")
                break

    # ------------------------------------------------------------------ paths and listing
    def adapter_dir(self, name: str) -> Path:
        return self.root / check_name(name)

    def base_dir(self, name: str) -> Path:
        return self.root / "bases" / check_name(name, "base")

    def adapter_names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / ADAPTER_META).is_file())

    def base_names(self) -> list[str]:
        bases = self.root / "bases"
        return sorted(p.name for p in bases.iterdir() if (p / BASE_META).is_file()) if bases.is_dir() else []

    def has_adapter(self, name: str) -> bool:
        return (self.adapter_dir(name) / ADAPTER_META).is_file()

    def has_base(self, name: str) -> bool:
        return (self.base_dir(name) / BASE_META).is_file()

    def check_free(self, what: str, name: str, overwrite: bool = False) -> Path:
        """The folder a new base, adapter or identifier will be written to: a valid name, free unless `overwrite`.

        Commands call this before any work, so a taken name fails at once rather than after training.
        """
        folders = {"adapter": self.adapter_dir, "base": self.base_dir, "identifier": self.identifier_dir}
        target = folders[what](name)
        self._refuse_taken(target, what, overwrite)
        return target

    def _refuse_taken(self, target: Path, what: str, overwrite: bool) -> None:
        if target.exists() and not overwrite:
            raise ExistsError(f"{what} {target.name!r} already exists in {self.root}", hint="pass --overwrite")

    # ------------------------------------------------------------------ bases
    def save_base(self, meta: BaseMeta, state: Mapping[str, Tensor], *, overwrite: bool = False) -> Path:
        meta = meta.model_copy(update={"fingerprint": weights_fingerprint(state)})
        files = {BASE_META: _json_bytes(meta.model_dump(mode="json"))}
        return self._write(self.base_dir(meta.name), files, {BASE_WEIGHTS: state}, overwrite, "base")

    def base_meta(self, name: str) -> BaseMeta:
        folder = self.base_dir(name)
        if not (folder / BASE_META).is_file():
            raise NotFoundError(f"no base {name!r} in {self.root}", hint=_suggest(name, self.base_names()))
        return _read_meta(folder / BASE_META, BaseMeta)

    def load_base(self, name: str) -> Base:
        meta = self.base_meta(name)
        state = _read_tensors(self.base_dir(name) / BASE_WEIGHTS)
        if weights_fingerprint(state) != meta.fingerprint:
            raise CorruptError(f"base {name!r}: weights do not match their recorded sha256 fingerprint")
        return Base(meta, state)

    # ------------------------------------------------------------------ adapters
    def save_adapter(self, meta: AdapterMeta, tensors: Mapping[str, Tensor], *, overwrite: bool = False) -> Path:
        meta = meta.model_copy(update={"tensors_sha256": weights_fingerprint(tensors)})
        files = {
            ADAPTER_META: _json_bytes(meta.model_dump(mode="json")),
            ADAPTER_CONFIG: _json_bytes(peft_config(meta)),
        }
        return self._write(self.adapter_dir(meta.name), files, {ADAPTER_WEIGHTS: tensors}, overwrite, "adapter")

    def adapter_meta(self, name: str) -> AdapterMeta:
        folder = self.adapter_dir(name)
        if not (folder / ADAPTER_META).is_file():
            raise NotFoundError(f"no adapter {name!r} in {self.root}", hint=_suggest(name, self.adapter_names()))
        return _read_meta(folder / ADAPTER_META, AdapterMeta)

    def load_adapter(self, name: str) -> Adapter:
        meta = self.adapter_meta(name)
        tensors = _read_tensors(self.adapter_dir(name) / ADAPTER_WEIGHTS)
        if weights_fingerprint(tensors) != meta.tensors_sha256:
            raise CorruptError(f"adapter {name!r}: tensors do not match their recorded sha256")
        return Adapter(meta, tensors)

    def delete_adapter(self, name: str) -> None:
        folder = self.adapter_dir(name)
        if not folder.is_dir():
            raise NotFoundError(f"no adapter {name!r} in {self.root}")
        shutil.rmtree(folder)

    # ------------------------------------------------------------------ attack identifiers
    def identifier_dir(self, name: str) -> Path:
        return self.root / "identifiers" / check_name(name, "identifier")

    def identifier_names(self) -> list[str]:
        folder = self.root / "identifiers"
        return sorted(p.name for p in folder.iterdir() if (p / IDENTIFIER_META).is_file()) if folder.is_dir() else []

    def save_identifier(
        self, name: str, meta: Mapping[str, Any], tensors: Mapping[str, Tensor], *, overwrite: bool = False
    ) -> Path:
        """Write `<root>/identifiers/<name>/` (JSON metadata + safetensors weights) atomically."""
        files = {IDENTIFIER_META: _json_bytes(dict(meta))}
        return self._write(self.identifier_dir(name), files, {IDENTIFIER_WEIGHTS: tensors}, overwrite, "identifier")

    def load_identifier(self, name: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The raw JSON metadata and tensors of a stored identifier (the caller validates them)."""
        folder = self.identifier_dir(name)
        if not (folder / IDENTIFIER_META).is_file():
            raise NotFoundError(f"no identifier {name!r} in {self.root}", hint=_suggest(name, self.identifier_names()))
        try:
            meta = json.loads((folder / IDENTIFIER_META).read_bytes())
        except (OSError, ValueError) as err:
            raise CorruptError(f"cannot read {folder / IDENTIFIER_META}: {type(err).__name__}") from None
        return meta, _read_tensors(folder / IDENTIFIER_WEIGHTS)

    # ------------------------------------------------------------------ atomic write
    def _write(
        self,
        target: Path,
        files: Mapping[str, bytes],
        tensor_files: Mapping[str, Mapping[str, Tensor]],
        overwrite: bool,
        what: str,
    ) -> Path:
        self._refuse_taken(target, what, overwrite)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
        try:
            write_safetensors_files(tmp, tensor_files)
            for filename, data in files.items():
                (tmp / filename).write_bytes(data)
            if target.exists():
                trash = Path(tempfile.mkdtemp(prefix=f".old-{target.name}-", dir=target.parent))
                os.replace(target, trash / target.name)
                os.replace(tmp, target)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target


def write_safetensors_files(folder: Path, tensor_files: Mapping[str, Mapping[str, Tensor]]) -> None:
    from safetensors.torch import save_file

    for filename, tensors in tensor_files.items():
        clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(clean, str(folder / filename), metadata={"format": "pt", "loradar.schema_version": "1"})


def _json_bytes(data: object) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode()


def _read_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise CorruptError(f"{path} is missing")
    try:
        return load_file(str(path))
    except Exception as err:
        raise CorruptError(f"{path} is not a readable safetensors file ({type(err).__name__})") from None


def _read_meta(path: Path, model: type[M]) -> M:
    try:
        return model.model_validate_json(path.read_bytes())
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        if where == "schema_version":
            raise CorruptError(f"{path} has a newer schema version", hint="upgrade loradar") from None
        raise CorruptError(f"{path} is invalid: {where}: {first['msg']}") from None
    except OSError as err:
        raise CorruptError(f"cannot read {path}: {err}") from None


def _suggest(name: str, names: list[str]) -> str | None:
    import difflib

    close = difflib.get_close_matches(name, names, n=3)
    if close:
        return f"did you mean {', '.join(close)}?"
    return f"available: {', '.join(names[:8])}" if names else "the store is empty"
