"""Bundles: one tar or zip holding store entries, a manifest with the sha256 of every file, and the bases'
fingerprints; importing checks all of it before any entry becomes visible in the store.

Layout inside the archive: `loradar-bundle.json`, then `<bases|adapters|identifiers>/<name>/<file>` with each
entry's files exactly as stored (manifest.json included), so an export/import round trip is byte-identical.
"""

import io
import json
import stat
import tarfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loradar_cli import __version__
from loradar_cli.errors import CorruptError, ExistsError, IncompatibleError, InvalidValueError, NotFoundError
from loradar_cli.files import atomic_path
from loradar_cli.store.manifest import MANIFEST, STORE_FORMAT, check_format, json_bytes, manifest_bytes, sha256
from loradar_cli.store.meta import now
from loradar_cli.store.store import KINDS, Store, check_entry_files, check_name

BUNDLE_MANIFEST = "loradar-bundle.json"
FOLDERS = {"base": "bases", "adapter": "adapters", "identifier": "identifiers"}
MAX_MEMBER_BYTES = 8 << 30
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")


@dataclass(frozen=True)
class BundleEntry:
    """One entry read from a bundle: its kind, name, files (manifest.json excluded) and parsed metadata."""

    kind: str
    name: str
    files: dict[str, bytes]
    meta: Any


# ---------------------------------------------------------------------------------------------------- export
def write_bundle(store: Store, entries: Sequence[tuple[str, str]], out: Path) -> dict[str, Any]:
    """Write the given (kind, name) entries, each fully checked first, to a tar or zip at `out`; returns its manifest."""
    if not out.name.endswith(ARCHIVE_SUFFIXES):
        raise InvalidValueError(f"--out must end in {', '.join(ARCHIVE_SUFFIXES)}, got {out.name!r}")
    files: dict[str, bytes] = {}
    bases: dict[str, str] = {}
    for kind, name in entries:
        store._load(kind, name)  # schema, hashes, finite tensors, config agreement: never export a damaged entry
        content = store.read_files(kind, name, KINDS[kind].files)
        content[MANIFEST] = manifest_bytes(kind, name, content)
        for filename, data in content.items():
            files[f"{FOLDERS[kind]}/{name}/{filename}"] = data
        meta = store.meta(kind, name)
        if kind == "base":
            bases[name] = meta.fingerprint
        elif getattr(meta, "base", None) and getattr(meta, "base_fingerprint", None):
            bases.setdefault(meta.base, meta.base_fingerprint)
    manifest = {
        "format": STORE_FORMAT,
        "loradar_version": __version__,
        "created_at": now().isoformat(),
        "entries": [{"kind": k, "name": n} for k, n in entries],
        "includes_bases": sorted(n for k, n in entries if k == "base"),
        "bases": bases,
        "files": {path: sha256(data) for path, data in sorted(files.items())},
    }
    members = {BUNDLE_MANIFEST: json_bytes(manifest), **files}
    with atomic_path(out) as tmp:
        _write_archive(tmp, out.name, members)
    return manifest


def _write_archive(path: Path, name: str, members: Mapping[str, bytes]) -> None:
    """A deterministic archive (fixed times, owners and modes) so equal contents give equal bundles."""
    if name.endswith(".zip"):
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for member, data in members.items():
                info = zipfile.ZipInfo(member, date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, data)
        return
    mode = "w:gz" if name.endswith((".tar.gz", ".tgz")) else "w"
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as archive:
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            archive.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------------------------------------------- import
def read_bundle(path: Path) -> tuple[dict[str, Any], list[BundleEntry]]:
    """The bundle's manifest and entries, after checking every member's path and sha256 and every entry."""
    members = _read_archive(path)
    if BUNDLE_MANIFEST not in members:
        raise CorruptError(f"{path} has no {BUNDLE_MANIFEST}; it is not a loradar bundle")
    try:
        manifest = json.loads(members.pop(BUNDLE_MANIFEST))
    except ValueError:
        raise CorruptError(f"{path}: {BUNDLE_MANIFEST} is not JSON") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CorruptError(f"{path}: {BUNDLE_MANIFEST} has no 'files' table")
    check_format(manifest.get("format"), f"bundle {path}")
    listed: dict[str, Any] = manifest["files"]
    unlisted = sorted(set(members) - set(listed))
    missing = sorted(set(listed) - set(members))
    if unlisted or missing:
        raise CorruptError(
            f"{path}: members do not match its manifest (unlisted {unlisted[:3]}, missing {missing[:3]})"
        )
    for member, data in members.items():
        if sha256(data) != listed[member]:
            raise CorruptError(f"{path}: {member} does not match its sha256 in {BUNDLE_MANIFEST}")
    grouped: dict[tuple[str, str], dict[str, bytes]] = {}
    for member, data in members.items():
        folder, name, filename = member.split("/")
        kind = next(k for k, f in FOLDERS.items() if f == folder)
        grouped.setdefault((kind, name), {})[filename] = data
    entries = []
    for (kind, name), files in grouped.items():
        stored_manifest = files.pop(MANIFEST, None)
        if stored_manifest != manifest_bytes(kind, name, files):
            raise CorruptError(f"{path}: {FOLDERS[kind]}/{name}/{MANIFEST} does not match the entry's files")
        extra = sorted(set(files) - set(KINDS[kind].files))
        if extra:
            raise CorruptError(f"{path}: {FOLDERS[kind]}/{name} holds unexpected files {extra}")
        meta, _ = check_entry_files(kind, name, files, path / FOLDERS[kind] / name)
        entries.append(BundleEntry(kind, name, files, meta))
    entries.sort(key=lambda e: (list(KINDS).index(e.kind), e.name))  # bases first
    return manifest, entries


