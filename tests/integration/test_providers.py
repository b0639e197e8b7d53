"""The real providers against their real wire protocols: Bedrock's binary event stream decoded by
botocore's own parser, and OpenAI's SSE parsed by the official client from a loopback server."""

from __future__ import annotations

import binascii
import json
import struct
import threading
from collections.abc import Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import boto3
import openai
import pytest
import urllib3
from botocore.awsrequest import AWSResponse
from botocore.config import Config

from spool_core import bootstrap
from spool_core.chat import Message
from spool_core.providers import Finished, GenerationRequest, ProviderError, ResumePoint, TextDelta
from spool_core.providers.bedrock import BedrockProvider
from spool_core.providers.continuation import CONTINUE_INSTRUCTION
from spool_core.providers.openai_compatible import OpenAICompatibleProvider

REQUEST = GenerationRequest(
    "model-x",
    (Message(role="system", content="ctx"), Message(role="user", content="hi")),
    max_tokens=50,
    temperature=0.2,
)


def collect(provider: Any, resume: ResumePoint | None = None) -> tuple[str, Finished | None]:
    text, finished = [], None
    for event in provider.stream(REQUEST, resume or ResumePoint()):
        if isinstance(event, TextDelta):
            text.append(event.text)
        elif isinstance(event, Finished):
            finished = event
    return "".join(text), finished


# ------------------------------------------------------------------------------------------- Bedrock
def _header(name: str, value: str) -> bytes:
    raw_name, raw_value = name.encode(), value.encode()
    return struct.pack("!B", len(raw_name)) + raw_name + struct.pack("!BH", 7, len(raw_value)) + raw_value


def event_message(event_type: str, payload: dict[str, Any], *, exception: bool = False) -> bytes:
    """One message of AWS's binary event stream: prelude, prelude CRC, headers, payload, message CRC."""
    kind = ":exception-type" if exception else ":event-type"
    headers = (
        _header(kind, event_type)
        + _header(":content-type", "application/json")
        + _header(":message-type", "exception" if exception else "event")
    )
    body = json.dumps(payload).encode()
    prelude = struct.pack("!II", 12 + len(headers) + len(body) + 4, len(headers))
    message = prelude + struct.pack("!I", binascii.crc32(prelude)) + headers + body
    return message + struct.pack("!I", binascii.crc32(message))


class RawStream:
    def __init__(self, chunks: list[bytes], cut: bool = False) -> None:
        self._chunks, self._cut = chunks, cut

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield from self._chunks
        if self._cut:
            raise urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead")

    def close(self) -> None:
        return None


def bedrock(
    responses: list[tuple[int, dict[str, str], RawStream]], seen: list[dict[str, Any]]
) -> BedrockProvider:
    client = boto3.session.Session().client(
        "bedrock-runtime",
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
        config=Config(
            retries={"mode": "standard", "total_max_attempts": 1}
        ),  # as spool_core.adapters.aws.bedrock
    )

    def answer(request: Any, **_: Any) -> AWSResponse:  # below the parser: botocore decodes what we send
        seen.append(json.loads(request.body))
        status, headers, raw = responses.pop(0)
        return AWSResponse(request.url, status, headers, raw)

    client.meta.events.register("before-send.bedrock-runtime.ConverseStream", answer)
    return BedrockProvider(client, supports_prefill=True)


def stream_ok(words: list[str], cut: bool = False) -> tuple[int, dict[str, str], RawStream]:
    messages = [event_message("messageStart", {"role": "assistant"})]
    messages += [
        event_message("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": w}}) for w in words
    ]
    if not cut:
        messages += [
            event_message("messageStop", {"stopReason": "end_turn"}),
            event_message(
                "metadata",
                {
                    "usage": {"inputTokens": 12, "outputTokens": len(words), "totalTokens": 12 + len(words)},
                    "metrics": {"latencyMs": 5},
                },
            ),
        ]
    return 200, {"content-type": "application/vnd.amazon.eventstream"}, RawStream(messages, cut=cut)


def error(status: int, code: str, message: str | None = None) -> tuple[int, dict[str, str], RawStream]:
    body = json.dumps({"message": message or f"{code} happened"}).encode()
    return (
        status,
        {"x-amzn-errortype": f"{code}:http://internal.amazon.com/", "content-type": "application/json"},
        RawStream([body]),
    )


