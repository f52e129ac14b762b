"""Combining stored adapters: ΔW-space and test-time scored merges, trimming, ensemble votes, attack identification.

The library side of `merge`, `trim`, `ensemble-vote` and `identify-attack`: plain values in, metadata and report
dicts out, nothing printed. The maths lives in `loradar_cli.ops`; this module loads adapters, checks that they fit
together, runs models, and writes the results to the store.
"""

import copy
import functools
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from loradar_cli.advset import load_adv_set
from loradar_cli.errors import CorruptError, ExistsError, IncompatibleError, InvalidValueError, NotFoundError
from loradar_cli.loading import (
    DENSE_SUFFIX,
    apply_adapter,
    build_model,
    check_adapter_fits,
    predict_logits,
    resolve_base_for,
)
from loradar_cli.lora.inject import PEFT_PREFIX, head_tensors, lora_layers
from loradar_cli.lora.spec import LoraSpec
from loradar_cli.models import ImageClassifier, weights_fingerprint
from loradar_cli.ops.identify import (
    IdentifierModel,
    accuracy,
    confusion_matrix,
    fit_identifier,
    identify_rule,
    identity_feature_names,
    identity_features,
)
from loradar_cli.ops.merge import (
    DEFAULT_TIES_DENSITY,
    LoraFactors,
    TTSResult,
    augment_support,
    cat_merge,
    check_compatible,
    factors_to_delta,
    linear_merge,
    merge_heads,
    refactor,
    ties_merge,
    tts_scores,
)
from loradar_cli.ops.trim import full_weight_trim, lowrank_or_dense, trim_delta
from loradar_cli.ops.vote import VOTE_METHODS, normalise_weights, reliability_weights, vote
from loradar_cli.store.meta import AdapterMeta, BaseMeta, now
from loradar_cli.store.store import Adapter, Base, Store, check_name
from loradar_cli.workflows import model_data

MERGE_METHODS = ("tts", "linear", "ties", "cat")
ENSEMBLE_METHODS = (*VOTE_METHODS, "route")
IDENTIFY_MODES = ("rule", "calibrated")
BASE_MEMBER = ":base"
"""Stands for the base model among identifier members (no adapter name can start with ':')."""
CLEAN = "clean"
PEFT_NOTE = ("dense deltas are stored under '<layer>.weight_delta' and are not part of target_modules: "
             "PEFT ignores them, load this adapter with loradar")


class Layer(NamedTuple):
    """One stored LoRA layer: factors A, B in PEFT layout and its lora_alpha, so ΔW = alpha/r·B·A."""

    a: Tensor
    b: Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


# ---------------------------------------------------------------------------------------------- members


@dataclass(frozen=True)
class Members:
    """Adapters to combine and the one base they were all trained on."""

    base: Base
    adapters: list[Adapter]

    @property
    def names(self) -> list[str]:
        return [a.meta.name for a in self.adapters]


def load_members(store: Store, names: Sequence[str], base: str | None = None) -> Members:
    """Load adapters and their common base; refuse adapters of different bases or class counts."""
    if not names:
        raise InvalidValueError("no adapters given")
    metas = [store.adapter_meta(n) for n in names]
    if len({m.base_fingerprint for m in metas}) > 1:
        listing = ", ".join(f"{m.name} (base {m.base!r})" for m in metas)
        raise IncompatibleError(f"adapters were trained on different bases: {listing}",
                                hint="only adapters of one base can be combined")
    stored = store.load_base(resolve_base_for(store, list(names), base))
    adapters = [store.load_adapter(n) for n in names]
    for adapter in adapters:
        check_adapter_fits(adapter, stored.meta)
        if adapter.meta.num_classes != stored.meta.num_classes:
            raise IncompatibleError(f"adapter {adapter.meta.name!r} has {adapter.meta.num_classes} classes, "
                                    f"base {stored.meta.name!r} has {stored.meta.num_classes}")
    return Members(stored, adapters)


def _check_new(store: Store, name: str, overwrite: bool) -> None:
    """A valid adapter name that is free (or may be overwritten)."""
    check_name(name)
    if store.has_adapter(name) and not overwrite:
        raise ExistsError(f"adapter {name!r} already exists in {store.root}", hint="pass --overwrite")


def dense_key(layer: str) -> str:
    """Tensor key of a dense ΔW stored with an adapter."""
    return f"{PEFT_PREFIX}{layer}.{DENSE_SUFFIX}"


def adapter_layers(adapter: Adapter) -> dict[str, Layer]:
    """The stored LoRA factors of every target layer (float32) with their lora_alpha."""
    spec, t = adapter.meta.lora, adapter.tensors
    return {name: Layer(t[f"{PEFT_PREFIX}{name}.lora_A.weight"].float(), t[f"{PEFT_PREFIX}{name}.lora_B.weight"].float(),
                        spec.alpha_of(name)) for name in spec.targets}


def _factors(layer: Layer) -> LoraFactors:
    """The layer as LoraFactors with scale alpha/r."""
    return LoraFactors(layer.a, layer.b, layer.alpha / layer.rank)


