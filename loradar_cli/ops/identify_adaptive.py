"""The adaptive attacker's objective against identification: fool the decision and hide the attack's family.

An attacker who knows the identifier (Tramèr, Carlini, Brendel, Madry, "On Adaptive Attacks to Adversarial
Example Defenses", NeurIPS 2020, arXiv:2002.08347) maximises the defended decision's loss and, at once,
minimises the identifier's probability q of the attack families it must hide (the true one). `EvadeIdentifier`
makes that objective reachable by every attack that ascends the cross-entropy, with its own algorithm unchanged
(PGD's iterated steps, FGSM's single step, ROA's sticker search): it appends one logit e = logsumexp(z) + g to the
decision's logits z, and since logsumexp([z, e]) = logsumexp(z) + softplus(g), choosing g = log(q^(−w) − 1) gives

    CE([z, e], y) = CE(z, y) − w · log q

for every label y: the decision's loss plus w times the identifier's cross-entropy on the hidden classes. Ascending
it raises the decision's loss and lowers q, and unlike a term such as softplus(w · logit(1 − q)) it does not
saturate while the identifier is sure (its gradient in q is −w / q). The extra logit can win the argmax, so this
module is only a gradient target: judge success on the decision itself. With w = 0 the decision's logits are
returned as they are.
Attacks whose loss is not the cross-entropy of the logits (FIA's feature loss) do not see the identifier term;
the decision's `members` are exposed so that such attacks tap the same layers as against the decision itself.

The identifier's probabilities are differentiable in the members' outputs and the input except for feature
groups that count exact values (`plateau`), which are constant for the gradient: the attacker's surrogate treats
them as fixed (their forward values are exact).
"""

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from loradar_cli.errors import InvalidValueError

__all__ = ["EvadeIdentifier", "hidden_probability"]

ProbabilityFn = Callable[[Mapping[str, Tensor], Tensor], Tensor]
"""Identifier class probabilities [B, n_classes] from the members' probabilities (by name) and the inputs."""


def hidden_probability(class_probs: Tensor, hidden: Sequence[int]) -> Tensor:
    """Total probability [B] of the hidden classes, clamped into (0, 1) so its log-odds stay finite."""
    if not hidden:
        raise InvalidValueError("the adaptive objective needs at least one class to hide")
    return class_probs[:, list(hidden)].sum(dim=1).clamp(1e-6, 1 - 1e-6)


class EvadeIdentifier(nn.Module):
    """Gradient target of the adaptive attacker: the decision's logits plus one logit carrying the identifier term.

    `readers` are the models whose probabilities the identifier reads (keyed as it names them); `probabilities`
    maps their probabilities and the input to the identifier's class probabilities; `hidden` are the indices of
    the classes whose total probability the attacker minimises, with `weight` against the decision's loss.
    """

    def __init__(
        self,
        decision: nn.Module,
        readers: Mapping[str, nn.Module],
        probabilities: ProbabilityFn,
        hidden: Sequence[int],
        weight: float = 1.0,
    ) -> None:
        super().__init__()
        if weight < 0:
            raise InvalidValueError(f"the identifier-evasion weight must be >= 0, got {weight}")
        if not hidden:
            raise InvalidValueError("the adaptive objective needs at least one class to hide")
        self.decision = decision
        members = getattr(decision, "members", None)
        if isinstance(members, nn.ModuleList):  # attacks that tap an ensemble's members (FIA) tap the same ones
            self.members = members
        self.readers = nn.ModuleList(readers.values())
        self._names = list(readers)
        self._probabilities = probabilities
        self.hidden, self.weight = list(hidden), weight

    def hidden_probability(self, x: Tensor) -> Tensor:
        """The identifier's total probability [B] of the hidden classes (differentiable in x)."""
        probs = {n: m(x).softmax(dim=-1) for n, m in zip(self._names, self.readers, strict=True)}
        return hidden_probability(self._probabilities(probs, x), self.hidden)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.decision(x)
        if self.weight == 0:
            return logits
        a = -self.weight * self.hidden_probability(x).to(logits.dtype).log()  # the added loss, > 0
        g = a + torch.log(-torch.expm1(-a))  # log(exp(a) − 1), stable for small and large a
        extra = logits.logsumexp(dim=-1) + g
        return torch.cat([logits, extra[:, None]], dim=1)
