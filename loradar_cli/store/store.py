"""Store: adapters in `<root>/<name>/` (PEFT layout + loradar.json), bases in `<root>/bases/<name>/`, attack
identifiers in `<root>/identifiers/<name>/`; every entry holds a manifest.json with the sha256 of each file.
Pools (`<root>/pools/<name>.json`, a list of adapters) are a kind too, one file each, with no manifest.

Writes build a hidden `.tmp-<name>-*` folder and swap it into place in one atomic rename (renameat2
RENAME_EXCHANGE when replacing), under a per-entry flock, so readers see the old entry or the new one, never a
mix, and two writers of one name never both succeed. Readers skip hidden names; the next writer removes the
leftovers of killed writers (and puts back an entry a kill left aside). No path under the root that is a
symbolic link is followed. What files each kind of entry has, how their contents are checked on read, and how
each kind is listed, read, renamed and discarded is `store/kinds.py`: `Store` asks the kind, never tests for one.
"""

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from torch import Tensor

from loradar_cli.errors import (
    CorruptError,
    ExistsError,
    IncompatibleError,
    InvalidValueError,
    NotFoundError,
    validation_message,
)
from loradar_cli.files import dir_mode, exchange, make_temp_dir, read_file, write_new_file
from loradar_cli.models import weights_fingerprint
from loradar_cli.store import lock
from loradar_cli.store.kinds import (
    ADAPTER_CONFIG,
    ADAPTER_META,
    ADAPTER_WEIGHTS,
    BASE_META,
    BASE_WEIGHTS,
    ENTRY_KINDS,
    IDENTIFIER_META,
    IDENTIFIER_WEIGHTS,
    KINDS,
    Adapter,
    Base,
    check_adapter_tensors,
    check_entry_files,
    check_finite,
    tensor_bytes,
)
from loradar_cli.store.manifest import (
    MANIFEST,
    STORE_FORMAT,
    STORE_MARKER,
    check_format,
    check_hash,
    json_bytes,
    manifest_bytes,
    parse_manifest,
)
from loradar_cli.store.meta import AdapterMeta, BaseMeta, IdentifierMeta, check_name, peft_config, valid_name

DEFAULT_STORE = Path("adapters")
LEFTOVER_PREFIXES = (".tmp-", ".old-", ".rm-")


@dataclass(frozen=True)
class Ref:
    """`source` (kind, name) needs `target` (kind, name) as its `relation` (base, parent, member)."""

    source: tuple[str, str]
    target: tuple[str, str]
    relation: str


def default_root() -> Path:
    return Path(os.environ.get("LORADAR_STORE", DEFAULT_STORE))


def leftover_name(entry: str) -> str | None:
    """The entry name inside a `.tmp-<name>-XXXXXXXX` / `.old-` / `.rm-` folder name, else None."""
    for prefix in LEFTOVER_PREFIXES:
        if entry.startswith(prefix):
            name, dash, _ = entry[len(prefix) :].rpartition("-")
            return name if dash and name else None
    return None


