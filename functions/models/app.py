"""GET /v1/models: the models this tenant may use, with windows, prices, fallbacks and status; an
OpenAI model list too (``object: list``, ``data`` with ``id``, ``object``, ``created``, ``owned_by``).
GET /v1/models/{id}: one of them (by id or alias), as the OpenAI SDKs' ``models.retrieve`` reads it;
404 ``model_not_found`` for a model the tenant may not use."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aws_lambda_powertools.event_handler import Response

from spool_core import bootstrap
from spool_core.api.resolver import api_handler, create_resolver, json_response, tenant_of
from spool_core.errors import ModelNotFound, UnknownModel
from spool_core.models import ModelCatalog, ModelSpec

app = create_resolver(openai_errors=True)  # OpenAI SDKs list and read models here


@app.get("/v1/models")
def list_models() -> Response[str]:
    catalog = bootstrap.catalog(tenant_of(app))
    visible = [m for m in catalog.all() if catalog.enabled(m)]
    return json_response(200, {"object": "list", "data": _entries(catalog, visible)})


@app.get("/v1/models/<model_id>")
def get_model(model_id: str) -> Response[str]:
    catalog = bootstrap.catalog(tenant_of(app))
    try:
        model = catalog.resolve(model_id)
    except ModelNotFound as unknown:  # named by its path: 404, as OpenAI answers (the SDK's NotFoundError)
        raise UnknownModel(
            unknown.message, details=unknown.details, suggestions=unknown.suggestions
        ) from None
    return json_response(200, _entries(catalog, [model])[0])


def _entries(catalog: ModelCatalog, models: Sequence[ModelSpec]) -> list[dict[str, Any]]:
    circuits = bootstrap.circuit_breaker().circuits(m.id for m in models)
    return [
        {
            "id": model.id,
            "object": "model",  # OpenAI's fields, so OpenAI clients list them too
            "created": model.created,
            "owned_by": model.provider,
            "aliases": list(model.aliases),
            "provider": model.provider,
            "context_window": model.context_window,
            "max_output_tokens": model.max_output_tokens,
            "pricing": model.pricing.model_dump(),
            "fallbacks": [
                f for f in model.fallbacks if (c := catalog.get(f)) is not None and catalog.enabled(c)
            ],
            "status": "degraded" if circuits[model.id].state == "open" else "available",
        }
        for model in models
    ]


lambda_handler = api_handler(app)
