"""Infrastructure cost per 1,000-token job, measured on the embedded stack and priced at list prices.

For each way of reading a job (no reader, a WebSocket subscriber, an SSE stream, a long-polling
client), one 1,000-token ``sim-realtime`` job (50 tokens/s) runs on a stack of its own, and the
suite counts what AWS would bill for it:

- Lambda: each invocation of the job's path (the REPORT of every invocation: requests, and billed
  duration times the function's memory, in GB-seconds, at the template's architecture; where an
  invocation's CPU time needs longer than its wall time at its memory's share of a vCPU, as on AWS,
  that longer time: ``aws_duration_ms``);
- API Gateway: the REST requests the client made, the WebSocket messages (the client's frames and
  every ``PostToConnection``, in 32 KB increments) and connection minutes;
- DynamoDB: write and read request units, from the sizes of the items each call touched
  (``bench/capacity.py``, metered in every container, in a second job read the same way: the
  meter's own reads would lengthen the first job's invocations);
- SQS (the function's calls, plus the event source's receive and delete of each message), S3 and
  Secrets Manager calls (the containers' call counts).

Multiplied by ``bench/prices.json``, printed per scenario as a breakdown and as a percentage of the
model's price for the job's output, beside issue 16's targets. Not included: the event source's
idle polling of the queue, DynamoDB Streams reads (free for Lambda triggers), storage, CloudWatch
Logs and X-Ray, and functions that run on a schedule whatever the jobs (the sweeper).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from bench.capacity import CAPACITY_ENV, METER_KEY, METER_SWITCH, read_dumps
from bench.readers import Reader

PRICES_PATH = Path(__file__).with_name("prices.json")
TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "template.yaml"
HOOK_DIR = Path(__file__).with_name("hook")
SCENARIOS = ("none", "websocket", "sse", "poll")
SCENARIO_NAMES = {
    "none": "no reader",
    "websocket": "WebSocket reader",
    "sse": "SSE reader",
    "poll": "long-polling reader",
}
# Functions not billed per job: the sweeper runs every minute whatever the jobs; health, models,
# usage and contexts are not on a job's path. Every other function that runs during a job is (a
# function added later, such as one serving chunk pages, is counted without a change here).
NOT_PER_JOB_FUNCTIONS = frozenset(
    {"SweeperFunction", "HealthFunction", "ModelsFunction", "UsageFunction", "ContextsFunction"}
)
# The deployed lease (the queue's visibility timeout, the template's default of 720 s), not the local
# 5 s: a job's lease renewals and visibility heartbeats are billed as a deployment makes them (none
# in a 20 s job), not as the local stack makes them to retry crashed jobs within seconds.
LEASE_PARAMETER = "WorkerVisibilityTimeoutSeconds"


def cost_parameters(template_path: Path = TEMPLATE_PATH) -> dict[str, str]:
    from spool.devstack.template import Template

    declared = Template.load(template_path).body["Parameters"][LEASE_PARAMETER]
    return {LEASE_PARAMETER: str(declared["Default"])}


# ---------------------------------------------------------------------------------------- prices
class _Section(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class LambdaPrices(_Section):
    per_gb_second: dict[str, float]
    per_million_requests: float = Field(ge=0)


class ApiGatewayPrices(_Section):
    rest_per_million_requests: float = Field(ge=0)
    websocket_per_million_messages: float = Field(ge=0)
    websocket_message_increment_bytes: int = Field(gt=0)
    websocket_per_million_connection_minutes: float = Field(ge=0)


class DynamoDBPrices(_Section):
    per_million_write_request_units: float = Field(ge=0)
    per_million_read_request_units: float = Field(ge=0)


class SqsPrices(_Section):
    per_million_requests: float = Field(ge=0)


class S3Prices(_Section):
    put_per_thousand: float = Field(ge=0)
    get_per_thousand: float = Field(ge=0)


class SecretsPrices(_Section):
    per_ten_thousand_api_calls: float = Field(ge=0)


class ModelOutputPrice(_Section):
    per_million_output_tokens: float = Field(gt=0)


class Prices(BaseModel):
    """``bench/prices.json``: the list prices the counts are multiplied by."""

    model_config = ConfigDict(extra="allow", frozen=True)

    region: str
    read_on: str
    lambda_: LambdaPrices = Field(alias="lambda")
    api_gateway: ApiGatewayPrices
    dynamodb: DynamoDBPrices
    sqs: SqsPrices
    s3: S3Prices
    secrets_manager: SecretsPrices
    model_output: ModelOutputPrice
    targets_percent: dict[str, float]

    @classmethod
    def load(cls, path: Path = PRICES_PATH) -> Prices:
        return cls.model_validate(json.loads(path.read_text()))

    def output_price(self, tokens: int) -> float:
        """The model's price for ``tokens`` output tokens: the denominator of every percentage."""
        return tokens * self.model_output.per_million_output_tokens / 1e6


