"""The attack contract: a frozen object holding a pydantic config, called as `attack(model, x, y) -> x_adv`."""

from collections.abc import Callable
from typing import Any, ClassVar, Generic, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from loradar_cli.attacks._functional import ce_each, eot_losses_grad_logits
from loradar_cli.errors import InvalidValueError
from loradar_cli.metrics import model_mode
from loradar_cli.registry import Registry

ThreatModel = Literal["linf", "l2", "patch"]


class AttackConfig(BaseModel):
    """Options shared by every attack; stored verbatim as adapter metadata."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    eps: float = Field(8 / 255, ge=0)  # pixel units: inputs are in [0, 1]
    seed: int | None = None  # seeds the attack's own generator; None draws from the global RNG


C = TypeVar("C", bound=AttackConfig)


class Attack(Generic[C]):
    """Craft adversarial inputs against a model passed per call.

    Contract: `x` is `[B, C, H, W]` in [0, 1], `y` is `[B]` (long). The result is detached, has the shape,
    dtype and device of `x`, lies in [0, 1] and within the threat model of `config`; `eps == 0` returns `x`
    unchanged. The model runs in eval mode and every module's `training` flag is restored afterwards;
    gradients are taken w.r.t. the input only, so parameter `.grad` is untouched.

    With `config.seed` set, the attack draws from its own generator, seeded once per device and advancing
    across calls: a sequence of calls is reproducible and successive batches still get fresh noise.
    """

    name: ClassVar[str]
    threat_model: ClassVar[ThreatModel]
    config_cls: ClassVar[type[AttackConfig]] = AttackConfig

    __slots__ = ("_generators", "config")
    config: C

    def __init__(self, config: C | None = None) -> None:
        config = self.config_cls() if config is None else config  # type: ignore[assignment]
        if not isinstance(config, self.config_cls):
            raise InvalidValueError(
                f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}"
            )
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "_generators", {})

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen; build a new one with a new config")

    def __reduce__(self) -> tuple[type, tuple[C]]:
        return type(self), (self.config,)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.config == self.config  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.config))

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """`x_adv` `[B, C, H, W]` for `model` at labels `y`; see the class docstring for the contract."""
        check_inputs(x, y)
        x, y = x.detach(), y.detach().long()
        if self.config.eps == 0:
            return x.clone()
        with model_mode(model, "eval"), torch.enable_grad():
            x_adv = self._generate(model, x, y, self._generator(x.device))
        return x_adv.detach().to(x.dtype)

    def until_fooled(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        early_stop: bool = True,
        judge: nn.Module | None = None,
        active: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(x_adv, fooled `[B]`): like a call, but a point fooled by any iterate keeps its first fooling example.

        With `early_stop` an iterative attack stops working on a point once it is fooled; without, it runs every
        point to the end and still reports the first fooling iterate, so both give the same flags for the same
        seed. `judge` (default `model`) decides "fooled" when the model attacked is a surrogate of the decision.
        `active` (bool `[B]`) restricts the work to some points; random draws are still made for the whole batch,
        so a point's result does not depend on which others are active. Inactive points come back unchanged.
        """
        check_inputs(x, y)
        x, y = x.detach(), y.detach().long()
        tracker = Tracker(model, judge, x, y, early_stop, active)
        with model_mode(model, "eval"), model_mode(tracker.judge, "eval"), torch.enable_grad():
            if self.config.eps == 0:
                tracker.observe(tracker.all, x[tracker.all], None)
                return tracker.result(x)
            x_adv = self._generate_tracked(model, x, y, self._generator(x.device), tracker)
            return tracker.result(x_adv.detach().to(x.dtype))

    def _generate(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor:
        """The attack proper: runs with the model in eval mode and gradients enabled."""
        raise NotImplementedError

    def _generate_tracked(
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None, tracker: "Tracker"
    ) -> Tensor:
        """`_generate` reporting its iterates to `tracker`; by default only the final result is judged."""
        x_adv = self._generate(model, x, y, generator)
        tracker.observe(tracker.all, x_adv[tracker.all], None)
        return x_adv

    def _generator(self, device: torch.device) -> torch.Generator | None:
        """This attack's generator on `device` (created and seeded on first use), or None without a seed."""
        if self.config.seed is None:
            return None
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.config.seed)
        return self._generators[key]

    def describe(self) -> dict[str, Any]:
        """JSON-ready metadata: registry name, threat model and the full config."""
        return {"name": self.name, "threat_model": self.threat_model, "config": self.config.model_dump(mode="json")}