def _groups(layer: Layer) -> int:
    """Conv groups implied by the factor shapes (1 for Linear)."""
    return 1 if layer.a.dim() == 2 else max(1, layer.a.shape[0] // max(1, layer.b.shape[1]))


def adapter_deltas(adapter: Adapter) -> dict[str, Tensor]:
    """ΔW of every adapted layer (float32): s·B·A for LoRA layers plus any stored dense delta."""
    deltas = {name: factors_to_delta(_factors(layer)) for name, layer in adapter_layers(adapter).items()}
    for name in adapter.meta.dense_deltas:
        dense = adapter.tensors[dense_key(name)].float()
        deltas[name] = deltas[name] + dense if name in deltas else dense
    return deltas


def _layer_groups(adapter: Adapter) -> dict[str, int]:
    """Conv groups of every LoRA layer of an adapter."""
    return {name: _groups(layer) for name, layer in adapter_layers(adapter).items()}


def _pack(layers: Mapping[str, Layer], dense: Mapping[str, Tensor], head_name: str | None,
          head: Mapping[str, Tensor]) -> tuple[LoraSpec, dict[str, Tensor]]:
    """LoraSpec with per-layer rank/alpha patterns, and the tensors under PEFT's key names."""
    tensors: dict[str, Tensor] = {}
    for name, layer in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.a.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.b.contiguous()
    tensors.update({dense_key(name): d.contiguous() for name, d in dense.items()})
    if head_name:
        tensors.update({f"{PEFT_PREFIX}{head_name}.{p}": t.contiguous() for p, t in head.items()})
    r = max((layer.rank for layer in layers.values()), default=1)
    spec = LoraSpec(r=r, lora_alpha=float(r), targets=list(layers), head=head_name if head else None,
                    rank_pattern={n: layer.rank for n, layer in layers.items()},
                    alpha_pattern={n: layer.alpha for n, layer in layers.items()})
    return spec, tensors


def _save(store: Store, members: Members, name: str, spec: LoraSpec, tensors: dict[str, Tensor], *,
          parents: Sequence[str], combination: dict[str, Any], dense: Sequence[str] = (), attack: str | None = None,
          attack_config: Mapping[str, Any] | None = None, overwrite: bool = False) -> AdapterMeta:
    """Write a derived adapter with its provenance and return the stored metadata."""
    base = members.base.meta
    meta = AdapterMeta(name=name, base=base.name, base_fingerprint=base.fingerprint, timm_model=base.timm_model,
                       num_classes=base.num_classes, lora=spec, attack=attack, attack_config=dict(attack_config or {}),
                       parents=list(parents), combination=combination, dense_deltas=list(dense))
    store.save_adapter(meta, tensors, overwrite=overwrite)
    return store.adapter_meta(name)


# ---------------------------------------------------------------------------------------------- merge


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


def merge_adapters(store: Store, names: Sequence[str], *, name: str, base: str | None = None,
                   method: str = "linear", weights: Sequence[float] | None = None, rank: int | None = None,
                   density: float = DEFAULT_TIES_DENSITY, tts: TTSOptions | None = None,
                   overwrite: bool = False) -> tuple[AdapterMeta, dict[str, Any]]:
    """Merge adapters in ΔW space (tts, linear, ties, cat) into a new adapter; returns its metadata and a report."""
    if method not in MERGE_METHODS:
        raise InvalidValueError(f"unknown merge method {method!r} (valid: {', '.join(MERGE_METHODS)})")
    if rank is not None and rank < 1:
        raise InvalidValueError(f"--rank must be >= 1, got {rank}")
    _check_new(store, name, overwrite)
    members = load_members(store, names, base)
    deltas = [adapter_deltas(a) for a in members.adapters]
    check_compatible(deltas, members.names)
    report: dict[str, Any] = {"name": name, "method": method, "parents": members.names}
    w = _merge_weights(members, method, weights, tts, report)
    report["weights"] = w
    if method == "cat":
        layers = _cat_layers(members, w)
        report["layers"] = {n: {"rank": layer.rank, "energy": 1.0, "rel_error": 0.0} for n, layer in layers.items()}
    else:
        merged = ties_merge(deltas, w, density) if method == "ties" else linear_merge(deltas, w)
        layers, report["layers"] = _refactor_all(merged, members, rank)
        if method == "ties":
            report["density"] = density
    report["rank"] = rank
    head_w = _ties_head_weights(w) if method == "ties" else w
    head_name, head = _merged_head(members, head_w)
    report["head"] = None if head_name is None else {"module": head_name, "rule": "h0 + sum_i w_i (h_i - h0)",
                                                     "weights": head_w}
    spec, tensors = _pack(layers, {}, head_name, head)
    combination = {k: v for k, v in report.items() if k not in ("name", "parents")}
    meta = _save(store, members, name, spec, tensors, parents=members.names, combination=combination,
                 overwrite=overwrite)
    return meta, report


def _merge_weights(members: Members, method: str, weights: Sequence[float] | None, tts: TTSOptions | None,
                   report: dict[str, Any]) -> list[float]:
    """The merge weights: AMT scores for tts, else the given ones or the method's default."""
    k = len(members.adapters)
    if method == "tts":
        if tts is None:
            raise InvalidValueError("--method tts needs a support set (--support SPEC or an adversarial-set file)")
        if weights is not None:
            raise InvalidValueError("--weights cannot be combined with --method tts (the scores set the weights)")
        result, support = tts_merge_weights(members, tts)
        report["scores"] = _score_rows(members.names, result)
        report["tts"] = {"lam": result.lam, "beta": result.beta, "top_k": result.top_k}
        report["support"] = support
        return list(result.weight)
    if weights is None:
        return [1.0] * k if method == "ties" else [1.0 / k] * k
    values = [float(v) for v in weights]
    if len(values) != k or not all(math.isfinite(v) for v in values):
        raise InvalidValueError(f"need {k} finite weights (one per adapter), got {values}")
    return values


def _ties_head_weights(weights: Sequence[float]) -> list[float]:
    """TIES averages agreeing entries, so its heads are averaged too: weights scaled to sum 1 (if they can be)."""
    total = sum(weights)
    return [w / total for w in weights] if total != 0.0 else list(weights)


def _score_rows(names: Sequence[str], result: TTSResult) -> list[dict[str, Any]]:
    """Per-adapter C, V, score and weight as JSON rows."""
    return [{"adapter": n, "compactness": c, "divergence": v, "score": s, "raw_weight": r, "weight": w,
             "selected": i in result.selected}
            for i, (n, c, v, s, r, w) in enumerate(zip(names, result.compactness, result.divergence, result.score,
                                                       result.raw_weight, result.weight, strict=True))]


def _refactor_all(merged: Mapping[str, Tensor], members: Members, rank: int | None
                  ) -> tuple[dict[str, Layer], dict[str, dict[str, Any]]]:
    """SVD re-factoring of each merged ΔW: exact (at most Σ ranks) unless `rank` caps it."""
    groups = _layer_groups(members.adapters[0])
    layers: dict[str, Layer] = {}
    report: dict[str, dict[str, Any]] = {}
    for name, delta in merged.items():
        cap = rank if rank is not None else sum(_member_rank(a, name, delta) for a in members.adapters)
        a, b, info = _refactor_layer(name, delta, groups.get(name, 1), cap)
        layers[name] = Layer(a, b, info.rank)
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


def _cat_layers(members: Members, weights: Sequence[float]) -> dict[str, Layer]:
    """Exact concatenation of the members' factors (rank Σ rᵢ, scale 1)."""
    for adapter in members.adapters:
        if adapter.meta.dense_deltas:
            raise IncompatibleError(f"--method cat needs LoRA factors; {adapter.meta.name!r} has dense deltas",
                                    hint="use --method linear")
    merged = cat_merge([{n: _factors(layer) for n, layer in adapter_layers(a).items()} for a in members.adapters],
                       weights)
    return {n: Layer(f.a, f.b, f.a.shape[0]) for n, f in merged.items()}


def _merged_head(members: Members, weights: Sequence[float]) -> tuple[str | None, dict[str, Tensor]]:
    """Heads combined with the merge weights as task arithmetic, h0 + Σ wᵢ(hᵢ − h0) (= Σ wᵢhᵢ when Σ w = 1)."""
    names = {a.meta.lora.head for a in members.adapters if a.meta.lora.head}
    if not names:
        return None, {}
    if len(names) > 1:
        raise IncompatibleError(f"adapters carry different classifier heads: {sorted(names)}")
    head = names.pop()
    prefix = f"{head}."
    base_head = {k[len(prefix):]: v.float() for k, v in members.base.state.items() if k.startswith(prefix)}
    heads = [{k: v.float() for k, v in head_tensors(a.tensors, a.meta.lora).items()} or base_head
             for a in members.adapters]
    rest = 1.0 - sum(weights)
    if abs(rest) <= 1e-12:
        return head, merge_heads(heads, weights)
    return head, merge_heads([*heads, base_head], [*weights, rest])


# ---------------------------------------------------------------------------------------------- test-time scores


def support_set(spec: str, base: BaseMeta, *, split: str = "val", shots: int | None = 5, seed: int = 0
                ) -> tuple[Tensor, Tensor]:
    """Support images and labels: an adversarial-set file or a data split, the first `shots` of each class."""
    path = Path(spec)
    if path.suffix == ".safetensors" or path.is_file():
        adv = load_adv_set(path)
        _check_images(adv.x, base, str(path))
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
    parts = [net.forward_head(net.forward_features(model.normalize(x[i:i + batch_size])), pre_logits=True)
             for i in range(0, len(x), batch_size)]
    return torch.cat(parts).flatten(1)


def tts_merge_weights(members: Members, opts: TTSOptions) -> tuple[TTSResult, dict[str, Any]]:
    """AMT scores of each member on the support set (clean + one shared augmented copy)."""
    x, y = support_set(opts.support, members.base.meta, split=opts.split, shots=opts.shots, seed=opts.seed)
    x_aug = augment_support(x, torch.Generator().manual_seed(opts.seed)) if opts.augment else x
    template = build_model(members.base)
    clean, aug = [], []
    for adapter in members.adapters:
        model = merged_model(template, adapter, members.base.meta)
        clean.append(penultimate_features(model, x, opts.batch_size))
        aug.append(penultimate_features(model, x_aug, opts.batch_size))
    result = tts_scores(torch.stack(clean), y, torch.stack(aug), lam=opts.lam, beta=opts.beta, top_k=opts.top_k)
    support = {"spec": opts.support, "split": opts.split, "shots": opts.shots, "n": len(y),
               "classes": len(set(y.tolist())), "augment": opts.augment, "seed": opts.seed}
    return result, support


# ---------------------------------------------------------------------------------------------- trim


def trim_adapter(store: Store, name: str, *, out_name: str, base: str | None = None, rank: int | None = None,
                 energy: float | None = None, full_weight: bool = False, keep: float = 0.7,
                 layers_regex: str | None = None, overwrite: bool = False) -> tuple[AdapterMeta, dict[str, Any]]:
    """Singular-value trimming of ΔW (--rank/--energy) or of W0 + ΔW (--full-weight); returns metadata and report."""
    if full_weight and (rank is not None or energy is not None):
        raise InvalidValueError("--full-weight trims W0 + ΔW by --keep; it cannot be combined with --rank/--energy")
    if not full_weight and rank is None and energy is None:
        raise InvalidValueError("give --rank or --energy (or --full-weight with --keep)")
    _check_new(store, out_name, overwrite)
    members = load_members(store, [name], base)
    adapter = members.adapters[0]
    report: dict[str, Any] = {"name": out_name, "parent": name}
    if full_weight:
        layers, dense, report["layers"] = _full_weight_layers(members, keep, layers_regex)
        report.update(mode="full-weight", keep=keep, layers_regex=layers_regex)
        if dense:
            report["dense_deltas"] = PEFT_NOTE
    else:
        layers, report["layers"] = _svd_trim_layers(adapter, rank, energy)
        dense = {}
        report.update(mode="svd", rank=rank, energy=energy)
    spec, tensors = _pack(layers, dense, adapter.meta.lora.head, head_tensors(adapter.tensors, adapter.meta.lora))
    combination = {"method": "trim", **{k: v for k, v in report.items() if k not in ("name", "parent")}}
    meta = _save(store, members, out_name, spec, tensors, parents=[name], combination=combination, dense=list(dense),
                 attack=adapter.meta.attack, attack_config=adapter.meta.attack_config, overwrite=overwrite)
    return meta, report


def _svd_trim_layers(adapter: Adapter, rank: int | None, energy: float | None
                     ) -> tuple[dict[str, Layer], dict[str, dict[str, Any]]]:
    """Keep the top triplets of each layer's ΔW by rank and/or energy."""
    groups = _layer_groups(adapter)
    layers: dict[str, Layer] = {}
    report: dict[str, dict[str, Any]] = {}
    for layer, delta in adapter_deltas(adapter).items():
        try:
            factors, info = trim_delta(delta, rank, energy, groups=groups.get(layer, 1))
        except IncompatibleError as err:
            raise IncompatibleError(f"layer {layer!r}: {err.message}", hint=err.hint) from None
        layers[layer] = Layer(factors.a, factors.b, info.rank)
        report[layer] = info.model_dump()
    return layers, report


def _full_weight_layers(members: Members, keep: float, regex: str | None
                        ) -> tuple[dict[str, Layer], dict[str, Tensor], dict[str, dict[str, Any]]]:
    """AMT trim of W0 + ΔW on the selected layers; the rest are copied unchanged."""
    adapter = members.adapters[0]
    chosen = _select_layers(adapter, regex)
    groups = _layer_groups(adapter)
    layers = {n: layer for n, layer in adapter_layers(adapter).items() if n not in chosen}
    dense = {n: adapter.tensors[dense_key(n)] for n in adapter.meta.dense_deltas if n not in chosen}
    report: dict[str, dict[str, Any]] = {}
    deltas = adapter_deltas(adapter)
    for name in chosen:
        if groups.get(name, 1) != 1:
            raise IncompatibleError(f"layer {name!r} is a grouped conv; --full-weight supports groups == 1 only")
        w0 = members.base.state[f"{name}.weight"].float()
        new_delta, info = full_weight_trim(w0, deltas[name], keep)
        packed = lowrank_or_dense(new_delta, storage_rank(new_delta))
        if packed is None:
            dense[name] = new_delta
        else:
            layers[name] = Layer(packed[0].a, packed[0].b, packed[1].rank)
        report[name] = {**info.model_dump(), "storage": "dense" if packed is None else "lora",
                        "stored_rank": None if packed is None else packed[1].rank}
    return layers, dense, report


def _select_layers(adapter: Adapter, regex: str | None) -> list[str]:
    """Adapter layers whose name matches `regex` (re.search), all of them by default."""
    names = [*adapter.meta.lora.targets, *(n for n in adapter.meta.dense_deltas if n not in adapter.meta.lora.targets)]
    if regex is None:
        return names
    try:
        pattern = re.compile(regex)
    except re.error as err:
        raise InvalidValueError(f"--layers {regex!r} is not a valid regex: {err}") from None
    chosen = [n for n in names if pattern.search(n)]
    if not chosen:
        raise NotFoundError(f"no layer of adapter {adapter.meta.name!r} matches --layers {regex!r}",
                            hint=f"layers: {', '.join(names[:6])}")
    return chosen


def storage_rank(delta: Tensor) -> int:
    """Largest rank r for which factors (r·(m + n) numbers) are no bigger than the dense ΔW (m·n)."""
    m, n = delta.shape[0], delta[0].numel()
    return max(1, (m * n) // (m + n))


# ---------------------------------------------------------------------------------------------- ensembles


def merged_model(template: ImageClassifier, adapter: Adapter, base: BaseMeta) -> ImageClassifier:
    """A copy of `template` with the adapter's ΔW folded into its weights (plain layers, no LoRA branches)."""
    model = apply_adapter(copy.deepcopy(template), adapter, base)
    for name, layer in lora_layers(model.model).items():
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.model.get_submodule(parent) if parent else model.model, child, layer.base_layer)
    return model.eval()


def member_models(members: Members, extra: Sequence[str] = ()) -> dict[str, ImageClassifier]:
    """Merged models keyed by adapter name, plus the base itself under BASE_MEMBER if asked for in `extra`."""
    template = build_model(members.base)
    models = {a.meta.name: merged_model(template, a, members.base.meta) for a in members.adapters}
    if BASE_MEMBER in extra:
        models[BASE_MEMBER] = template
    return models


def adapter_models(store: Store, base: str | None, names: Sequence[str]) -> list[ImageClassifier]:
    """One merged model per adapter (ΔW folded into a copy of the base weights once)."""
    models = member_models(load_members(store, names, base))
    return [models[n] for n in names]


@torch.no_grad()
def ensemble_probs(models: Sequence[torch.nn.Module], x: Tensor, batch_size: int = 256) -> Tensor:
    """Softmax outputs [K, N, C] of K models on batched inputs: K merged forwards."""
    return torch.stack([predict_logits(m, x, batch_size).softmax(dim=-1) for m in models])


@dataclass(frozen=True)
class InputSet:
    """Labelled inputs to vote on or identify; `attack` is the true attack family ('clean' for clean data)."""

    label: str
    x: Tensor
    y: Tensor
    attack: str


def input_sets(base: BaseMeta, *, data: str | None = None, split: str = "test", adv_sets: Sequence[Path] = (),
               limit: int | None = None, seed: int = 0) -> list[InputSet]:
    """The --data split (labelled 'clean') and each adversarial set (labelled by its file name)."""
    if data is None and not adv_sets:
        raise InvalidValueError("give --data SPEC and/or --adv-set FILE")
    sets: list[InputSet] = []
    if data is not None:
        clean = model_data(data, split, base, seed=seed, limit=limit)
        sets.append(InputSet(CLEAN, clean.x, clean.y, CLEAN))
    for path in adv_sets:
        adv = load_adv_set(Path(path))
        _check_images(adv.x, base, str(path))
        label = _unique(Path(path).name, {s.label for s in sets})
        sets.append(InputSet(label, adv.x[:limit], adv.y[:limit], adv.label))
    return sets


def _unique(label: str, taken: set[str]) -> str:
    """`label`, or `label#2`, `label#3`, ... if it is taken."""
    out, i = label, 2
    while out in taken:
        out, i = f"{label}#{i}", i + 1
    return out


def _check_images(x: Tensor, base: BaseMeta, what: str) -> None:
    """Images must have the base's input size and channels."""
    if tuple(x.shape[1:]) != tuple(base.input_size):
        raise IncompatibleError(f"{what} holds images {tuple(x.shape[1:])}, base {base.name!r} takes "
                                f"{tuple(base.input_size)}")


def vote_sets(store: Store, names: Sequence[str], *, base: str | None = None, methods: Sequence[str] = ("majority",),
              weights: Sequence[float] | None = None, data: str | None = None, split: str = "test",
              adv_sets: Sequence[Path] = (), limit: int | None = None, identifier: str | None = None,
              compare: Sequence[str] = (), seed: int = 0, batch_size: int = 256,
              out: Path | None = None) -> dict[str, Any]:
    """Ensemble votes (majority, weighted, soft) and identify-then-route per input set; accuracy and predictions.

    `compare` adapters (e.g. merged ones) are evaluated alone on the same sets, for one table.
    """
    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in ENSEMBLE_METHODS]
    if unknown or not methods:
        raise InvalidValueError(f"unknown ensemble method {(unknown or [''])[0]!r} (valid: {', '.join(ENSEMBLE_METHODS)})")
    if identifier and "route" not in methods:
        raise InvalidValueError("--identifier is used by --method route only")
    names = list(names)
    members = load_members(store, list(dict.fromkeys([*names, *compare])), base)
    router = _router(store, identifier, names, members) if "route" in methods else None
    weighting = _vote_weights(members, names, weights) if "weighted" in methods else None
    models = member_models(members, router.members if router else ())
    sets = input_sets(members.base.meta, data=data, split=split, adv_sets=adv_sets, limit=limit, seed=seed)
    report: dict[str, Any] = {"base": members.base.meta.name, "members": names, "compare": list(compare),
                              "methods": methods, "weighting": weighting,
                              "route": _route_info(router) if "route" in methods else None, "sets": {}}
    samples: dict[str, Any] = {}
    for s in sets:
        probs = dict(zip(models, ensemble_probs(list(models.values()), s.x, batch_size), strict=True))
        preds, routed = _ensemble_predictions(probs, names, methods, weighting, router)
        singles = {n: probs[n].argmax(dim=-1) for n in dict.fromkeys([*names, *compare])}
        report["sets"][s.label] = _vote_row(s, preds, singles, routed, names)
        samples[s.label] = {"y": s.y.tolist(), "attack": s.attack, "methods": {m: p.tolist() for m, p in preds.items()},
                            "adapters": {n: p.tolist() for n, p in singles.items()},
                            "routed_to": None if routed is None else [names[i] for i in routed.tolist()]}
    if out is not None:
        write_json(out, {"members": names, "sets": samples})
    return report


