"""Attack identification from K attack-specific adapters' outputs and the input itself.

Three routes: the LoRADAR rule (the most confident adapter names the attack, with a margin and a "clean" member);
the same rule on confidences relative to each member's confidence on clean inputs, so that "most confident" means
"most confident relative to its usual"; and a small calibrated classifier (multinomial logistic regression) on
per-input features (`loradar_cli.ops.identify_features`), with feature groups chosen by cross-validated accuracy
and a rejection rule that answers "unknown" for inputs far from every fitted class.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from loradar_cli.errors import CorruptError, IncompatibleError, InvalidValueError
from loradar_cli.ops._linalg import check_probs
from loradar_cli.ops.identify_features import FeatureInputs, confidence_features

__all__ = [
    "UNKNOWN",
    "IdentifierModel",
    "accuracy",
    "balanced_accuracy",
    "calibrate_rejection",
    "clean_confidence_stats",
    "confusion_matrix",
    "fit_identifier",
    "identify_relative",
    "identify_rule",
    "identity_feature_names",
    "identity_features",
    "per_class_scores",
    "relative_confidence",
    "select_feature_groups",
    "stratified_split",
]

UNKNOWN = "unknown"


def identify_rule(
    probs: Tensor,
    labels_of_adapters: Sequence[str],
    *,
    margin: float = 0.1,
    clean_label: str = "clean",
    clean_index: int | None = None,
    unknown_label: str = UNKNOWN,
) -> list[str]:
    """Per input: î = argmax_i max_c P[i, b, c] names the attack; "unknown" if its lead is too small.

    The lead is max_c P[î] − max_c P[j] over the runner-up adapter j; a lead <= margin gives `unknown_label`
    (with K = 1 the lead is infinite). Otherwise, if î is `clean_index` (the base model or a clean adapter),
    the answer is `clean_label`, else `labels_of_adapters[î]`. Ties between adapters go to the lower index.
    """
    check_probs(probs, min_classes=2)
    conf = probs.to(torch.float64).max(dim=-1).values  # [K, B]
    return _rule_from_scores(conf, labels_of_adapters, margin, clean_index, clean_label, unknown_label)


def relative_confidence(probs: Tensor, clean_mean: Tensor, clean_std: Tensor) -> Tensor:
    """Per member and input [K, B]: the log-odds of its max probability in standard units of its clean spread.

    (logit(max_c P[i, b, c]) − clean_mean[i]) / clean_std[i], with mean and std measured on clean inputs, so 0 is
    the member's usual confidence and the scores of different members are comparable.
    """
    check_probs(probs, min_classes=2)
    if clean_mean.shape != (probs.shape[0],) or clean_std.shape != (probs.shape[0],):
        raise InvalidValueError(
            f"need one clean mean and std per member ({probs.shape[0]}), got {tuple(clean_mean.shape)}, "
            f"{tuple(clean_std.shape)}"
        )
    top = probs.to(torch.float64).max(dim=-1).values.clamp(1e-6, 1 - 1e-6)
    odds = top.log() - (-top).log1p()
    return (odds - clean_mean.to(odds)[:, None]) / clean_std.to(odds).clamp_min(1e-6)[:, None]


def clean_confidence_stats(probs: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and std [K] over clean inputs of each member's max-probability log-odds (for `relative_confidence`)."""
    check_probs(probs, min_classes=2)
    if probs.shape[1] < 2:
        raise InvalidValueError("clean confidence statistics need at least 2 clean inputs")
    top = probs.to(torch.float64).max(dim=-1).values.clamp(1e-6, 1 - 1e-6)
    odds = top.log() - (-top).log1p()
    return odds.mean(dim=1), odds.std(dim=1).clamp_min(1e-6)


def identify_relative(
    probs: Tensor,
    labels_of_members: Sequence[str],
    clean_mean: Tensor,
    clean_std: Tensor,
    *,
    margin: float = 0.0,
    clean_index: int | None = None,
    clean_label: str = "clean",
    unknown_label: str = UNKNOWN,
) -> list[str]:
    """The LoRADAR rule on relative confidences: the member most confident relative to its clean usual names it.

    Scores are `relative_confidence` (standard units); a lead over the runner-up <= margin gives `unknown_label`;
    the member at `clean_index` answers `clean_label`. Ties go to the lower index.
    """
    scores = relative_confidence(probs, clean_mean, clean_std)
    return _rule_from_scores(scores, labels_of_members, margin, clean_index, clean_label, unknown_label)


