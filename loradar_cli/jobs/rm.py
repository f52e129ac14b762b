"""The job behind `loradar rm`: remove entries of any kind, refusing to orphan dependents unless forced."""

from collections.abc import Sequence

from pydantic import BaseModel

from loradar_cli.errors import IncompatibleError
from loradar_cli.store.store import Store, describe_refs


class Orphan(BaseModel):
    """An entry left pointing at something that is gone."""

    kind: str
    name: str
    relation: str
    missing: str


class RemoveReport(BaseModel):
    removed: list[str]
    orphans: list[Orphan]


def remove_entries(store: Store, names: Sequence[str], *, kind: str | None = None, force: bool = False) -> RemoveReport:
    """Remove each named entry; all names are resolved and checked for dependents before the first removal."""
    resolved = [(store.resolve_kind(n, kind), n) for n in dict.fromkeys(names)]
    going = set(resolved)
    if not force:
        for k, n in resolved:  # links between entries removed together do not count
            outside = [r for r in store.dependents(k, n) if r.source not in going]
            if outside:
                raise IncompatibleError(
                    f"cannot remove {k} {n!r}: {describe_refs(outside)}",
                    hint="pass --force to do it anyway and orphan them",
                )
    removed, orphans = [], []
    for k, n in resolved:
        broken = store.remove(k, n, force=True)
        removed.append(f"{k} {n}")
        orphans.extend(
            Orphan(kind=r.source[0], name=r.source[1], relation=r.relation, missing=f"{k} {n}")
            for r in broken
            if r.source not in going
        )
    return RemoveReport(removed=removed, orphans=orphans)