def _router(store: Store, identifier: str | None, names: Sequence[str], members: Members) -> "Identifier | None":
    """The calibrated identifier for `route`, checked against base and adapters; None for the rule."""
    if not identifier:
        return None
    router = load_identifier(store, identifier, members.base.meta)
    missing = [m for m in router.adapter_names if m not in names]
    if missing:
        raise IncompatibleError(f"identifier {identifier!r} reads adapters {router.adapter_names}; "
                                f"{missing[0]!r} is not among the voting adapters")
    return router


def _vote_weights(members: Members, names: Sequence[str], weights: Sequence[float] | None) -> dict[str, Any]:
    """Weights of the weighted vote: given, else reliability from each adapter's stored validation metrics."""
    if weights is not None:
        return {"weights": normalise_weights(weights, len(names)).tolist(), "source": "--weights"}
    metas = {a.meta.name: a.meta for a in members.adapters}
    rel = reliability_weights([metas[n].metrics for n in names])
    source = f"metrics.{rel.key}" if rel.key else "uniform: no validation metric common to all adapters"
    if rel.uniform_fallback and rel.key:
        source += " (unusable values: uniform)"
    return {"weights": rel.weights, "source": source}


def _route_info(router: "Identifier | None") -> dict[str, Any]:
    """How `route` picks its adapter, for the report."""
    if router is None:
        return {"mode": "rule", "rule": "the most confident adapter classifies"}
    return {"mode": "calibrated", "identifier": router.meta.name,
            "fallback": "the most confident adapter when no voting adapter was trained on the identified attack"}


