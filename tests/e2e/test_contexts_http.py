"""The context workflow over HTTP, as a client does it, with every status code of the contract."""

from __future__ import annotations

import urllib.request

from tests.e2e.conftest import E2E_MAX_CONTEXT_BYTES, OTHER_KEY, RunningStack
from tests.support import wait_for


def test_create_get_patch_delete(dev_stack: RunningStack) -> None:
    files = [{"path": f"src/mod{i}.py", "content": f"def f{i}():\n    return {i}\n"} for i in range(10)]
    status, headers, created = dev_stack.request(
        "POST", "/v1/contexts", body={"files": files, "metadata": {"repo": "acme/web"}, "ttl_seconds": 600}
    )
    assert status == 201
    assert headers["Location"] == f"/v1/contexts/{created['context_id']}"
    assert set(created) == {"context_id", "version", "expires_at", "size_bytes", "token_count", "file_count"}
    path = f"/v1/contexts/{created['context_id']}"

    status, _, detail = dev_stack.request("GET", path)
    assert status == 200
    assert len(detail["files"]) == 10
    assert {"path", "sha256", "size_bytes", "token_count"} == set(detail["files"][0])

    status, _, patched = dev_stack.request(
        "PATCH",
        path,
        body={"upsert": [{"path": "src/mod1.py", "content": "changed = True\n"}], "delete": ["src/mod2.py"]},
    )
    assert status == 200
    assert patched["version"] == 2
    assert patched["file_count"] == 9

    status, _, body = dev_stack.request("DELETE", path)
    assert (status, body) == (204, None)
    status, headers, error = dev_stack.request("GET", path)
    assert status == 404
    assert error["error"]["code"] == "context_not_found"
    assert error["error"]["request_id"] == headers["X-Request-Id"]


def test_cross_tenant_access_is_404(dev_stack: RunningStack) -> None:
    _, _, created = dev_stack.request("POST", "/v1/contexts", body={"files": [{"path": "a", "content": "b"}]})
    status, _, error = dev_stack.request("GET", f"/v1/contexts/{created['context_id']}", key=OTHER_KEY)
    assert status == 404
    assert error["error"]["code"] == "context_not_found"


def test_expired_context_is_410(dev_stack: RunningStack) -> None:
    _, _, created = dev_stack.request(
        "POST", "/v1/contexts", body={"files": [{"path": "a", "content": "b"}], "ttl_seconds": 1}
    )
    status, _, error = wait_for(
        lambda: (
            (answer := dev_stack.request("GET", f"/v1/contexts/{created['context_id']}"))[0] == 410 and answer
        ),
        timeout=10,
        what="the context to expire",
    )
    assert status == 410
    assert error["error"]["code"] == "context_expired"


def test_bad_input(dev_stack: RunningStack) -> None:
    status, _, error = dev_stack.request(
        "POST", "/v1/contexts", body={"files": [{"path": "../x", "content": "b"}]}
    )
    assert (status, error["error"]["code"]) == (400, "invalid_path")
    status, _, error = dev_stack.request("POST", "/v1/contexts", body=b"{not json")
    assert (status, error["error"]["code"]) == (400, "invalid_request")
    big = "x" * (E2E_MAX_CONTEXT_BYTES + 1)
    status, _, error = dev_stack.request(
        "POST", "/v1/contexts", body={"files": [{"path": "big", "content": big}]}
    )
    assert status == 413
    assert error["error"]["code"] == "payload_too_large"
    assert error["error"]["details"] == {
        "size_bytes": E2E_MAX_CONTEXT_BYTES + 1,
        "limit_bytes": E2E_MAX_CONTEXT_BYTES,
    }
    status, _, error = dev_stack.request("POST", "/v1/contexts", key=None, body={"files": []})
    assert (status, error["error"]["code"]) == (401, "unauthorized")


def test_presigned_upload_flow(dev_stack: RunningStack) -> None:
    status, _, ticket = dev_stack.request("POST", "/v1/contexts/uploads")
    assert status == 201
    assert ticket["max_bytes"] == 2 * E2E_MAX_CONTEXT_BYTES  # the document: the context, as JSON
    document = b'{"files": [{"path": "notes.txt", "content": "uploaded out of band"}]}'
    put = urllib.request.Request(ticket["upload_url"], data=document, method="PUT")  # noqa: S310 - loopback moto
    put.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(put, timeout=10) as response:  # noqa: S310
        assert response.status == 200
    status, _, created = dev_stack.request("POST", "/v1/contexts", body={"upload_id": ticket["upload_id"]})
    assert status == 201
    assert created["file_count"] == 1


def test_token_count(dev_stack: RunningStack) -> None:
    _, _, created = dev_stack.request(
        "POST", "/v1/contexts", body={"files": [{"path": "a.py", "content": "x = 1\n"}]}
    )
    status, _, counted = dev_stack.request(
        "POST",
        "/v1/tokens/count",
        body={
            "model": "sim-fast",
            "context_id": created["context_id"],
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    assert status == 200
    assert counted["context_window"] == 128000
    assert counted["input_tokens"] == counted["context_tokens"] + counted["message_tokens"]