# ---------------------------------------------------------------------------------------- arithmetic
def gb_seconds(billed_ms: float, memory_mb: int) -> float:
    """Lambda's duration charge unit: billed milliseconds times configured memory (1 GB = 1024 MB)."""
    return billed_ms / 1000 * memory_mb / 1024


def billed_ms(duration_ms: float) -> int:
    """Lambda bills each invocation's duration rounded up to the millisecond (at least 1 ms)."""
    return max(1, math.ceil(duration_ms))


# Lambda gives a function one vCPU at this much memory, and a proportional share below it.
ONE_VCPU_MB = 1769


def aws_duration_ms(duration_ms: float, cpu_ms: float | None, memory_mb: int) -> float:
    """An invocation's duration on AWS, from its local wall time and CPU time: this machine runs every
    container at a full CPU, where Lambda gives ``memory_mb / 1769`` of one, so CPU-bound work takes
    longer there (a fanout push of 10 ms of CPU takes ~140 ms at 128 MB). Work that mostly waits (a
    worker paced by its provider, a stream paced by the log) is not stretched: its CPU fits its share."""
    if cpu_ms is None or memory_mb >= ONE_VCPU_MB:
        return duration_ms
    return max(duration_ms, cpu_ms * ONE_VCPU_MB / memory_mb)


def increments(size_bytes: int, increment: int) -> int:
    """Billed units of a message metered in fixed increments (WebSocket 32 KB, SQS 64 KB); at least 1."""
    return max(1, math.ceil(size_bytes / increment))


@dataclass
class Usage:
    """What one job consumed, by billable dimension."""

    lambda_requests: Counter[str] = field(default_factory=Counter)  # by function
    lambda_gb_seconds: dict[str, float] = field(default_factory=dict)  # by function
    lambda_architecture: dict[str, str] = field(default_factory=dict)  # by function
    rest_requests: int = 0
    websocket_messages: int = 0  # in 32 KB increments
    websocket_connection_minutes: float = 0.0
    write_units: dict[str, float] = field(default_factory=dict)  # by table
    read_units: dict[str, float] = field(default_factory=dict)  # by table
    sqs_requests: int = 0  # in 64 KB increments
    s3_puts: int = 0
    s3_gets: int = 0
    secrets_calls: int = 0
    aws_calls: Counter[str] = field(default_factory=Counter)  # service.Operation -> calls


