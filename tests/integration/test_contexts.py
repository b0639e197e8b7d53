"""The contexts function against moto: real S3 objects, real DynamoDB items, real presigned PUTs."""

from __future__ import annotations

import base64
import json
import time
import urllib.request
from typing import Any

import pytest

from spool.devstack.provision import StackDescription
from tests.integration.conftest import client
from tests.support import api_event, response_json, wait_for

RETRIES = 12


def call(invoke: Any, method: str, path: str, body: Any = None, tenant: str = "local") -> tuple[int, Any]:
    resource = "/v1/contexts/{context_id}" if path.count("/") == 3 and "uploads" not in path else path
    event = api_event(method, path, body=body, tenant=tenant, resource=resource)
    if resource.endswith("{context_id}"):
        event["pathParameters"] = {"context_id": path.rsplit("/", 1)[1]}
    response = invoke("ContextsFunction", event)
    return response["statusCode"], (response_json(response) if response.get("body") else None)


def keys_under(stack: StackDescription, prefix: str) -> list[str]:
    listed = client("s3", stack).list_objects_v2(Bucket=stack.refs["ContextBucket"], Prefix=prefix)
    return [o["Key"] for o in listed.get("Contents", [])]


def test_one_object_per_distinct_content_across_contexts_and_versions(
    invoke: Any, stack: StackDescription
) -> None:
    shared = "def shared():\n    return 'same'\n"
    files = [{"path": "a.py", "content": shared}, {"path": "b/c.py", "content": shared}]
    status, first = call(invoke, "POST", "/v1/contexts", {"files": files}, tenant="dedupe")
    assert status == 201
    status, _ = call(invoke, "POST", "/v1/contexts", {"files": [files[0]]}, tenant="dedupe")
    assert status == 201
    status, _ = call(
        invoke,
        "PATCH",
        f"/v1/contexts/{first['context_id']}",
        {"upsert": [{"path": "new.py", "content": shared}]},
        tenant="dedupe",
    )
    assert status == 200
    assert len(keys_under(stack, "t/dedupe/blobs/")) == 1
    manifests = keys_under(stack, f"t/dedupe/contexts/{first['context_id']}/")
    assert sorted(k.rsplit("/", 1)[1].split("-")[0] for k in manifests) == ["v1", "v2"]  # v<n>-<digest>.json


def test_another_tenants_context_is_404_like_an_unknown_one(invoke: Any) -> None:
    status, created = call(
        invoke, "POST", "/v1/contexts", {"files": [{"path": "a", "content": "x"}]}, tenant="owner"
    )
    assert status == 201
    path = f"/v1/contexts/{created['context_id']}"
    for method, body in (("GET", None), ("PATCH", {"delete": ["a"]}), ("DELETE", None)):
        status, error = call(invoke, method, path, body, tenant="intruder")
        assert status == 404
        assert error["error"]["code"] == "context_not_found"
    assert call(invoke, "GET", path, tenant="owner")[0] == 200


def test_expired_context_answers_410_before_ttl_deletes_it(invoke: Any, stack: StackDescription) -> None:
    status, created = call(
        invoke, "POST", "/v1/contexts", {"files": [{"path": "a", "content": "x"}], "ttl_seconds": 1}
    )
    assert status == 201
    status, error = wait_for(
        lambda: (answer := call(invoke, "GET", f"/v1/contexts/{created['context_id']}"))[0] == 410 and answer,
        timeout=10,
        what="the context to expire",
    )
    assert status == 410
    assert error["error"]["code"] == "context_expired"
    assert error["error"]["details"]["expired_at"] == created["expires_at"]
    item = client("dynamodb", stack).get_item(
        TableName=stack.refs["ContextsTable"], Key={"pk": {"S": f"local#ctx#{created['context_id']}"}}
    )
    assert "Item" in item  # still stored; the expiry is enforced on read


def test_presigned_upload_with_a_real_http_put(invoke: Any, stack: StackDescription) -> None:
    status, ticket = call(invoke, "POST", "/v1/contexts/uploads", tenant="uploader")
    assert status == 201
    document = b'{"files": [{"path": "big.txt", "content": "' + b"word " * 1000 + b'"}], "ttl_seconds": 60}'
    put = urllib.request.Request(ticket["upload_url"], data=document, method="PUT")  # noqa: S310 - moto on loopback
    put.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(put, timeout=10) as response:  # noqa: S310
        assert response.status == 200
    status, created = call(
        invoke, "POST", "/v1/contexts", {"upload_id": ticket["upload_id"]}, tenant="uploader"
    )
    assert status == 201
    assert created["size_bytes"] == 5000
    assert keys_under(stack, "uploads/uploader/") == []  # consumed
    status, error = call(
        invoke, "POST", "/v1/contexts", {"upload_id": ticket["upload_id"]}, tenant="uploader"
    )
    assert (status, error["context_id"]) == (201, created["context_id"])  # one context per upload


