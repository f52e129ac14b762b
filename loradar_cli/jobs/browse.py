"""The jobs behind `loradar list` and `loradar show`: rows of every store kind, and adapters' lineage."""

from typing import Any

from pydantic import BaseModel

from loradar_cli.errors import CorruptError, IncompatibleError, InvalidValueError, NotFoundError
from loradar_cli.store.kinds import ENTRY_KINDS, POOL
from loradar_cli.store.store import Store


class Row(BaseModel):
    """One listed entry with the fields the filters and table use."""

    name: str
    kind: str
    model: str = ""
    base: str = ""
    recipe: str = ""
    attack: str = ""
    val_clean: float | None = None
    val_robust: float | None = None
    meta: dict[str, Any]


class Listing(BaseModel):
    store: str
    rows: list[Row]
    skipped: list[str]

    def as_json(self) -> dict[str, Any]:
        """{store, bases, adapters, identifiers, pools: [full metadata], skipped}."""
        out: dict[str, Any] = {"store": self.store}
        for kind in ENTRY_KINDS:
            out[f"{kind}s"] = [r.meta for r in self.rows if r.kind == kind]
        out["skipped"] = self.skipped
        return out


class Node(BaseModel):
    """A lineage tree node: an entry, how its child was derived from it, and its own parents."""

    label: str
    how: str | None = None
    children: list["Node"] = []


def list_entries(
    store: Store,
    *,
    kind: str | None = None,
    base: str | None = None,
    attack: str | None = None,
    recipe: str | None = None,
) -> Listing:
    """Every readable entry matching the filters; unreadable ones are named in `skipped`, not fatal."""
    if kind is not None and kind not in ENTRY_KINDS:
        raise InvalidValueError(f"--kind must be one of {', '.join(ENTRY_KINDS)}, got {kind!r}")
    rows, skipped = [], []
    for k in [kind] if kind else list(ENTRY_KINDS):
        for name in store.names(k):
            try:
                meta = store.meta(k, name)
            except (CorruptError, IncompatibleError) as err:
                skipped.append(f"{k} {name}: {err.one_line()}")
                continue
            row = _row(k, meta)
            if _keep(row, base=base, attack=attack, recipe=recipe):
                rows.append(row)
    return Listing(store=str(store.root), rows=rows, skipped=skipped)


def _row(kind: str, meta: Any) -> Row:
    data = meta.model_dump(mode="json")
    if kind == "base":
        return Row(
            name=meta.name,
            kind=kind,
            model=meta.timm_model,
            base=meta.name,
            attack=meta.dataset,
            val_clean=meta.metrics.get("val_clean_acc"),
            meta=data,
        )
    if kind == "adapter":
        return Row(
            name=meta.name,
            kind=kind,
            model=meta.timm_model,
            base=meta.base,
            recipe=meta.recipe or str(meta.combination.get("method", "derived")),
            attack=meta.attack or "",
            val_clean=meta.metrics.get("val_clean_acc"),
            val_robust=meta.metrics.get("val_robust_acc"),
            meta=data,
        )
    if kind == POOL:
        return Row(name=meta.name, kind=kind, recipe=meta.recipe or "", attack=", ".join(meta.members), meta=data)
    return Row(
        name=meta.name,
        kind=kind,
        base=meta.base or "",
        recipe=meta.mode or "identifier",
        attack=", ".join(meta.members),
        meta=data,
    )


def _keep(row: Row, *, base: str | None, attack: str | None, recipe: str | None) -> bool:
    if base is not None and row.base != base:
        return False
    if attack is not None and (row.kind != "adapter" or row.attack != attack):
        return False
    return recipe is None or (row.kind == "adapter" and row.recipe == recipe)


def show_entry(store: Store, name: str, kind: str | None = None) -> tuple[str, dict[str, Any]]:
    """(kind, metadata as JSON) of the named entry; identifiers keep every stored field."""
    resolved = store.resolve_kind(name, kind)
    if resolved == "identifier":
        return resolved, store.load_identifier(name)[0]
    return resolved, store.meta(resolved, name).model_dump(mode="json")


def lineage(store: Store, name: str, how: str | None = None, seen: frozenset[str] = frozenset()) -> Node:
    """An adapter's derivation: its base, then each parent with the merge weight or trim setting that used it."""
    try:
        meta = store.adapter_meta(name)
    except (NotFoundError, CorruptError, IncompatibleError) as err:
        return Node(label=f"adapter {name} ({err.one_line()})", how=how)
    node = Node(label=f"adapter {name}: {_describe(meta)}", how=how)
    if not meta.parents:
        node.children.append(_base_node(store, meta.base))
        return node
    combination = meta.combination
    weights = combination.get("weights") or []
    method = str(combination.get("method", "derived"))
    for i, parent in enumerate(meta.parents):
        step = method if i >= len(weights) else f"{method}, weight {weights[i]:g}"
        if method == "trim":
            settings = {k: combination.get(k) for k in ("mode", "rank", "energy", "keep") if combination.get(k)}
            step = "trim " + ", ".join(f"{k}={v}" for k, v in settings.items())
        if parent in seen or parent == name:
            node.children.append(Node(label=f"adapter {parent} (cycle)", how=step))
        else:
            node.children.append(lineage(store, parent, step, seen | {name}))
    return node


def _describe(meta: Any) -> str:
    parts = [f"recipe {meta.recipe}" if meta.recipe else None, f"attack {meta.attack}" if meta.attack else None]
    data = meta.combination.get("data") or meta.recipe_config.get("data")
    parts += [f"data {data}" if data else None, f"seed {meta.seed}" if meta.seed is not None else None]
    if "val_clean_acc" in meta.metrics:
        parts.append(f"val clean {100 * meta.metrics['val_clean_acc']:.1f}%")
    if "val_robust_acc" in meta.metrics:
        parts.append(f"val robust {100 * meta.metrics['val_robust_acc']:.1f}%")
    origin = meta.recipe_config.get("origin") if meta.recipe == "imported" else None
    if origin:
        parts.append(f"from {origin}")
    return ", ".join(p for p in parts if p) or "derived"


def _base_node(store: Store, base: str) -> Node:
    try:
        meta = store.base_meta(base)
    except (NotFoundError, CorruptError, IncompatibleError) as err:
        return Node(label=f"base {base} ({err.one_line()})", how="on")
    return Node(label=f"base {base}: {meta.timm_model} on {meta.dataset}, sha256 {meta.fingerprint[:12]}", how="on")