def costs(usage: Usage, prices: Prices) -> dict[str, float]:
    """Dollars per line item: each Lambda function (requests and GB-seconds), API Gateway, DynamoDB
    writes and reads, SQS, S3 and Secrets Manager."""
    lines: dict[str, float] = {}
    lam = prices.lambda_
    for function in sorted(set(usage.lambda_requests) | set(usage.lambda_gb_seconds)):
        architecture = usage.lambda_architecture.get(function, "x86_64")
        per_gb_second = lam.per_gb_second[architecture]
        lines[f"Lambda {function}"] = (
            usage.lambda_requests[function] * lam.per_million_requests / 1e6
            + usage.lambda_gb_seconds.get(function, 0.0) * per_gb_second
        )
    api = prices.api_gateway
    lines["API Gateway REST requests"] = usage.rest_requests * api.rest_per_million_requests / 1e6
    lines["API Gateway WebSocket messages"] = (
        usage.websocket_messages * api.websocket_per_million_messages / 1e6
    )
    lines["API Gateway WebSocket connection minutes"] = (
        usage.websocket_connection_minutes * api.websocket_per_million_connection_minutes / 1e6
    )
    db = prices.dynamodb
    lines["DynamoDB writes"] = sum(usage.write_units.values()) * db.per_million_write_request_units / 1e6
    lines["DynamoDB reads"] = sum(usage.read_units.values()) * db.per_million_read_request_units / 1e6
    lines["SQS requests"] = usage.sqs_requests * prices.sqs.per_million_requests / 1e6
    lines["S3 requests"] = (
        usage.s3_puts * prices.s3.put_per_thousand / 1e3 + usage.s3_gets * prices.s3.get_per_thousand / 1e3
    )
    lines["Secrets Manager calls"] = (
        usage.secrets_calls * prices.secrets_manager.per_ten_thousand_api_calls / 1e4
    )
    return lines


def percent_of_output(total: float, prices: Prices, tokens: int) -> float:
    return 100 * total / prices.output_price(tokens)


S3_PUTS = (
    "PutObject",
    "CopyObject",
    "CreateMultipartUpload",
    "UploadPart",
    "CompleteMultipartUpload",
    "ListObjectsV2",
)
S3_GETS = ("GetObject", "HeadObject")


def add_aws_calls(usage: Usage, calls: Mapping[str, int]) -> None:
    """The containers' call counts (``service.Operation``) into the billable request counts."""
    for name, n in calls.items():
        usage.aws_calls[name] += n
        service, _, operation = name.partition(".")
        if service == "sqs":
            usage.sqs_requests += n
        elif service == "s3" and operation in S3_PUTS:
            usage.s3_puts += n
        elif service == "s3" and operation in S3_GETS:
            usage.s3_gets += n
        elif service == "secretsmanager":
            usage.secrets_calls += n
        elif service == "apigatewaymanagementapi" and operation == "PostToConnection":
            usage.websocket_messages += n  # each a frame of a few hundred bytes: one 32 KB increment


# ---------------------------------------------------------------------------------------- snapshots
def _sum_counts(directory: Path) -> dict[str, Counter[str]]:
    """Per counts file (``<Function>-<pid>``): the calls it recorded so far."""
    totals: dict[str, Counter[str]] = {}
    for path in directory.glob("*.json"):
        text = path.read_text()
        totals[path.stem] = Counter(json.loads(text) if text else {})
    return totals


def counter_delta(before: Mapping[str, Counter[str]], after: Mapping[str, Counter[str]]) -> Counter[str]:
    """Calls made between two snapshots, by ``Function:service.Operation``."""
    delta: Counter[str] = Counter()
    for stem, counts in after.items():
        function = stem.rsplit("-", 1)[0]
        previous = before.get(stem, Counter())
        for name, n in counts.items():
            if n - previous[name]:
                delta[f"{function}:{name}"] += n - previous[name]
    return delta


def capacity_delta(
    before: Mapping[str, Mapping[str, Mapping[str, float]]],
    after: Mapping[str, Mapping[str, Mapping[str, float]]],
) -> dict[str, dict[str, float]]:
    """Request units between two snapshots, ``{table: {"read": units, "write": units}}``."""
    delta: dict[str, dict[str, float]] = {}
    for stem, tables in after.items():
        for table, kinds in tables.items():
            if table == METER_KEY:
                continue
            for kind, units in kinds.items():
                previous = before.get(stem, {}).get(table, {}).get(kind, 0.0)
                if units - previous:
                    slot = delta.setdefault(table, {"read": 0.0, "write": 0.0})
                    slot[kind] += units - previous
    return delta


# ---------------------------------------------------------------------------------------- the scenarios
@dataclass
class Measured:
    scenario: str
    usage: Usage
    tokens: int
    chunks: int
    seconds: float
    metered_chunks: int = 0  # read in the second job, whose request units are the ones counted