def _ensemble_predictions(probs: Mapping[str, Tensor], names: Sequence[str], methods: Sequence[str],
                          weighting: Mapping[str, Any] | None, router: "Identifier | None"
                          ) -> tuple[dict[str, Tensor], Tensor | None]:
    """Predicted class per input for each method, and the adapter index `route` picked (None without route)."""
    stack = torch.stack([probs[n] for n in names])
    preds: dict[str, Tensor] = {}
    routed = None
    for method in methods:
        if method == "route":
            routed = route_choice(stack, names, router, probs)
            preds[method] = stack[routed, torch.arange(stack.shape[1])].argmax(dim=-1)
        else:
            preds[method] = vote(stack, method, weighting["weights"] if weighting and method == "weighted" else None)
    return preds, routed


def _vote_row(s: "InputSet", preds: Mapping[str, Tensor], singles: Mapping[str, Tensor], routed: Tensor | None,
              names: Sequence[str]) -> dict[str, Any]:
    """One set's accuracies: per method, per adapter alone, and how often route picked each adapter."""
    row: dict[str, Any] = {"n": len(s.y), "attack": s.attack, "accuracy": {m: _acc(p, s.y) for m, p in preds.items()},
                           "adapters": {n: _acc(p, s.y) for n, p in singles.items()}}
    if routed is not None:
        row["routed_to"] = {n: int((routed == i).sum()) for i, n in enumerate(names)}
    return row