def _read_archive(path: Path) -> dict[str, bytes]:
    """Every regular-file member of a tar or zip, refusing links, devices, duplicates and unsafe paths."""
    if not path.is_file():
        raise NotFoundError(f"bundle {path} does not exist")
    members: dict[str, bytes] = {}
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    kind = stat.S_IFMT(info.external_attr >> 16)
                    if info.is_dir():
                        _safe_member(info.filename.rstrip("/"), path, directory=True)
                        continue
                    if kind not in (0, stat.S_IFREG):
                        raise CorruptError(f"{path}: member {info.filename!r} is not a regular file")
                    _add(members, _safe_member(info.filename, path), _limited(archive.open(info), info.file_size, path))
            return members
        with tarfile.open(path, "r:*") as archive:
            for info in archive:
                if info.isdir():
                    _safe_member(info.name.rstrip("/"), path, directory=True)
                    continue
                if not info.isfile():
                    raise CorruptError(f"{path}: member {info.name!r} is a link or special file; refused")
                handle = archive.extractfile(info)
                if handle is None:
                    raise CorruptError(f"{path}: member {info.name!r} cannot be read")
                _add(members, _safe_member(info.name, path), _limited(handle, info.size, path))
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise CorruptError(f"{path} is not a readable tar or zip bundle ({type(err).__name__})") from None
    return members


def _limited(handle: Any, declared: int, path: Path) -> bytes:
    if declared > MAX_MEMBER_BYTES:
        raise CorruptError(f"{path}: a member declares {declared} bytes, more than a bundle member may hold")
    data = handle.read(MAX_MEMBER_BYTES + 1)
    if len(data) > MAX_MEMBER_BYTES:
        raise CorruptError(f"{path}: a member is larger than a bundle member may be")
    return data


def _add(members: dict[str, bytes], name: str, data: bytes) -> None:
    if name in members:
        raise CorruptError(f"bundle holds {name!r} twice")
    members[name] = data


def _safe_member(name: str, path: Path, *, directory: bool = False) -> str:
    """A member path that stays inside its entry folder: `loradar-bundle.json` or `<kind folder>/<name>/<file>`."""
    parts = name.split("/")
    unsafe = name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts)
    if not unsafe and directory and len(parts) <= 2 and parts[0] in FOLDERS.values():
        return name
    if not unsafe and parts == [BUNDLE_MANIFEST]:
        return name
    if not unsafe and len(parts) == 3 and parts[0] in FOLDERS.values():
        kind = next(k for k, f in FOLDERS.items() if f == parts[0])
        try:
            check_name(parts[1], kind)
        except InvalidValueError:
            unsafe = True
        if not unsafe and parts[2] in (*KINDS[kind].files, MANIFEST):
            return name
    raise CorruptError(f"{path}: member {name!r} would land outside its entry folder; refused")


def check_bases(store: Store, manifest: Mapping[str, Any], entries: Iterable[BundleEntry]) -> None:
    """Every adapter and identifier must find its exact base weights in the bundle or already in the store."""
    bundled = {e.name: e.meta.fingerprint for e in entries if e.kind == "base"}
    for entry in entries:
        if entry.kind == "base":
            if store.has("base", entry.name) and store.base_meta(entry.name).fingerprint != entry.meta.fingerprint:
                raise IncompatibleError(
                    f"bundle base {entry.name!r} has other weights than this store's base {entry.name!r}"
                )
            continue
        base, fingerprint = getattr(entry.meta, "base", None), getattr(entry.meta, "base_fingerprint", None)
        if not base or not fingerprint:
            continue
        if manifest.get("bases", {}).get(base) not in (None, fingerprint):
            raise CorruptError(f"bundle manifest and {entry.kind} {entry.name!r} disagree on base {base!r}")
        found = bundled.get(base) or (store.base_meta(base).fingerprint if store.has("base", base) else None)
        if found is None:
            raise IncompatibleError(
                f"{entry.kind} {entry.name!r} needs base {base!r} (sha256 {fingerprint[:12]}), "
                "which is neither in the bundle nor in the store",
                hint="import the base first or export without --no-base",
            )
        if found != fingerprint:
            raise IncompatibleError(
                f"{entry.kind} {entry.name!r} was trained on base {base!r} with sha256 {fingerprint[:12]}, "
                f"but the base {base!r} here has sha256 {found[:12]}"
            )


def install_bundle(store: Store, entries: Sequence[BundleEntry], *, overwrite: bool = False) -> tuple[list, list]:
    """Write checked entries (identical ones already present are skipped); refuses taken names before writing."""
    todo, skipped = [], []
    for e in entries:
        if not store.has(e.kind, e.name):
            todo.append(e)
            continue
        same = e.kind == "base" and store.base_meta(e.name).fingerprint == e.meta.fingerprint
        if not same:
            try:
                same = store.read_files(e.kind, e.name, KINDS[e.kind].files) == e.files
            except (CorruptError, IncompatibleError):
                same = False
        if same:
            skipped.append(f"{e.kind} {e.name}")
        elif overwrite and e.kind != "base":
            todo.append(e)
        else:
            raise ExistsError(f"{e.kind} {e.name!r} already exists in {store.root} with other contents")
    for e in todo:
        store.write_entry(e.kind, e.name, e.files, overwrite=overwrite)
    return [f"{e.kind} {e.name}" for e in todo], skipped