def _architectures(template_body: Mapping[str, Any]) -> dict[str, str]:
    default = template_body.get("Globals", {}).get("Function", {}).get("Architectures", ["x86_64"])[0]
    return {
        name: (resource.get("Properties", {}).get("Architectures") or [default])[0]
        for name, resource in template_body["Resources"].items()
        if resource.get("Type") == "AWS::Serverless::Function"
    }


class CostBench:
    def __init__(self, stack: Any, counts_dir: Path, capacity_dir: Path) -> None:
        self.stack = stack
        self.counts_dir = counts_dir
        self.capacity_dir = capacity_dir
        self.architectures = _architectures(stack.template.body)
        assert stack.description is not None
        self.tables = {physical: logical for logical, physical in stack.description.refs.items()}

    def _reports(self) -> dict[str, set[str]]:
        return {name: {r.request_id for r in list(f.reports)} for name, f in self.stack.functions.items()}

    def settle(self, quiet: float = 1.5, timeout: float = 120) -> None:
        """Until the queue is drained and no function has run for ``quiet`` seconds (the fanout of a
        job's last records, a subscriber's disconnect)."""
        from bench.jobs import wait_queue_drained

        wait_queue_drained(self.stack)
        deadline = time.monotonic() + timeout
        seen = sum(len(f.reports) for f in self.stack.functions.values())
        last_change = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = sum(len(f.reports) for f in self.stack.functions.values())
            busy = any(f._busy for f in self.stack.functions.values())
            if now != seen or busy:
                seen, last_change = now, time.monotonic()
            elif time.monotonic() - last_change >= quiet:
                return

    def _job_status(self, job_id: str) -> str:
        from spool_core import bootstrap
        from spool_core.tenancy import Tenant

        tenant = Tenant(self.stack.dev_keys[self.stack.api_key])
        return str(bootstrap.job_service(tenant).get(job_id).status)

    def _wait_finished(self, job_id: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._job_status(job_id) in {"completed", "failed", "cancelled"}:
                return
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} did not finish within {timeout:g}s")

    def measure(self, scenario: str, tokens: int = 1000, model: str = "sim-realtime") -> Measured:
        """Two jobs read the same way: the first with the request-unit meter off gives the durations
        and the call counts (the meter's own reads would lengthen the functions' invocations), the
        second with it on gives the request units."""
        measured = self._job(scenario, tokens, model, metered=False)
        units = self._job(scenario, tokens, model, metered=True)
        measured.usage.write_units = units.usage.write_units
        measured.usage.read_units = units.usage.read_units
        measured.metered_chunks = units.chunks
        return measured

    def _job(self, scenario: str, tokens: int, model: str, *, metered: bool) -> Measured:
        switch = self.capacity_dir / METER_SWITCH
        self.settle()
        if metered:
            switch.touch()
        try:
            return self._measure(scenario, tokens, model)
        finally:
            switch.unlink(missing_ok=True)

    def _measure(self, scenario: str, tokens: int, model: str) -> Measured:
        reports_before = self._reports()
        counts_before = _sum_counts(self.counts_dir)
        capacity_before = read_dumps(self.capacity_dir)
        reader = Reader(self.stack.base_url, self.stack.api_key)
        started = time.monotonic()
        chunks = 0
        try:
            job = reader.create_job(message=f"cost {scenario}", model=model, max_tokens=tokens)
            if scenario == "none":
                self._wait_finished(job["job_id"])  # read in this process, straight from the table
            else:
                chunks = sum(1 for _ in reader.read(scenario, job, within=300))
        finally:
            reader.close()
        seconds = time.monotonic() - started
        self._wait_finished(job["job_id"])
        self.settle()
        usage = Usage(
            rest_requests=reader.rest_requests,
            websocket_messages=reader.websocket_frames_sent,
            websocket_connection_minutes=math.ceil(reader.websocket_seconds / 60),
        )
        for name, function in self.stack.functions.items():
            if name in NOT_PER_JOB_FUNCTIONS:
                continue
            new = [r for r in list(function.reports) if r.request_id not in reports_before.get(name, set())]
            if not new:
                continue
            usage.lambda_requests[name] += len(new)
            usage.lambda_gb_seconds[name] = sum(
                gb_seconds(billed_ms(aws_duration_ms(r.duration_ms, r.cpu_ms, r.memory_mb)), r.memory_mb)
                for r in new
            )
            usage.lambda_architecture[name] = self.architectures.get(name, "x86_64")
        calls = counter_delta(counts_before, _sum_counts(self.counts_dir))
        job_path_calls: Counter[str] = Counter()
        physical_names = {f.name: logical for logical, f in self.stack.functions.items()}
        for key, n in calls.items():
            function, _, name = key.partition(":")
            logical = physical_names.get(function, function)
            if logical not in NOT_PER_JOB_FUNCTIONS:
                job_path_calls[name] += n
        add_aws_calls(usage, job_path_calls)
        # The SQS event source receives each worker message and deletes it (locally: this process).
        usage.sqs_requests += 2 * usage.lambda_requests["WorkerFunction"]
        capacity = capacity_delta(capacity_before, read_dumps(self.capacity_dir))
        for physical, kinds in capacity.items():
            table = self.tables.get(physical, physical)
            usage.write_units[table] = usage.write_units.get(table, 0.0) + kinds.get("write", 0.0)
            usage.read_units[table] = usage.read_units.get(table, 0.0) + kinds.get("read", 0.0)
        done = self._output_tokens(job["job_id"])
        return Measured(scenario, usage, done, chunks, seconds)

    def _output_tokens(self, job_id: str) -> int:
        from spool_core import bootstrap
        from spool_core.tenancy import Tenant

        tenant = Tenant(self.stack.dev_keys[self.stack.api_key])
        return int(bootstrap.job_service(tenant).get(job_id).usage.output_tokens)


