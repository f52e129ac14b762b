"""Attack identification from K attack-specific adapters' outputs (LoRADAR, methods.md §5.1).

Two routes: the write-up's rule (the most confident adapter names the attack, with our margin and "clean"
additions, marked unverified in methods.md), and a small calibrated classifier (multinomial logistic regression)
on per-input features of the K probability vectors, trained on loradar-generated attack sets.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from loradar_cli.errors import CorruptError, IncompatibleError, InvalidValueError

__all__ = [
    "IdentifierModel",
    "accuracy",
    "confusion_matrix",
    "fit_identifier",
    "identify_rule",
    "identity_feature_names",
    "identity_features",
]


def _check_probs(probs: Tensor) -> None:
    """Probabilities must be [K, B, C] with K >= 1 and C >= 2."""
    if probs.dim() != 3 or probs.shape[0] < 1 or probs.shape[2] < 2:
        raise InvalidValueError(f"expected probabilities [K, B, C] with C >= 2, got shape {tuple(probs.shape)}")


def identify_rule(
    probs: Tensor,
    labels_of_adapters: Sequence[str],
    *,
    margin: float = 0.1,
    clean_label: str = "clean",
    clean_index: int | None = None,
    unknown_label: str = "unknown",
) -> list[str]:
    """Per input: î = argmax_i max_c P[i, b, c] names the attack; "unknown" if its lead is too small.

    The lead is max_c P[î] − max_c P[j] over the runner-up adapter j; a lead <= margin gives `unknown_label`
    (with K = 1 the lead is infinite). Otherwise, if î is `clean_index` (the base model or a clean adapter),
    the answer is `clean_label`, else `labels_of_adapters[î]`. Ties between adapters go to the lower index.
    """
    _check_probs(probs)
    k = probs.shape[0]
    if len(labels_of_adapters) != k:
        raise InvalidValueError(f"got {len(labels_of_adapters)} adapter labels for {k} adapters")
    if clean_index is not None and not 0 <= clean_index < k:
        raise InvalidValueError(f"clean_index {clean_index} is out of range for {k} adapters")
    conf = probs.to(torch.float64).max(dim=-1).values  # [K, B]
    best = conf.argmax(dim=0)
    if k == 1:
        lead = torch.full_like(conf[0], torch.inf)
    else:
        top2 = conf.topk(2, dim=0).values
        lead = top2[0] - top2[1]
    out: list[str] = []
    for i, d in zip(best.tolist(), lead.tolist(), strict=True):
        if d <= margin:
            out.append(unknown_label)
        elif i == clean_index:
            out.append(clean_label)
        else:
            out.append(labels_of_adapters[i])
    return out


def identity_feature_names(k: int) -> list[str]:
    """Names of the columns of `identity_features` for K adapters."""
    names = [f"{stat}_{i}" for i in range(k) for stat in ("maxprob", "entropy", "margin")]
    return names + [f"agree_{i}_{j}" for i in range(k) for j in range(i + 1, k)]


def identity_features(probs: Tensor) -> Tensor:
    """Small, class-count-independent features [B, 3K + K(K−1)/2] of probs [K, B, C] for the identifier.

    Per adapter: max probability, entropy (nats), margin top1 − top2; then, for each pair i < j, whether the two
    adapters predict the same class (1.0 / 0.0). Column order and names: `identity_feature_names(K)`.
    """
    _check_probs(probs)
    p = probs.to(torch.float32)
    top2 = p.topk(2, dim=-1).values  # [K, B, 2]
    entropy = -torch.special.xlogy(p, p).sum(dim=-1)
    per_adapter = torch.stack([top2[..., 0], entropy, top2[..., 0] - top2[..., 1]], dim=-1)  # [K, B, 3]
    columns = [per_adapter.permute(1, 0, 2).reshape(p.shape[1], -1)]
    pred = p.argmax(dim=-1)
    k = p.shape[0]
    pairs = [(pred[i] == pred[j]).float() for i in range(k) for j in range(i + 1, k)]
    if pairs:
        columns.append(torch.stack(pairs, dim=1))
    return torch.cat(columns, dim=1)


@dataclass(frozen=True, eq=False)
class IdentifierModel:
    """Multinomial logistic regression on standardised features: logits = ((x − mean)/std)·Wᵀ + b."""

    weight: Tensor  # [n_classes, F]
    bias: Tensor  # [n_classes]
    mean: Tensor  # [F]
    std: Tensor  # [F]
    classes: list[str]

    def logits(self, features: Tensor) -> Tensor:
        """Class logits [B, n_classes] for features [B, F]."""
        if features.dim() != 2 or features.shape[1] != self.mean.shape[0]:
            raise IncompatibleError(
                f"identifier expects features [B, {self.mean.shape[0]}], got {tuple(features.shape)}"
            )
        z = (features.to(self.mean) - self.mean) / self.std
        return z @ self.weight.T + self.bias

    def predict_proba(self, features: Tensor) -> Tensor:
        """Class probabilities [B, n_classes], columns in the order of `classes`."""
        return self.logits(features).softmax(dim=-1)

    def predict(self, features: Tensor) -> list[str]:
        """Predicted class name per row."""
        return [self.classes[i] for i in self.logits(features).argmax(dim=-1).tolist()]

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors to store (e.g. in safetensors); the class names go to JSON metadata separately."""
        return {"weight": self.weight, "bias": self.bias, "mean": self.mean, "std": self.std}

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
        return cls(weight=w, bias=b, mean=mean, std=std, classes=list(classes))


def fit_identifier(
    features: Tensor,
    labels: Sequence[str],
    *,
    epochs: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> IdentifierModel:
    """Fit a multinomial logistic regression: standardised features, full-batch Adam, CE + wd·‖W‖²/2.

    Deterministic: fixed full batch, init from `seed`. Classes are the sorted distinct labels (at least 2);
    features with zero spread are standardised with std 1. The bias is not decayed.
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
    _adam(params, z1, onehot, epochs, lr, weight_decay)
    return IdentifierModel(params[:, :-1].clone(), params[:, -1].clone(), mean, std, classes)


def _adam(params: Tensor, z1: Tensor, onehot: Tensor, steps: int, lr: float, weight_decay: float) -> None:
    """Full-batch Adam (β = 0.9, 0.999) in place on [W | b] with the analytic softmax-regression gradient.

    Written out instead of torch.optim.Adam, whose per-step overhead dominates on problems this small.
    """
    decay = torch.ones_like(params) * weight_decay
    decay[:, -1] = 0.0  # no decay on the bias column
    m, v = torch.zeros_like(params), torch.zeros_like(params)
    for t in range(1, steps + 1):
        logits = z1 @ params.T
        p = (logits - logits.amax(dim=1, keepdim=True)).exp_()  # softmax by hand: Tensor.softmax is
        p.div_(p.sum(dim=1, keepdim=True))  # multi-threaded and crawls on a busy CPU
        grad = (p - onehot).T @ z1 / len(z1) + decay * params
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