def _acc(pred: Tensor, y: Tensor) -> float:
    """Fraction of correct predictions (0 for an empty set)."""
    return float((pred == y).double().mean()) if len(y) else 0.0


def route_choice(stack: Tensor, names: Sequence[str], router: "Identifier | None",
                 probs: Mapping[str, Tensor]) -> Tensor:
    """Index of the adapter that classifies each input: the identified attack's adapter, else the most confident."""
    confident = stack.to(torch.float64).max(dim=-1).values.argmax(dim=0)
    if router is None:
        return confident
    by_attack: dict[str, int] = {}
    for i, n in enumerate(names):
        by_attack.setdefault(router.meta.member_labels.get(n, n), i)
    attacks = router.predict(probs)
    return torch.tensor([by_attack.get(a, c) for a, c in zip(attacks, confident.tolist(), strict=True)],
                        dtype=torch.long)


# ---------------------------------------------------------------------------------------------- identification


class IdentifierMeta(BaseModel):
    """A stored attack identifier: its members (adapters, BASE_MEMBER = the base), classes, base and training."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    name: str
    base: str
    base_fingerprint: str
    members: list[str]
    member_labels: dict[str, str]
    classes: list[str]
    feature_names: list[str]
    training: dict[str, Any] = Field(default_factory=dict)
    tensors_sha256: str = ""
    created_at: datetime = Field(default_factory=now)


@dataclass(frozen=True)
class Identifier:
    """A loaded identifier: metadata and the logistic-regression model."""

    meta: IdentifierMeta
    model: IdentifierModel

    @property
    def members(self) -> list[str]:
        return list(self.meta.members)

    @property
    def adapter_names(self) -> list[str]:
        return [m for m in self.meta.members if m != BASE_MEMBER]

    def predict(self, probs: Mapping[str, Tensor]) -> list[str]:
        """Attack label per input from the members' probabilities (keyed by member name)."""
        return self.model.predict(identity_features(torch.stack([probs[m] for m in self.members])))


