"""Adapter tensors as stored: the plain LoRA a trained model amounts to, relative to the untouched base.

A layer with a frozen residual pair (A₀, B₀) and/or a trainable scale α computes
W₀ + s·(α·B·A − B₀·A₀) = W₀ + s·[α·B, −B₀]·[A; A₀]: an exact LoRA of rank 2r. It is stored as such (rank and
alpha per layer in `rank_pattern`/`alpha_pattern`, the scale s unchanged), so loradar and PEFT load it onto the
plain base, and every adapter initialised from the same base shares that base. Where 2r exceeds what the layer
can hold (min(d_out, d_in), e.g. the 3×3 conv of a 1-channel input), the same ΔW is re-factored exactly by SVD.
"""

import torch
from torch import Tensor, nn

from loradar_cli.lora.inject import PEFT_PREFIX, lora_layers, lora_state_dict
from loradar_cli.lora.spec import LoraSpec


def adapter_tensors(model: nn.Module, spec: LoraSpec) -> tuple[LoraSpec, dict[str, Tensor]]:
    """(spec, tensors) to store for an injected `model`: plain factors as they are, extended layers folded."""
    layers = lora_layers(model)
    tensors = lora_state_dict(model, spec)
    if all(layer.plain for layer in layers.values()):
        return spec, tensors
    ranks, alphas = dict(spec.rank_pattern), dict(spec.alpha_pattern)
    with torch.no_grad():
        for name, layer in layers.items():
            a, b = within_rank(*layer.factors())
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.detach().cpu().contiguous().clone()
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.detach().cpu().contiguous().clone()
            ranks[name] = a.shape[0]
            alphas[name] = layer.scaling * a.shape[0]
    r = max(ranks.values())
    lora_alpha = next(alphas[n] for n in ranks if ranks[n] == r)
    ranks = {n: k for n, k in ranks.items() if k != r}
    alphas = {n: v for n, v in alphas.items() if v != lora_alpha}
    stored = spec.model_copy(update={"r": r, "lora_alpha": lora_alpha, "rank_pattern": ranks, "alpha_pattern": alphas})
    return LoraSpec.model_validate(stored.model_dump()), tensors


def within_rank(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Factors (A, B) of the same ΔW = B·A with at most min(d_out, d_in) rows of A (an exact SVD re-factoring)."""
    d_out, d_in = b.shape[0], a[0].numel()
    m = min(d_out, d_in)
    if a.shape[0] <= m:
        return a, b
    u, s, vh = torch.linalg.svd(b.flatten(1).double() @ a.flatten(1).double(), full_matrices=False)
    root = s[:m].sqrt()
    new_b = (u[:, :m] * root).to(b.dtype).reshape(d_out, m, *b.shape[2:])
    new_a = (root[:, None] * vh[:m]).to(a.dtype).reshape(m, *a.shape[1:])
    return new_a, new_b


def base_state(model: nn.Module) -> dict[str, Tensor]:
    """The plain model's state dict of an injected `model`, LoRA branches dropped (their base weights kept)."""
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if any(part.startswith("lora_") for part in parts):
            continue
        out[".".join(p for p in parts if p != "base_layer")] = value.detach().cpu().contiguous().clone()
    return out