def test_bedrock_success_and_usage() -> None:
    seen: list[dict[str, Any]] = []
    text, finished = collect(bedrock([stream_ok(["Hello", " world"])], seen))
    assert text == "Hello world"
    assert finished == Finished(12, 2, "end_turn")
    assert seen[0]["system"] == [{"text": "ctx"}]
    assert seen[0]["messages"] == [{"role": "user", "content": [{"text": "hi"}]}]
    assert seen[0]["inferenceConfig"]["maxTokens"] == 50


@pytest.mark.parametrize(
    ("response", "code", "retryable"),
    [
        (error(429, "ThrottlingException"), "provider_throttled", True),
        (error(503, "ServiceUnavailableException"), "provider_unavailable", True),
        (error(500, "InternalServerException"), "provider_unavailable", True),
        (error(400, "ValidationException"), "provider_error", False),
        (error(403, "AccessDeniedException"), "provider_model_unavailable", False),
        # Bedrock's refusal of a model id it serves only through an inference profile: the registry's
        # id is wrong here, not the request, so the fallbacks are tried
        (
            error(
                400,
                "ValidationException",
                "Invocation of model ID anthropic.claude-sonnet-4-20250514-v1:0 with on-demand throughput "
                "isn't supported. Retry your request with the ID or ARN of an inference profile that "
                "contains this model.",
            ),
            "provider_model_unavailable",
            False,
        ),
    ],
)
def test_bedrock_errors_are_classified(response: Any, code: str, retryable: bool) -> None:
    with pytest.raises(ProviderError) as raised:
        collect(bedrock([response], []))
    assert (raised.value.code, raised.value.retryable) == (code, retryable)


def test_bedrock_exception_events_mid_stream_and_cuts() -> None:
    throttled_mid = stream_ok(["a"], cut=False)
    throttled_mid[2]._chunks.insert(
        2, event_message("throttlingException", {"message": "slow down"}, exception=True)
    )
    with pytest.raises(ProviderError) as raised:
        collect(bedrock([throttled_mid], []))
    assert (raised.value.code, raised.value.retryable) == ("provider_throttled", True)
    with pytest.raises(ProviderError) as cut:
        collect(bedrock([stream_ok(["a", "b"], cut=True)], []))
    assert (cut.value.code, cut.value.retryable) == ("provider_unavailable", True)


def test_bedrock_resumes_with_an_assistant_prefill() -> None:
    seen: list[dict[str, Any]] = []
    collect(bedrock([stream_ok([" rest"])], seen), ResumePoint(tokens=7, text="The first part"))
    assert seen[0]["messages"][-1] == {"role": "assistant", "content": [{"text": "The first part"}]}
    assert seen[0]["inferenceConfig"]["maxTokens"] == 43


@pytest.mark.parametrize(
    ("persisted", "deltas", "written"),
    [
        # the model writes again the whitespace the prefill left out: not written twice
        ("def f():\n    ", ["\n", "    return", " 1"], "return 1"),
        ("Hello ", [" world"], "world"),
        # it goes on otherwise: kept as it comes
        ("Hello ", ["world"], "world"),
        ("Items:\n\n", ["\n- one"], "- one"),
        ("Items:\n\n", ["\n", "\t- one"], "\t- one"),
        # nothing but whitespace was written: no prefill at all (an empty one is refused too)
        ("\n\n", ["\n\nHello"], "Hello"),
    ],
)
def test_bedrock_prefill_leaves_out_trailing_whitespace_which_claude_refuses(
    persisted: str, deltas: list[str], written: str
) -> None:
    """Claude on Bedrock answers ValidationException "final assistant content cannot end with trailing
    whitespace", and a persisted chunk often ends with some: each hand-over and crash retry failed."""
    seen: list[dict[str, Any]] = []
    text, finished = collect(bedrock([stream_ok(deltas)], seen), ResumePoint(tokens=7, text=persisted))
    kept = persisted.rstrip()
    last = seen[0]["messages"][-1]
    assert last == (
        {"role": "assistant", "content": [{"text": kept}]}
        if kept
        else {"role": "user", "content": [{"text": "hi"}]}
    )
    assert text == written and finished is not None


