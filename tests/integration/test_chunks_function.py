"""ChunksFunction: the chunk log's pages, from its own module beside the jobs function's code."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support import api_event, load_event, response_json


def _headers(response: dict[str, Any]) -> dict[str, str]:
    return {
        **response.get("headers", {}),
        **{k: v[0] for k, v in (response.get("multiValueHeaders") or {}).items()},
    }


def test_a_chunk_page_of_a_created_job_carries_no_rate_limit_headers(invoke: Any) -> None:
    created = invoke("JobsFunction", load_event("jobs"))
    body = response_json(created)
    job_id = body["job_id"] if created["statusCode"] == 202 else body["error"]["details"]["job_id"]
    event = load_event("chunks")
    event["path"] = f"/v1/jobs/{job_id}/chunks"
    event["pathParameters"] = {"job_id": job_id}
    response = invoke("ChunksFunction", event)
    assert response["statusCode"] == 200, response
    page = response_json(response)
    assert page["job_id"] == job_id and page["next_after"] >= 0
    assert page["status"] in {"queued", "running", "completed"}
    assert not any(h.startswith("X-RateLimit") for h in _headers(response))


def test_the_sample_event_names_a_job_that_does_not_exist(invoke: Any) -> None:
    response = invoke("ChunksFunction", load_event("chunks"))
    assert response["statusCode"] == 404
    assert response_json(response)["error"]["code"] == "job_not_found"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"last_sequence_id": True}, "last_sequence_id"),
        ({"last_sequence_id": "3"}, "last_sequence_id"),
        ({"last_sequence_id": 3.5}, "last_sequence_id"),
        ({"last_sequence_id": -1}, "last_sequence_id"),
        ({"limit": "10"}, "limit"),
        ({"wait": False}, "wait"),
    ],
)
def test_a_resume_cursor_is_a_json_number_never_guessed_at(
    invoke: Any, body: dict[str, Any], field: str
) -> None:
    job_id = load_event("chunks")["pathParameters"]["job_id"]
    event = api_event(
        "POST", f"/v1/jobs/{job_id}/stream/resume", body=body, resource="/v1/jobs/{job_id}/stream/resume"
    )
    response = invoke("ChunksFunction", event)
    assert response["statusCode"] == 400, response
    error = response_json(response)["error"]
    assert error["code"] == "invalid_request"
    assert any(f["field"].endswith(field) for f in error["details"]["fields"]), error
