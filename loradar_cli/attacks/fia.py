"""FIA: feature importance-aware attack, L-inf.

Wang, Guo, Zhang, Liu, Qin, Ren, "Feature Importance-aware Transferable Adversarial Attacks", ICCV 2021,
arXiv:2107.14185; official code `hcguoO0/FIA` (TensorFlow).
Threat model: ||x_adv - x||_inf <= eps, x_adv in [0, 1].

Choices:
* eps defaults to 8/255 like the project's other L-inf attacks (the paper uses 16/255); alpha defaults to
  eps / steps [paper].
* The aggregate gradient uses the true-class *logit* [code] (the PyTorch ports use the softmax probability),
  with Bernoulli(1 - drop_prob) masks per pixel and channel on the raw [0, 1] image [code]. It is computed
  once from the clean image and normalised per sample by its L2 norm.
* The loss sum(delta * f_k(x')) is not divided by the feature size (the code does; sign updates are equal).
* `layer=None` picks `default_feature_layer(model)`, the middle of the feature hierarchy (ResNet `layer2`,
  as in the PyTorch ports for ResNet-18). unverified for other families.
* An ensemble (a model with a `members` ModuleList, whose logits are the members' mean) is attacked as one
  model whose feature is the concatenation of every member's feature layer: the masked images go through
  all members, and the importance is normalised over all layers together.
* A module that runs several times per forward pass is tapped at its first call. The objective's forward
  pass stops at the layer (a private exception raised by the hook), so later layers cost nothing.
"""

import difflib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from loradar_cli.attacks._functional import grad_wrt, l2_norm, per_sample, project_linf, uniform
from loradar_cli.attacks.base import Attack, AttackConfig, ThreatModel, register_attack
from loradar_cli.errors import InvalidValueError, NotFoundError


class FIAConfig(AttackConfig):
    """FIA options; `max_batch` caps the masked images per forward pass when aggregating gradients."""

    layer: str | None = None
    ensemble: int = Field(30, ge=1)
    drop_prob: float = Field(0.3, ge=0, lt=1)
    steps: int = Field(10, ge=1)
    alpha: float | None = Field(None, gt=0)
    momentum: float = Field(1.0, ge=0)
    max_batch: int = Field(256, ge=1)


def default_feature_layer(model: nn.Module) -> str:
    """Name of a mid-level feature module: `layer2`, else `stages.1`, else `blocks.{n // 2}`, else a middle child.

    Names are matched on dotted components anywhere in `model.named_modules()`, so a bare timm model and a
    wrapper holding it (e.g. as `.model`) both work.
    """
    modules = dict(model.named_modules())
    for name in modules:
        if name.split(".")[-1] == "layer2":
            return name
    for name in modules:
        if name == "stages.1" or name.endswith(".stages.1"):
            return name
    for name, module in modules.items():
        if name.split(".")[-1] == "blocks" and len(list(module.children())) > 0:
            return f"{name}.{len(list(module.children())) // 2}"
    return _middle_child(model)


