"""LoraSpec: the validated description of where LoRA sits and how it is scaled (stored with every adapter)."""

from pydantic import BaseModel, ConfigDict, Field


class LoraSpec(BaseModel):
    """Resolved LoRA placement: exact module names relative to the timm model, rank and scale.

    `rank_pattern`/`alpha_pattern` override r/lora_alpha per module (PEFT semantics), as merged or trimmed
    adapters have per-layer ranks. `head` names the classifier module saved with the adapter, if any.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    r: int = Field(4, ge=1)
    lora_alpha: float = Field(4.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str]
    head: str | None = None
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)

    def rank_of(self, module: str) -> int:
        return self.rank_pattern.get(module, self.r)

    def alpha_of(self, module: str) -> float:
        return self.alpha_pattern.get(module, self.lora_alpha)
