"""The job behind `loradar verify`: check the store (and, with fix, remove leftovers no live writer owns)."""

from collections.abc import Sequence

from pydantic import BaseModel

from loradar_cli.store.store import Store


class VerifyReport(BaseModel):
    checked: int
    problems: list[str]
    fixed: list[str]


def verify(store: Store, names: Sequence[str] = (), *, fix: bool = False) -> VerifyReport:
    """One line per problem; `fix` first removes leftovers of killed writes (an entry left aside is put back)."""
    from loradar_cli.store.verify import verify_store

    fixed = [str(p) for p in store.clean_leftovers()] if fix and store.root.is_dir() else []
    problems, checked = verify_store(store, names)
    return VerifyReport(checked=checked, problems=[p.line() for p in problems], fixed=fixed)
