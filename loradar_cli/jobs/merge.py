"""`merge`: ΔW-space merges (linear, ties, cat) and AMT's test-time scored merge (tts) into a new adapter."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, SerializerFunctionWrapHandler, model_serializer
from torch import Tensor

from loradar_cli.advset import labelled_adv_sets
from loradar_cli.device import active_engine
from loradar_cli.errors import IncompatibleError, InvalidValueError
from loradar_cli.jobs._derived import save_derived
from loradar_cli.loading import build_model, model_data
from loradar_cli.lora.state import LoraFactors, head_tensors, pack, stored_deltas, stored_factors, stored_groups
from loradar_cli.members import Members, load_members, merged_model
from loradar_cli.models import ImageClassifier
from loradar_cli.ops._linalg import check_weights
from loradar_cli.ops.merge import (
    DEFAULT_TIES_DENSITY,
    MERGE_METHODS,
    MergeMethod,
    TTSResult,
    augment_support,
    cat_merge,
    check_compatible,
    merge_heads,
    refactor,
    tts_scores,
)
from loradar_cli.store.meta import AdapterMeta, BaseMeta
from loradar_cli.store.store import Adapter, Store


class MergeReport(BaseModel):
    """What a merge did: weights (with tts's scores and support), per-layer re-factoring, the head rule.

    `scores`, `tts` and `support` exist for a scored method and `density` for one that uses it; absent, they are
    left out of the JSON (as the stored `combination` always did).
    """

    name: str
    method: str
    parents: list[str]
    scores: list[dict[str, Any]] | None = None
    tts: dict[str, Any] | None = None
    support: dict[str, Any] | None = None
    weights: list[float]
    layers: dict[str, dict[str, Any]]
    density: float | None = None
    rank: int | None
    head: dict[str, Any] | None

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        optional = ("scores", "tts", "support", "density")
        return {k: v for k, v in handler(self).items() if not (k in optional and v is None)}

    def combination(self) -> dict[str, Any]:
        """The provenance stored with the merged adapter: the report less its name and parents."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in ("name", "parents")}


@dataclass(frozen=True)
class TTSOptions:
    """AMT test-time scoring: the support set (data spec or adversarial-set file) and the score's parameters."""

    support: str
    split: str = "val"
    shots: int | None = 5
    lam: float = 0.6
    beta: float = 1.0
    top_k: int = 2
    augment: bool = True
    seed: int = 0
    batch_size: int = 256


def merge_adapters(
    store: Store,
    names: Sequence[str],
    *,
    name: str,
    base: str | None = None,
    method: str = "linear",
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    density: float = DEFAULT_TIES_DENSITY,
    tts: TTSOptions | None = None,
    overwrite: bool = False,
) -> tuple[AdapterMeta, MergeReport]:
    """Merge adapters with a registered method (`MERGE_METHODS`) into a new adapter; returns its metadata and a report."""
    spec = _merge_method(method)
    if rank is not None and rank < 1:
        raise InvalidValueError(f"--rank must be >= 1, got {rank}")
    store.check_free("adapter", name, overwrite)
    members = load_members(store, names, base)
    deltas = [stored_deltas(a.meta.lora, a.tensors, a.meta.dense_deltas) for a in members.adapters]
    check_compatible(deltas, members.names)
    w, scored = _merge_weights(members, spec, weights, tts)
    if spec.merge is None:
        layers = _cat_layers(members, w, spec.name)
        layer_report = {n: {"rank": layer.rank, "energy": 1.0, "rel_error": 0.0} for n, layer in layers.items()}
    else:
        layers, layer_report = _refactor_all(spec.merge(deltas, w, density), members, rank)
    head_w = spec.head_weights(w)
    head_name, head = _merged_head(members, head_w)
    report = MergeReport(
        name=name,
        method=method,
        parents=members.names,
        **scored,
        weights=w,
        layers=layer_report,
        density=density if spec.merge is not None and spec.uses_density else None,
        rank=rank,
        head=None
        if head_name is None
        else {"module": head_name, "rule": "h0 + sum_i w_i (h_i - h0)", "weights": head_w},
    )
    spec, tensors = pack(layers, {}, head_name, head)
    meta = save_derived(
        store,
        members,
        name,
        spec,
        tensors,
        parents=members.names,
        combination=report.combination(),
        overwrite=overwrite,
    )
    return meta, report


def _merge_method(method: str) -> MergeMethod:
    """The registered merge method, or an InvalidValueError listing the valid ones."""
    if method not in MERGE_METHODS:
        raise InvalidValueError(f"unknown merge method {method!r} (valid: {', '.join(MERGE_METHODS)})")
    return MERGE_METHODS.get(method)


def _merge_weights(
    members: Members, spec: MergeMethod, weights: Sequence[float] | None, tts: TTSOptions | None
) -> tuple[list[float], dict[str, Any]]:
    """The merge weights (test-time scores for a scored method, else the given ones or the method's default) and,
    for a scored method, the report's `scores`, `tts` and `support`."""
    k = len(members.adapters)
    if spec.scored:
        if tts is None:
            raise InvalidValueError(f"merge method {spec.name!r} needs a support set (a data spec or adversarial set)")
        if weights is not None:
            raise InvalidValueError(f"merge method {spec.name!r} sets its own weights from scores; give no weights")
        result, support = tts_merge_weights(members, tts)
        scored = {
            "scores": _score_rows(members.names, result),
            "tts": {"lam": result.lam, "beta": result.beta, "top_k": result.top_k},
            "support": support,
        }
        return list(result.weight), scored
    if weights is None:
        return spec.default_weights(k), {}
    return check_weights(weights, k), {}


def _score_rows(names: Sequence[str], result: TTSResult) -> list[dict[str, Any]]:
    """Per-adapter C, V, score and weight as JSON rows."""
    return [
        {
            "adapter": n,
            "compactness": c,
            "divergence": v,
            "score": s,
            "raw_weight": r,
            "weight": w,
            "selected": i in result.selected,
        }
        for i, (n, c, v, s, r, w) in enumerate(
            zip(
                names,
                result.compactness,
                result.divergence,
                result.score,
                result.raw_weight,
                result.weight,
                strict=True,
            )
        )
    ]


def _refactor_all(
    merged: Mapping[str, Tensor], members: Members, rank: int | None
) -> tuple[dict[str, LoraFactors], dict[str, dict[str, Any]]]:
    """SVD re-factoring of each merged ΔW: exact (at most Σ ranks) unless `rank` caps it."""
    first = members.adapters[0]
    groups = stored_groups(first.meta.lora, first.tensors)
    layers: dict[str, LoraFactors] = {}
    report: dict[str, dict[str, Any]] = {}
    for name, delta in merged.items():
        cap = rank if rank is not None else sum(_member_rank(a, name, delta) for a in members.adapters)
        a, b, info = _refactor_layer(name, delta, groups.get(name, 1), cap)
        layers[name] = LoraFactors(a, b)
        report[name] = info.model_dump()
    return layers, report


def _member_rank(adapter: Adapter, layer: str, delta: Tensor) -> int:
    """Rank an adapter spends on a layer (a dense delta counts as full rank)."""
    if layer in adapter.meta.dense_deltas:
        return min(delta.shape[0], delta[0].numel())
    return adapter.meta.lora.rank_of(layer)


def _refactor_layer(name: str, delta: Tensor, groups: int, cap: int) -> tuple[Tensor, Tensor, Any]:
    """Exact numerical-rank factors, truncated to `cap` triplets when the numerical rank exceeds it."""
    try:
        a, b, info = refactor(delta, groups=groups)
        if info.rank > cap:
            a, b, info = refactor(delta, rank=cap, groups=groups)
    except IncompatibleError as err:
        raise IncompatibleError(f"layer {name!r}: {err.message}", hint=err.hint) from None
    return a, b, info


def _cat_layers(members: Members, weights: Sequence[float], method: str) -> dict[str, LoraFactors]:
    """Exact concatenation of the members' factors (rank Σ rᵢ, scale 1)."""
    for adapter in members.adapters:
        if adapter.meta.dense_deltas:
            raise IncompatibleError(
                f"merge method {method!r} needs LoRA factors; {adapter.meta.name!r} has dense deltas",
                hint="use --method linear",
            )
    return cat_merge([stored_factors(a.meta.lora, a.tensors) for a in members.adapters], weights)


def _merged_head(members: Members, weights: Sequence[float]) -> tuple[str | None, dict[str, Tensor]]:
    """Heads combined with the merge weights as task arithmetic, h0 + Σ wᵢ(hᵢ − h0) (= Σ wᵢhᵢ when Σ w = 1)."""
    names = {a.meta.lora.head for a in members.adapters if a.meta.lora.head}
    if not names:
        return None, {}
    if len(names) > 1:
        raise IncompatibleError(f"adapters carry different classifier heads: {sorted(names)}")
    head = names.pop()
    prefix = f"{head}."
    base_head = {k[len(prefix) :]: v.float() for k, v in members.base.state.items() if k.startswith(prefix)}
    heads = [
        {k: v.float() for k, v in head_tensors(a.tensors, a.meta.lora).items()} or base_head for a in members.adapters
    ]
    rest = 1.0 - sum(weights)
    if abs(rest) <= 1e-12:
        return head, merge_heads(heads, weights)
    return head, merge_heads([*heads, base_head], [*weights, rest])


def support_set(
    spec: str, base: BaseMeta, *, split: str = "val", shots: int | None = 5, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Support images and labels: an adversarial-set file or a data split, the first `shots` of each class."""
    path = Path(spec)
    if path.suffix == ".safetensors" or path.is_file():
        (adv,) = labelled_adv_sets([path], base.input_size, num_classes=base.num_classes).values()
        x, y = adv.x, adv.y
    else:
        data = model_data(spec, split, base, seed=seed)
        x, y = data.x, data.y
    keep = per_class(y, shots)
    return x[keep], y[keep]


def per_class(y: Tensor, shots: int | None) -> Tensor:
    """Indices (in order) of the first `shots` examples of every class; all indices when shots is None."""
    if shots is None:
        return torch.arange(len(y))
    if shots < 1:
        raise InvalidValueError(f"--shots must be >= 1, got {shots}")
    seen: dict[int, int] = {}
    keep = []
    for i, label in enumerate(y.tolist()):
        if seen.get(label, 0) < shots:
            seen[label] = seen.get(label, 0) + 1
            keep.append(i)
    return torch.tensor(keep, dtype=torch.long)


@torch.no_grad()
def penultimate_features(model: ImageClassifier, x: Tensor, batch_size: int = 256) -> Tensor:
    """Pre-logit features [N, D] of a timm model on inputs in [0, 1] (forward_features + pre-logits head)."""
    net = model.eval().model
    device = next(net.parameters()).device
    parts = [
        net.forward_head(net.forward_features(model.normalize(x[i : i + batch_size].to(device))), pre_logits=True).cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(parts).flatten(1)


def tts_merge_weights(members: Members, opts: TTSOptions) -> tuple[TTSResult, dict[str, Any]]:
    """AMT scores of each member on the support set (clean + one shared augmented copy)."""
    x, y = support_set(opts.support, members.base.meta, split=opts.split, shots=opts.shots, seed=opts.seed)
    x_aug = augment_support(x, torch.Generator().manual_seed(opts.seed)) if opts.augment else x
    template = active_engine().model(build_model(members.base))
    clean, aug = [], []
    for adapter in members.adapters:
        model = merged_model(template, adapter, members.base.meta)
        clean.append(penultimate_features(model, x, opts.batch_size))
        aug.append(penultimate_features(model, x_aug, opts.batch_size))
    result = tts_scores(torch.stack(clean), y, torch.stack(aug), lam=opts.lam, beta=opts.beta, top_k=opts.top_k)
    support = {
        "spec": opts.support,
        "split": opts.split,
        "shots": opts.shots,
        "n": len(y),
        "classes": len(set(y.tolist())),
        "augment": opts.augment,
        "seed": opts.seed,
    }
    return result, support