# ---------------------------------------------------------------------------------------- report
def format_report(measured: Measured, prices: Prices) -> list[str]:
    usage = measured.usage
    lines = costs(usage, prices)
    total = sum(lines.values())
    percent = percent_of_output(total, prices, measured.tokens)
    target = prices.targets_percent[measured.scenario]
    verdict = "meets" if percent <= target else "misses"
    out = [
        f"{SCENARIO_NAMES[measured.scenario]} ({measured.tokens} tokens, {measured.chunks} chunks read"
        f" ({measured.metered_chunks} in the metered job), "
        f"{measured.seconds:.1f} s): ${total:.6f} per job = {percent:.1f}% of "
        f"${prices.output_price(measured.tokens):.4f} of model output (target <= {target:g}%: {verdict})"
    ]
    for name, dollars in sorted(lines.items(), key=lambda kv: -kv[1]):
        if dollars <= 0:
            continue
        out.append(f"    {name:<42} ${dollars:.7f}  {100 * dollars / total:5.1f}%  {_detail(name, usage)}")
    return out


def _detail(line: str, usage: Usage) -> str:
    if line.startswith("Lambda "):
        function = line.removeprefix("Lambda ")
        seconds = usage.lambda_gb_seconds.get(function, 0)
        return f"{usage.lambda_requests[function]} invocations, {seconds:.3f} GB-s"
    if line == "DynamoDB writes":
        return f"{sum(usage.write_units.values()):.0f} WRU (" + _by_table(usage.write_units) + ")"
    if line == "DynamoDB reads":
        return f"{sum(usage.read_units.values()):.1f} RRU (" + _by_table(usage.read_units) + ")"
    if line == "API Gateway REST requests":
        return f"{usage.rest_requests} requests"
    if line == "API Gateway WebSocket messages":
        return f"{usage.websocket_messages} messages"
    if line == "API Gateway WebSocket connection minutes":
        return f"{usage.websocket_connection_minutes:g} connection minutes"
    if line == "SQS requests":
        return f"{usage.sqs_requests} requests"
    if line == "S3 requests":
        return f"{usage.s3_puts} PUT, {usage.s3_gets} GET"
    if line == "Secrets Manager calls":
        return f"{usage.secrets_calls} calls"
    return ""


