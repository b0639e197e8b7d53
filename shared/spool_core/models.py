"""The model registry: exact pinned ids, aliases, windows, prices, fallbacks.

Read from ``models.json`` shipped with the layer, or at run time from SSM Parameter Store
(``SPOOL_MODELS_PARAMETER``) or AppConfig (``SPOOL_MODELS_APPCONFIG`` = ``app/env/profile``) through
Powertools Parameters, cached for a minute, so models change without a deploy. Feature flags decide
which tenants may use a model (``ModelCatalog``).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from spool_core.errors import ModelNotFound
from spool_core.units import price_nanos

if TYPE_CHECKING:  # feature flags (and AppConfig under them) are loaded by who evaluates them
    from spool_core.flags import Flags

DEFAULT_REGISTRY = Path(__file__).with_name("models.json")


class Pricing(BaseModel):
    model_config = ConfigDict(frozen=True)

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)


class ModelSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    created: int = 0  # when this pinned version joined the registry, Unix seconds (OpenAI's `created`)
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

    def cost_nanos(self, input_tokens: int, output_tokens: int) -> int:
        """The price of a call in nano-dollars (exact for prices with up to three decimals per Mtok)."""
        return price_nanos(input_tokens, self.pricing.input_per_mtok) + price_nanos(
            output_tokens, self.pricing.output_per_mtok
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

    def get(self, name: str) -> ModelSpec | None:
        """A pinned id or an alias -> the model, whatever its state."""
        return self._models.get(self._aliases.get(name, name))

    def resolve(self, name: str) -> ModelSpec:
        """A pinned id or an alias -> the model; unknown or disabled names raise ``ModelNotFound``."""
        return ModelCatalog(self, None, None).resolve(name)


class ModelCatalog:
    """The registry as one tenant sees it: a model is usable when its feature flag says so for the
    tenant (``model_<id>``), or, without a flag, when the registry enables it."""

    def __init__(self, registry: ModelRegistry, flags: Flags | None, tenant_id: str | None) -> None:
        self._registry = registry
        self._flags = flags
        self._tenant = tenant_id

    def enabled(self, model: ModelSpec) -> bool:
        if self._flags is None:
            return model.enabled
        return self._flags.model_enabled(model.id, self._tenant, default=model.enabled)

    def available(self) -> list[str]:
        return sorted(m.id for m in self._registry.all() if self.enabled(m))

    def get(self, name: str) -> ModelSpec | None:
        return self._registry.get(name)

    def resolve(self, name: str) -> ModelSpec:
        model = self._registry.get(name)
        if model is None or not self.enabled(model):
            available = self.available()
            raise ModelNotFound(
                f"Model '{name}' is not available",
                details={"model": name, "available": available},
                suggestions=[f"Use one of: {', '.join(available)}", "List models with GET /v1/models"],
            )
        return model

    def chain(self, model: ModelSpec, *, fallback: bool) -> list[ModelSpec]:
        """The model, then its enabled fallbacks in order (when fallback is allowed)."""
        chain = [model]
        if fallback:
            for name in model.fallbacks:
                candidate = self._registry.get(name)
                if candidate is not None and self.enabled(candidate) and candidate not in chain:
                    chain.append(candidate)
        return chain

    def all(self) -> list[ModelSpec]:
        return self._registry.all()


@lru_cache(maxsize=4)
def _load(path: str) -> ModelRegistry:
    return ModelRegistry.from_file(Path(path))


def registry() -> ModelRegistry:
    """The registry from SSM or AppConfig when configured (Powertools caches it for a minute),
    otherwise from the file."""
    parameter = os.environ.get("SPOOL_MODELS_PARAMETER")
    appconfig = os.environ.get("SPOOL_MODELS_APPCONFIG")
    if parameter or appconfig:
        from aws_lambda_powertools.utilities import parameters

        if parameter:
            document: Any = parameters.get_parameter(parameter, transform="json", max_age=60)
        else:
            application, environment, profile = str(appconfig).split("/", 2)
            document = parameters.get_app_config(
                name=profile, environment=environment, application=application, transform="json", max_age=60
            )
        return ModelRegistry([ModelSpec.model_validate(m) for m in document["models"]])
    return _load(os.environ.get("SPOOL_MODELS_FILE", str(DEFAULT_REGISTRY)))