class TrackedAttack(Attack[C]):
    """An attack whose loop reports every iterate to a `Tracker` (`_generate_tracked` is the attack proper).

    Called plainly it returns each point's first fooling iterate, else its final one, as AutoAttack's attacks do.
    """

    def _generate(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor:
        tracker = Tracker(model, None, x, y, early_stop=True)
        return tracker.result(self._generate_tracked(model, x, y, generator, tracker))[0]


class Tracker:
    """Per-point record of an attack's first fooling iterate, and which points are still worth attacking.

    Iterative attacks call `observe(idx, x_iter, logits)` with the points `idx` (indices into the batch) they
    currently work on; the returned mask says which of them to keep attacking. An attack must observe every
    iterate it returns, so the flags always describe the returned examples.
    """

    def __init__(
        self,
        model: nn.Module,
        judge: nn.Module | None,
        x: Tensor,
        y: Tensor,
        early_stop: bool,
        active: Tensor | None = None,
    ) -> None:
        self.model, self.judge, self.y, self.early_stop = model, judge if judge is not None else model, y, early_stop
        self.x, self.x_adv = x, x.clone()
        self.fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        self.active = torch.ones_like(self.fooled) if active is None else active.to(x.device, torch.bool)
        self.all = self.active.nonzero().flatten()

    @torch.no_grad()
    def observe(self, idx: Tensor, x_iter: Tensor, logits: Tensor | None) -> Tensor:
        """Record iterates `x_iter` (points `idx`) that fool the judge; mask over `idx` of points to keep attacking.

        `logits` are the attacked model's outputs at `x_iter`, reused when the judge is that model (None runs it).
        """
        if not len(idx):
            return torch.zeros(0, dtype=torch.bool, device=idx.device)
        scores = logits if logits is not None and self.judge is self.model else self.judge(x_iter)
        wrong = scores.argmax(1) != self.y[idx]
        new = wrong & ~self.fooled[idx] & self.active[idx]
        self.x_adv[idx[new]] = x_iter[new].detach().to(self.x_adv.dtype)
        self.fooled[idx[new]] = True
        return ~wrong if self.early_stop else torch.ones_like(wrong)

    def remaining(self) -> Tensor:
        """Indices of the points still to attack (all of them without early stopping)."""
        return (~self.fooled & self.active).nonzero().flatten() if self.early_stop else self.all

    def result(self, x_adv: Tensor) -> tuple[Tensor, Tensor]:
        """Fooled points keep their first fooling example, other active ones `x_adv` (which the attack observed)."""
        shape = (-1, *[1] * (x_adv.dim() - 1))
        out = torch.where(self.fooled.view(shape), self.x_adv, torch.where(self.active.view(shape), x_adv, self.x))
        return out.detach(), self.fooled.clone()


A = TypeVar("A", bound=type[Attack[Any]])

ATTACKS: Registry[type[Attack[Any]]] = Registry("attack")


def register_attack(cls: A) -> A:
    """Class decorator: register an attack under its `name` (so key and class can never disagree)."""
    ATTACKS.register(cls.name)(cls)
    return cls


def check_inputs(x: Tensor, y: Tensor) -> None:
    """Reject inputs outside the contract with a one-line message instead of a shape error deep in a model."""
    if x.dim() != 4 or not x.is_floating_point():
        raise InvalidValueError(f"x must be a float tensor [B, C, H, W], got {x.dtype} of shape {tuple(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
        raise InvalidValueError(f"y must be integer labels [B] with B = {x.shape[0]}, got shape {tuple(y.shape)}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise InvalidValueError("x must lie in [0, 1] (normalisation belongs inside the model)")


def tracked_ascent(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    x_adv: Tensor,
    tracker: Tracker,
    idx: Tensor,
    steps: int,
    step: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor],
    eot: int = 1,
) -> Tensor:
    """`steps` ascent steps on CE from `x_adv`, reporting every iterate and dropping points once they are fooled.

    `step(x_adv, x, grad, rows)` makes one step for the points still attacked (`rows`: their positions in `x`, so
    per-point state such as a sticker mask can be indexed). The logits of each gradient pass judge the iterate it
    was taken at; the final iterate is judged once more. Returns every point's last iterate.
    """
    out = x_adv.clone()
    rows = torch.arange(len(x), device=x.device)
    sub_x, sub_y = x, y
    for _ in range(steps):
        _, grad, logits = eot_losses_grad_logits(model, x_adv, sub_y, ce_each, eot)
        keep = tracker.observe(idx, x_adv, logits)
        if not keep.all():
            out[rows] = x_adv
            rows, idx, x_adv, grad = rows[keep], idx[keep], x_adv[keep], grad[keep]
            sub_x, sub_y = x[rows], y[rows]
            if not len(idx):
                return out
        x_adv = step(x_adv, sub_x, grad, rows)
    tracker.observe(idx, x_adv, None)
    out[rows] = x_adv
    return out