def load_identifier(store: Store, name: str, base: BaseMeta | None = None) -> Identifier:
    """Read and validate a stored identifier; with `base`, refuse one fitted on other base weights."""
    raw, tensors = store.load_identifier(name)
    try:
        meta = IdentifierMeta.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        raise CorruptError(f"identifier {name!r} has invalid metadata: {'.'.join(map(str, first['loc']))}: "
                           f"{first['msg']}") from None
    if weights_fingerprint(tensors) != meta.tensors_sha256:
        raise CorruptError(f"identifier {name!r}: tensors do not match their recorded sha256")
    ident = Identifier(meta, IdentifierModel.from_tensors(tensors, meta.classes))
    if base is not None:
        check_identifier_base(ident, base)
    return ident


def check_identifier_base(ident: Identifier, base: BaseMeta) -> None:
    """An identifier reads adapter outputs on the exact base weights it was fitted on."""
    if base.fingerprint != ident.meta.base_fingerprint:
        raise IncompatibleError(f"identifier {ident.meta.name!r} was fitted on base {ident.meta.base!r}, "
                                f"not on base {base.name!r}")


def member_label(meta: AdapterMeta) -> str:
    """The attack an adapter stands for in identification (its name if it has no attack)."""
    return meta.attack or meta.name


def _rule_members(members: Members, clean: str) -> tuple[list[str], list[str], int | None]:
    """Members for the rule (adapters + the clean member), their attack labels, and the clean member's index."""
    names, labels = members.names, [member_label(a.meta) for a in members.adapters]
    if clean == "none":
        return names, labels, None
    if clean == "base":
        return [*names, BASE_MEMBER], [*labels, CLEAN], len(names)
    if clean not in names:
        raise InvalidValueError(f"--clean {clean!r} must be 'base', 'none' or one of the given adapters")
    return names, labels, names.index(clean)