class Store:
    """Bases, adapters and identifiers under one root folder."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        for folder in (self.root, *self.root.parents):  # the nearest existing path must be a folder
            if folder.exists():
                if not folder.is_dir():
                    inside = "" if folder == self.root else f" ({folder} is not a folder)"
                    raise InvalidValueError(f"store {self.root} is not a folder{inside}")
                break

    # ------------------------------------------------------------------ paths and listing
    def kind_dir(self, kind: str) -> Path:
        folder = KINDS[kind].folder
        return self.root / folder if folder else self.root

    def entry_dir(self, kind: str, name: str) -> Path:
        return self.kind_dir(kind) / check_name(name, kind)

    def entry_path(self, kind: str, name: str) -> Path:
        """Where an entry of any kind lives: a folder kind's folder, a pool's manifest file."""
        return ENTRY_KINDS[kind].path(self.root, check_name(name, kind))

    def adapter_dir(self, name: str) -> Path:
        return self.entry_dir("adapter", name)

    def base_dir(self, name: str) -> Path:
        return self.entry_dir("base", name)

    def identifier_dir(self, name: str) -> Path:
        return self.entry_dir("identifier", name)

    def names(self, kind: str) -> list[str]:
        """Entries of a kind, skipping hidden folders (temporary and aside copies), links and invalid names."""
        self.check_root()
        return ENTRY_KINDS[kind].names(self.root)

    def check_root(self) -> None:
        """A store root that exists must be a folder (a missing one is an empty store)."""
        if self.root.exists() and not self.root.is_dir():
            raise InvalidValueError(f"store {self.root} is not a folder")

    def adapter_names(self) -> list[str]:
        return self.names("adapter")

    def base_names(self) -> list[str]:
        return self.names("base")

    def identifier_names(self) -> list[str]:
        return self.names("identifier")

    def has(self, kind: str, name: str) -> bool:
        return ENTRY_KINDS[kind].present(self.entry_path(kind, name))

    def has_adapter(self, name: str) -> bool:
        return self.has("adapter", name)

    def has_base(self, name: str) -> bool:
        return self.has("base", name)

    def resolve_kind(self, name: str, kind: str | None = None) -> str:
        """The kind of the entry called `name`: `kind` if given, else the only kind holding that name."""
        if kind is not None:
            if kind not in ENTRY_KINDS:
                raise InvalidValueError(f"unknown kind {kind!r}; valid: {', '.join(ENTRY_KINDS)}")
            return kind
        kinds = self.kinds_of(name)
        if not kinds:
            every = sorted({n for k in ENTRY_KINDS for n in self.names(k)})
            raise NotFoundError(f"no entry {name!r} in {self.root}", hint=_suggest(name, every))
        if len(kinds) > 1:
            raise InvalidValueError(f"{name!r} names a {' and a '.join(kinds)}; pass --kind")
        return kinds[0]

    def kinds_of(self, name: str) -> list[str]:
        """Every kind that has an entry called `name` (names are unique per kind only)."""
        out = []
        for kind in ENTRY_KINDS:
            try:
                if self.has(kind, name):
                    out.append(kind)
            except InvalidValueError:
                continue
        return out

    def check_free(self, what: str, name: str, overwrite: bool = False) -> Path:
        """The folder a new base, adapter or identifier will be written to: a valid name, free unless `overwrite`.

        Commands call this before any work, so a taken name (or one another process is writing now) fails at
        once rather than after training. It changes nothing on disk: the write itself claims the name.
        """
        target = self.entry_dir(what, name)
        self._refuse_taken(what, name, overwrite)
        self._check_no_links(what)
        claim = lock.lock_path(self.root, what, name)
        if lock.busy(claim):
            raise lock.busy_error(claim, f"{what} {name!r}")
        return target

    def _refuse_taken(self, what: str, name: str, overwrite: bool) -> None:
        target = self.entry_path(what, name)
        if (target.exists() or target.is_symlink()) and not overwrite:
            raise ExistsError(f"{what} {name!r} already exists in {self.root}", hint="pass --overwrite")

    def _check_no_links(self, kind: str) -> None:
        folder = self.kind_dir(kind)
        if folder != self.root and folder.is_symlink():
            raise CorruptError(f"{folder} is a symbolic link; the store never follows links out of its root")

    # ------------------------------------------------------------------ store format
    def store_format(self) -> int:
        """1 for a store written by loradar 0.1 (or empty), else the format in loradar-store.json."""
        marker = self.root / STORE_MARKER
        if not marker.is_file() or marker.is_symlink():
            return 1
        try:
            doc = json.loads(read_file(marker))
        except (OSError, ValueError):
            raise CorruptError(f"{marker} is not readable JSON") from None
        return check_format(doc.get("format") if isinstance(doc, dict) else None, f"store {self.root}")

    def _ensure_format(self) -> None:
        """Before a write: create the root, and migrate a format-1 store by giving each intact entry a manifest."""
        if not self.root.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            os.chmod(self.root, dir_mode())
        elif not self.root.is_dir():
            raise InvalidValueError(f"store {self.root} is not a folder")
        if self.store_format() >= STORE_FORMAT:
            return
        marker_lock = lock.lock_path(self.root, "store", "format")
        lock.try_claim(marker_lock, timeout=None)  # concurrent first writers wait for one migration, then proceed
        try:
            if self.store_format() >= STORE_FORMAT:
                return
            for kind in KINDS:
                for name in self.names(kind):
                    self._migrate_entry(kind, name)
            marker = self.root / STORE_MARKER
            tmp = marker.with_name(f".tmp-{STORE_MARKER}-{os.getpid()}")
            tmp.unlink(missing_ok=True)
            write_new_file(tmp, json_bytes({"format": STORE_FORMAT}))
            os.replace(tmp, marker)
        finally:
            lock.release(marker_lock)

    def _migrate_entry(self, kind: str, name: str) -> None:
        """Add manifest.json to a format-1 entry whose legacy checks pass (a damaged one is left for verify)."""
        folder = self.entry_dir(kind, name)
        if (folder / MANIFEST).exists():
            return
        try:
            self._load(kind, name, legacy=True)
            files = {f: read_file(folder / f) for f in KINDS[kind].files}
        except (CorruptError, IncompatibleError, OSError):
            return
        with self._claimed(kind, name, f"{kind} {name!r}"):  # keeps `verify --fix` off the file being written
            tmp = folder / f".tmp-{MANIFEST}-{os.getpid()}"
            tmp.unlink(missing_ok=True)
            write_new_file(tmp, manifest_bytes(kind, name, files))
            os.replace(tmp, folder / MANIFEST)

    # ------------------------------------------------------------------ reading
    def read_files(self, kind: str, name: str, filenames: Iterable[str], *, legacy: bool = False) -> dict[str, bytes]:
        """Bytes of an entry's files, each checked against the entry's manifest (format-1 entries: unchecked)."""
        folder = self.entry_dir(kind, name)
        self.check_root()
        self._check_no_links(kind)
        if folder.is_symlink():
            raise CorruptError(f"{folder} is a symbolic link; the store never follows links out of its root")
        if not (folder / KINDS[kind].meta_file).is_file():
            raise NotFoundError(f"no {kind} {name!r} in {self.root}", hint=_suggest(name, self.names(kind)))
        hashes = self._manifest(kind, name, legacy=legacy)
        out: dict[str, bytes] = {}
        for filename in filenames:
            path = folder / filename
            try:
                data = read_file(path)
            except FileNotFoundError:
                raise CorruptError(f"{path} is missing") from None
            except OSError as err:
                raise CorruptError(f"cannot read {path}: {err.strerror or type(err).__name__}") from None
            out[filename] = data if hashes is None else check_hash(data, hashes.get(filename), path)
        return out

    def _manifest(self, kind: str, name: str, *, legacy: bool = False) -> dict[str, str] | None:
        path = self.entry_dir(kind, name) / MANIFEST
        try:
            data = read_file(path)
        except FileNotFoundError:
            if legacy or self.store_format() < STORE_FORMAT:
                return None
            raise CorruptError(f"{kind} {name!r} has no {MANIFEST}; its files cannot be checked") from None
        except OSError as err:
            raise CorruptError(f"cannot read {path}: {err.strerror or type(err).__name__}") from None
        return parse_manifest(data, path, kind, name)

    def meta(self, kind: str, name: str) -> Any:
        """The validated metadata of an entry of any kind (its file checked against the manifest); a pool's manifest."""
        return ENTRY_KINDS[kind].read_meta(self, name)

    def _load(self, kind: str, name: str, *, legacy: bool = False) -> tuple[Any, dict[str, Any]]:
        """Metadata and tensors of an entry, fully checked: hashes, schema, tensors, config agreement."""
        files = self.read_files(kind, name, KINDS[kind].files, legacy=legacy)
        return check_entry_files(kind, name, files, self.entry_dir(kind, name))

    # ------------------------------------------------------------------ bases
    def save_base(self, meta: BaseMeta, state: Mapping[str, Tensor], *, overwrite: bool = False) -> Path:
        meta = meta.model_copy(update={"fingerprint": weights_fingerprint(state)})
        files = {BASE_META: json_bytes(meta.model_dump(mode="json")), BASE_WEIGHTS: tensor_bytes(state)}
        return self.write_entry("base", meta.name, files, overwrite=overwrite)

    def base_meta(self, name: str) -> BaseMeta:
        return self.meta("base", name)

    def load_base(self, name: str) -> Base:
        meta, state = self._load("base", name)
        return Base(meta, state)

    # ------------------------------------------------------------------ adapters
    def save_adapter(self, meta: AdapterMeta, tensors: Mapping[str, Tensor], *, overwrite: bool = False) -> Path:
        meta = meta.model_copy(update={"tensors_sha256": weights_fingerprint(tensors)})
        check_adapter_tensors(meta, tensors, f"adapter {meta.name!r}")
        files = {
            ADAPTER_META: json_bytes(meta.model_dump(mode="json")),
            ADAPTER_CONFIG: json_bytes(peft_config(meta)),
            ADAPTER_WEIGHTS: tensor_bytes(tensors),
        }
        return self.write_entry("adapter", meta.name, files, overwrite=overwrite)

    def adapter_meta(self, name: str) -> AdapterMeta:
        return self.meta("adapter", name)

    def load_adapter(self, name: str) -> Adapter:
        meta, tensors = self._load("adapter", name)
        return Adapter(meta, tensors)

    def delete_adapter(self, name: str) -> None:
        self.remove("adapter", name, force=True)

    # ------------------------------------------------------------------ attack identifiers
    def save_identifier(
        self, name: str, meta: Mapping[str, Any], tensors: Mapping[str, Tensor], *, overwrite: bool = False
    ) -> Path:
        """Write `<root>/identifiers/<name>/` (JSON metadata + safetensors weights) atomically."""
        raw = {"name": name, **dict(meta)}
        try:
            checked = IdentifierMeta.model_validate(raw)
        except ValidationError as err:
            raise InvalidValueError(
                f"identifier {name!r}: {validation_message(err, first=True, values=False)}"
            ) from None
        if checked.name != name:
            raise InvalidValueError(f"identifier metadata names {checked.name!r}, not {name!r}")
        check_finite(tensors, f"identifier {name!r}")
        files = {IDENTIFIER_META: json_bytes(raw), IDENTIFIER_WEIGHTS: tensor_bytes(tensors)}
        return self.write_entry("identifier", name, files, overwrite=overwrite)

    def identifier_meta(self, name: str) -> IdentifierMeta:
        return self.meta("identifier", name)

    def load_identifier(self, name: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The JSON metadata (as stored, every field kept) and tensors of an identifier, fully checked."""
        files = self.read_files("identifier", name, KINDS["identifier"].files)
        _, tensors = check_entry_files("identifier", name, files, self.identifier_dir(name))
        return json.loads(files[IDENTIFIER_META]), tensors

    # ------------------------------------------------------------------ dependencies
    def references(self) -> list[Ref]:
        """Every link between entries, as each kind reads them from its entries' metadata (unreadable ones skipped)."""
        refs: list[Ref] = []
        for kind, spec in ENTRY_KINDS.items():
            for name in self.names(kind):
                meta = self._quiet_meta(kind, name)
                if meta is not None:
                    refs.extend(Ref((kind, name), target, relation) for relation, target in spec.links(name, meta))
        return refs

    def dependents(self, kind: str, name: str) -> list[Ref]:
        return [r for r in self.references() if r.target == (kind, name)]

    def _quiet_meta(self, kind: str, name: str) -> Any:
        try:
            return self.meta(kind, name)
        except (CorruptError, IncompatibleError, NotFoundError):
            return None

    # ------------------------------------------------------------------ remove and rename
    def remove(self, kind: str, name: str, *, force: bool = False) -> list[Ref]:
        """Delete an entry in one rename (then free its files); refuse while others depend on it unless `force`.

        Returns the links it broke (empty unless forced).
        """
        if not self.has(kind, name):
            raise NotFoundError(f"no {kind} {name!r} in {self.root}", hint=_suggest(name, self.names(kind)))
        spec = ENTRY_KINDS[kind]
        if spec.manifested:
            self._ensure_format()
        with self._claimed(kind, name, f"{kind} {name!r}"):
            broken = _refuse_dependents(self.dependents(kind, name), force, f"remove {kind} {name!r}")
            spec.discard(self.entry_path(kind, name))
        return broken

    def rename(self, kind: str, old: str, new: str, *, force: bool = False) -> list[Ref]:
        """Rename an entry (its metadata and manifest rewritten under the new name); refuse to break dependents."""
        if old == new:
            raise InvalidValueError(f"{kind} {old!r} already has that name")
        spec = ENTRY_KINDS[kind]
        check_name(new, kind)
        meta = spec.read_checked(self, old)
        if spec.manifested:
            self._ensure_format()
        with self._claimed(kind, old, f"{kind} {old!r}"), self._claimed(kind, new, f"{kind} {new!r}"):
            self._refuse_taken(kind, new, False)
            broken = _refuse_dependents(self.dependents(kind, old), force, f"rename {kind} {old!r}")
            spec.write_renamed(self, old, new, meta)  # the new entry is whole before the old one goes:
            spec.discard(self.entry_path(kind, old))  # a crash between leaves both, never neither
        return broken

    # ------------------------------------------------------------------ atomic write
    def write_entry(self, kind: str, name: str, files: Mapping[str, bytes], *, overwrite: bool = False) -> Path:
        """Write an entry from file contents (a manifest is added): all of it appears at once, or none of it."""
        self._refuse_taken(kind, name, overwrite)
        self._ensure_format()
        self._check_no_links(kind)
        with self._claimed(kind, name, f"{kind} {name!r}"):
            return self._install(kind, name, files, overwrite=overwrite)

    def _install(self, kind: str, name: str, files: Mapping[str, bytes], *, overwrite: bool) -> Path:
        """Stage the files in a hidden folder and rename it into place (the caller holds the entry's claim)."""
        target = self.entry_dir(kind, name)
        parent = target.parent
        if not parent.exists():
            parent.mkdir(parents=True, exist_ok=True)
            os.chmod(parent, dir_mode())
        self.clean_leftovers(kind)
        self._refuse_taken(kind, name, overwrite)
        if target.is_symlink():
            raise CorruptError(f"{target} is a symbolic link; the store never follows links out of its root")
        tmp = make_temp_dir(parent, f".tmp-{name}-")
        try:
            for filename, data in files.items():
                write_new_file(tmp / filename, data)
            write_new_file(tmp / MANIFEST, manifest_bytes(kind, name, files))
            _fsync_dir(tmp)
            if not target.exists():
                os.rename(tmp, target)
            elif not exchange(tmp, target):
                aside = make_temp_dir(parent, f".old-{name}-")
                os.replace(target, aside / "entry")  # a kill here leaves it aside; the next writer puts it back
                os.rename(tmp, target)
                tmp = aside
            _fsync_dir(parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def leftovers(self, kind: str | None = None) -> list[Path]:
        """Hidden `.tmp-`/`.old-`/`.rm-` folders and files that killed writers left behind."""
        out: list[Path] = []
        folders = {self.kind_dir(k) for k in ([kind] if kind else KINDS)}
        for folder in sorted(folders):
            if not folder.is_dir() or (folder != self.root and folder.is_symlink()):
                continue
            out.extend(sorted(p for p in folder.iterdir() if p.name.startswith(LEFTOVER_PREFIXES)))
        for k in [kind] if kind else list(KINDS):
            for name in self.names(k):
                entry = self.entry_dir(k, name)
                out.extend(sorted(p for p in entry.iterdir() if p.name.startswith(LEFTOVER_PREFIXES)))
        return out

    def clean_leftovers(self, kind: str | None = None) -> list[Path]:
        """Remove leftovers no live writer owns (an aside copy whose entry is gone is put back); returns them."""
        cleaned = []
        for path in self.leftovers(kind):
            owner_kind = self._kind_of_folder(path.parent)
            name = leftover_name(path.name)
            if path.parent == self.root and name == STORE_MARKER:
                owner_kind, name = "store", "format"
            elif owner_kind is None:  # inside an entry: a manifest or marker file being replaced
                owner_kind, name = self._kind_of_folder(path.parent.parent), path.parent.name
            if owner_kind is None or name is None or (owner_kind != "store" and not valid_name(name)):
                continue
            claim_path = lock.lock_path(self.root, owner_kind, name)
            mine = lock.held(claim_path)
            if not mine and not lock.try_claim(claim_path):
                continue  # a live writer is using it
            try:
                saved = path / "entry"
                if path.name.startswith(".old-") and saved.is_dir() and not self.entry_dir(owner_kind, name).exists():
                    os.rename(saved, self.entry_dir(owner_kind, name))
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                cleaned.append(path)
            finally:
                if not mine:
                    lock.release(claim_path)
        return cleaned

    def _kind_of_folder(self, folder: Path) -> str | None:
        for key in KINDS:
            if self.kind_dir(key) == folder:
                return key
        return None

    @contextmanager
    def _claimed(self, kind: str, name: str, what: str) -> Iterator[None]:
        path = lock.lock_path(self.root, kind, name)
        mine = lock.held(path)
        lock.claim(path, what)
        try:
            yield
        finally:
            if not mine:
                lock.release(path)


def _refuse_dependents(refs: list[Ref], force: bool, action: str) -> list[Ref]:
    if refs and not force:
        raise IncompatibleError(
            f"cannot {action}: {describe_refs(refs)}", hint="pass --force to do it anyway and orphan them"
        )
    return refs


def describe_refs(refs: Iterable[Ref]) -> str:
    """'adapter 'm' uses it as parent, identifier 'w' uses it as member'."""
    return ", ".join(f"{r.source[0]} {r.source[1]!r} uses it as {r.relation}" for r in refs)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _suggest(name: str, names: list[str]) -> str | None:
    import difflib

    close = difflib.get_close_matches(name, names, n=3)
    if close:
        return f"did you mean {', '.join(close)}?"
    return f"available: {', '.join(names[:8])}" if names else "the store is empty"
