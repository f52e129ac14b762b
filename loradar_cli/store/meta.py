"""Pydantic metadata written beside every stored base and adapter (the provenance contract)."""

from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from loradar_cli import __version__
from loradar_cli.errors import InvalidValueError
from loradar_cli.lora.spec import LoraSpec

SCHEMA_VERSION = 1
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
RESERVED_NAMES = frozenset({"bases", "identifiers", "pools", "loradar-store.json"})


def check_name(name: str, what: str = "adapter") -> str:
    """`name` if it may name a store entry of kind `what` (pattern, length, not reserved), else InvalidValueError."""
    from pydantic import TypeAdapter, ValidationError

    try:
        TypeAdapter(Name).validate_python(name)
    except ValidationError:
        raise InvalidValueError(
            f"invalid {what} name {name!r}: use letters, digits, '.', '_' and '-' (max 64)"
        ) from None
    if name in RESERVED_NAMES:  # `show NAME` looks up adapters and bases alike, so no kind may use these
        raise InvalidValueError(f"{name!r} is reserved in the store; pick another {what} name")
    return name


def valid_name(name: str) -> bool:
    """Whether `name` passes `check_name` (listings skip what could not have been written)."""
    try:
        check_name(name)
    except InvalidValueError:
        return False
    return True


def now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


class _Meta(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    schema_version: Literal[1] = SCHEMA_VERSION
    name: Name
    created_at: datetime = Field(default_factory=now)
    loradar_version: str = __version__


class BaseMeta(_Meta):
    """A fitted timm model: everything needed to rebuild it bit-exactly, and its weights' fingerprint."""

    timm_model: str
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    num_classes: int = Field(ge=2)
    input_size: tuple[int, int, int]
    mean: list[float]
    std: list[float]
    dataset: str
    pretrained: bool = False
    head_only: bool = False
    metrics: dict[str, float] = Field(default_factory=dict)
    seed: int | None = None
    training: dict[str, Any] = Field(default_factory=dict)  # augmentation, device, precision, throughput
    fingerprint: str
    origin: dict[str, Any] = Field(default_factory=dict)  # how the base came to be if not by finetune


class AdapterMeta(_Meta):
    """An adapter bound to one base (by fingerprint), with its LoRA spec, recipe, attack and metrics."""

    base: Name
    base_fingerprint: str
    timm_model: str
    num_classes: int
    lora: LoraSpec
    recipe: str | None = None
    recipe_config: dict[str, Any] = Field(default_factory=dict)
    attack: str | None = None
    attack_config: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    parents: list[Name] = Field(default_factory=list)
    combination: dict[str, Any] = Field(default_factory=dict)
    dense_deltas: list[str] = Field(default_factory=list)
    seed: int | None = None
    tensors_sha256: str = ""


class IdentifierMeta(BaseModel):
    """A stored attack identifier: the fields the store relies on; the identifier's own fields pass through."""

    model_config = ConfigDict(frozen=True, extra="allow", protected_namespaces=())

    schema_version: int = Field(SCHEMA_VERSION, ge=1)  # the identifier's own format, versioned by its writer
    name: Name
    members: list[str] = Field(min_length=1)
    mode: str | None = None
    features: list[str] | None = None
    base: str | None = None
    base_fingerprint: str | None = None
    tensors_sha256: str | None = None


def newer_schema(raw: object) -> int | None:
    """The schema_version of parsed metadata if it is newer than this code reads (so the error can name it)."""
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        return version
    return None


def peft_config(meta: AdapterMeta) -> dict[str, Any]:
    """adapter_config.json as PEFT's LoraConfig reads it (PeftModel.from_pretrained on the same timm model)."""
    spec = meta.lora
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": spec.r,
        "lora_alpha": spec.lora_alpha,
        "lora_dropout": spec.dropout,
        "target_modules": list(spec.targets),
        "modules_to_save": [spec.head] if spec.head else None,
        "rank_pattern": dict(spec.rank_pattern),
        "alpha_pattern": dict(spec.alpha_pattern),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
    }