# ------------------------------------------------------------------------------------------- OpenAI
class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ChatHandler)
        self.scenarios: list[str] = []
        self.requests: list[dict[str, Any]] = []
        self.credentials: list[tuple[str | None, str | None]] = []  # (Authorization, Cookie) of each
        self.release = threading.Event()  # what a "stall" answer waits for after its second word

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class ChatHandler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        return None

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        self.server.credentials.append((self.headers.get("Authorization"), self.headers.get("Cookie")))
        scenario = self.server.scenarios.pop(0)
        if scenario.isdigit():
            payload = json.dumps(
                {"error": {"message": f"status {scenario}", "type": "x", "code": scenario}}
            ).encode()
            self.send_response(int(scenario))
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Set-Cookie", f"session=from-{self.server.server_address[1]}; Path=/")
        self.send_header("Connection", "close")
        self.end_headers()
        words = ["Hel", "lo", " there"]

        def send(chunk: dict[str, Any]) -> None:
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
        send(
            {
                **base,
                "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                ],
            }
        )
        if scenario == "sparse":  # what some servers send: no choices, a choice without a delta, extras
            send({**base, "choices": None, "system_fingerprint": "fp"})
            send({**base, "choices": [{"index": 0, "finish_reason": None, "logprobs": {"content": []}}]})
        for i, word in enumerate(words):
            send({**base, "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]})
            if scenario == "stall" and i == 1:  # the upstream stops sending, the connection open
                self.server.release.wait(60)
                self.close_connection = True
                return
            if scenario == "cut" and i == 1:
                self.close_connection = True
                return  # the connection drops mid-answer: no finish, no usage, no [DONE]
            if scenario == "error-event" and i == 1:
                send({"error": {"message": "The server is overloaded", "type": "server_error"}})
                self.wfile.write(b"data: [DONE]\n\n")
                self.close_connection = True
                return
        send({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        send(
            {
                **base,
                "choices": [],
                "usage": {"prompt_tokens": 21, "completion_tokens": 3, "total_tokens": 24},
            }
        )
        self.wfile.write(b"data: [DONE]\n\n")
        self.close_connection = True


def _serving() -> Iterator[ChatServer]:
    server = ChatServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def chat_server() -> Iterator[ChatServer]:
    yield from _serving()


@pytest.fixture
def other_chat_server() -> Iterator[ChatServer]:
    yield from _serving()


def openai_provider(server: ChatServer) -> OpenAICompatibleProvider:
    return OpenAICompatibleProvider(openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0))


def test_openai_success_with_usage(chat_server: ChatServer) -> None:
    chat_server.scenarios.append("ok")
    text, finished = collect(openai_provider(chat_server))
    assert text == "Hello there"
    assert finished == Finished(21, 3, "stop")
    sent = chat_server.requests[0]
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["messages"] == [{"role": "system", "content": "ctx"}, {"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("status", "code", "retryable"),
    [
        ("429", "provider_throttled", True),
        ("500", "provider_unavailable", True),
        ("503", "provider_unavailable", True),
        ("400", "provider_error", False),
        ("404", "provider_model_unavailable", False),
    ],
)
def test_openai_errors_are_classified(
    chat_server: ChatServer, status: str, code: str, retryable: bool
) -> None:
    chat_server.scenarios.append(status)
    with pytest.raises(ProviderError) as raised:
        collect(openai_provider(chat_server))
    assert (raised.value.code, raised.value.retryable) == (code, retryable)


def test_the_request_carries_the_providers_key_and_never_the_environments_admin_key(
    chat_server: ChatServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_ADMIN_KEY", "sk-admin-secret")
    chat_server.scenarios += ["ok", "ok"]
    collect(openai_provider(chat_server))
    assert chat_server.credentials[0][0] == "Bearer sk-test"
    keyless = OpenAICompatibleProvider(
        openai.OpenAI(base_url=chat_server.base_url, api_key="", max_retries=0)
    )
    with pytest.raises(ProviderError):  # no key for this endpoint: refused here, not sent another's
        collect(keyless)
    assert [auth for auth, _ in chat_server.credentials] == ["Bearer sk-test"]


def test_openai_events_without_choices_or_deltas_are_read_past(chat_server: ChatServer) -> None:
    chat_server.scenarios.append("sparse")
    assert collect(openai_provider(chat_server)) == ("Hello there", Finished(21, 3, "stop"))


def test_an_error_event_mid_stream_is_a_retryable_provider_error(chat_server: ChatServer) -> None:
    chat_server.scenarios.append("error-event")
    received: list[str] = []

    def read() -> None:
        for event in openai_provider(chat_server).stream(REQUEST, ResumePoint()):
            if isinstance(event, TextDelta):
                received.append(event.text)

    with pytest.raises(ProviderError) as raised:
        read()
    assert (raised.value.code, raised.value.retryable) == ("provider_unavailable", True)
    assert "overloaded" in str(raised.value)
    assert "".join(received) == "Hello"  # what came before the error is kept


def test_openai_stream_cut_mid_answer_then_resumed_with_an_instruction(chat_server: ChatServer) -> None:
    chat_server.scenarios += ["cut", "ok"]
    provider = openai_provider(chat_server)
    received: list[str] = []

    def read_until_cut() -> None:
        for event in provider.stream(REQUEST, ResumePoint()):
            if isinstance(event, TextDelta):
                received.append(event.text)

    with pytest.raises(ProviderError) as cut:
        read_until_cut()
    assert (cut.value.code, cut.value.retryable) == ("provider_unavailable", True)
    assert "".join(received) == "Hello"
    collect(provider, ResumePoint(tokens=2, text="Hello"))
    resumed = chat_server.requests[1]["messages"]
    assert resumed[-2:] == [
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": CONTINUE_INSTRUCTION},
    ]
    assert chat_server.requests[1]["max_tokens"] == 48


def _run_on_local_llm(base_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, tenant_name: str) -> Any:
    """One job on an OpenAI-compatible ``local-llm`` at ``base_url``, run through the worker's own
    wiring (registry file, provider factory, key from ``env:LOCAL_LLM_KEY``) to its end: the job
    resource, once the runner has said ``DONE``."""
    from spool_core import bootstrap
    from spool_core.jobs.model import JobRequest
    from spool_core.jobs.runner import JobRunner, Outcome, RunnerSettings
    from spool_core.tenancy import Tenant

    models = {
        "models": [
            {
                "id": "local-llm",
                "provider": "openai",
                "provider_model_id": "llama3",
                "family": "meta-llama",
                "context_window": 8192,
                "max_output_tokens": 1024,
                "pricing": {"input_per_mtok": 0, "output_per_mtok": 0},
                "options": {"base_url": base_url, "api_key_parameter": "env:LOCAL_LLM_KEY"},
            }
        ]
    }
    (tmp_path / "models.json").write_text(json.dumps(models))
    monkeypatch.setenv("SPOOL_MODELS_FILE", str(tmp_path / "models.json"))
    monkeypatch.setenv("SPOOL_PROVIDER_STALL_SECONDS", "0.5")
    tenant = Tenant(tenant_name)
    service = bootstrap.job_service(tenant)
    created = service.create(
        "k", JobRequest.model_validate({"message": "hi", "model": "local-llm", "max_tokens": 100})
    )
    jobs, chunks = bootstrap._job_tables(tenant, bootstrap.settings())
    runner = JobRunner(
        jobs,
        chunks,
        partial(bootstrap.context_service, tenant),
        bootstrap.catalog(tenant),
        bootstrap.provider_for,
        bootstrap.rate_limiter(tenant),
        RunnerSettings(backoff_seconds=0.0, stall_seconds=bootstrap.settings().provider_stall_seconds),
        queue=bootstrap.job_queue(),
        sleep=lambda _: None,
    )
    outcomes: list[Outcome] = []
    worker = threading.Thread(
        target=lambda: outcomes.append(runner.run(created.job.job_id, remaining_ms=lambda: 600_000)),
        daemon=True,
    )
    worker.start()
    # A deadline under the provider client's own read timeout (120 s), which ends a stall without the
    # watch: the stall limit here is 0.5 s.
    worker.join(100)
    assert outcomes == [Outcome.DONE]
    return service.view(service.get(created.job.job_id))


@pytest.mark.parametrize("scenario", ["cut", "stall"])
def test_a_job_on_an_openai_compatible_endpoint_survives_a_cut(
    chat_server: ChatServer, stack: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, scenario: str
) -> None:
    """A stall (the upstream stops sending and keeps the connection) is a cut once the stall limit has
    passed: before, it held the worker until the HTTP client's timeout, the invocation's whole time."""
    monkeypatch.setenv("LOCAL_LLM_KEY", "sk-local")
    chat_server.scenarios += [scenario, "ok"]
    done = _run_on_local_llm(chat_server.base_url, tmp_path, monkeypatch, f"openai-job-{scenario}")
    assert done["status"] == "completed"
    assert done["output"] == "Hello" + "Hello there"  # the partial answer kept, then the continuation
    assert done["usage"]["input_tokens"] == 21
    assert chat_server.requests[1]["messages"][-1]["content"] == CONTINUE_INSTRUCTION


def test_a_job_whose_models_key_variable_is_missing_fails_at_its_first_attempt_saying_which(
    chat_server: ChatServer, stack: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key's ``env:`` reference names a variable the function lacks: every attempt raised it until
    the dead letter ended the job bare. The first attempt ends it, naming the variable."""
    monkeypatch.delenv("LOCAL_LLM_KEY", raising=False)
    done = _run_on_local_llm(chat_server.base_url, tmp_path, monkeypatch, "openai-job-no-key")
    assert done["status"] == "failed"
    error = done["error"]
    assert error["code"] == "model_unavailable"
    assert error["details"]["last_error"] == "provider_misconfigured"
    assert "env:LOCAL_LLM_KEY" in error["message"]
    assert any("Set LOCAL_LLM_KEY" in fix for fix in error["suggestions"])
    assert chat_server.requests == []  # the upstream was never called


def test_the_providers_clients_share_no_cookies_across_upstreams(
    chat_server: ChatServer, other_chat_server: ChatServer
) -> None:
    """The provider clients the worker makes share one TLS context (one CA bundle load per process),
    never their connections or cookies: each upstream sees its own key and only its own cookie."""
    first = OpenAICompatibleProvider(bootstrap._openai_client(chat_server.base_url, "sk-first"))
    second = OpenAICompatibleProvider(bootstrap._openai_client(other_chat_server.base_url, "sk-second"))
    chat_server.scenarios += ["ok", "ok"]
    other_chat_server.scenarios.append("ok")
    for provider in (first, second, first):
        assert collect(provider)[0] == "Hello there"
    own = f"session=from-{chat_server.server_address[1]}"
    assert chat_server.credentials == [("Bearer sk-first", None), ("Bearer sk-first", own)]
    assert other_chat_server.credentials == [("Bearer sk-second", None)]


@pytest.mark.parametrize("kind", ["ssm", "secretsmanager"])
def test_a_key_reference_to_a_parameter_that_does_not_exist_is_the_deployments_error(
    stack: Any, kind: str
) -> None:
    """On moto as on AWS: a missing parameter or secret is a configuration error (the model cannot be
    called: its job fails or falls back at once), where Powertools wraps it as it wraps a throttled
    read. The one that exists is read."""
    import boto3

    from spool_core.errors import ConfigurationError

    name = f"/spool-it/keys/{kind}"
    with pytest.raises(ConfigurationError, match=r"names a .* the function cannot read") as missing:
        bootstrap.secret(f"{kind}:{name}-absent")
    assert any(f"{name}-absent" in fix for fix in missing.value.suggestions)
    if kind == "ssm":
        boto3.client("ssm").put_parameter(Name=name, Value="sk-ssm", Type="SecureString", Overwrite=True)
    else:
        boto3.client("secretsmanager").create_secret(Name=name, SecretString="sk-sm")
    assert bootstrap.secret(f"{kind}:{name}") == ("sk-ssm" if kind == "ssm" else "sk-sm")


def test_a_key_reference_of_no_known_kind_is_never_quoted() -> None:
    """An operator who pasted the key itself where its reference goes: the error named it, and the
    error reaches the job's tenant and the public deep health check."""
    from spool_core.errors import ConfigurationError

    with pytest.raises(ConfigurationError) as unknown:
        bootstrap.secret("sk-proj-abcdef123456")
    told = " ".join([unknown.value.message, *unknown.value.suggestions])
    assert "abcdef" not in told and "sk-proj" not in told
    assert "ssm:, secretsmanager: or env:" in unknown.value.message
