"""The playground (the local stack's page at `/`) in a real headless browser: Debian's Chromium,
driven by Playwright. A job streamed same-origin and cross-origin, a connection dropped and resumed
from Last-Event-ID, a job cancelled: each time the text the page shows must be exactly the job's
`output`. The e2e stack ends every stream after a few seconds, so every job here also crosses the
browser's own reconnects."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import pytest
from playwright.sync_api import Browser, ConsoleMessage, FilePayload, Page, Playwright, sync_playwright

from tests.e2e.conftest import DEV_KEY, RunningStack

# Playwright's own browser download is not used: Debian's package (`make browser` installs it).
CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
    pytest.skip(
        f"no Chromium at {CHROMIUM}: the playground's browser tests are skipped "
        "(install it with `make browser` or `apt-get install chromium`)",
        allow_module_level=True,
    )

# Without the background-networking flags Chromium's own connections are refused on a closed network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Generous: a loaded machine is slow, and waiting on page state costs nothing when it is fast.
LOAD_MS = 60_000
STREAM_MS = 180_000
SOURCE = 'def handler(event, context):\n    """Answer a health check."""\n    return {"status": "ok"}\n'


class Playground:
    """One browser tab on the playground, with what its console said."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.console: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.console.append(f"pageerror: {error}"))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in {"error", "warning"}:
            self.console.append(f"{message.type}: {message.text}")

    def open(self, url: str) -> None:
        """Load the page, which starts with the stack's first dev key (SPOOL_DEV_KEYS), and connect."""
        self.page.goto(url)
        assert self.page.input_value("#key") == DEV_KEY  # not the page's own default, sk-local-dev
        self.page.click("#connect")
        self.page.wait_for_function(
            "window.playground.modelsLoaded && document.getElementById('error').hidden"
            " && document.querySelector('#model option[value=\"sim-realtime\"]')",
            timeout=LOAD_MS,
        )

    def ask(self, question: str, *, max_tokens: int, model: str = "sim-realtime") -> str:
        self.page.select_option("#model", model)
        self.page.fill("#question", question)
        self.page.fill("#max-tokens", str(max_tokens))
        self.page.click("#ask")
        self.page.wait_for_function("window.playground.jobId !== null", timeout=LOAD_MS)
        job_id = self.state("jobId")
        assert isinstance(job_id, str) and job_id.startswith("job_")
        return job_id

    def wait_chunks(self, count: int) -> None:
        self.page.wait_for_function(f"window.playground.lastEventId >= {count}", timeout=STREAM_MS)

    def wait_done(self) -> dict[str, Any]:
        """Wait for the `done` event and the page's own check against the job's output."""
        self.page.wait_for_function(
            "window.playground.done && window.playground.verified !== null", timeout=STREAM_MS
        )
        state = self.page.evaluate("JSON.parse(JSON.stringify(window.playground))")
        assert isinstance(state, dict)
        return state

    def state(self, name: str) -> Any:
        return self.page.evaluate(f"window.playground[{name!r}]")


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
    yield chromium
    chromium.close()


@pytest.fixture
def playground(browser: Browser) -> Iterator[Playground]:
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    context.set_default_timeout(LOAD_MS)
    tab = Playground(context.new_page())
    yield tab
    context.close()


def finished_job(stack: RunningStack, job_id: str) -> dict[str, Any]:
    status, _, job = stack.request("GET", f"/v1/jobs/{job_id}")
    assert status == 200, job
    assert isinstance(job, dict)
    return job


def assert_contiguous(state: dict[str, Any]) -> None:
    """Every chunk once, in order: no gap, no duplicate, and each resume at last id + 1."""
    assert state["gaps"] == [], state["log"]
    assert state["duplicates"] == [], state["log"]
    chunk_ids = [event["id"] for event in state["events"] if event["type"] == "chunk"]
    assert chunk_ids == list(range(1, len(chunk_ids) + 1))
    assert chunk_ids[-1] == state["lastEventId"] == state["doneData"]["last_sequence_id"]
    for resume in state["reconnects"]:
        assert resume["ok"], state["log"]
        if resume["next"] != "done":
            assert resume["next"] == resume["after"] + 1, resume


def other_host(base_url: str) -> str:
    """The same server under its other loopback name: a different origin for the browser."""
    parts = urlsplit(base_url)
    host = "localhost" if parts.hostname == "127.0.0.1" else "127.0.0.1"
    return urlunsplit(parts._replace(netloc=f"{host}:{parts.port}"))


