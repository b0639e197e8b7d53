"""GET /v1/models: the models this tenant may use, with windows, prices, fallbacks and status; an
OpenAI model list too (``object: list``, ``data`` with ``id``, ``object``, ``created``, ``owned_by``)."""

from __future__ import annotations

from aws_lambda_powertools.event_handler import Response

from spool_core import bootstrap
from spool_core.api.resolver import api_handler, create_resolver, json_response, tenant_of

app = create_resolver()


@app.get("/v1/models")
def list_models() -> Response[str]:
    catalog = bootstrap.catalog(tenant_of(app))
    visible = [m for m in catalog.all() if catalog.enabled(m)]
    circuits = bootstrap.circuit_breaker().circuits(m.id for m in visible)
    models = [
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
        for model in visible
    ]
    return json_response(200, {"object": "list", "data": models})


lambda_handler = api_handler(app)
