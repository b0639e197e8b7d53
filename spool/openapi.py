"""The API's OpenAPI document, built from the functions' own routes and models.

Each function is a Powertools resolver that knows its routes, path and query parameters; this joins
them into one document, adds what the resolvers cannot see (bodies parsed with ``parse_body``, the
error envelope, the API key, the streaming routes of the ASGI function), and writes it to
``shared/spool_core/openapi.json``, which the health function serves as ``GET /v1/openapi.json``.
A test fails when the file is stale; ``make openapi`` rebuilds it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "shared" / "spool_core" / "openapi.json"
# Each Powertools resolver's module: (its directory under functions/, its file)
POWERTOOLS_FUNCTIONS = [
    ("jobs", "app"),
    ("jobs", "chunks"),
    ("contexts", "app"),
    ("models", "app"),
    ("usage", "app"),
    ("health", "app"),
]
TITLE = "Spool"
VERSION = "1"
PUBLIC = {("/v1/health", "get"), ("/v1/openapi.json", "get")}
JSON = "application/json"
# Routes whose success is not (only) a 200, as DESIGN.md and the handlers answer: a resolver's
# document knows only 200, and a generated client would take these answers for errors.
SUCCESS: dict[tuple[str, str], dict[str, str]] = {
    ("/v1/jobs", "post"): {
        "202": "Accepted: the job resource, queued (Location: /v1/jobs/{job_id})",
        "200": "The job an earlier request with this key and body created, finished",
    },
    ("/v1/contexts", "post"): {"201": "Created: the context's first version"},
    ("/v1/contexts/uploads", "post"): {"201": "Created: an upload URL for a large document"},
    ("/v1/contexts/{context_id}", "delete"): {"204": "Deleted (no body)"},
}


def _load(name: str, module: str = "app") -> Any:
    spec = importlib.util.spec_from_file_location(
        f"spool_function_{name}_{module}", ROOT / "functions" / name / f"{module}.py"
    )
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def _bodies() -> dict[tuple[str, str], type[BaseModel]]:
    """Request bodies the resolvers parse themselves (large or streamed), by route."""
    from spool_core.contexts.model import CreateContextRequest, PatchContextRequest, TokenCountRequest
    from spool_core.jobs.model import JobRequest
    from spool_core.openai_compat.chat import ChatRequest
    from spool_core.openai_compat.responses import ResponsesRequest

    chunks = _load("jobs", "chunks")
    return {
        ("/v1/jobs", "post"): JobRequest,
        ("/v1/jobs/{job_id}/stream/resume", "post"): chunks.ResumeRequest,
        ("/v1/contexts", "post"): CreateContextRequest,
        ("/v1/contexts/{context_id}", "patch"): PatchContextRequest,
        ("/v1/tokens/count", "post"): TokenCountRequest,
        ("/v1/chat/completions", "post"): ChatRequest,
        ("/v1/responses", "post"): ResponsesRequest,
    }


def _param(
    name: str, where: str, schema: dict[str, Any], description: str, required: bool = False
) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required, "schema": schema, "description": description}


def _streaming_paths() -> dict[str, Any]:
    """The ASGI function's routes (Starlette, not a Powertools resolver)."""
    sequence = {"type": "integer", "minimum": 0, "maximum": 2**53 - 1}
    sse = {"text/event-stream": {"schema": {"type": "string"}}}
    job_id = _param("job_id", "path", {"type": "string"}, "the job", required=True)
    response_id = _param("response_id", "path", {"type": "string"}, "resp_<id> (a job)", required=True)
    return {
        "/v1/jobs/{job_id}/events": {
            "get": {
                "operationId": "job_events",
                "summary": "The job's chunk log as Server-Sent Events, resumable with Last-Event-ID",
                "parameters": [
                    job_id,
                    _param("after", "query", sequence, "start after this sequence_id"),
                    _param(
                        "Last-Event-ID",
                        "header",
                        {"type": "string"},
                        "the last id received (wins over after)",
                    ),
                    _param("token", "query", {"type": "string"}, "links.events token instead of an API key"),
                ],
                "responses": {"200": {"description": "event stream", "content": sse}},
            }
        },
        "/v1/chat/completions": {
            "post": {"operationId": "chat_completions", "summary": "OpenAI chat completion"}
        },
        "/v1/responses": {"post": {"operationId": "create_response", "summary": "OpenAI Responses API"}},
        "/v1/responses/{response_id}": {
            "get": {
                "operationId": "get_response",
                "summary": "A response, or its events from starting_after with stream=true",
                "parameters": [
                    response_id,
                    _param("stream", "query", {"type": "boolean"}, "stream the events"),
                    _param("starting_after", "query", sequence, "the last sequence_number received"),
                ],
            }
        },
        "/v1/responses/{response_id}/cancel": {
            "post": {
                "operationId": "cancel_response",
                "summary": "Cancel a background response",
                "parameters": [response_id],
            }
        },
    }