def test_same_origin_stream_with_a_context(dev_stack: RunningStack, playground: Playground) -> None:
    page = playground.page
    playground.open(dev_stack.base_url + "/")
    assert page.input_value("#api") == dev_stack.base_url  # the page's own origin by default

    # a context from a pasted file and a chosen one
    page.fill("#paste-path", "src/app.py")
    page.fill("#paste-content", SOURCE)
    page.click("#paste-add")
    notes: FilePayload = {"name": "NOTES.md", "mimeType": "text/markdown", "buffer": b"# Notes\nHealth.\n"}
    page.set_input_files("#files", files=[notes])
    page.wait_for_function("document.querySelectorAll('#context-files li').length === 2")

    job_id = playground.ask("What does this handler return?", max_tokens=160)
    state = playground.wait_done()

    job = finished_job(dev_stack, job_id)
    assert job["status"] == state["status"] == "completed"
    assert job["output"]
    assert state["text"] == job["output"]
    assert page.text_content("#answer") == job["output"]
    assert state["verified"] is True
    assert_contiguous(state)

    context_id = state["contextId"]
    status, _, context = dev_stack.request("GET", f"/v1/contexts/{context_id}")
    assert status == 200, context
    assert sorted(f["path"] for f in context["files"]) == ["NOTES.md", "src/app.py"]

    # the status line ends on the job's real numbers
    usage = job["usage"]
    assert state["doneData"]["usage"]["output_tokens"] == usage["output_tokens"] > 0
    assert state["doneData"]["cost_usd"] == job["cost_usd"] > 0
    assert page.text_content("#status-connection") == "closed"
    assert page.text_content("#status-tokens") == f"tokens {usage['output_tokens']:,}"
    cost = page.text_content("#status-cost") or ""
    assert cost.startswith("cost $"), cost  # no longer an estimate ("cost so far ~$")
    assert float(cost.removeprefix("cost $")) == pytest.approx(job["cost_usd"], abs=1e-6)

    # the usage table has today's row for the model
    page.wait_for_selector('#usage tbody tr[data-model="sim-realtime"]', timeout=LOAD_MS)
    row = page.locator('#usage tbody tr[data-model="sim-realtime"]').first
    cells = row.locator("td").all_text_contents()
    assert cells[1] == "sim-realtime" and int(cells[2].replace(",", "")) >= 1
    assert "Total" in (page.text_content("#usage tfoot") or "")


