"""The recipe contract: a registered class with its own pydantic config, called once per batch by the loop.

Modelled on timm's training tasks: `recipe.step(model, x, y, attack)` computes the loss of one batch and may
craft its own adversarial batch (TRADES maximises a KL divergence, not the attack's CE), own extra state (saved
with `state_dict` for `--resume`) and change the weights around the optimiser step (`after_step`). The loop
knows nothing else about it: it runs `for x, y in batches: out = recipe.step(...); out.loss.backward(); ...`.

To add a recipe: one module with a `<Name>Config(RecipeConfig)` and a `@register_recipe` class, imported in
`recipes/__init__.py`. The contract test trains every registered recipe for one step and reloads it.
"""

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn

from loradar_cli.errors import InvalidValueError, validation_message
from loradar_cli.lora.spec import LoraSpec
from loradar_cli.lora.state import adapter_tensors
from loradar_cli.registry import Registry

if TYPE_CHECKING:
    from loradar_cli.data import ImageData

AttackFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


class RecipeConfig(BaseModel):
    """Options of a recipe (`--recipe-opt KEY=VALUE`); stored verbatim in the adapter's provenance."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class StepOutput(NamedTuple):
    """One batch: the scalar loss to backpropagate and the logits [B, K] used for bookkeeping."""

    loss: Tensor
    logits: Tensor
    metrics: dict[str, float] = {}  # noqa: RUF012  (a NamedTuple default, never mutated)


class Export(NamedTuple):
    """One stored adapter: its spec, PEFT-keyed tensors, and extra provenance (`parents`, `combination` keys)."""

    spec: LoraSpec
    tensors: dict[str, Tensor]
    extra: dict[str, Any] = {}  # noqa: RUF012  (a NamedTuple default, never mutated)


class Recipe:
    """Base class: subclasses set `name`, `config_cls`, optionally `lora_init`, and implement `step`."""

    name: ClassVar[str]
    config_cls: ClassVar[type[RecipeConfig]] = RecipeConfig
    lora_init: ClassVar[str] = "kaiming"  # a key of lora.init.LORA_INITS
    default_targets: ClassVar[str | None] = None  # a LoRA target preset when --targets is not given
    output: ClassVar[str] = "adapter"  # "adapter", or "base" for a recipe whose result is a full model
    frozen_norm_stats: ClassVar[bool] = True  # BatchNorm statistics stay the base's (exact adapter reloads)
    output_suffixes: ClassVar[tuple[str, ...]] = ("",)  # names of the adapters `export` writes: --name + suffix

    def __init__(self, config: RecipeConfig | None = None) -> None:
        self.config = config if config is not None else self.config_cls()
        if not isinstance(self.config, self.config_cls):
            raise InvalidValueError(f"recipe {self.name!r} needs a {self.config_cls.__name__}")

    def prepare(self, model: nn.Module, train: "ImageData", val: "ImageData", attack: AttackFn) -> None:
        """Called by the loop once LoRA is injected and initialised, before the optimiser is built."""

    def build_optimizer(
        self, params: list[nn.Parameter] | list[dict[str, Any]], lr: float, step_size: int, gamma: float
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        """Adam with a StepLR schedule (the run's --lr, --step-size, gamma) over `params` (parameters, or groups
        with their own lr); recipes may bring their own."""
        optimizer = torch.optim.Adam(params, lr=lr)
        return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)

    def inference(self, model: nn.Module) -> AbstractContextManager[Any]:
        """The model as deployed, for validation (e.g. with a training-only branch switched off)."""
        return nullcontext()

    def step(self, model: nn.Module, x: Tensor, y: Tensor, attack: AttackFn) -> StepOutput:
        """Loss and logits for a clean batch `x` [B, C, H, W] in [0, 1] with labels `y` [B]."""
        raise NotImplementedError

    def after_step(self, model: nn.Module) -> None:
        """Called after each optimiser step (e.g. to remove a weight perturbation)."""

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        """Called before the first batch of each epoch (1-based)."""

    def on_epoch_end(self, model: nn.Module, epoch: int, val_clean: float, val_robust: float) -> bool:
        """Called after each epoch's validation; returning True stops training early."""
        return False

    def export(self, model: nn.Module, spec: LoraSpec) -> dict[str, Export]:
        """What the run stores, by name suffix (one of `output_suffixes`): the trained adapter as a plain LoRA."""
        stored_spec, tensors = adapter_tensors(getattr(model, "model", model), spec)
        return {"": Export(stored_spec, tensors)}

    def state_dict(self) -> dict[str, Any]:
        """Extra state a resumed run needs (tensors and JSON-ready values)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    def describe(self) -> dict[str, Any]:
        """JSON-ready provenance: name, LoRA initialisation and the full config."""
        return {"name": self.name, "lora_init": self.lora_init, "config": self.config.model_dump(mode="json")}


RECIPES: Registry[type[Recipe]] = Registry("recipe")


def register_recipe(cls: type[Recipe]) -> type[Recipe]:
    """Class decorator: register a recipe under its `name` (key and class cannot disagree)."""
    RECIPES.register(cls.name)(cls)
    return cls


def build_recipe(name: str, options: Mapping[str, Any] | None = None) -> Recipe:
    """The recipe registered as `name` with its config from `options` (errors as one-line LoradarErrors)."""
    cls = RECIPES.get(name)
    options = dict(options or {})
    fields = cls.config_cls.model_fields
    unknown = sorted(set(options) - set(fields))
    if unknown:
        valid = ", ".join(fields) or "none"
        raise InvalidValueError(f"unknown option(s) {', '.join(unknown)} for recipe {name!r}; valid: {valid}")
    try:
        return cls(cls.config_cls(**options))
    except ValidationError as err:
        raise InvalidValueError(f"invalid option for recipe {name!r}: {validation_message(err, first=True)}") from None


def norm_stats(model: nn.Module) -> list[Tensor]:
    """The BatchNorm running statistics of `model` (mean, variance, batch count), in module order."""
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]
