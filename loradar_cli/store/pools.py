"""Pools: a named list of adapters trained together (e.g. one per budget), `<store>/pools/<name>.json`.

A pool is a manifest only; its members are ordinary adapters. Commands that take several adapters accept a
pool by name (`pool:NAME` or the bare name when no adapter has it), expanding to its members in order.
"""

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loradar_cli.errors import CorruptError, ExistsError, NotFoundError
from loradar_cli.files import atomic_path
from loradar_cli.store.meta import Name, check_name, now

if TYPE_CHECKING:
    from loradar_cli.store.store import Store

POOLS_DIR = "pools"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class PoolManifest(BaseModel):
    """Members of a pool and the attack option that tells them apart."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = 1
    name: Name
    key: str  # the attack option varied across members, e.g. "eps"
    values: list[str]  # its value per member, as given
    members: list[Name] = Field(min_length=1)
    recipe: str | None = None
    created_at: str = Field(default_factory=lambda: now().isoformat())


def pool_path(root: Path, name: str) -> Path:
    """Where the manifest of pool `name` lives."""
    return Path(root) / POOLS_DIR / f"{check_name(name, 'pool')}.json"


def pool_names(root: Path) -> list[str]:
    folder = Path(root) / POOLS_DIR
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def check_pool_free(root: Path, name: str, overwrite: bool = False) -> None:
    """Refuse a taken pool name before any training starts."""
    if pool_path(root, name).exists() and not overwrite:
        raise ExistsError(f"pool {name!r} already exists in {root}", hint="pass --overwrite")


def save_pool(root: Path, manifest: PoolManifest, *, overwrite: bool = False) -> Path:
    """Write the manifest atomically."""
    check_pool_free(root, manifest.name, overwrite)
    path = pool_path(root, manifest.name)
    with atomic_path(path) as tmp:
        tmp.write_text(manifest.model_dump_json(indent=2) + "\n")
    return path


def load_pool(root: Path, name: str) -> PoolManifest:
    """The manifest of pool `name`; NotFoundError lists the pools there are."""
    path = pool_path(root, name)
    if not path.is_file():
        names = pool_names(root)
        raise NotFoundError(f"no pool {name!r} in {root}", hint=f"pools: {', '.join(names)}" if names else None)
    try:
        return PoolManifest.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError) as err:
        raise CorruptError(f"{path} is not a valid pool manifest ({type(err).__name__})") from None


def expand_pools(store: "Store", names: list[str]) -> list[str]:
    """Adapter names with every `pool:NAME`, or bare pool name that is not an adapter, replaced by its members."""
    out: list[str] = []
    for name in names:
        bare_pool = _NAME.fullmatch(name) is not None and pool_path(store.root, name).is_file()
        if name.startswith("pool:") or (bare_pool and not store.has_adapter(name)):
            out.extend(load_pool(store.root, name.removeprefix("pool:")).members)
        else:
            out.append(name)
    return out
