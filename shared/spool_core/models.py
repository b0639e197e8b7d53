"""The model registry: exact pinned ids, aliases, windows, prices, fallbacks.

Read from ``models.json`` shipped with the layer (``SPOOL_MODELS_FILE`` points elsewhere).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from spool_core.errors import ModelNotFound

DEFAULT_REGISTRY = Path(__file__).with_name("models.json")


class Pricing(BaseModel):
    model_config = ConfigDict(frozen=True)

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)


class ModelSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    aliases: tuple[str, ...] = ()
    provider: str
    provider_model_id: str
    family: str
    context_window: int = Field(gt=0)
    max_output_tokens: int = Field(gt=0)
    pricing: Pricing
    fallbacks: tuple[str, ...] = ()
    enabled: bool = True
    options: dict[str, Any] = Field(default_factory=dict)

    def cost_usd(self, input_tokens: int, output_tokens: int) -> float:
        return round(
            input_tokens * self.pricing.input_per_mtok / 1e6
            + output_tokens * self.pricing.output_per_mtok / 1e6,
            8,
        )


class ModelRegistry:
    def __init__(self, models: list[ModelSpec]) -> None:
        self._models = {m.id: m for m in models}
        self._aliases = {alias: m.id for m in models for alias in m.aliases}

    @classmethod
    def from_file(cls, path: Path) -> ModelRegistry:
        raw = json.loads(path.read_text())
        return cls([ModelSpec.model_validate(m) for m in raw["models"]])

    def all(self) -> list[ModelSpec]:
        return list(self._models.values())

    def available(self) -> list[str]:
        return sorted(m.id for m in self._models.values() if m.enabled)

    def resolve(self, name: str) -> ModelSpec:
        """A pinned id or an alias -> the model; unknown or disabled names raise ``ModelNotFound``."""
        model = self._models.get(self._aliases.get(name, name))
        if model is None or not model.enabled:
            available = self.available()
            raise ModelNotFound(
                f"Model '{name}' is not available",
                details={"model": name, "available": available},
                suggestions=[f"Use one of: {', '.join(available)}", "List models with GET /v1/models"],
            )
        return model


@lru_cache(maxsize=4)
def _load(path: str) -> ModelRegistry:
    return ModelRegistry.from_file(Path(path))


def registry() -> ModelRegistry:
    return _load(os.environ.get("SPOOL_MODELS_FILE", str(DEFAULT_REGISTRY)))
