"""Per-entry manifests: the sha256 of every file of a store entry, and the store's format version.

Format 1 (loradar 0.1) hashed only the tensors, inside the metadata; format 2 adds `manifest.json` to every
entry, so metadata, PEFT config and tensors are all covered, and `loradar-store.json` at the root marks a
store whose entries must all carry one.
"""

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loradar_cli.errors import CorruptError, IncompatibleError

STORE_FORMAT = 2
MANIFEST = "manifest.json"
STORE_MARKER = "loradar-store.json"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def json_bytes(data: object) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode()


def manifest_bytes(kind: str, name: str, files: Mapping[str, bytes]) -> bytes:
    """manifest.json for an entry holding `files` (name -> content)."""
    hashes = {filename: sha256(data) for filename, data in sorted(files.items())}
    return json_bytes({"format": STORE_FORMAT, "kind": kind, "name": name, "files": hashes})


def check_format(found: Any, where: str) -> int:
    """A format number this code reads, or a clear error naming the version found."""
    if not isinstance(found, int) or isinstance(found, bool) or found < 1:
        raise CorruptError(f"{where}: invalid format version {found!r}")
    if found > STORE_FORMAT:
        raise IncompatibleError(
            f"{where} was written by a newer loradar (store format {found}; this one reads up to {STORE_FORMAT})",
            hint="upgrade loradar",
        )
    return found


def parse_manifest(data: bytes, path: Path, kind: str, name: str) -> dict[str, str]:
    """filename -> sha256 from manifest.json bytes, checked for format, kind and name."""
    try:
        doc = json.loads(data)
    except ValueError:
        raise CorruptError(f"{path} is not JSON") from None
    if not isinstance(doc, dict):
        raise CorruptError(f"{path} is not a manifest")
    check_format(doc.get("format"), str(path))
    files = doc.get("files")
    if doc.get("kind") != kind or doc.get("name") != name:
        raise CorruptError(f"{path} describes {doc.get('kind')} {doc.get('name')!r}, not {kind} {name!r}")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise CorruptError(f"{path} has no valid 'files' table")
    if any("/" in k or k.startswith(".") or k == MANIFEST for k in files):
        raise CorruptError(f"{path} lists a file outside its entry")
    return dict(files)


def check_hash(data: bytes, expected: str | None, path: Path) -> bytes:
    """`data` unchanged, or CorruptError if its sha256 differs from the manifest's."""
    if expected is None:
        raise CorruptError(f"{path} is not listed in the entry's {MANIFEST}")
    if sha256(data) != expected:
        raise CorruptError(f"{path} does not match its sha256 in {MANIFEST} (modified or damaged)")
    return data
