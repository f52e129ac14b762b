"""The kinds of store entry: three folder kinds (bases, adapters, identifiers), each with the files that make it
and how their contents are parsed and checked when read (schema, name, the tensors' sha256, PEFT config, factor
shapes, finite values), and pools, a file kind (one manifest naming adapters). Each kind says where its entries
live, how they are listed, read, renamed and discarded, and which other entries they need; `Store` asks the kind
and holds the claims, format and dependency checks around it. Bundles check imported entries with the same
`check_entry_files`.
"""

import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from pydantic import BaseModel, ValidationError
from torch import Tensor

from loradar_cli.errors import CorruptError, IncompatibleError, validation_message
from loradar_cli.files import make_temp_dir
from loradar_cli.lora.state import dense_key, factor_keys, head_prefix
from loradar_cli.models import weights_fingerprint
from loradar_cli.store.manifest import json_bytes
from loradar_cli.store.meta import AdapterMeta, BaseMeta, IdentifierMeta, newer_schema, peft_config, valid_name
from loradar_cli.store.pools import POOLS_DIR, PoolManifest, load_pool, pool_names, pool_path, save_pool

if TYPE_CHECKING:
    from loradar_cli.store.store import Store

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_META = "loradar.json"
BASE_WEIGHTS = "model.safetensors"
BASE_META = "base.json"
IDENTIFIER_WEIGHTS = "identifier.safetensors"
IDENTIFIER_META = "identifier.json"
M = TypeVar("M", bound=BaseModel)

POOL = "pool"
TensorCheck = Callable[[Any, Mapping[str, Tensor], Mapping[str, bytes], Path, str], None]
"""(meta, tensors, files, folder, label) -> None, raising CorruptError: what a kind checks beyond its schema."""
Link = tuple[str, tuple[str, str]]
"""(relation, (kind, name)): an entry needs that other entry as its base, parent or member."""


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


def _no_links(name: str, meta: Any) -> list[Link]:
    return []


def _adapter_links(name: str, meta: Any) -> list[Link]:
    """An adapter needs its base and every parent it was merged or trimmed from."""
    return [("base", ("base", meta.base)), *(("parent", ("adapter", p)) for p in meta.parents if p != name)]


def _identifier_links(name: str, meta: Any) -> list[Link]:
    """An identifier needs its base (if it records one) and every stored member (`:name` members are not stored)."""
    base: list[Link] = [("base", ("base", meta.base))] if meta.base else []
    return base + [("member", ("adapter", m)) for m in meta.members if not m.startswith(":")]


def _adapter_derived(meta: Any) -> dict[str, bytes]:
    """adapter_config.json follows from loradar.json, so a rename writes it again."""
    return {ADAPTER_CONFIG: json_bytes(peft_config(meta))}


class EntryKind(Protocol):
    """What `Store` asks of a kind: paths, listing, reading, renaming and discarding its entries, and their links."""

    @property
    def key(self) -> str: ...

    manifested: ClassVar[bool]  # entries carry manifest.json, so writing one first brings the store to its format

    def path(self, root: Path, name: str) -> Path: ...
    def names(self, root: Path) -> list[str]: ...
    def present(self, path: Path) -> bool: ...
    def read_meta(self, store: "Store", name: str) -> Any: ...
    def read_checked(self, store: "Store", name: str) -> Any: ...
    def links(self, name: str, meta: Any) -> list[Link]: ...
    def write_renamed(self, store: "Store", old: str, new: str, meta: Any) -> None: ...
    def discard(self, path: Path) -> None: ...