def _rule_predict(probs: Mapping[str, Tensor], *, order: Sequence[str], labels: Sequence[str], margin: float,
                  clean_index: int | None) -> list[str]:
    """The LoRADAR rule over the members in `order`."""
    return identify_rule(torch.stack([probs[m] for m in order]), labels, margin=margin, clean_index=clean_index)


def identify_sets(store: Store, names: Sequence[str], *, base: str | None = None, mode: str = "rule",
                  identifier: str | None = None, margin: float = 0.1, clean: str = "base", data: str | None = None,
                  split: str = "test", adv_sets: Sequence[Path] = (), limit: int | None = None, seed: int = 0,
                  batch_size: int = 256, out: Path | None = None) -> dict[str, Any]:
    """Per input, the attack family it came from (rule or calibrated); accuracy and confusion matrix vs the truth."""
    if mode not in IDENTIFY_MODES:
        raise InvalidValueError(f"unknown mode {mode!r} (valid: {', '.join(IDENTIFY_MODES)})")
    if mode == "calibrated":
        ident = _calibrated_identifier(store, identifier, names)
        members = load_members(store, ident.adapter_names, base or ident.meta.base)
        check_identifier_base(ident, members.base.meta)
        order, predict = ident.members, ident.predict
        setup: dict[str, Any] = {"identifier": ident.meta.name, "classes": ident.meta.classes}
    else:
        members = load_members(store, names, base)
        order, labels, clean_index = _rule_members(members, clean)
        predict = functools.partial(_rule_predict, order=order, labels=labels, margin=margin, clean_index=clean_index)
        setup = {"margin": margin, "clean": clean, "labels": dict(zip(order, labels, strict=True))}
    models = member_models(members, order)
    sets = input_sets(members.base.meta, data=data, split=split, adv_sets=adv_sets, limit=limit, seed=seed)
    predicted = {s.label: predict(dict(zip(models, ensemble_probs(list(models.values()), s.x, batch_size),
                                            strict=True))) for s in sets}
    truth = [s.attack for s in sets for _ in range(len(s.y))]
    report = {"base": members.base.meta.name, "members": members.names, "mode": mode, **setup,
              **identification_summary(truth, [p for s in sets for p in predicted[s.label]]),
              "sets": {s.label: _identify_row(s, predicted[s.label]) for s in sets}}
    if out is not None:
        write_json(out, {"mode": mode, "sets": {s.label: {"attack": s.attack, "predicted": predicted[s.label]}
                                                for s in sets}})
    return report


