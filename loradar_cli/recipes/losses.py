"""Recipe losses as pure functions of logits (batch means; KL summed over classes, as the reference codes do).

- TRADES: Zhang, Yu, Jiao, Xing, El Ghaoui, Jordan, "Theoretically Principled Trade-off between Robustness
  and Accuracy", ICML 2019, arXiv:1901.08573: CE(z(x), y) + β·KL(p(x) ‖ p(x_adv)).
- MART: Wang, Zou, Yi, Bailey, Ma, Gu, "Improving Adversarial Robustness Requires Revisiting Misclassified
  Examples", ICLR 2020: BCE(p(x_adv), y) + λ·KL(p(x) ‖ p(x_adv))·(1 − p_y(x)), with the boosted CE
  BCE = −log p_y(x_adv) − log(1 − max_{k≠y} p_k(x_adv)).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

# Guards of the MART reference code: log(1.0001 − p) stays finite when p → 1, and the KL weight 1 − p_y stays
# positive for confidently correct points.
_MART_LOG_GUARD = 1.0001
_MART_WEIGHT_GUARD = 1.0000001


def kl_div(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(p ‖ q) per sample [B], p = softmax(logits_p), q = softmax(logits_q), summed over classes."""
    log_p, log_q = torch.log_softmax(logits_p, 1), torch.log_softmax(logits_q, 1)
    return (log_p.exp() * (log_p - log_q)).sum(1)


def trades_loss(logits: Tensor, logits_adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """TRADES outer loss: CE on clean logits + β·batch-mean KL(p(x) ‖ p(x_adv)); p(x) keeps its gradient."""
    return F.cross_entropy(logits, y) + beta * kl_div(logits, logits_adv).mean()


def boosted_ce(logits_adv: Tensor, y: Tensor) -> Tensor:
    """MART's boosted CE per sample [B]: CE plus −log(1 − the largest wrong-class probability)."""
    probs = logits_adv.softmax(1)
    wrong = probs.scatter(1, y[:, None], float("-inf")).max(1).values
    return F.cross_entropy(logits_adv, y, reduction="none") - torch.log(_MART_LOG_GUARD - wrong)


def mart_loss(logits: Tensor, logits_adv: Tensor, y: Tensor, lam: float) -> Tensor:
    """MART: batch mean of boosted CE + λ·KL(p(x) ‖ p(x_adv))·(1 − p_y(x))."""
    p_true = logits.softmax(1).gather(1, y[:, None]).squeeze(1)
    kl = kl_div(logits, logits_adv) * (_MART_WEIGHT_GUARD - p_true)
    return (boosted_ce(logits_adv, y) + lam * kl).mean()
