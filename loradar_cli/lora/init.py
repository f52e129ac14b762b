"""LoRA initialisations behind one registry: `LORA_INITS.get("svd")(layer)` sets a wrapped layer's factors.

- `kaiming`: A Kaiming-uniform, B = 0 (PEFT's default): the adapted model starts equal to the base.
- `svd`: the top-r singular triplets of the base weight W₀ (conv kernels flattened to [out, in·kh·kw]):
  B = U_r·diag(σ_r/s)^½, A = diag(σ_r/s)^½·V_rᵀ, and the same pair frozen as the residual (A₀, B₀), so the
  layer computes W₀ − s·B₀A₀ + s·BA, which equals W₀ at step 0. Yang, Liu, Wei, "Mixture of Adversarial
  LoRAs: Boosting Robust Generalization in Meta-Tuning", NeurIPS 2024 (AMT), principal singular
  value/vector initialisation.
- `cluster`: k-means with k = r on the rows of W₀ (flattened): A = the centres [r, in·kh·kw], B = the one-hot
  assignment [out, r], frozen again as the residual pair (function-preserving). Ji et al., "AdvLoRA:
  Adversarial Low-Rank Adaptation of Vision-Language Models", arXiv:2404.13425 (reparameterisation by
  parameter clustering; the clustering axis and the frozen residual are our reading, the paper gives neither).

To add an initialisation: a function `(layer, generator) -> None` registered here under a lower-case name.
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from loradar_cli.errors import IncompatibleError
from loradar_cli.lora.layers import LoraLayer
from loradar_cli.registry import Registry

LoraInit = Callable[[LoraLayer, torch.Generator | None], None]
LORA_INITS: Registry[LoraInit] = Registry("LoRA initialisation")


def flat_weight(layer: LoraLayer) -> Tensor:
    """The base weight W₀ as a matrix [out, in·kh·kw] (float32, detached)."""
    weight = layer.base_layer.weight.detach().float()
    return weight.reshape(weight.shape[0], -1)


def set_factors(layer: LoraLayer, a: Tensor, b: Tensor, *, residual: bool) -> None:
    """Copy matrices a [r, in·kh·kw] and b [out, r] into the layer's factor shapes (and freeze them as A₀, B₀)."""
    if getattr(layer.base_layer, "groups", 1) != 1:
        raise IncompatibleError("this LoRA initialisation needs ungrouped layers; exclude grouped convs")
    a = a.reshape(layer.lora_A.weight.shape).to(layer.lora_A.weight)
    b = b.reshape(layer.lora_B.weight.shape).to(layer.lora_B.weight)
    with torch.no_grad():
        layer.lora_A.weight.copy_(a)
        layer.lora_B.weight.copy_(b)
    if residual:
        layer.set_residual(a, b)


@LORA_INITS.register("kaiming")
def kaiming_init(layer: LoraLayer, generator: torch.Generator | None = None) -> None:
    """A Kaiming-uniform (as PEFT), B = 0."""
    bound = 1 / math.sqrt(layer.lora_A.weight[0].numel())  # kaiming_uniform_ with a = √5, as nn.Linear
    with torch.no_grad():
        if generator is None:
            nn.init.kaiming_uniform_(layer.lora_A.weight, a=math.sqrt(5))
        else:
            layer.lora_A.weight.uniform_(-bound, bound, generator=generator)
        layer.lora_B.weight.zero_()


@LORA_INITS.register("svd")
def svd_init(layer: LoraLayer, generator: torch.Generator | None = None) -> None:
    """Top-r SVD split of W₀, frozen as the residual pair: the layer equals its base at step 0."""
    w = flat_weight(layer)
    r = layer.r
    if r > min(w.shape):
        raise IncompatibleError(f"SVD init needs rank <= min(out, in) = {min(w.shape)}, got {r}")
    u, sigma, vh = torch.linalg.svd(w.double(), full_matrices=False)
    root = (sigma[:r] / layer.scaling).sqrt()
    set_factors(layer, (root[:, None] * vh[:r]).float(), (u[:, :r] * root).float(), residual=True)


def kmeans(rows: Tensor, k: int, *, iters: int = 20, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means with k-means++ seeding on `rows` [n, d]: (centres [k, d], assignment [n])."""
    n = rows.shape[0]
    if k > n:
        raise IncompatibleError(f"cluster init needs rank <= the layer's output size {n}, got {k}")
    first = int(torch.randint(n, (1,), generator=generator))
    centres = rows[first : first + 1]
    for _ in range(1, k):
        d2 = torch.cdist(rows, centres).min(1).values.square()
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / n)
        centres = torch.cat([centres, rows[torch.multinomial(probs, 1, generator=generator)]])
    assign = torch.cdist(rows, centres).argmin(1)
    for _ in range(iters):
        for j in range(k):
            members = rows[assign == j]
            if len(members):  # an empty cluster keeps its centre
                centres[j] = members.mean(0)
        new = torch.cdist(rows, centres).argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
    return centres, assign


@LORA_INITS.register("cluster")
def cluster_init(layer: LoraLayer, generator: torch.Generator | None = None) -> None:
    """k-means (k = r) of W₀'s rows: A = centres / s, B = one-hot assignment, frozen as the residual pair."""
    w = flat_weight(layer).double()
    centres, assign = kmeans(w, layer.r, generator=generator)
    one_hot = torch.nn.functional.one_hot(assign, layer.r).to(w)
    set_factors(layer, (centres / layer.scaling).float(), one_hot.float(), residual=True)


def init_lora(layers: dict[str, LoraLayer], name: str, generator: torch.Generator | None = None) -> None:
    """Initialise every layer with the registered initialisation `name` (layers in name order)."""
    init = LORA_INITS.get(name)
    for key in sorted(layers):
        init(layers[key], generator)