def test_a_refused_upload_is_deleted_takes_a_corrected_one_and_the_form_post_holds_the_size(
    invoke: Any, stack: StackDescription
) -> None:
    status, ticket = call(invoke, "POST", "/v1/contexts/uploads", tenant="refused")
    assert ["content-length-range", 1, ticket["max_bytes"]] in json.loads(
        base64.b64decode(ticket["upload_form"]["fields"]["policy"])
    )["conditions"]
    document = b'{"files": [{"path": "../x", "content": "y"}]}'
    put = urllib.request.Request(ticket["upload_url"], data=document, method="PUT")  # noqa: S310 - moto
    put.add_header("Content-Type", "application/json")
    urllib.request.urlopen(put, timeout=10).close()  # noqa: S310
    assert keys_under(stack, "uploads/refused/") != []
    status, error = call(invoke, "POST", "/v1/contexts", {"upload_id": ticket["upload_id"]}, tenant="refused")
    assert (status, error["error"]["code"]) == (400, "invalid_path"), error
    assert keys_under(stack, "uploads/refused/") == []  # nothing left behind
    assert "same upload_url" in error["error"]["suggestions"][-1]
    # As the refusal says, the URL takes a corrected document, and the same upload_id makes the context.
    corrected = b'{"files": [{"path": "x", "content": "y"}]}'
    put = urllib.request.Request(ticket["upload_url"], data=corrected, method="PUT")  # noqa: S310 - moto
    put.add_header("Content-Type", "application/json")
    urllib.request.urlopen(put, timeout=10).close()  # noqa: S310
    status, created = call(
        invoke, "POST", "/v1/contexts", {"upload_id": ticket["upload_id"]}, tenant="refused"
    )
    assert (status, created.get("file_count")) == (201, 1), created


def test_an_upload_of_another_tenant_is_not_found(invoke: Any) -> None:
    status, ticket = call(invoke, "POST", "/v1/contexts/uploads", tenant="alice")
    put = urllib.request.Request(ticket["upload_url"], data=b'{"files": []}', method="PUT")  # noqa: S310
    put.add_header("Content-Type", "application/json")
    urllib.request.urlopen(put, timeout=10).close()  # noqa: S310
    status, error = call(invoke, "POST", "/v1/contexts", {"upload_id": ticket["upload_id"]}, tenant="mallory")
    assert status == 404
    assert error["error"]["code"] == "upload_not_found"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"files": [{"path": "/etc/passwd", "content": "x"}]}, 400, "invalid_path"),
        ({"files": [{"path": "a", "content": "1"}, {"path": "a", "content": "2"}]}, 400, "duplicate_path"),
        ({"files": [{"path": "a", "content": "\u0000"}]}, 400, "invalid_content"),
        ({"files": [], "ttl_seconds": 604801}, 400, "invalid_request"),
        ({"files": [{"path": "a"}]}, 400, "invalid_request"),
        ("{broken", 400, "invalid_request"),
    ],
)
def test_bad_input_gets_a_structured_error(invoke: Any, body: Any, status: int, code: str) -> None:
    got, error = call(invoke, "POST", "/v1/contexts", body)
    assert got == status
    assert error["error"]["code"] == code
    assert error["error"]["suggestions"]


def test_size_limit_is_413_with_the_numbers(invoke: Any) -> None:
    def limited(function: str, event: dict[str, Any]) -> Any:
        return invoke(function, event, environment={"SPOOL_MAX_CONTEXT_BYTES": "100"})

    status, error = call(limited, "POST", "/v1/contexts", {"files": [{"path": "a", "content": "x" * 101}]})
    assert status == 413
    assert error["error"]["details"] == {"size_bytes": 101, "limit_bytes": 100}