def _rule_from_scores(
    scores: Tensor,
    labels: Sequence[str],
    margin: float,
    clean_index: int | None,
    clean_label: str,
    unknown_label: str,
) -> list[str]:
    """Per input the label of argmax_i scores[i], or `unknown_label` if its lead over the runner-up <= margin."""
    k = scores.shape[0]
    if len(labels) != k:
        raise InvalidValueError(f"got {len(labels)} member labels for {k} members")
    if clean_index is not None and not 0 <= clean_index < k:
        raise InvalidValueError(f"clean_index {clean_index} is out of range for {k} members")
    best = scores.argmax(dim=0)
    lead = torch.full_like(scores[0], torch.inf) if k == 1 else scores.topk(2, dim=0).values.diff(dim=0)[0].neg()
    out: list[str] = []
    for i, d in zip(best.tolist(), lead.tolist(), strict=True):
        if d <= margin:
            out.append(unknown_label)
        else:
            out.append(clean_label if i == clean_index else labels[i])
    return out


def identity_feature_names(k: int) -> list[str]:
    """Names of the columns of `identity_features` for K adapters."""
    names = [f"{stat}_{i}" for i in range(k) for stat in ("maxprob", "entropy", "margin")]
    return names + [f"agree_{i}_{j}" for i in range(k) for j in range(i + 1, k)]


def identity_features(probs: Tensor) -> Tensor:
    """Small, class-count-independent features [B, 3K + K(K−1)/2] of probs [K, B, C] for the identifier.

    Per adapter: max probability, entropy (nats), margin top1 − top2; then, for each pair i < j, whether the two
    adapters predict the same class (1.0 / 0.0). Column order and names: `identity_feature_names(K)`; the same
    columns as the "confidence" feature group.
    """
    check_probs(probs, min_classes=2)
    return confidence_features(FeatureInputs(probs))


REJECTION_TENSORS = ("class_mean", "class_std", "reject_distance", "reject_prob")


