"""Feature flags (Powertools Feature Flags): AppConfig on AWS, a JSON file locally.

Used for: enabling a model for a percentage or a list of tenants (flag ``model_<id>``), and turning
capabilities on or off without a deploy (``model_fallback``, ``deep_health_checks``).
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from aws_lambda_powertools.utilities.feature_flags import AppConfigStore, FeatureFlags, StoreProvider
from aws_lambda_powertools.utilities.feature_flags.exceptions import ConfigurationStoreError

DEFAULT_FLAGS_FILE = Path(__file__).with_name("flags.json")


class FileStore(StoreProvider):
    """The local stand-in for AppConfig: the same JSON document, read from a file on every evaluation
    (so editing it changes behaviour without a restart, as an AppConfig deployment would)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def get_raw_configuration(self) -> dict[str, Any]:
        try:
            raw: dict[str, Any] = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigurationStoreError(f"cannot read feature flags from {self.path}: {exc}") from exc
        return raw

    def get_configuration(self) -> dict[str, Any]:
        return self.get_raw_configuration


def tenant_context(tenant_id: str) -> dict[str, Any]:
    """What rules can match on: the tenant id, and a stable number for percentage rollouts
    (``MODULO_RANGE`` with BASE 100 enables a share of tenants)."""
    bucket = int(hashlib.sha256(tenant_id.encode()).hexdigest()[:8], 16)
    return {"tenant_id": tenant_id, "tenant_hash": bucket}


class Flags:
    def __init__(self, flags: FeatureFlags) -> None:
        self._flags = flags

    def enabled(self, name: str, tenant_id: str | None = None, *, default: bool) -> bool:
        context = tenant_context(tenant_id) if tenant_id else {}
        return bool(self._flags.evaluate(name=name, context=context, default=default))

    def model_enabled(self, model_id: str, tenant_id: str | None, *, default: bool) -> bool:
        return self.enabled(f"model_{model_id}", tenant_id, default=default)


@lru_cache(maxsize=4)
def flags(appconfig: str | None, path: str) -> Flags:
    """``appconfig`` is ``application/environment/profile``; without it the file at ``path`` is used."""
    store: StoreProvider
    if appconfig:
        application, environment, profile = appconfig.split("/", 2)
        store = AppConfigStore(environment=environment, application=application, name=profile, max_age=60)
    else:
        store = FileStore(Path(path))
    return Flags(FeatureFlags(store=store))