def test_a_context_larger_than_a_request_goes_through_a_presigned_upload(
    dev_stack: RunningStack, playground: Playground
) -> None:
    """Two 4 MB files: the page sent them in one POST, which no Lambda takes (413, with a suggestion
    to use the upload flow that the page could not follow). It now uploads a context too large for a
    request as the CLI does. Here the page's threshold is lowered (this stack takes contexts of 1 MiB
    at most) so that the upload's context also fits a model's window and is answered."""
    page = playground.page
    playground.open(dev_stack.base_url + "/")
    page.evaluate("window.playground.directUploadBytes = 100000")
    line = "def handler(event, context):  # returns the status\n"
    content = (line * (150_000 // len(line))).encode()
    big = [FilePayload(name=f"big{i}.py", mimeType="text/x-python", buffer=content) for i in range(2)]
    page.set_input_files("#files", files=big)
    page.wait_for_function("document.querySelectorAll('#context-files li').length === 2")
    job_id = playground.ask("Summarize", max_tokens=20, model="sim-fast")
    state = playground.wait_done()
    assert state["status"] == "completed" and state["verified"] is True, state["log"]
    assert finished_job(dev_stack, job_id)["output"] == state["text"]
    assert any("presigned" in entry["message"] for entry in state["log"]), state["log"]
    status, _, context = dev_stack.request("GET", f"/v1/contexts/{state['contextId']}")
    assert status == 200, context
    assert sorted((f["path"], f["size_bytes"]) for f in context["files"]) == [
        ("big0.py", len(content)),
        ("big1.py", len(content)),
    ]


def test_files_the_page_does_not_add_are_named_beside_the_context(
    dev_stack: RunningStack, playground: Playground
) -> None:
    """A file over the page's 5 MB was skipped with one line in the stream's log at the bottom of the
    page, while the context panel said "No context" and Ask went on without it."""
    page = playground.page
    playground.open(dev_stack.base_url + "/")
    huge = FilePayload(name="huge.txt", mimeType="text/plain", buffer=b"x" * (5 * 1024 * 1024 + 1))
    binary = FilePayload(name="logo.png", mimeType="image/png", buffer=b"\x89PNG\x00\x01")
    small = FilePayload(name="app.py", mimeType="text/x-python", buffer=b"print('hi')\n")
    page.set_input_files("#files", files=[huge, binary])
    page.wait_for_function("document.querySelector('#context').textContent.includes('Not added')")
    said = page.text_content("#context") or ""
    assert said.startswith("No context") and "huge.txt (5,242,881 bytes, more than" in said, said
    assert "logo.png (binary)" in said, said
    page.set_input_files("#files", files=[small])  # a new batch: only what it skipped is said
    page.wait_for_function("document.querySelectorAll('#context-files li').length === 1")
    said = page.text_content("#context") or ""
    assert said.startswith("1 file(s)") and "Not added" not in said, said


def test_cross_origin_stream(dev_stack: RunningStack, playground: Playground) -> None:
    page = playground.page
    page_origin = other_host(dev_stack.base_url)
    playground.open(f"{page_origin}/?api={quote(dev_stack.base_url, safe='')}")
    assert page.evaluate("location.origin") == page_origin != dev_stack.base_url
    assert page.input_value("#api") == dev_stack.base_url

    page.fill("#paste-path", "src/app.py")
    page.fill("#paste-content", SOURCE)  # added to the context when asking
    job_id = playground.ask("Explain this handler.", max_tokens=200)
    state = playground.wait_done()

    job = finished_job(dev_stack, job_id)
    assert job["status"] == state["status"] == "completed"
    assert state["text"] == job["output"] != ""
    assert page.text_content("#answer") == job["output"]
    assert state["contextId"].startswith("ctx_")
    assert urlsplit(job["links"]["events"]).netloc == urlsplit(dev_stack.base_url).netloc
    assert_contiguous(state)
    page.wait_for_selector('#usage tbody tr[data-model="sim-realtime"]', timeout=LOAD_MS)

    cors = [line for line in playground.console if "CORS" in line or "Access-Control" in line]
    assert cors == [], cors


def test_a_page_on_another_origin_may_send_the_openai_sdks_own_headers(
    dev_stack: RunningStack, playground: Playground
) -> None:
    """The official OpenAI JS SDK, run in a browser, adds ``x-stainless-*`` headers to each request:
    the preflight must allow them, or the browser refuses the call before it is sent."""
    page = playground.page
    page_origin = other_host(dev_stack.base_url)
    playground.open(f"{page_origin}/?api={quote(dev_stack.base_url, safe='')}")
    answer = page.evaluate(
        """async ([api, key]) => {
            const response = await fetch(api + "/v1/chat/completions", {
                method: "POST",
                headers: {
                    "Authorization": "Bearer " + key,
                    "Content-Type": "application/json",
                    "X-Stainless-Lang": "js",
                    "X-Stainless-OS": "Linux",
                    "X-Stainless-Retry-Count": "0",
                },
                body: JSON.stringify({
                    model: "sim-fast", max_tokens: 5, messages: [{role: "user", content: "hi"}],
                }),
            });
            return [response.status, (await response.json()).choices[0].message.content,
                    response.headers.get("X-Request-Id")];
        }""",
        [dev_stack.base_url, DEV_KEY],
    )
    status, content, request_id = answer
    assert status == 200 and content and request_id  # the exposed header is readable too


def test_drop_connection_resumes_from_last_event_id(dev_stack: RunningStack, playground: Playground) -> None:
    page = playground.page
    playground.open(dev_stack.base_url + "/")
    job_id = playground.ask("Tell a long story about durable logs.", max_tokens=600)
    playground.wait_chunks(3)

    # Cut the open stream; if the browser is between two connections (the stack's stream time
    # limit) there is nothing to cut yet, so try again.
    for attempt in range(1, 11):
        if playground.state("done"):
            break
        page.click("#drop", force=True)  # a job that just ended disables the button: then done is true
        page.wait_for_function(
            f"window.playground.drops.length >= {attempt} || window.playground.done", timeout=LOAD_MS
        )
        if any(drop["dropped"] for drop in playground.state("drops")):
            break
    assert any(drop["dropped"] for drop in playground.state("drops")), playground.state("log")

    state = playground.wait_done()
    job = finished_job(dev_stack, job_id)
    assert job["status"] == state["status"] == "completed"
    assert state["text"] == job["output"]
    assert page.text_content("#answer") == job["output"]
    assert_contiguous(state)

    dropped = [r for r in state["reconnects"] if r["cause"] == "dropped"]
    assert dropped, state["log"]
    assert all(r["ok"] for r in dropped)
    resumed = [r for r in state["reconnects"] if r["next"] != "done"]
    assert resumed and all(r["next"] == r["after"] + 1 for r in resumed), state["reconnects"]
    log = page.text_content("#log") or ""
    assert "Last-Event-ID" in log and "nothing lost" in log


def test_cancel_keeps_the_partial_output(dev_stack: RunningStack, playground: Playground) -> None:
    page = playground.page
    playground.open(dev_stack.base_url + "/")
    job_id = playground.ask("Write a very long essay.", max_tokens=4000)
    playground.wait_chunks(3)
    page.click("#cancel")
    state = playground.wait_done()

    job = finished_job(dev_stack, job_id)
    assert job["status"] == state["status"] == "cancelled"
    assert state["text"] == job["output"] != ""
    assert page.text_content("#answer") == job["output"]
    assert job["usage"]["output_tokens"] < 4000
    assert_contiguous(state)
    assert page.text_content("#status-connection") == "closed"
    assert page.is_disabled("#cancel") and page.is_disabled("#drop") and page.is_enabled("#ask")


def test_api_errors_show_message_and_suggestions(dev_stack: RunningStack, playground: Playground) -> None:
    page = playground.page
    playground.open(dev_stack.base_url + "/")
    page.fill("#key", "sk-not-a-key-of-this-stack")
    page.click("#connect")
    page.wait_for_selector("#error:not([hidden])", timeout=LOAD_MS)
    error = page.text_content("#error") or ""
    assert "API key" in error and "unauthorized" in error and "HTTP 401" in error
    suggestions = page.locator("#error .suggestions li").all_text_contents()
    assert any("Authorization: Bearer" in s for s in suggestions), suggestions