def _error_components() -> dict[str, Any]:
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message", "details", "suggestions", "request_id"],
                    "properties": {
                        "code": {"type": "string"},
                        "message": {"type": "string"},
                        "details": {"type": "object"},
                        "suggestions": {"type": "array", "items": {"type": "string"}},
                        "request_id": {"type": ["string", "null"]},
                    },
                }
            },
        }
    }


def _listings(document: dict[str, Any]) -> None:
    """The list routes: the status filter's values, and the page every list answers."""
    from spool_core.jobs.service import STATUSES

    for parameter in document["paths"]["/v1/jobs"]["get"]["parameters"]:
        if parameter["name"] == "status":
            parameter["schema"] = {"type": "string", "enum": list(STATUSES)}
    page = {
        "type": "object",
        "required": ["data", "next_cursor"],
        "properties": {
            "data": {"type": "array", "items": {"type": "object"}},
            "next_cursor": {
                "type": ["string", "null"],
                "description": "pass back as cursor; null: last page",
            },
        },
    }
    for path in ("/v1/jobs", "/v1/contexts"):
        document["paths"][path]["get"]["responses"]["200"] = {
            "description": "A page, newest first",
            "content": {JSON: {"schema": page}},
        }


def build() -> dict[str, Any]:
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": VERSION,
            "description": "Durable generation jobs, contexts uploaded once, token-aware limits.",
        },
        "servers": [{"url": "/"}],
        "paths": {},
        "components": {
            "schemas": {},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
    }
    for name, module in POWERTOOLS_FUNCTIONS:
        schema = _load(name, module).app.get_openapi_schema(title=TITLE, version=VERSION)
        generated = json.loads(schema.model_dump_json(by_alias=True, exclude_none=True))
        for path, operations in generated.get("paths", {}).items():
            document["paths"].setdefault(path, {}).update(operations)
        document["components"]["schemas"].update(generated.get("components", {}).get("schemas", {}))
    document["paths"].update(_streaming_paths())
    document["paths"]["/v1/openapi.json"] = {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "responses": {"200": {"description": "OK"}},
        }
    }
    idempotency = {"type": "string", "minLength": 1, "maxLength": 255}
    for path, method, parameter in [
        (
            "/v1/jobs",
            "post",
            _param("Idempotency-Key", "header", idempotency, "one job per key", required=True),
        ),
        ("/v1/chat/completions", "post", _param("Idempotency-Key", "header", idempotency, "one job per key")),
        ("/v1/responses", "post", _param("Idempotency-Key", "header", idempotency, "one job per key")),
    ]:
        document["paths"][path][method].setdefault("parameters", []).append(parameter)
    for (path, method), model in _bodies().items():
        operation = document["paths"][path][method]
        model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        document["components"]["schemas"].update(model_schema.pop("$defs", {}))
        document["components"]["schemas"][model.__name__] = model_schema
        ref = {"$ref": f"#/components/schemas/{model.__name__}"}
        operation["requestBody"] = {"required": True, "content": {JSON: {"schema": ref}}}
    document["components"]["schemas"].update(_error_components())
    for schema_name in ("HTTPValidationError", "ValidationError"):
        document["components"]["schemas"].pop(schema_name, None)  # Powertools' 422: Spool answers 400
    error = {
        "description": "Spool's error envelope",
        "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            if "200" in responses and path not in {"/v1/jobs/{job_id}/events"}:
                responses["200"] = {"description": "OK", "content": {JSON: {"schema": {"type": "object"}}}}
            if not any(code.startswith("2") for code in responses):
                responses["200"] = {"description": "OK"}
            if (path, method) in SUCCESS:
                for code in [c for c in responses if c.startswith("2")]:
                    del responses[code]
                for code, description in SUCCESS[path, method].items():
                    content = {} if code == "204" else {"content": {JSON: {"schema": {"type": "object"}}}}
                    responses[code] = {"description": description, **content}
            responses["default"] = error
            if (path, method) not in PUBLIC:
                operation["security"] = [{"bearer": []}, {"apiKey": []}]
    _listings(document)
    document["paths"] = dict(sorted(document["paths"].items()))
    return document


def render() -> str:
    return json.dumps(build(), indent=1, sort_keys=False) + "\n"


def main() -> None:
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