def test_token_count_and_delete(invoke: Any) -> None:
    status, created = call(
        invoke, "POST", "/v1/contexts", {"files": [{"path": "a.py", "content": "x = 1\n"}]}
    )
    status, counted = call(
        invoke,
        "POST",
        "/v1/tokens/count",
        {
            "model": "sim-realtime",
            "context_id": created["context_id"],
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    assert status == 200
    assert counted["input_tokens"] == counted["context_tokens"] + counted["message_tokens"] > 0
    assert call(invoke, "DELETE", f"/v1/contexts/{created['context_id']}")[0] == 204
    assert call(invoke, "GET", f"/v1/contexts/{created['context_id']}")[0] == 404
    status, error = call(invoke, "POST", "/v1/tokens/count", {"model": "nope"})
    assert (status, error["error"]["code"]) == (400, "model_not_found")


def test_the_upload_budget_is_kept_in_the_table(invoke: Any) -> None:
    """Each upload spends one conditional write on the tenant's budget item (first a create, then
    a compare-and-set); the 101st within an hour is a 429 with Retry-After."""
    hour = int(time.time() // 3600)
    for _ in range(100):
        status, _ = call(invoke, "POST", "/v1/contexts/uploads", tenant="budget")
        assert status == 201
    status, error = call(invoke, "POST", "/v1/contexts/uploads", tenant="budget")
    if int(time.time() // 3600) != hour:
        pytest.skip("the hour turned during the test: its budget started again")
    assert (status, error["error"]["code"]) == (429, "rate_limited")
    assert error["error"]["details"] == {"limit": 100, "window": "hour"}
    assert call(invoke, "POST", "/v1/contexts/uploads", tenant="other-budget")[0] == 201  # per tenant


def test_a_version_a_job_pinned_is_read_after_a_patch_and_gone_after_a_delete(
    stack: StackDescription,
) -> None:
    """On S3 (moto): the manifest a job was accepted with stays readable after a PATCH made another
    version current; after a DELETE it is gone (``find``: None, not an S3 error)."""
    from spool_core import bootstrap
    from spool_core.contexts.errors import ContextNotFound
    from spool_core.contexts.model import CreateContextRequest, PatchContextRequest
    from spool_core.tenancy import Tenant

    service = bootstrap.context_service(Tenant("local"))
    created = service.create(
        CreateContextRequest.model_validate({"files": [{"path": "a.py", "content": "A = 1\n"}]})
    )
    context_id = created["context_id"]
    pinned = service.load(context_id).record.manifest_key
    service.patch(
        context_id, PatchContextRequest.model_validate({"upsert": [{"path": "a.py", "content": "A = 2\n"}]})
    )
    assert service.load(context_id).record.manifest_key != pinned
    (entry,) = service.load_version(context_id, pinned).files
    assert service.read_file(entry, created["context_id"]) == "A = 1\n"
    service.delete(context_id)
    with pytest.raises(ContextNotFound):
        service.load_version(context_id, pinned)


def test_if_match_makes_exactly_one_of_two_edits_of_a_version_win(invoke: Any) -> None:
    """Every answer names its version as an ETag; a PATCH with If-Match applies to that version only,
    so two clients that read version 1 cannot both write over the same file."""

    def patch(context_id: str, content: str, if_match: str | None) -> tuple[int, Any, dict[str, str]]:
        event = api_event(
            "PATCH",
            f"/v1/contexts/{context_id}",
            body={"upsert": [{"path": "shared.py", "content": content}]},
            tenant="etag",
            resource="/v1/contexts/{context_id}",
            headers={"If-Match": if_match} if if_match is not None else None,
        )
        event["pathParameters"] = {"context_id": context_id}
        response = invoke("ContextsFunction", event)
        headers = {name: values[-1] for name, values in (response.get("multiValueHeaders") or {}).items()}
        return response["statusCode"], response_json(response), headers

    created_event = api_event(
        "POST", "/v1/contexts", body={"files": [{"path": "shared.py", "content": "0"}]}, tenant="etag"
    )
    created = invoke("ContextsFunction", created_event)
    assert created["statusCode"] == 201 and created["multiValueHeaders"]["ETag"] == ['"1"']
    context_id = response_json(created)["context_id"]
    status, first, headers = patch(context_id, "mine", '"1"')
    assert (status, first["version"], headers["ETag"]) == (200, 2, '"2"')
    status, lost, _ = patch(context_id, "theirs", 'W/"1"')  # the other client, also from version 1
    assert status == 409 and lost["error"]["code"] == "context_conflict"
    assert (
        lost["error"]["details"]["current_version"] == 2
        and 'If-Match: "2"' in lost["error"]["suggestions"][0]
    )
    for odd in ("abc", '"²"', '"-1"', '"1.0"'):  # "²" is a digit to str.isdigit, not to int()
        status, bad, _ = patch(context_id, "x", odd)
        assert status == 400 and bad["error"]["details"]["field"] == "If-Match", odd
    status, merged, _ = patch(context_id, "last", None)  # no If-Match: applied to the current version
    assert (status, merged["version"]) == (200, 3)
    status, read = call(invoke, "GET", f"/v1/contexts/{context_id}", tenant="etag")
    assert status == 200 and read["version"] == 3


def test_concurrent_retries_of_one_upload_all_answer_its_one_context(stack: StackDescription) -> None:
    """Requests naming one upload while another of them makes its context, as a client's retries do,
    on S3 and DynamoDB (moto): each answers the one context the upload makes (201). Their starts are
    spread over the time one takes, so that some read while another creates, notes the upload used
    and deletes its document."""
    from spool_core import bootstrap
    from spool_core.contexts.model import CreateContextRequest
    from spool_core.tenancy import Tenant
    from tests.integration.test_atomic_dynamodb import run_together

    document = json.dumps({"files": [{"path": f"f{i}", "content": f"c{i}" * 100} for i in range(20)]})
    started = time.monotonic()
    bootstrap.context_service(Tenant("retries")).create(CreateContextRequest.model_validate_json(document))
    one_create = time.monotonic() - started
    for _ in range(8):
        services = [bootstrap.context_service(Tenant("retries")) for _ in range(RETRIES)]
        upload_id = services[0].begin_upload()["upload_id"]
        client("s3", stack).put_object(
            Bucket=stack.refs["ContextBucket"], Key=f"uploads/retries/{upload_id}", Body=document.encode()
        )

        def retry(i: int) -> Any:
            time.sleep(one_create * i / RETRIES)
            return services[i].create_from_upload(upload_id)  # noqa: B023

        answers = run_together(RETRIES, retry)
        assert [a for a in answers if not isinstance(a, dict)] == []
        assert {a["context_id"] for a in answers} == {services[0].create_from_upload(upload_id)["context_id"]}
        assert services[0].get(answers[0]["context_id"])["file_count"] == 20
        assert keys_under(stack, f"uploads/retries/{upload_id}") == []


def test_a_context_at_the_listing_bound_answers_its_get_within_lambdas_6_mb(invoke: Any) -> None:
    """Through the function: symbols up to the default ``max_listing_bytes`` (long paths) make a GET
    whose whole Lambda response (status, headers, the body as a JSON string) is under 6 MB; one symbol
    more is refused. The tester's 10,000 symbols of 512-character names answered a 15.6 MB GET."""
    from spool_core import bootstrap
    from spool_core.contexts.errors import ListingTooLarge
    from spool_core.contexts.model import CreateContextRequest
    from spool_core.tenancy import Tenant

    service = bootstrap.context_service(Tenant("listing"))
    limit = service.limits.max_listing_bytes
    path = "d/" * 500 + "f.py"

    def document(count: int) -> CreateContextRequest:
        symbols = [
            {"name": f"s{i:05d}", "kind": "function", "path": path, "line": 10_000 + i} for i in range(count)
        ]
        return CreateContextRequest.model_validate(
            {"files": [{"path": path, "content": "x"}], "symbols": symbols}
        )

    def refused_at(count: int) -> int:
        with pytest.raises(ListingTooLarge) as refused:
            service.create(document(count))
        assert refused.value.details["limit_bytes"] == limit
        return int(refused.value.details["listing_bytes"])

    # Every symbol lists the same bytes (and a comma): the most that fit follow from two refusals.
    per_symbol = (refused_at(10_000) - refused_at(9_000)) // 1_000
    fitting = (limit - (refused_at(10_000) - 10_000 * per_symbol)) // per_symbol
    refused_at(fitting + 1)
    created = service.create(document(fitting))
    response = invoke(
        "ContextsFunction",
        {
            **api_event(
                "GET",
                f"/v1/contexts/{created['context_id']}",
                tenant="listing",
                resource="/v1/contexts/{context_id}",
            ),
            "pathParameters": {"context_id": created["context_id"]},
        },
    )
    assert response["statusCode"] == 200
    assert len(response_json(response)["symbols"]) == fitting
    assert limit - per_symbol < len(json.dumps(response)) < 6 * 1024 * 1024
