"""``spool``: the command line. ``spool dev`` runs the embedded stack; ``spool ask`` streams an answer."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from spool.client import DEFAULT_URL, Client, SpoolError
from spool.devstack.template import parse_parameter_overrides


def _dev(args: argparse.Namespace) -> int:
    from spool.devstack.ports import PortInUse
    from spool.devstack.stack import EmbeddedStack

    stack = EmbeddedStack(
        port=args.port,
        ws_port=args.ws_port,
        host=args.host,
        config_env=args.config_env,
        parameter_overrides=parse_parameter_overrides(args.parameter_overrides),
        workers=args.workers,
        state_dir=Path(args.state_dir) if args.state_dir else None,
    )
    stopped = threading.Event()
    starting = True

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopped.set()
        if starting:
            raise KeyboardInterrupt  # abandon the start; start() stops what it began

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print("spool: starting the embedded stack (moto server, API Gateway emulator, worker)...", flush=True)
    try:
        stack.start()
    except PortInUse as exc:
        print(f"spool: cannot start: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("spool: stopped before it was ready", flush=True)
        return 130
    starting = False
    try:
        state = f" (state kept in {stack.state_dir})" if stack.state_dir else ""
        print(f"spool: AWS endpoint (moto)  {stack.moto.url}", flush=True)
        print(f"spool: API base URL         {stack.base_url}{state}", flush=True)
        print(f"spool: WebSocket URL        {stack.websocket_url}", flush=True)
        print(f"spool: dev API key          {stack.api_key}", flush=True)
        print(f"spool: try  curl -s {stack.base_url}/v1/health", flush=True)
        print(
            f"spool: try  SPOOL_URL={stack.base_url} {_spool_command()} ask 'What does the worker do?'"
            " --context ./worker",
            flush=True,
        )
        print(f"spool: ready on {stack.base_url} (Ctrl-C to stop)", flush=True)
        stopped.wait()
    finally:
        print("spool: stopping...", flush=True)
        stack.stop()
        if stack.saved is not None:
            saved = stack.saved
            print(
                f"spool: saved {saved['items']} items, {saved['objects']} objects and {saved['messages']}"
                f" queued messages to {stack.state_dir}",
                flush=True,
            )
        print("spool: stopped", flush=True)
    return 0


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url, args.key)


def _print(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _ask(args: argparse.Namespace) -> int:
    client = _client(args)
    context_id = None
    if args.context:
        summary = client.sync_directory(args.context, ttl_seconds=args.ttl)
        context_id = summary["context_id"]
        print(
            f"context {context_id}: {summary['file_count']} files, {summary['token_count']:,} tokens "
            f"(version {summary['version']})",
            file=sys.stderr,
            flush=True,
        )
    job = client.create_job(
        args.question, context_id=context_id, model=args.model, max_tokens=args.max_tokens
    )
    job_id = job["job_id"]
    print(f"job {job_id} ({job['model']['resolved']})", file=sys.stderr, flush=True)
    prices = {m["id"]: m["pricing"] for m in client.request("GET", "/v1/models")[2]["data"]}
    pricing = prices.get(job["model"]["resolved"], {"input_per_mtok": 0.0, "output_per_mtok": 0.0})
    input_estimate = max(0, job["usage"]["estimated_tokens"] - args.max_tokens)
    status = StatusLine(sys.stderr, pricing, input_estimate)
    try:
        for text in client.stream(job_id, transport=args.transport):
            sys.stdout.write(text)
            sys.stdout.flush()
            status.update(text)
    except KeyboardInterrupt:
        cancelled = client.cancel(job_id)
        deadline = time.monotonic() + 5  # the worker stops within one flush interval
        while cancelled["status"] not in {"completed", "failed", "cancelled"} and time.monotonic() < deadline:
            time.sleep(0.1)
            cancelled = client.job(job_id)
        status.finish(
            f"cancelled: {cancelled['status']} after {cancelled['progress']['tokens_generated']} tokens"
        )
        return 130
    final = client.job(job_id)
    usage = final["usage"]
    status.finish(
        f"{final['status']}: {usage['input_tokens']:,} in, {usage['output_tokens']:,} out, "
        f"${final['cost_usd']:.6f}"
    )
    return 0 if final["status"] == "completed" else 1


class StatusLine:
    """Tokens, tokens/s and the cost so far (estimated from the model's prices until the provider
    reports usage) on one line of the terminal while the answer streams on stdout."""

    def __init__(self, stream: Any, pricing: dict[str, float], input_tokens: int) -> None:
        self._stream = stream
        self._pricing = pricing
        self._input_cost = input_tokens * pricing["input_per_mtok"] / 1e6
        self._started = time.monotonic()
        self._tokens = 0
        self._last = 0.0

    def update(self, text: str) -> None:
        self._tokens += max(1, len(text.split()))
        now = time.monotonic()
        if now - self._last >= 0.5 and self._stream.isatty():
            rate = self._tokens / max(0.001, now - self._started)
            cost = self._input_cost + self._tokens * self._pricing["output_per_mtok"] / 1e6
            self._stream.write(f"\0337\r\033[K[{self._tokens} tokens, {rate:.0f} tok/s, ~${cost:.5f}]\0338")
            self._stream.flush()
            self._last = now

    def finish(self, message: str) -> None:
        elapsed = time.monotonic() - self._started
        self._stream.write(f"\n[{message}; {elapsed:.1f} s]\n")
        self._stream.flush()


def _demo(args: argparse.Namespace) -> int:
    """The tour: a stack (started here unless --url is given), Spool's own source as context, an
    answer streamed as Server-Sent Events, the connection dropped mid-answer and resumed from
    Last-Event-ID, usage and cost."""
    from spool.devstack.stack import PROJECT_ROOT, EmbeddedStack

    stack = None
    if not (args.url or os.environ.get("SPOOL_URL")):
        if not os.environ.get("SPOOL_LOG_LEVEL"):  # the tour's own lines, not the stack's request log
            logging.getLogger("devstack").setLevel(logging.WARNING)
        print("starting the embedded stack...", file=sys.stderr, flush=True)
        stack = EmbeddedStack(port=0, ws_port=0).start()
        args.url, args.key = stack.base_url, stack.api_key
    try:
        client = _client(args)
        summary = client.sync_directory(PROJECT_ROOT / "shared" / "spool_core", ttl_seconds=3600)
        print(
            f"uploaded Spool's own source: {summary['file_count']} files, {summary['token_count']:,} tokens "
            f"-> {summary['context_id']}",
            file=sys.stderr,
            flush=True,
        )
        job = client.create_job(
            "How does Spool keep a stream resumable?",
            context_id=summary["context_id"],
            model="sim-realtime",
            max_tokens=args.max_tokens,
        )
        print(
            f"job {job['job_id']} on {job['model']['resolved']}, streaming its events (SSE) from\n"
            f"  {client.base_url}/v1/jobs/{job['job_id']}/events\n",
            file=sys.stderr,
            flush=True,
        )
        last = 0
        for chunk in client.events(job["job_id"]):
            sys.stdout.write(chunk["text"])
            sys.stdout.flush()
            last = chunk["sequence_id"]
            if last == args.drop_after:
                break  # closing the stream drops the connection
        print(
            f"\n\n[connection dropped after chunk {last}; reconnecting with Last-Event-ID: {last}]\n",
            file=sys.stderr,
            flush=True,
        )
        for chunk in client.events(job["job_id"], last):
            sys.stdout.write(chunk["text"])
            sys.stdout.flush()
        final = client.job(job["job_id"])
        usage = final["usage"]
        print(
            f"\n\n[{final['status']}: {final['progress']['chunks_written']} chunks, none lost or repeated; "
            f"{usage['input_tokens']:,} tokens in, {usage['output_tokens']:,} out, ${final['cost_usd']:.6f}]",
            file=sys.stderr,
            flush=True,
        )
        return 0
    finally:
        if stack:
            stack.stop()


def _jobs(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.action == "get":
        _print(client.job(args.job_id))
    elif args.action == "cancel":
        _print(client.cancel(args.job_id))
    else:
        for chunk in client.stream_chunks(args.job_id, args.after):
            _print(chunk)
    return 0


def _contexts(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.action == "sync":
        _print(client.sync_directory(args.target, ttl_seconds=args.ttl))
    elif args.action == "get":
        _print(client.get_context(args.target))
    else:
        client.delete_context(args.target)
        print(f"deleted {args.target}")
    return 0


def _admin_target(args: argparse.Namespace) -> Any:
    from spool.admin import resolve

    url = args.url or os.environ.get("SPOOL_URL") or DEFAULT_URL
    return resolve(url, args.stack_name, args.endpoint_url)


def _keys(args: argparse.Namespace) -> int:
    """API keys in the key table of a stack (the local one, or a deployed one): create, list, revoke,
    rotate. A key is shown once, on stdout, when it is made; the table keeps only its hash."""
    from spool_core.adapters.api_keys import DynamoApiKeyStore
    from spool_core.auth import ApiKeys, KeyCache
    from spool_core.errors import SpoolError as DomainError
    from spool_core.tenancy import Tenant

    target = _admin_target(args)
    table = args.table or target.resource("ApiKeysTable")
    # No cache: an operator reads and changes the table itself, never a remembered copy.
    keys = ApiKeys(DynamoApiKeyStore(target.client("dynamodb"), table), cache=KeyCache(0))
    tenant = Tenant(args.tenant) if args.tenant else None
    try:
        if args.action == "create":
            assert tenant is not None  # argparse requires --tenant for create
            key, record = keys.create(tenant, args.description)
            _ensure_usage_key(args, target, record.tenant_id)
            print(key)
            print(
                f"tenant {record.tenant_id}, key id {record.key_id} in {target.description}:"
                " store the key now, it is not shown again",
                file=sys.stderr,
            )
        elif args.action == "list":
            _print_keys(keys.summaries(tenant), as_json=args.json)
        elif args.action == "revoke":
            record = keys.revoke(args.key_id, tenant=tenant)
            print(f"revoked {record.key_id} (tenant {record.tenant_id}) at {record.revoked_at}")
            print(
                f"requests with it are refused within {_KEY_CACHE_NOTE}; open WebSocket connections"
                " made with it are closed within the same time. The record stays, for audit.",
                file=sys.stderr,
            )
        else:
            rotation = keys.rotate(
                args.key_id, grace_seconds=args.grace, tenant=tenant, description=args.description
            )
            _ensure_usage_key(args, target, rotation.new.tenant_id)
            print(rotation.key)
            old = rotation.old
            until = (
                f"keeps working until {old.expires_at}"
                if old.status == "active"
                else f"was revoked (refused within {_KEY_CACHE_NOTE})"
            )
            print(
                f"tenant {rotation.new.tenant_id}: new key id {rotation.new.key_id} in {target.description}"
                f" (store the key now, it is not shown again); the old key {old.key_id} {until}",
                file=sys.stderr,
            )
    except DomainError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        for suggestion in exc.suggestions:
            print(f"  - {suggestion}", file=sys.stderr)
        return 2
    return 0


_KEY_CACHE_NOTE = "the functions' key cache lifetime (SPOOL_AUTH_CACHE_SECONDS, 30 s unless configured)"


KEY_COLUMNS = (
    ("KEY ID", "key_id"),
    ("TENANT", "tenant"),
    ("STATUS", "status"),
    ("CREATED", "created_at"),
    ("UNTIL", "until"),
    ("DESCRIPTION", "description"),
)


def _print_keys(summaries: list[dict[str, Any]], *, as_json: bool) -> None:
    """A table for people (UNTIL: when a revoked key stopped, or a rotated one stops), JSON for scripts."""
    if as_json:
        _print(summaries)
        return
    if not summaries:
        print("no keys", file=sys.stderr)
        return
    rows = [
        {**s, "until": s["revoked_at"] if s["status"] == "revoked" else s["expires_at"] or ""}
        for s in summaries
    ]
    widths = [max(len(title), *(len(str(r[field])) for r in rows)) for title, field in KEY_COLUMNS]
    lines = [[title for title, _ in KEY_COLUMNS], *([str(r[f]) for _, f in KEY_COLUMNS] for r in rows)]
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


def _ensure_usage_key(args: argparse.Namespace, target: Any, tenant_id: str) -> None:
    """On AWS, the tenant's API Gateway API key must be in the stack's usage plan, or API Gateway
    refuses its requests (403): the authorizer names that key (``usageIdentifierKey``). The local
    gateway has no usage plans, so the local stack needs nothing."""
    if not args.stack_name:
        return
    from spool_core.adapters.api_keys import ApiGatewayUsageKeys

    plan = args.usage_plan_id or _stack_output(target, args.stack_name, "UsagePlanId")
    if not plan:
        print(
            f"note: stack {args.stack_name} has no UsagePlanId output (no usage plan): "
            "no API Gateway usage key registered",
            file=sys.stderr,
        )
        return
    api_key_id = ApiGatewayUsageKeys(target.client("apigateway"), plan).ensure(tenant_id)
    print(f"tenant {tenant_id}: API Gateway key {api_key_id} is in usage plan {plan}", file=sys.stderr)


def _stack_output(target: Any, stack_name: str, name: str) -> str | None:
    stacks = target.client("cloudformation").describe_stacks(StackName=stack_name)["Stacks"]
    for output in stacks[0].get("Outputs", []) if stacks else []:
        if output.get("OutputKey") == name:
            return str(output["OutputValue"])
    return None


def _limits(args: argparse.Namespace) -> int:
    """A tenant's own limits in the usage table: read at every admission, so a change applies to the
    tenant's next job; without limits of its own, the deployment's defaults apply."""
    from spool_core.adapters.dynamodb import ScopedTable
    from spool_core.adapters.usage import DynamoUsageStore
    from spool_core.limits.model import TenantLimits
    from spool_core.tenancy import Tenant, TenantScope
    from spool_core.units import nanos, usd

    target = _admin_target(args)
    table = ScopedTable(
        target.client("dynamodb"), target.resource("UsageTable"), TenantScope(Tenant(args.tenant))
    )
    store = DynamoUsageStore(table)
    current = store.limits()
    if args.action == "reset":
        store.clear_limits()
        print(f"tenant {args.tenant} now has the deployment's default limits ({target.description})")
        return 0
    if args.action == "set":
        fields = {
            "tokens_per_minute": args.tokens_per_minute,
            "tokens_per_day": args.tokens_per_day,
            "max_concurrent_jobs": args.max_concurrent_jobs,
        }
        base = current.__dict__ if current else {}
        missing = [name for name, value in fields.items() if value is None and name not in base]
        if missing:
            flags = ", ".join("--" + name.replace("_", "-") for name in missing)
            print(f"error: a tenant's first limits need {flags}", file=sys.stderr)
            return 2
        budget = base.get("daily_budget_nanos")
        if args.daily_budget_usd is not None:
            budget = nanos(args.daily_budget_usd) if args.daily_budget_usd > 0 else None
        current = TenantLimits(
            **{name: value if value is not None else base[name] for name, value in fields.items()},
            daily_budget_nanos=budget,
        )
        store.set_limits(current)
    if current is None:
        print(f"tenant {args.tenant} has no limits of its own: the deployment's defaults apply")
        return 0
    _print(
        {
            "tenant": args.tenant,
            "tokens_per_minute": current.tokens_per_minute,
            "tokens_per_day": current.tokens_per_day,
            "max_concurrent_jobs": current.max_concurrent_jobs,
            "daily_budget_usd": usd(current.daily_budget_nanos)
            if current.daily_budget_nanos is not None
            else None,
        }
    )
    return 0


MAX_GRACE_SECONDS = 90 * 86_400  # a rotation's overlap; beyond it the new key is stored, never shown


def _spool_command() -> str:
    """``spool`` as the user can type it: the bare name when it is on PATH, else the virtual
    environment's script (``make dev`` does not activate the venv), relative when that is shorter."""
    script = Path(sys.executable).with_name("spool")
    found = shutil.which("spool")
    if found and Path(found).resolve() == script.resolve():
        return "spool"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def _seconds(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_GRACE_SECONDS:
        raise argparse.ArgumentTypeError(f"must be 0 to {MAX_GRACE_SECONDS} seconds (90 days)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spool", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    dev = commands.add_parser("dev", help="run the embedded stack on this machine")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=int(os.environ.get("SPOOL_PORT", "8000")))
    dev.add_argument(
        "--config-env", default="local", help="samconfig.toml environment to read (default: local)"
    )
    dev.add_argument(
        "--parameter-overrides",
        default=os.environ.get("SPOOL_PARAMETER_OVERRIDES", ""),
        help="template parameters, as sam deploy takes them: 'Key=Value Key2=Value2'",
    )
    dev.add_argument(
        "--ws-port",
        type=int,
        default=int(os.environ["SPOOL_WS_PORT"]) if os.environ.get("SPOOL_WS_PORT") else None,
        help="WebSocket port (SPOOL_WS_PORT; default: the API port + 1 if free, else any free port)",
    )
    dev.add_argument("--workers", type=int, default=int(os.environ.get("SPOOL_WORKERS", "2")))
    dev.add_argument(
        "--state-dir",
        default=os.environ.get("SPOOL_STATE_DIR") or None,
        help="keep tables, objects and queued messages here across a clean stop and start"
        " (SPOOL_STATE_DIR; default: nothing is kept)",
    )
    dev.set_defaults(run=_dev)

    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--url", default=None, help="Spool's base URL (SPOOL_URL, default the local stack)")
    remote.add_argument("--key", default=None, help="API key (SPOOL_API_KEY, default the local dev key)")

    ask = commands.add_parser("ask", parents=[remote], help="ask a question about a directory, streamed live")
    ask.add_argument("question")
    ask.add_argument("--context", help="directory to upload (or update by diff) as the context")
    ask.add_argument("--model", default="default")
    ask.add_argument("--max-tokens", type=int, default=1024)
    ask.add_argument("--ttl", type=int, default=3600, help="context ttl_seconds")
    ask.add_argument(
        "--transport",
        choices=["sse", "websocket", "poll"],
        default="sse",
        help="how the answer streams: Server-Sent Events (default), the WebSocket API, or long-polling",
    )
    ask.set_defaults(run=_ask)

    demo = commands.add_parser(
        "demo", parents=[remote], help="the one-command tour (starts a stack if needed)"
    )
    demo.add_argument("--max-tokens", type=int, default=300)
    demo.add_argument("--drop-after", type=int, default=8, help="drop the connection after this chunk")
    demo.set_defaults(run=_demo)

    jobs = commands.add_parser("jobs", parents=[remote], help="inspect or cancel a job")
    jobs.add_argument("action", choices=["get", "cancel", "chunks"])
    jobs.add_argument("job_id")
    jobs.add_argument("--after", type=int, default=0)
    jobs.set_defaults(run=_jobs)

    contexts = commands.add_parser("contexts", parents=[remote], help="upload, read or delete contexts")
    contexts.add_argument("action", choices=["sync", "get", "delete"])
    contexts.add_argument("target", help="a directory (sync) or a context id")
    contexts.add_argument("--ttl", type=int, default=3600)
    contexts.set_defaults(run=_contexts)

    target = argparse.ArgumentParser(add_help=False)
    target.add_argument(
        "--url", default=None, help="the local stack to manage (SPOOL_URL, default the local stack)"
    )
    target.add_argument("--stack-name", help="a deployed stack to manage instead of the local one")
    target.add_argument("--endpoint-url", help="AWS endpoint for --stack-name (an AWS-compatible endpoint)")
    admin = argparse.ArgumentParser(add_help=False, parents=[target])
    admin.add_argument("--tenant", required=True)

    keys = commands.add_parser("keys", help="manage API keys: create, list, revoke, rotate")
    keys.set_defaults(run=_keys)
    key_actions = keys.add_subparsers(dest="action", required=True, metavar="{create,list,revoke,rotate}")
    key_table = argparse.ArgumentParser(add_help=False, parents=[target])
    key_table.add_argument("--table", help="the key table's name, instead of looking it up in the stack")
    usage_plan = argparse.ArgumentParser(add_help=False)
    usage_plan.add_argument(
        "--usage-plan-id",
        help="with --stack-name: the usage plan the tenant's API Gateway key joins"
        " (default: the stack's UsagePlanId output)",
    )
    create = key_actions.add_parser(
        "create", parents=[key_table, usage_plan], help="a new key for a tenant, printed once"
    )
    create.add_argument("--tenant", required=True)
    create.add_argument("--description", default="")
    listing = key_actions.add_parser(
        "list", parents=[key_table], help="key id, tenant, status and times; never the key or its hash"
    )
    listing.add_argument("--tenant", help="only this tenant's keys (default: every tenant's)")
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    revoke = key_actions.add_parser(
        "revoke", parents=[key_table], help="stop a key (within the key cache's lifetime); the record stays"
    )
    revoke.add_argument("key_id")
    revoke.add_argument(
        "--tenant",
        help="the key's tenant: looked up with a Query instead of a Scan; another tenant's key is refused",
    )
    rotate = key_actions.add_parser(
        "rotate",
        parents=[key_table, usage_plan],
        help="a new key for the same tenant (printed once); the old one is revoked, or ends after --grace",
    )
    rotate.add_argument("key_id")
    rotate.add_argument(
        "--tenant",
        help="the key's tenant: looked up with a Query instead of a Scan; another tenant's key is refused",
    )
    rotate.add_argument(
        "--grace",
        type=_seconds,
        default=0,
        help="seconds the old key keeps working beside the new one (default 0: revoked now)",
    )
    rotate.add_argument("--description", default=None, help="the new key's (default: the old key's)")

    limits = commands.add_parser("limits", parents=[admin], help="read or change a tenant's limits")
    limits.add_argument("action", choices=["get", "set", "reset"])
    limits.add_argument("--tokens-per-minute", type=int)
    limits.add_argument("--tokens-per-day", type=int)
    limits.add_argument("--max-concurrent-jobs", type=int)
    limits.add_argument("--daily-budget-usd", type=float, help="0 removes the budget")
    limits.set_defaults(run=_limits)
    return parser


def main(argv: list[str] | None = None) -> int:
    # The devstack's own log: one line per request and per job transition (SPOOL_LOG_LEVEL=WARNING
    # quiets it, DEBUG adds each Lambda invocation's REPORT line).
    level = os.environ.get("SPOOL_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level if level in logging.getLevelNamesMapping() else "INFO",
        format="spool: %(asctime)s.%(msecs)03d %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("botocore").setLevel(logging.WARNING)
    logging.getLogger("websockets").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        result: int = args.run(args)
    except SpoolError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        for suggestion in exc.suggestions:
            print(f"  - {suggestion}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