@dataclass(frozen=True)
class Kind:
    """A folder kind of store entry: where it lives, which files make it, its schema, its checks and its links."""

    key: str
    folder: str | None
    meta_file: str
    weights_file: str
    meta_model: type[BaseModel]
    check: TensorCheck
    extra_files: tuple[str, ...] = ()
    links: Callable[[str, Any], list[Link]] = _no_links
    derived: Callable[[Any], dict[str, bytes]] | None = None  # files computed from the metadata
    manifested: ClassVar[bool] = True

    @property
    def files(self) -> tuple[str, ...]:
        return (self.meta_file, *self.extra_files, self.weights_file)

    def folder_path(self, root: Path) -> Path:
        return root / self.folder if self.folder else root

    def path(self, root: Path, name: str) -> Path:
        """The entry's folder (`name` already checked)."""
        return self.folder_path(root) / name

    def names(self, root: Path) -> list[str]:
        """Entries, skipping hidden folders (temporary and aside copies), links, invalid names and reserved ones."""
        folder = self.folder_path(root)
        if folder != root and folder.is_symlink():
            return []
        try:
            children = list(folder.iterdir()) if folder.is_dir() else []
        except OSError:
            return []
        return sorted(p.name for p in children if not p.name.startswith(".") and self.present(p) and valid_name(p.name))

    def present(self, path: Path) -> bool:
        return not path.is_symlink() and (path / self.meta_file).is_file()

    def read_meta(self, store: "Store", name: str) -> Any:
        """The metadata file, checked against the entry's manifest and validated by the kind's schema."""
        data = store.read_files(self.key, name, [self.meta_file])[self.meta_file]
        return parse_meta(data, store.entry_dir(self.key, name) / self.meta_file, self.meta_model)

    def read_checked(self, store: "Store", name: str) -> Any:
        """The metadata once every file of the entry has passed its checks (hashes, schema, tensors)."""
        files = store.read_files(self.key, name, self.files)
        return check_entry_files(self.key, name, files, store.entry_dir(self.key, name))[0]

    def write_renamed(self, store: "Store", old: str, new: str, meta: Any) -> None:
        """Write the entry's files again under `new`: the name in its metadata and the derived files changed."""
        files = store.read_files(self.key, old, self.files)
        raw = json.loads(files[self.meta_file])
        raw["name"] = new
        files[self.meta_file] = json_bytes(raw)
        if self.derived is not None:
            files.update(self.derived(meta.model_copy(update={"name": new})))
        store.write_entry(self.key, new, files)

    def discard(self, path: Path) -> None:
        """Take the folder out of the store in one rename, then free its files."""
        trash = make_temp_dir(path.parent, f".rm-{path.name}-")
        os.replace(path, trash / "entry")
        shutil.rmtree(trash, ignore_errors=True)


@dataclass(frozen=True)
class PoolKind:
    """Pools, a file kind: one manifest `<root>/pools/<name>.json` naming ordinary adapters; nothing needs a pool."""

    key: str = POOL
    folder: str = POOLS_DIR
    meta_model: type[BaseModel] = PoolManifest
    manifested: ClassVar[bool] = False

    def path(self, root: Path, name: str) -> Path:
        return pool_path(root, name)

    def names(self, root: Path) -> list[str]:
        return [n for n in pool_names(root) if valid_name(n) and not pool_path(root, n).is_symlink()]

    def present(self, path: Path) -> bool:
        return not path.is_symlink() and path.is_file()

    def read_meta(self, store: "Store", name: str) -> Any:
        return load_pool(store.root, name)

    def read_checked(self, store: "Store", name: str) -> Any:
        """The manifest is the whole entry, so reading it is the whole check."""
        return load_pool(store.root, name)

    def links(self, name: str, meta: Any) -> list[Link]:
        return [("member", ("adapter", m)) for m in dict.fromkeys(meta.members)]

    def write_renamed(self, store: "Store", old: str, new: str, meta: Any) -> None:
        save_pool(store.root, meta.model_copy(update={"name": new}))

    def discard(self, path: Path) -> None:
        path.unlink()


KINDS: dict[str, Kind] = {
    "base": Kind("base", "bases", BASE_META, BASE_WEIGHTS, BaseMeta, _check_base),
    "adapter": Kind(
        "adapter",
        None,
        ADAPTER_META,
        ADAPTER_WEIGHTS,
        AdapterMeta,
        _check_adapter,
        (ADAPTER_CONFIG,),
        links=_adapter_links,
        derived=_adapter_derived,
    ),
    "identifier": Kind(
        "identifier",
        "identifiers",
        IDENTIFIER_META,
        IDENTIFIER_WEIGHTS,
        IdentifierMeta,
        _check_identifier,
        links=_identifier_links,
    ),
}
"""The folder kinds: entries with a manifest, written by `Store.write_entry` and carried by bundles."""

ENTRY_KINDS: dict[str, EntryKind] = {**KINDS, POOL: PoolKind()}
"""Every kind `rm`, `mv`, `verify`, `list` and `show` handle: the folder kinds, then pools."""


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
