"""Whole-store checks behind `loradar verify`: every problem found, one line each, nothing changed."""

import json
from collections.abc import Sequence
from dataclasses import dataclass

from loradar_cli.errors import CorruptError, IncompatibleError, InvalidValueError, NotFoundError
from loradar_cli.files import read_file
from loradar_cli.store.kinds import ADAPTER_CONFIG, ENTRY_KINDS, KINDS
from loradar_cli.store.manifest import MANIFEST
from loradar_cli.store.store import Store


@dataclass(frozen=True)
class Problem:
    """One finding: the entry (or path) it concerns and what is wrong."""

    where: str
    message: str

    def line(self) -> str:
        return f"{self.where}: {self.message}"


def verify_store(store: Store, names: Sequence[str] = ()) -> tuple[list[Problem], int]:
    """Problems of the named entries (all of them if none), and how many entries were checked."""
    problems: list[Problem] = []
    try:
        store.store_format()
    except (CorruptError, IncompatibleError) as err:
        return [Problem(str(store.root), err.one_line())], 0
    for kind in KINDS:
        folder = store.kind_dir(kind)
        if folder != store.root and folder.is_symlink():
            problems.append(Problem(str(folder), "is a symbolic link; the store does not follow it"))
    targets = _targets(store, names, problems)
    links = {(r.source, r.target, r.relation) for r in store.references()}
    for kind, name in targets:
        problems.extend(_check_entry(store, kind, name))
        for source, target, relation in sorted(links):
            if source == (kind, name) and not _present(store, *target):
                problems.append(
                    Problem(f"{kind} {name}", f"its {relation} {target[0]} {target[1]!r} is not in the store")
                )
    if not names:
        problems.extend(
            Problem(str(p), "leftover of an interrupted write (loradar verify --fix removes it)")
            for p in store.leftovers()
        )
    return problems, len(targets)


def _targets(store: Store, names: Sequence[str], problems: list[Problem]) -> list[tuple[str, str]]:
    if not names:
        return [(kind, name) for kind in ENTRY_KINDS for name in store.names(kind)]
    out = []
    for name in names:
        try:
            kinds = store.kinds_of(name)
        except InvalidValueError as err:
            problems.append(Problem(name, err.one_line()))
            continue
        if not kinds:
            problems.append(Problem(name, "no such entry"))
        out.extend((kind, name) for kind in kinds)
    return out


def _present(store: Store, kind: str, name: str) -> bool:
    try:
        return store.has(kind, name)
    except InvalidValueError:
        return False


def _check_entry(store: Store, kind: str, name: str) -> list[Problem]:
    where = f"{kind} {name}"
    spec = ENTRY_KINDS[kind]
    try:
        meta = spec.read_checked(store, name)  # a pool is its manifest: it parses, its members are checked as links
    except (CorruptError, IncompatibleError, NotFoundError) as err:
        return [Problem(where, err.one_line())]
    problems = _stray_files(store, kind, name) if spec.manifested else []
    if kind == "adapter":
        problems.extend(_check_base_link(store, where, meta.base, meta.base_fingerprint))
        problems.extend(_check_peft_loadable(store, where, name))
    elif kind == "identifier" and meta.base:
        problems.extend(_check_base_link(store, where, meta.base, meta.base_fingerprint))
    return problems


def _stray_files(store: Store, kind: str, name: str) -> list[Problem]:
    folder = store.entry_dir(kind, name)
    try:
        listed = set(json.loads(read_file(folder / MANIFEST))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return []  # a format-1 entry (no manifest): nothing to compare with
    present = {p.name for p in folder.iterdir()} - {MANIFEST}
    out = [Problem(f"{kind} {name}", f"file {f!r} is not in its manifest") for f in sorted(present - listed)]
    return out + [Problem(f"{kind} {name}", f"file {f!r} is missing") for f in sorted(listed - present)]


def _check_base_link(store: Store, where: str, base: str, fingerprint: str | None) -> list[Problem]:
    try:
        meta = store.base_meta(base)
    except NotFoundError:
        return []  # reported as a missing link
    except (CorruptError, IncompatibleError, InvalidValueError) as err:
        return [Problem(where, f"its base {base!r} is unreadable: {err.one_line()}")]
    if fingerprint and meta.fingerprint != fingerprint:
        return [Problem(where, f"its base {base!r} has other weights (sha256 {meta.fingerprint[:12]})")]
    return []


def _check_peft_loadable(store: Store, where: str, name: str) -> list[Problem]:
    """PEFT's own LoraConfig accepts adapter_config.json (skipped when peft is not installed)."""
    try:
        from peft import LoraConfig
    except ImportError:
        return []
    config = json.loads(store.read_files("adapter", name, [ADAPTER_CONFIG])[ADAPTER_CONFIG])
    config.pop("peft_type", None)
    try:
        LoraConfig(**config)
    except Exception as err:  # any refusal by PEFT is the finding
        return [Problem(where, f"PEFT refuses its {ADAPTER_CONFIG}: {type(err).__name__}: {err}".splitlines()[0])]
    return []