def _by_table(units: Mapping[str, float]) -> str:
    return ", ".join(
        f"{t.removesuffix('Table')} {u:g}" for t, u in sorted(units.items(), key=lambda kv: -kv[1]) if u
    )


def calls_line(usage: Usage) -> str:
    dynamo = {k.partition(".")[2]: n for k, n in usage.aws_calls.items() if k.startswith("dynamodb.")}
    other = {k: n for k, n in usage.aws_calls.items() if not k.startswith("dynamodb.")}
    parts = ", ".join(f"{op} {n}" for op, n in sorted(dynamo.items(), key=lambda kv: -kv[1]))
    rest = ", ".join(f"{op} {n}" for op, n in sorted(other.items(), key=lambda kv: -kv[1]))
    return f"    AWS calls: DynamoDB {sum(dynamo.values())} ({parts}); {rest}"


# ---------------------------------------------------------------------------------------- entry point
@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def metered_stack(counts_dir: Path, capacity_dir: Path) -> Iterator[Any]:
    """A started embedded stack whose containers count their AWS calls and meter DynamoDB request
    units: its fork server imports ``bench/hook/sitecustomize.py`` (on its ``PYTHONPATH``) at start."""
    from spool.devstack.runtime import CALL_COUNTS_ENV
    from spool.devstack.stack import EmbeddedStack

    path = os.pathsep.join(filter(None, [str(HOOK_DIR), os.environ.get("PYTHONPATH", "")]))
    environment = {CALL_COUNTS_ENV: str(counts_dir), CAPACITY_ENV: str(capacity_dir), "PYTHONPATH": path}
    with (
        _environment(environment),
        EmbeddedStack(port=0, ws_port=0, parameter_overrides=cost_parameters()) as stack,
    ):
        yield stack


# The chunk cadences measured: DESIGN.md's (every 200 ms or 64 tokens, the default), and the ramp a
# deployment may opt into (each interval twice the last, up to 1.5 s): most of a job's cost is its
# chunks (a write each, and for a WebSocket subscriber a message and a fanout invocation).
CADENCES: dict[str, dict[str, str]] = {
    "DESIGN.md's cadence, every 200 ms or 64 tokens (the default)": {},
    "SPOOL_FLUSH_MAX_MS=1500 (each interval twice the last, up to 1.5 s)": {"SPOOL_FLUSH_MAX_MS": "1500"},
}


def run(
    scenarios: tuple[str, ...] = SCENARIOS,
    print_: Callable[[str], None] = print,
    cadences: Mapping[str, Mapping[str, str]] = CADENCES,
) -> list[Measured]:
    prices = Prices.load()
    print_(
        f"== cost: infrastructure per 1,000-token job at 50 tok/s (sim-realtime), {prices.region} list prices"
        f" of {prices.read_on}, vs ${prices.output_price(1000):.4f} of model output =="
    )
    results = []
    for cadence, environment in cadences.items():
        print_(f"-- {cadence}")
        with (
            _environment(environment),
            tempfile.TemporaryDirectory(prefix="spool-cost-") as scratch,
        ):
            counts_dir, capacity_dir = Path(scratch, "calls"), Path(scratch, "units")
            counts_dir.mkdir()
            capacity_dir.mkdir()
            with metered_stack(counts_dir, capacity_dir) as stack:
                bench = CostBench(stack, counts_dir, capacity_dir)
                for scenario in scenarios:
                    # A short job read the same way first: every function on the path has a warm
                    # container that has loaded what it loads on first use (a job's path is warm on AWS).
                    bench.measure(scenario, tokens=16, model="sim-fast")
                    measured = bench.measure(scenario)
                    results.append(measured)
                    for line in format_report(measured, prices):
                        print_(line)
                    print_(calls_line(measured.usage))
    print_("")
    return results