@dataclass(frozen=True, eq=False)
class IdentifierModel:
    """Multinomial logistic regression on standardised features: logits = ((x − mean)/std)·Wᵀ + b.

    With rejection fitted (`calibrate_rejection`), an input whose standardised features lie farther than
    `reject_distance` from every class (mean squared z-score under a per-class diagonal Gaussian) or whose top
    class probability is below `reject_prob` is answered "unknown".
    """

    weight: Tensor  # [n_classes, F]
    bias: Tensor  # [n_classes]
    mean: Tensor  # [F]
    std: Tensor  # [F]
    classes: list[str]
    class_mean: Tensor | None = None  # [n_classes, F], in standardised units
    class_std: Tensor | None = None  # [n_classes, F]
    reject_distance: Tensor | None = None  # scalar
    reject_prob: Tensor | None = None  # scalar

    def standardise(self, features: Tensor) -> Tensor:
        """(features − mean) / std [B, F], checking the column count."""
        if features.dim() != 2 or features.shape[1] != self.mean.shape[0]:
            raise IncompatibleError(
                f"identifier expects features [B, {self.mean.shape[0]}], got {tuple(features.shape)}"
            )
        return (features.to(self.mean) - self.mean) / self.std

    def logits(self, features: Tensor) -> Tensor:
        """Class logits [B, n_classes] for features [B, F] (differentiable in the features)."""
        return self.standardise(features) @ self.weight.T + self.bias

    def predict_proba(self, features: Tensor) -> Tensor:
        """Class probabilities [B, n_classes], columns in the order of `classes`."""
        return self.logits(features).softmax(dim=-1)

    def distance(self, features: Tensor) -> Tensor:
        """Per input [B]: min over classes of the mean squared z-score to the class (needs rejection fitted)."""
        if self.class_mean is None or self.class_std is None:
            raise IncompatibleError("this identifier has no rejection statistics")
        z = self.standardise(features)
        return (((z[:, None, :] - self.class_mean) / self.class_std).pow(2).mean(dim=-1)).min(dim=1).values

    def rejected(self, features: Tensor) -> Tensor:
        """Boolean [B]: inputs answered "unknown" (all False without rejection)."""
        out = torch.zeros(features.shape[0], dtype=torch.bool)
        if self.reject_distance is not None:
            out |= self.distance(features) > self.reject_distance
        if self.reject_prob is not None:
            out |= self.predict_proba(features).max(dim=-1).values < self.reject_prob
        return out

    def predict(self, features: Tensor, *, reject: bool = True, unknown_label: str = UNKNOWN) -> list[str]:
        """Predicted class name per row; rejected rows (if `reject` and rejection is fitted) get `unknown_label`."""
        best = self.logits(features).argmax(dim=-1).tolist()
        out = self.rejected(features).tolist() if reject else [False] * len(best)
        return [unknown_label if r else self.classes[i] for i, r in zip(best, out, strict=True)]

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors to store (e.g. in safetensors); the class names go to JSON metadata separately."""
        tensors = {"weight": self.weight, "bias": self.bias, "mean": self.mean, "std": self.std}
        extra = {k: getattr(self, k) for k in REJECTION_TENSORS}
        return {**tensors, **{k: v.contiguous() for k, v in extra.items() if v is not None}}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], classes: Sequence[str]) -> "IdentifierModel":
        """Rebuild from `state_dict()` tensors and the class list, checking that the shapes agree."""
        missing = [k for k in ("weight", "bias", "mean", "std") if k not in tensors]
        if missing:
            raise CorruptError(f"identifier tensors lack {missing}")
        w, b, mean, std = (tensors[k].detach().to(torch.float32) for k in ("weight", "bias", "mean", "std"))
        n = len(classes)
        f = mean.shape[0] if mean.dim() == 1 else -1
        if w.shape != (n, f) or b.shape != (n,) or std.shape != (f,):
            raise CorruptError(
                f"identifier tensors do not fit {n} classes: weight {tuple(w.shape)}, bias {tuple(b.shape)}, "
                f"mean {tuple(mean.shape)}, std {tuple(std.shape)}"
            )
        extra = {k: tensors[k].detach().to(torch.float32) for k in REJECTION_TENSORS if k in tensors}
        expected = {"class_mean": (n, f), "class_std": (n, f), "reject_distance": (), "reject_prob": ()}
        wrong = [k for k, v in extra.items() if tuple(v.shape) != expected[k]]
        if wrong:
            raise CorruptError(f"identifier rejection tensor {wrong[0]!r} has shape {tuple(extra[wrong[0]].shape)}")
        return cls(weight=w, bias=b, mean=mean, std=std, classes=list(classes), **extra)


def calibrate_rejection(
    model: IdentifierModel,
    train_features: Tensor,
    train_labels: Sequence[str],
    held_features: Tensor,
    *,
    quantile: float = 0.99,
) -> IdentifierModel:
    """Add rejection: per-class diagonal Gaussians from the training rows, thresholds from held-out rows.

    The distance threshold is the `quantile` of held-out distances and the probability threshold the (1 −
    `quantile`) quantile of held-out top probabilities, so about 2·(1 − quantile) of inputs like the fitted ones
    are rejected. Class spreads are floored at 0.1 standard units, so a feature that is constant within a class
    cannot make every other input infinitely far.
    """
    if not 0 < quantile <= 1:
        raise InvalidValueError(f"the rejection quantile must be in (0, 1], got {quantile}")
    z = model.standardise(train_features)
    index = torch.tensor([model.classes.index(label) for label in train_labels])
    class_mean = torch.stack([z[index == c].mean(dim=0) for c in range(len(model.classes))])
    class_std = torch.stack([z[index == c].std(dim=0, unbiased=False) for c in range(len(model.classes))])
    with_stats = dataclasses.replace(model, class_mean=class_mean, class_std=class_std.clamp_min(0.1))
    distance = with_stats.distance(held_features).quantile(quantile)
    prob = model.predict_proba(held_features).max(dim=-1).values.quantile(1 - quantile)
    return dataclasses.replace(with_stats, reject_distance=distance, reject_prob=prob)


def fit_identifier(
    features: Tensor,
    labels: Sequence[str],
    *,
    epochs: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-3,
    seed: int = 0,
    balance: bool = False,
) -> IdentifierModel:
    """Fit a multinomial logistic regression: standardised features, full-batch Adam, CE + wd·‖W‖²/2.

    Deterministic: fixed full batch, init from `seed`. Classes are the sorted distinct labels (at least 2);
    features with zero spread are standardised with std 1. The bias is not decayed. With `balance` each class
    weighs the same in the loss whatever its count (each input weighted by N / (classes · its class's count)),
    so a class with few inputs (clean data next to many attack sets) is not sacrificed to the others.
    """
    if features.dim() != 2 or features.shape[0] != len(labels):
        raise InvalidValueError(f"need features [N, F] with N = {len(labels)} labels, got {tuple(features.shape)}")
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise InvalidValueError(f"the identifier needs at least 2 classes, got {classes}")
    if epochs < 1 or lr <= 0 or weight_decay < 0:
        raise InvalidValueError(f"need epochs >= 1, lr > 0, weight_decay >= 0; got {epochs}, {lr}, {weight_decay}")
    x = features.detach().to(torch.float32).cpu()
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    z = (x - mean) / std
    index = {c: i for i, c in enumerate(classes)}
    onehot = F.one_hot(torch.tensor([index[label] for label in labels]), len(classes)).float()
    z1 = torch.cat([z, torch.ones(len(z), 1)], dim=1)  # bias as a last, constant feature
    gen = torch.Generator().manual_seed(seed)
    params = torch.cat([torch.randn(len(classes), x.shape[1], generator=gen) * 0.01, torch.zeros(len(classes), 1)], 1)
    weights = None
    if balance:
        counts = onehot.sum(dim=0)
        weights = (len(labels) / (len(classes) * counts))[onehot.argmax(dim=1)]
    _adam(params, z1, onehot, epochs, lr, weight_decay, weights)
    return IdentifierModel(params[:, :-1].clone(), params[:, -1].clone(), mean, std, classes)


def _adam(
    params: Tensor, z1: Tensor, onehot: Tensor, steps: int, lr: float, weight_decay: float, weights: Tensor | None
) -> None:
    """Full-batch Adam (β = 0.9, 0.999) in place on [W | b] with the analytic softmax-regression gradient.

    `weights` (mean 1) weigh each input's loss. Written out instead of torch.optim.Adam, whose per-step overhead
    dominates on problems this small.
    """
    zw = z1 if weights is None else z1 * weights[:, None]
    decay = torch.ones_like(params) * weight_decay
    decay[:, -1] = 0.0  # no decay on the bias column
    m, v = torch.zeros_like(params), torch.zeros_like(params)
    for t in range(1, steps + 1):
        logits = z1 @ params.T
        p = (logits - logits.amax(dim=1, keepdim=True)).exp_()  # softmax by hand: Tensor.softmax is
        p.div_(p.sum(dim=1, keepdim=True))  # multi-threaded and crawls on a busy CPU
        grad = (p - onehot).T @ zw / len(z1) + decay * params
        m.mul_(0.9).add_(grad, alpha=0.1)
        v.mul_(0.999).addcmul_(grad, grad, value=0.001)
        step = lr / (1 - 0.9**t)
        params.addcdiv_(m, (v / (1 - 0.999**t)).sqrt_().add_(1e-8), value=-step)


def _check_pairs(true: Sequence[str], pred: Sequence[str]) -> None:
    """Same, non-zero length."""
    if len(true) != len(pred) or not true:
        raise InvalidValueError(f"need equally many true and predicted labels (> 0), got {len(true)} and {len(pred)}")


def confusion_matrix(
    true: Sequence[str], pred: Sequence[str], labels: Sequence[str] | None = None
) -> tuple[list[str], list[list[int]]]:
    """Counts [i][j] of inputs with true label labels[i] predicted as labels[j]; labels default to the sorted union."""
    _check_pairs(true, pred)
    names = list(labels) if labels is not None else sorted(set(true) | set(pred))
    index = {name: i for i, name in enumerate(names)}
    unlisted = [x for x in (*true, *pred) if x not in index]
    if unlisted:
        raise InvalidValueError(f"label {unlisted[0]!r} is not in the confusion-matrix labels {names}")
    matrix = [[0] * len(names) for _ in names]
    for t, p in zip(true, pred, strict=True):
        matrix[index[t]][index[p]] += 1
    return names, matrix


def accuracy(true: Sequence[str], pred: Sequence[str]) -> float:
    """Fraction of inputs whose predicted label equals the true one."""
    _check_pairs(true, pred)
    return sum(t == p for t, p in zip(true, pred, strict=True)) / len(true)


def balanced_accuracy(true: Sequence[str], pred: Sequence[str]) -> float:
    """Mean over the true classes of the fraction named correctly: a small class counts as much as a large one."""
    recalls = [float(scores["recall"] or 0.0) for scores in per_class_scores(true, pred).values()]
    return sum(recalls) / len(recalls)


def per_class_scores(true: Sequence[str], pred: Sequence[str]) -> dict[str, dict[str, float | int | None]]:
    """Per true class: precision, recall and support; precision is None for a class never predicted."""
    _check_pairs(true, pred)
    out: dict[str, dict[str, float | int | None]] = {}
    for name in sorted(set(true)):
        hits = sum(t == p == name for t, p in zip(true, pred, strict=True))
        called = sum(p == name for p in pred)
        support = sum(t == name for t in true)
        out[name] = {"precision": hits / called if called else None, "recall": hits / support, "support": support}
    return out


def stratified_split(labels: Sequence[str], fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Row indices (kept, held out): about `fraction` of each class held out (at least 1 if it has >= 2 rows)."""
    if not 0 < fraction < 1:
        raise InvalidValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    kept: list[int] = []
    held: list[int] = []
    for name in sorted(set(labels)):
        rows = [i for i, label in enumerate(labels) if label == name]
        order = [rows[i] for i in torch.randperm(len(rows), generator=gen).tolist()]
        n_held = min(len(rows) - 1, max(1, round(fraction * len(rows)))) if len(rows) >= 2 else 0
        held += order[:n_held]
        kept += order[n_held:]
    return sorted(kept), sorted(held)


def _cv_accuracy(features: Tensor, labels: Sequence[str], folds: int, seed: int, fit_options: Mapping) -> float:
    """Mean accuracy over `folds` stratified folds (each fold held out once); balanced accuracy (the mean of the
    per-class recalls) when the fit is balanced."""
    score = balanced_accuracy if fit_options.get("balance") else accuracy
    gen = torch.Generator().manual_seed(seed)
    fold_of = torch.empty(len(labels), dtype=torch.long)
    for name in sorted(set(labels)):
        rows = torch.tensor([i for i, label in enumerate(labels) if label == name])
        fold_of[rows[torch.randperm(len(rows), generator=gen)]] = torch.arange(len(rows)) % folds
    scores = []
    for f in range(folds):
        train, test = (fold_of != f).nonzero()[:, 0], (fold_of == f).nonzero()[:, 0]
        train_labels = [labels[i] for i in train.tolist()]
        if len(set(train_labels)) < 2 or len(test) == 0:
            continue
        model = fit_identifier(features[train], train_labels, seed=seed, **fit_options)
        scores.append(score([labels[i] for i in test.tolist()], model.predict(features[test])))
    if not scores:
        raise InvalidValueError("too few labelled inputs to cross-validate the feature selection")
    return sum(scores) / len(scores)


def select_feature_groups(
    blocks: Mapping[str, Tensor],
    labels: Sequence[str],
    *,
    folds: int = 3,
    seed: int = 0,
    tolerance: float = 0.005,
    fit_options: Mapping | None = None,
) -> tuple[list[str], list[dict[str, object]]]:
    """Greedy forward selection of feature groups by cross-validated accuracy.

    Each round adds the group that gives the best `folds`-fold accuracy, until every group is in; the answer is
    the shortest chosen prefix within `tolerance` of the best accuracy seen (running every round instead of
    stopping at the first round without gain lets a group that only helps next to others be found). Returns the
    groups and the history (groups and accuracy per round).
    """
    if not blocks:
        raise InvalidValueError("no feature groups to select from")
    chosen: list[str] = []
    scores: list[float] = []
    options = dict(fit_options or {})
    while len(chosen) < len(blocks):
        trials = {
            name: _cv_accuracy(torch.cat([blocks[g] for g in [*chosen, name]], dim=1), labels, folds, seed, options)
            for name in blocks
            if name not in chosen
        }
        name, score = max(trials.items(), key=lambda kv: (kv[1], -list(blocks).index(kv[0])))
        chosen.append(name)
        scores.append(score)
    size = next(i + 1 for i, score in enumerate(scores) if score >= max(scores) - tolerance)
    history: list[dict[str, object]] = [
        {"groups": chosen[: i + 1], "cv_accuracy": score} for i, score in enumerate(scores)
    ]
    return chosen[:size], history