def _middle_child(model: nn.Module) -> str:
    """The middle top-level child, looking through wrappers that hold the network as `.model`."""
    prefix, core = "", model
    while isinstance(getattr(core, "model", None), nn.Module) and "model" in dict(core.named_children()):
        prefix, core = f"{prefix}model.", core.model
    children = [name for name, _ in core.named_children()]
    if not children:
        raise InvalidValueError(f"cannot choose a feature layer in {type(core).__name__}; pass layer=<module name>")
    return prefix + children[len(children) // 2]


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called `name`; an unknown name lists close or first valid names."""
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    valid = [n for n in modules if n]
    close = difflib.get_close_matches(name, valid, n=5) or valid[:5]
    raise NotFoundError(f"layer {name!r} not found in {type(model).__name__}", hint=f"valid e.g.: {', '.join(close)}")


class _StopForward(Exception):
    """Raised by the feature tap to end a forward pass once the feature is captured."""


@contextmanager
def _tap(module: nn.Module, *, leaf: bool, stop: bool = True) -> Iterator[list[Tensor]]:
    """Capture `module`'s output at its first call; the hook is always removed on exit.

    leaf=True: the output is replaced by a fresh leaf (so d logits / d feature needs no graph upstream) and
    the forward pass continues on a copy. leaf=False: the output keeps its graph and the forward pass stops
    (unless stop=False, when several layers are tapped in one pass).
    """
    captured: list[Tensor] = []

    def hook(mod: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
        if captured:
            return None
        if not isinstance(output, Tensor):
            raise InvalidValueError(
                f"FIA layer must output a tensor, {type(mod).__name__} gives {type(output).__name__}"
            )
        if not leaf:
            captured.append(output)
            if stop:
                raise _StopForward
            return None
        feature = output.detach().requires_grad_(True)
        captured.append(feature)
        return feature.clone()  # downstream in-place ops must not touch the captured leaf

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def _features(model: nn.Module, layers: list[nn.Module], x: Tensor) -> list[Tensor]:
    """f_k(x) at each layer with its graph back to `x`; with one layer the forward pass stops there."""
    if len(layers) == 1:
        with _tap(layers[0], leaf=False) as captured, suppress(_StopForward):
            model(x)
        taps = [captured]
    else:
        with ExitStack() as stack:
            taps = [stack.enter_context(_tap(layer, leaf=False, stop=False)) for layer in layers]
            model(x)
    if not all(taps):
        raise InvalidValueError("FIA layer did not run in the model's forward pass")
    return [captured[0] for captured in taps]


def feature_layers(model: nn.Module, name: str | None) -> list[nn.Module]:
    """The layer(s) FIA taps: one per member of an ensemble (a model whose `members` is a ModuleList), else one."""
    members = getattr(model, "members", None)
    nets = list(members) if isinstance(members, nn.ModuleList) and len(members) else [model]
    return [resolve_layer(net, name or default_feature_layer(net)) for net in nets]


@register_attack
class FIA(Attack[FIAConfig]):
    """MI-FGSM minimising the importance-weighted features sum(delta * f_k(x')) at one layer."""

    name: ClassVar[str] = "fia"
    threat_model: ClassVar[ThreatModel] = "linf"
    config_cls: ClassVar[type[AttackConfig]] = FIAConfig

    def _generate(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor:
        cfg = self.config
        layers = feature_layers(model, cfg.layer)
        importance = self._aggregate_gradient(model, layers, x, y, generator)
        alpha = cfg.alpha if cfg.alpha is not None else cfg.eps / cfg.steps
        x_adv, momentum = x.clone(), torch.zeros_like(x)
        for _ in range(cfg.steps):
            grad = grad_wrt(
                x_adv,
                lambda inp: sum((d * f).sum() for d, f in zip(importance, _features(model, layers, inp), strict=True)),
            )
            grad_scale = per_sample(grad.abs().flatten(1).mean(dim=1).clamp_min(1e-12))
            momentum = cfg.momentum * momentum + grad / grad_scale
            x_adv = project_linf(x_adv - alpha * momentum.sign(), x, cfg.eps)
        return x_adv

    def _aggregate_gradient(
        self, model: nn.Module, layers: list[nn.Module], x: Tensor, y: Tensor, generator: torch.Generator | None
    ) -> list[Tensor]:
        """Delta = sum_n d z_y(x * M_n) / d f_k, L2-normalised per sample over all tapped layers together."""
        keep, batch = 1.0 - self.config.drop_prob, x.shape[0]
        chunk = max(1, self.config.max_batch // batch)
        sums: list[Tensor] | None = None
        with ExitStack() as stack:
            taps = [stack.enter_context(_tap(layer, leaf=True)) for layer in layers]
            for start in range(0, self.config.ensemble, chunk):
                n = min(chunk, self.config.ensemble - start)
                copies = x.expand(n, *x.shape)
                masked = (copies * (uniform(copies, generator) < keep).to(x.dtype)).flatten(0, 1)
                for captured in taps:
                    captured.clear()
                true_logit = model(masked).gather(1, y.repeat(n)[:, None]).sum()
                if not all(taps):
                    raise InvalidValueError("FIA layer did not run in the model's forward pass")
                grads = torch.autograd.grad(true_logit, [captured[0] for captured in taps])
                parts = [g.reshape(n, batch, *g.shape[1:]).sum(dim=0) for g in grads]
                sums = parts if sums is None else [a + b for a, b in zip(sums, parts, strict=True)]
        norm = torch.stack([l2_norm(s) ** 2 for s in sums or []]).sum(dim=0).sqrt().clamp_min(1e-12)
        return [s / norm.view(-1, *([1] * (s.dim() - 1))) for s in sums or []]
