"""The job behind `loradar export`: entries, what they need (ancestors, members, base) and a manifest, in one file."""

from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel

from loradar_cli.store.manifest import sha256
from loradar_cli.store.store import Store


class ExportReport(BaseModel):
    out: str
    entries: list[str]
    base_fingerprints: dict[str, str]
    includes_bases: list[str]
    bytes: int
    sha256: str


def export_entries(store: Store, names: Sequence[str], out: Path, *, with_base: bool = True) -> ExportReport:
    """Bundle the named entries with their ancestors (merge/trim parents) and identifiers' members; the base
    itself unless `with_base` is False, in which case only its fingerprint travels."""
    from loradar_cli.store.bundle import write_bundle

    chosen: dict[tuple[str, str], None] = {}
    for name in names:
        _add_closure(store, store.resolve_kind(name), name, chosen)
    entries = [e for e in chosen if with_base or e[0] != "base"]
    entries.sort(key=lambda e: (("base", "adapter", "identifier").index(e[0]), e[1]))
    manifest = write_bundle(store, entries, out)
    data = out.read_bytes()
    return ExportReport(
        out=str(out),
        entries=[f"{k} {n}" for k, n in entries],
        base_fingerprints=manifest["bases"],
        includes_bases=manifest["includes_bases"],
        bytes=len(data),
        sha256=sha256(data),
    )


def _add_closure(store: Store, kind: str, name: str, chosen: dict[tuple[str, str], None]) -> None:
    if (kind, name) in chosen or not store.has(kind, name):
        return
    chosen[(kind, name)] = None
    meta = store.meta(kind, name)
    if kind == "adapter":
        _add_closure(store, "base", meta.base, chosen)
        for parent in meta.parents:
            _add_closure(store, "adapter", parent, chosen)
    elif kind == "identifier":
        if meta.base:
            _add_closure(store, "base", meta.base, chosen)
        for member in meta.members:
            if not member.startswith(":"):
                _add_closure(store, "adapter", member, chosen)