def _calibrated_identifier(store: Store, identifier: str | None, names: Sequence[str]) -> Identifier:
    """The stored identifier for --mode calibrated, checked against the adapters given (if any)."""
    if not identifier:
        raise InvalidValueError("--mode calibrated needs --identifier NAME (fit one with `loradar identify-attack fit`)")
    ident = load_identifier(store, identifier)
    if names and list(names) != ident.adapter_names:
        raise IncompatibleError(f"identifier {identifier!r} was fitted on adapters {ident.adapter_names}, "
                                f"got {list(names)}", hint="give the same adapters in the same order, or none")
    return ident


def _identify_row(s: "InputSet", predicted: Sequence[str]) -> dict[str, Any]:
    """One set's identification accuracy and predicted-label counts."""
    counts: dict[str, int] = {}
    for label in predicted:
        counts[label] = counts.get(label, 0) + 1
    return {"n": len(predicted), "attack": s.attack,
            "accuracy": accuracy([s.attack] * len(predicted), predicted) if predicted else None,
            "predicted": dict(sorted(counts.items()))}


def identification_summary(truth: Sequence[str], pred: Sequence[str]) -> dict[str, Any]:
    """Overall accuracy and the confusion matrix (rows: true attack, columns: predicted)."""
    if not truth:
        return {"accuracy": None, "confusion": None}
    labels, matrix = confusion_matrix(truth, pred)
    return {"accuracy": accuracy(truth, pred), "confusion": {"labels": labels, "matrix": matrix}}


def fit_identifier_from_sets(store: Store, names: Sequence[str], *, name: str, adv_sets: Sequence[Path],
                             base: str | None = None, data: str | None = None, split: str = "val",
                             limit: int | None = None, clean: str = "base", epochs: int = 300, lr: float = 0.05,
                             weight_decay: float = 1e-3, seed: int = 0, batch_size: int = 256,
                             overwrite: bool = False) -> tuple[IdentifierMeta, dict[str, Any]]:
    """Fit the calibrated identifier on labelled sets (adversarial sets by attack, --data as clean) and store it."""
    check_name(name, "identifier")
    if store.identifier_dir(name).exists() and not overwrite:
        raise ExistsError(f"identifier {name!r} already exists in {store.root}", hint="pass --overwrite")
    if clean not in ("base", "none"):
        raise InvalidValueError(f"--clean must be 'base' or 'none' when fitting, got {clean!r}")
    members = load_members(store, names, base)
    order = [*members.names, *([BASE_MEMBER] if clean == "base" else [])]
    models = member_models(members, order)
    sets = input_sets(members.base.meta, data=data, split=split, adv_sets=adv_sets, limit=limit, seed=seed)
    features = torch.cat([identity_features(ensemble_probs([models[m] for m in order], s.x, batch_size))
                          for s in sets])
    labels = [s.attack for s in sets for _ in range(len(s.y))]
    model = fit_identifier(features, labels, epochs=epochs, lr=lr, weight_decay=weight_decay, seed=seed)
    summary = identification_summary(labels, model.predict(features))
    training = {"sets": {s.label: {"attack": s.attack, "n": len(s.y)} for s in sets}, "epochs": epochs, "lr": lr,
                "weight_decay": weight_decay, "seed": seed, "train_accuracy": summary["accuracy"]}
    tensors = model.state_dict()
    meta = IdentifierMeta(name=name, base=members.base.meta.name, base_fingerprint=members.base.meta.fingerprint,
                          members=order, member_labels={a.meta.name: member_label(a.meta) for a in members.adapters},
                          classes=model.classes, feature_names=identity_feature_names(len(order)), training=training,
                          tensors_sha256=weights_fingerprint(tensors))
    store.save_identifier(name, meta.model_dump(mode="json"), tensors, overwrite=overwrite)
    return meta, {"name": name, "base": meta.base, "members": order, "classes": model.classes, **summary,
                  "training": training}


# ---------------------------------------------------------------------------------------------- files


def write_json(path: Path, data: Any) -> Path:
    """Write JSON atomically (temp file + rename): a failed run leaves no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
