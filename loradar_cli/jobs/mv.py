"""The job behind `loradar mv`: rename an entry of any kind, refusing to break dependents unless forced."""

from pydantic import BaseModel

from loradar_cli.jobs.rm import Orphan
from loradar_cli.store.store import Store


class RenameReport(BaseModel):
    kind: str
    old: str
    new: str
    orphans: list[Orphan]


def rename_entry(store: Store, old: str, new: str, *, kind: str | None = None, force: bool = False) -> RenameReport:
    """Rename `old` to `new`; entries that named `old` are reported as orphans (only possible with `force`)."""
    resolved = store.resolve_kind(old, kind)
    broken = store.rename(resolved, old, new, force=force)
    orphans = [
        Orphan(kind=r.source[0], name=r.source[1], relation=r.relation, missing=f"{resolved} {old}") for r in broken
    ]
    return RenameReport(kind=resolved, old=old, new=new, orphans=orphans)
