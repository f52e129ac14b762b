"""Store: adapters in `<root>/<name>/` (PEFT layout + loradar.json), bases in `<root>/bases/<name>/`, attack
identifiers in `<root>/identifiers/<name>/`; every entry holds a manifest.json with the sha256 of each file.

Writes build a hidden `.tmp-<name>-*` folder and swap it into place in one atomic rename (renameat2
RENAME_EXCHANGE when replacing), under a per-entry flock, so readers see the old entry or the new one, never a
mix, and two writers of one name never both succeed. Readers skip hidden names; the next writer removes the
leftovers of killed writers (and puts back an entry a kill left aside). No path under the root that is a
symbolic link is followed. What files each kind of entry has and how their contents are checked on read is
`store/kinds.py`.
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
    IDENTIFIER_META,
    IDENTIFIER_WEIGHTS,
    KINDS,
    Adapter,
    Base,
    check_adapter_tensors,
    check_entry_files,
    check_finite,
    parse_meta,
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
from loradar_cli.store.meta import RESERVED_NAMES, AdapterMeta, BaseMeta, IdentifierMeta, Name, peft_config
from loradar_cli.store.pools import load_pool, pool_names, pool_path, save_pool

DEFAULT_STORE = Path("adapters")
LEFTOVER_PREFIXES = (".tmp-", ".old-", ".rm-")


@dataclass(frozen=True)
class Ref:
    """`source` (kind, name) needs `target` (kind, name) as its `relation` (base, parent, member)."""

    source: tuple[str, str]
    target: tuple[str, str]
    relation: str


POOL = "pool"
# Kinds `rm`, `mv`, `verify`, `list` and `show` handle: the folder kinds, and pools (a manifest of adapters).
ENTRY_KINDS: tuple[str, ...] = (*KINDS, POOL)


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

    def adapter_dir(self, name: str) -> Path:
        return self.entry_dir("adapter", name)

    def base_dir(self, name: str) -> Path:
        return self.entry_dir("base", name)

    def identifier_dir(self, name: str) -> Path:
        return self.entry_dir("identifier", name)

    def names(self, kind: str) -> list[str]:
        """Entries of a kind, skipping hidden folders (temporary and aside copies), links and invalid names."""
        self.check_root()
        if kind == POOL:
            return [n for n in pool_names(self.root) if _valid(n, POOL) and not pool_path(self.root, n).is_symlink()]
        folder = self.kind_dir(kind)
        if folder != self.root and folder.is_symlink():
            return []
        try:
            children = list(folder.iterdir()) if folder.is_dir() else []
        except OSError:
            return []
        meta_file = KINDS[kind].meta_file
        out = []
        for p in children:
            if p.name.startswith(".") or p.is_symlink() or not (p / meta_file).is_file():
                continue
            if kind == "adapter" and p.name in RESERVED_NAMES:
                continue
            try:
                check_name(p.name, kind)
            except InvalidValueError:
                continue
            out.append(p.name)
        return sorted(out)

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
        if kind == POOL:
            path = pool_path(self.root, name)
            return not path.is_symlink() and path.is_file()
        folder = self.entry_dir(kind, name)
        return not folder.is_symlink() and (folder / KINDS[kind].meta_file).is_file()

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
        self._refuse_taken(target, what, overwrite)
        self._check_no_links(what)
        claim = lock.lock_path(self.root, what, name)
        if lock.busy(claim):
            raise lock.busy_error(claim, f"{what} {name!r}")
        return target

    def _refuse_taken(self, target: Path, what: str, overwrite: bool) -> None:
        if (target.exists() or target.is_symlink()) and not overwrite:
            raise ExistsError(f"{what} {target.name!r} already exists in {self.root}", hint="pass --overwrite")

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
        if kind == POOL:
            return load_pool(self.root, name)
        spec = KINDS[kind]
        data = self.read_files(kind, name, [spec.meta_file])[spec.meta_file]
        return parse_meta(data, self.entry_dir(kind, name) / spec.meta_file, spec.meta_model)

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
        """Every link between entries: adapters on their base and parents, identifiers on members and base."""
        refs: list[Ref] = []
        for name in self.names("adapter"):
            meta = self._quiet_meta("adapter", name)
            if meta is None:
                continue
            refs.append(Ref(("adapter", name), ("base", meta.base), "base"))
            refs.extend(Ref(("adapter", name), ("adapter", p), "parent") for p in meta.parents if p != name)
        for name in self.names("identifier"):
            meta = self._quiet_meta("identifier", name)
            if meta is None:
                continue
            if meta.base:
                refs.append(Ref(("identifier", name), ("base", meta.base), "base"))
            members = [m for m in meta.members if not m.startswith(":")]
            refs.extend(Ref(("identifier", name), ("adapter", m), "member") for m in members)
        for name in self.names(POOL):
            pool = self._quiet_meta(POOL, name)
            if pool is not None:
                refs.extend(Ref((POOL, name), ("adapter", m), "member") for m in dict.fromkeys(pool.members))
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
        if kind == POOL:  # nothing refers to a pool: its members are ordinary adapters and stay
            with self._claimed(kind, name, f"pool {name!r}"):
                pool_path(self.root, name).unlink()
            return []
        folder = self.entry_dir(kind, name)
        self._ensure_format()
        with self._claimed(kind, name, f"{kind} {name!r}"):
            broken = _refuse_dependents(self.dependents(kind, name), force, f"remove {kind} {name!r}")
            trash = make_temp_dir(folder.parent, f".rm-{name}-")
            os.replace(folder, trash / "entry")
            shutil.rmtree(trash, ignore_errors=True)
        return broken

    def rename(self, kind: str, old: str, new: str, *, force: bool = False) -> list[Ref]:
        """Rename an entry (its metadata and manifest rewritten under the new name); refuse to break dependents."""
        if old == new:
            raise InvalidValueError(f"{kind} {old!r} already has that name")
        if kind == POOL:
            self._rename_pool(old, new)
            return []
        target = self.entry_dir(kind, new)
        meta, _ = self._load(kind, old)
        self._ensure_format()
        with self._claimed(kind, old, f"{kind} {old!r}"), self._claimed(kind, new, f"{kind} {new!r}"):
            self._refuse_taken(target, kind, False)
            broken = _refuse_dependents(self.dependents(kind, old), force, f"rename {kind} {old!r}")
            spec = KINDS[kind]
            files = self.read_files(kind, old, spec.files)
            raw = json.loads(files[spec.meta_file])
            raw["name"] = new
            files[spec.meta_file] = json_bytes(raw)
            if kind == "adapter":
                files[ADAPTER_CONFIG] = json_bytes(peft_config(meta.model_copy(update={"name": new})))
            self._install(kind, new, files, overwrite=False)
            trash = make_temp_dir(self.kind_dir(kind), f".rm-{old}-")
            os.replace(self.entry_dir(kind, old), trash / "entry")
            shutil.rmtree(trash, ignore_errors=True)
        return broken

    def _rename_pool(self, old: str, new: str) -> None:
        """Write the manifest under the new name, then remove the old one (a crash leaves both, never neither)."""
        manifest = load_pool(self.root, old)
        check_name(new, POOL)
        with self._claimed(POOL, old, f"pool {old!r}"), self._claimed(POOL, new, f"pool {new!r}"):
            save_pool(self.root, manifest.model_copy(update={"name": new}))
            pool_path(self.root, old).unlink()

    # ------------------------------------------------------------------ atomic write
    def write_entry(self, kind: str, name: str, files: Mapping[str, bytes], *, overwrite: bool = False) -> Path:
        """Write an entry from file contents (a manifest is added): all of it appears at once, or none of it."""
        target = self.entry_dir(kind, name)
        self._refuse_taken(target, kind, overwrite)
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
        self._refuse_taken(target, kind, overwrite)
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
            if owner_kind is None or name is None or (owner_kind != "store" and not _valid(name, owner_kind)):
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


def _valid(name: str, kind: str) -> bool:
    try:
        check_name(name, kind)
    except InvalidValueError:
        return False
    return True


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
