"""Reading template.yaml: CloudFormation tags, Globals, parameters and the intrinsic functions the
local stack needs to resolve (Ref, GetAtt, Sub, Join, Select, If)."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PSEUDO_REGION = "AWS::Region"
PSEUDO_ACCOUNT = "AWS::AccountId"
PSEUDO_STACK = "AWS::StackName"
PSEUDO_PARTITION = "AWS::Partition"
PSEUDO_URL_SUFFIX = "AWS::URLSuffix"


class TemplateError(Exception):
    pass


class _CfnLoader(yaml.SafeLoader):
    """YAML loader that turns the short-form tags (!Ref, !Sub, ...) into their long JSON form."""


def _intrinsic(name: str) -> Callable[[yaml.Loader, yaml.Node], Any]:
    key = "Ref" if name == "Ref" else f"Fn::{name}"

    def construct(loader: yaml.Loader, node: yaml.Node) -> Any:
        value: Any
        if isinstance(node, yaml.ScalarNode):
            value = loader.construct_scalar(node)
            if name == "GetAtt":
                value = str(value).split(".", 1)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
        return {key: value}

    return construct


for _tag in (
    "Ref",
    "GetAtt",
    "Sub",
    "Join",
    "Select",
    "Split",
    "If",
    "Equals",
    "Not",
    "And",
    "Or",
    "FindInMap",
    "GetAZs",
    "ImportValue",
    "Base64",
    "Condition",
    "Cidr",
):
    _CfnLoader.add_constructor(f"!{_tag}", _intrinsic(_tag))


def parse_parameter_overrides(text: str | None) -> dict[str, str]:
    """Parse overrides exactly as ``sam deploy --parameter-overrides`` takes them:
    ``Key=Value Key2='a b'`` or ``ParameterKey=Key,ParameterValue=Value ...``."""
    overrides: dict[str, str] = {}
    for token in shlex.split(text or ""):
        if token.startswith("ParameterKey="):
            match = re.fullmatch(r"ParameterKey=([^,]+),ParameterValue=(.*)", token)
            if not match:
                raise TemplateError(f"cannot parse parameter override {token!r}")
            overrides[match.group(1)] = match.group(2)
        elif "=" in token:
            key, value = token.split("=", 1)
            overrides[key] = value
        else:
            raise TemplateError(f"cannot parse parameter override {token!r} (expected Key=Value)")
    return overrides


def samconfig_parameters(path: Path, config_env: str) -> tuple[str | None, dict[str, str]]:
    """The stack name and parameter overrides of one samconfig.toml environment (``deploy`` section)."""
    if not path.exists():
        return None, {}
    with path.open("rb") as handle:
        config = tomllib.load(handle)
    env = config.get(config_env, {})
    deploy = {**env.get("global", {}).get("parameters", {}), **env.get("deploy", {}).get("parameters", {})}
    overrides = deploy.get("parameter_overrides", "")
    if isinstance(overrides, list):
        overrides = " ".join(overrides)
    return deploy.get("stack_name"), parse_parameter_overrides(overrides)


@dataclass(frozen=True)
class ApiEvent:
    name: str
    api: str
    path: str
    method: str
    authorized: bool
    streaming: bool = False  # ResponseTransferMode: RESPONSE_STREAM (the integration streams)
    timeout_ms: int | None = None  # TimeoutInMillis (29 s when unset; up to 15 min when streaming)
    api_key_required: bool | None = None  # Auth.ApiKeyRequired of the event (None: the API's default)


# API Gateway's account-level throttle per Region, what a stage or route without its own settings gets.
ACCOUNT_RATE_LIMIT = 10_000.0
ACCOUNT_BURST_LIMIT = 5_000


@dataclass(frozen=True)
class Throttle:
    """An API Gateway throttle: a token bucket refilled with ``rate`` tokens a second that holds at
    most ``burst``; each request (or WebSocket message) takes one."""

    rate: float
    burst: int


@dataclass(frozen=True)
class MethodThrottle:
    """One entry of a stage's ``MethodSettings``: the throttle of the methods it names."""

    resource_path: str  # "/*" for every resource, else the resource's path (/v1/jobs)
    http_method: str  # "*" for every method, else GET, POST, ..., ANY
    throttle: Throttle

    def matches(self, resource: str, method: str) -> bool:
        return self.resource_path in {"/*", resource} and self.http_method in {"*", method}

    @property
    def specificity(self) -> tuple[bool, bool]:
        """A setting for a named resource or method wins over the stage-wide ``/*`` ``*`` one."""
        return self.resource_path != "/*", self.http_method != "*"


@dataclass(frozen=True)
class AuthorizerSpec:
    """A Lambda authorizer of a REST API (SAM ``Auth.Authorizers``)."""

    function: str  # logical id of the function
    headers: tuple[str, ...] = ()  # identity sources: request headers ...
    query_strings: tuple[str, ...] = ()  # ... and query string parameters
    reauthorize_every: int = 0  # seconds a policy is cached per identity (0: every request is authorized)


@dataclass(frozen=True)
class RestApiSpec:
    """What a REST API's properties say about who may call it how often."""

    method_throttles: tuple[MethodThrottle, ...] = ()
    # Where a method that requires an API key finds it: the x-api-key header (HEADER) or the
    # authorizer's usageIdentifierKey (AUTHORIZER).
    api_key_source: str = "HEADER"
    api_key_required: bool = False  # Auth.ApiKeyRequired: the default of every method
    # SAM adds the API key requirement to the CORS preflight (OPTIONS) too unless told not to.
    api_key_required_on_preflight: bool = True
    usage_plan_throttle: Throttle | None = None  # the per-key throttle of the API's usage plan
    default_authorizer: str | None = None
    authorizers: Mapping[str, AuthorizerSpec] = field(default_factory=dict)

    def method_throttle(self, resource: str, method: str) -> Throttle | None:
        """The stage throttle of one method: its own setting, else the stage-wide one."""
        matching = [setting for setting in self.method_throttles if setting.matches(resource, method)]
        return max(matching, key=lambda setting: setting.specificity).throttle if matching else None


@dataclass(frozen=True)
class WebSocketThrottles:
    """A WebSocket stage's throttles: ``DefaultRouteSettings`` for every route, ``RouteSettings`` per
    route key."""

    default: Throttle | None = None
    routes: Mapping[str, Throttle] = field(default_factory=dict)

    def for_route(self, route_key: str) -> Throttle | None:
        return self.routes.get(route_key, self.default)


@dataclass(frozen=True)
class SqsEvent:
    name: str
    queue: str  # logical id of the queue
    batch_size: int
    report_batch_item_failures: bool
    maximum_concurrency: int | None = None  # ScalingConfig.MaximumConcurrency: invocations at once


@dataclass(frozen=True)
class StreamEvent:
    name: str
    table: str  # logical id of the table whose stream feeds the function
    batch_size: int
    filters: tuple[Mapping[str, Any], ...] = ()  # FilterCriteria patterns (a record passes if any matches)
    # Batches of one shard processed at once; records of one partition key stay in order, in one batch
    parallelization: int = 1
    # MaximumRetryAttempts: retries of a record reported failed before it is skipped (None: -1, forever)
    maximum_retry_attempts: int | None = None


@dataclass(frozen=True)
class ScheduleEvent:
    name: str
    expression: str  # rate(1 minute), rate(5 minutes), ...

    @property
    def interval_seconds(self) -> float:
        """The period of a ``rate(...)`` expression (cron expressions are not run locally)."""
        match = re.fullmatch(r"rate\((\d+) (minute|minutes|hour|hours|day|days)\)", self.expression.strip())
        if not match:
            raise TemplateError(f"only rate(...) schedules run locally, not {self.expression!r}")
        unit = {"minute": 60, "hour": 3600, "day": 86400}[match.group(2).rstrip("s")]
        return int(match.group(1)) * unit


@dataclass(frozen=True)
class FunctionSpec:
    logical_id: str
    code_uri: str
    handler: str
    timeout: int
    memory_mb: int
    environment: Mapping[str, Any]
    api_events: tuple[ApiEvent, ...] = ()
    sqs_events: tuple[SqsEvent, ...] = ()
    stream_events: tuple[StreamEvent, ...] = ()
    reserved_concurrency: int | None = None
    schedule_events: tuple[ScheduleEvent, ...] = ()
    # A web app run by AWS Lambda Web Adapter (Handler is its start script): "module:attribute" of
    # the ASGI app the script serves, and the adapter's readiness check path.
    web_app: str | None = None
    readiness_path: str = "/"

    @property
    def module_file(self) -> str:
        """The Python file holding the handler (or the web app)."""
        module = self.web_app.partition(":")[0] if self.web_app else self.handler.rpartition(".")[0]
        return str(Path(self.code_uri) / (module.replace(".", "/") + ".py"))

    @property
    def function_name(self) -> str:
        return self.handler.rpartition(".")[2]


@dataclass
class Template:
    path: Path
    body: dict[str, Any] = field(repr=False)
    overrides: dict[str, str] = field(default_factory=dict)  # parameter values, as sam deploy takes them

    @classmethod
    def load(cls, path: Path) -> Template:
        with path.open() as handle:
            body = yaml.load(handle, Loader=_CfnLoader)  # noqa: S506 - SafeLoader subclass with CFN tags
        if not isinstance(body, dict) or "Resources" not in body:
            raise TemplateError(f"{path} is not a CloudFormation template")
        return cls(path, body)

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def resources(self) -> dict[str, dict[str, Any]]:
        resources: dict[str, dict[str, Any]] = self.body["Resources"]
        return resources

    def resources_of_type(self, *types: str) -> dict[str, dict[str, Any]]:
        return {name: res for name, res in self.resources.items() if res.get("Type") in types}

    def parameter_values(self, overrides: Mapping[str, str]) -> dict[str, str]:
        declared = self.body.get("Parameters", {})
        unknown = set(overrides) - set(declared)
        if unknown:
            raise TemplateError(f"unknown parameters in overrides: {', '.join(sorted(unknown))}")
        values = {}
        for name, spec in declared.items():
            if name in overrides:
                values[name] = str(overrides[name])
            elif "Default" in spec:
                values[name] = str(spec["Default"])
            else:
                raise TemplateError(f"parameter {name} has no default and no override")
        return values

    def _value(self, value: Any) -> Any:
        """A property given as a literal or as ``!Ref Parameter`` (its override, else its default)."""
        if isinstance(value, dict) and "Ref" in value:
            return self.parameter_values(self.overrides)[str(value["Ref"])]
        return value

    def _number(self, value: Any, default: int) -> int:
        """A numeric property, given as a literal or as ``!Ref Parameter`` (overrides, else the default)."""
        return default if value is None else int(self._value(value))

    def _flag(self, value: Any, default: bool) -> bool:
        if value is None:
            return default
        value = self._value(value)
        return value if isinstance(value, bool) else str(value).lower() == "true"

    def _throttle(self, rate: Any, burst: Any) -> Throttle | None:
        """A throttle from its two settings; one left out is API Gateway's account-level value."""
        if rate is None and burst is None:
            return None
        return Throttle(
            float(self._value(rate)) if rate is not None else ACCOUNT_RATE_LIMIT,
            int(float(self._value(burst))) if burst is not None else ACCOUNT_BURST_LIMIT,
        )

    def functions(self) -> dict[str, FunctionSpec]:
        globals_ = self.body.get("Globals", {}).get("Function", {})
        specs = {}
        for name, resource in self.resources_of_type("AWS::Serverless::Function").items():
            props = {**globals_, **resource.get("Properties", {})}
            env = {
                **globals_.get("Environment", {}).get("Variables", {}),
                **resource.get("Properties", {}).get("Environment", {}).get("Variables", {}),
            }
            api_events, sqs_events, stream_events, schedules = [], [], [], []
            for event_name, event in (props.get("Events") or {}).items():
                ep = event.get("Properties", {})
                if event["Type"] == "Api":
                    event_auth = ep.get("Auth") or {}
                    auth = event_auth.get("Authorizer")
                    api_events.append(
                        ApiEvent(
                            event_name,
                            _ref_name(ep.get("RestApiId")),
                            ep["Path"],
                            ep["Method"].upper(),
                            authorized=auth != "NONE",
                            streaming=ep.get("ResponseTransferMode") == "RESPONSE_STREAM",
                            timeout_ms=(
                                self._number(ep["TimeoutInMillis"], 0) if "TimeoutInMillis" in ep else None
                            ),
                            api_key_required=(
                                self._flag(event_auth["ApiKeyRequired"], False)
                                if "ApiKeyRequired" in event_auth
                                else None
                            ),
                        )
                    )
                elif event["Type"] == "DynamoDB":
                    patterns = ((ep.get("FilterCriteria") or {}).get("Filters")) or []
                    stream_events.append(
                        StreamEvent(
                            event_name,
                            _ref_name(ep["Stream"]),
                            int(ep.get("BatchSize", 100)),
                            tuple(json.loads(f["Pattern"]) for f in patterns),
                            int(ep.get("ParallelizationFactor", 1)),
                            _retry_attempts(ep.get("MaximumRetryAttempts", -1)),
                        )
                    )
                elif event["Type"] in {"Schedule", "ScheduleV2"}:
                    schedules.append(
                        ScheduleEvent(event_name, str(ep.get("Schedule") or ep["ScheduleExpression"]))
                    )
                elif event["Type"] == "SQS":
                    sqs_events.append(
                        SqsEvent(
                            event_name,
                            _ref_name(ep["Queue"]),
                            int(ep.get("BatchSize", 10)),
                            "ReportBatchItemFailures" in (ep.get("FunctionResponseTypes") or []),
                            (
                                self._number(ep["ScalingConfig"].get("MaximumConcurrency"), 0) or None
                                if isinstance(ep.get("ScalingConfig"), Mapping)
                                else None
                            ),
                        )
                    )
            specs[name] = FunctionSpec(
                logical_id=name,
                code_uri=str(props["CodeUri"]).rstrip("/"),
                handler=props["Handler"],
                timeout=self._number(props.get("Timeout"), 3),
                memory_mb=self._number(props.get("MemorySize"), 128),
                environment=env,
                api_events=tuple(api_events),
                sqs_events=tuple(sqs_events),
                stream_events=tuple(stream_events),
                reserved_concurrency=(
                    self._number(props["ReservedConcurrentExecutions"], 0)
                    if "ReservedConcurrentExecutions" in props
                    else None
                ),
                schedule_events=tuple(schedules),
                **self._web_app(props, env),
            )
        return specs

    def _web_app(self, props: Mapping[str, Any], env: Mapping[str, Any]) -> dict[str, Any]:
        """For a function run by Lambda Web Adapter (its wrapper set, Handler a start script): the ASGI
        app the script starts with ``python -m uvicorn ... module:attribute``."""
        if env.get("AWS_LAMBDA_EXEC_WRAPPER") != "/opt/bootstrap":
            return {}
        script = self.root / str(props["CodeUri"]) / str(props["Handler"])
        command = next((line for line in script.read_text().splitlines() if "uvicorn" in line), "")
        target = re.search(r"(\S+:\S+)\s*$", command)
        if not target:
            raise TemplateError(f"{script}: expected a `python -m uvicorn ... module:app` line")
        return {
            "web_app": target.group(1),
            "readiness_path": str(env.get("AWS_LWA_READINESS_CHECK_PATH", "/")),
        }

    def websocket_routes(self) -> dict[str, str]:
        """Route key -> logical id of the function its AWS_PROXY integration invokes."""
        integrations = {}
        for name, resource in self.resources_of_type("AWS::ApiGatewayV2::Integration").items():
            uri = resource["Properties"]["IntegrationUri"]
            text = uri["Fn::Sub"] if isinstance(uri, dict) else str(uri)
            match = re.search(r"\$\{(\w+)\.Arn\}", text if isinstance(text, str) else text[0])
            if match:
                integrations[name] = match.group(1)
        routes = {}
        for resource in self.resources_of_type("AWS::ApiGatewayV2::Route").values():
            props = resource["Properties"]
            target = props.get("Target", {})
            text = target.get("Fn::Sub", "") if isinstance(target, dict) else str(target)
            match = re.search(r"\$\{(\w+)\}", text)
            if match and match.group(1) in integrations:
                routes[props["RouteKey"]] = integrations[match.group(1)]
        return routes

    def api(self, logical_id: str) -> dict[str, Any]:
        props: dict[str, Any] = self.resources[logical_id].get("Properties", {})
        return props

    def rest_api(self, logical_id: str) -> RestApiSpec:
        """Throttling, API keys and authorizers of an ``AWS::Serverless::Api``; whatever is left out
        has API Gateway's (and SAM's) default."""
        props = self.api(logical_id)
        auth = props.get("Auth") or {}
        method_throttles = []
        for setting in props.get("MethodSettings") or []:
            throttle = self._throttle(setting.get("ThrottlingRateLimit"), setting.get("ThrottlingBurstLimit"))
            if throttle is not None:
                method = str(self._value(setting.get("HttpMethod", "*"))).upper()
                path = str(self._value(setting.get("ResourcePath", "/*")))
                method_throttles.append(MethodThrottle(_method_setting_path(path), method, throttle))
        plan = auth.get("UsagePlan") or {}
        usage_plan_throttle = None
        if str(self._value(plan.get("CreateUsagePlan", "NONE"))).upper() != "NONE":
            limits = plan.get("Throttle") or {}
            usage_plan_throttle = self._throttle(limits.get("RateLimit"), limits.get("BurstLimit"))
        return RestApiSpec(
            method_throttles=tuple(method_throttles),
            api_key_source=str(self._value(props.get("ApiKeySourceType", "HEADER"))).upper(),
            api_key_required=self._flag(auth.get("ApiKeyRequired"), False),
            api_key_required_on_preflight=self._flag(auth.get("AddApiKeyRequiredToCorsPreflight"), True),
            usage_plan_throttle=usage_plan_throttle,
            default_authorizer=auth.get("DefaultAuthorizer"),
            authorizers={
                name: self._authorizer(spec)
                for name, spec in (auth.get("Authorizers") or {}).items()
                if isinstance(spec, dict) and "FunctionArn" in spec
            },
        )

    def _authorizer(self, spec: Mapping[str, Any]) -> AuthorizerSpec:
        identity = spec.get("Identity") or {}
        if str(spec.get("FunctionPayloadType", "TOKEN")).upper() == "TOKEN":
            headers = [identity.get("Header", "Authorization")]  # a TOKEN authorizer reads one header
        else:
            headers = list(identity.get("Headers") or [])
        return AuthorizerSpec(
            function=_ref_name(spec["FunctionArn"]),
            headers=tuple(str(h) for h in headers),
            query_strings=tuple(str(q) for q in identity.get("QueryStrings") or []),
            reauthorize_every=self._number(identity.get("ReauthorizeEvery"), 300),  # SAM's default TTL
        )

    def websocket_throttles(self) -> WebSocketThrottles:
        """The throttles of the WebSocket API's stage (none declared: API Gateway's account limits)."""
        for stage in self.resources_of_type("AWS::ApiGatewayV2::Stage").values():
            props = stage.get("Properties", {})
            api_id = props.get("ApiId")
            api = self.resources.get(_ref_name(api_id), {}) if isinstance(api_id, dict) else {}
            if api.get("Properties", {}).get("ProtocolType") != "WEBSOCKET":
                continue
            default = props.get("DefaultRouteSettings") or {}
            routes = {}
            for route_key, settings in (props.get("RouteSettings") or {}).items():
                throttle = self._throttle(
                    settings.get("ThrottlingRateLimit"), settings.get("ThrottlingBurstLimit")
                )
                if throttle is not None:
                    routes[route_key] = throttle
            return WebSocketThrottles(
                self._throttle(default.get("ThrottlingRateLimit"), default.get("ThrottlingBurstLimit")),
                routes,
            )
        return WebSocketThrottles()


def _method_setting_path(path: str) -> str:
    """A ``MethodSettings`` resource path as the resource's own: ``/~1v1~1jobs`` is /v1/jobs (the
    slashes inside are written ~1), ``/*`` stays every resource."""
    return path if path == "/*" else (path[1:].replace("~1", "/") or "/")


def _ref_name(value: Any) -> str:
    """The logical id named by ``!Ref X`` or ``!GetAtt X.Arn``."""
    if isinstance(value, dict):
        if "Ref" in value:
            return str(value["Ref"])
        if "Fn::GetAtt" in value:
            return str(value["Fn::GetAtt"][0])
    raise TemplateError(f"expected !Ref or !GetAtt, got {value!r}")


class Resolver:
    """Resolves intrinsic functions against parameter values and provisioned resources."""

    _SUB = re.compile(r"\$\{([^}!][^}]*)\}")

    def __init__(
        self,
        parameters: Mapping[str, str],
        pseudo: Mapping[str, str],
        refs: Mapping[str, str],
        attributes: Mapping[tuple[str, str], str],
    ) -> None:
        self._parameters = parameters
        self._pseudo = pseudo
        self._refs = refs
        self._attributes = attributes

    def ref(self, name: str) -> str:
        for table in (self._parameters, self._pseudo, self._refs):
            if name in table:
                return table[name]
        raise TemplateError(f"cannot resolve !Ref {name}")

    def get_att(self, name: str, attribute: str) -> str:
        try:
            return self._attributes[(name, attribute)]
        except KeyError:
            raise TemplateError(f"cannot resolve !GetAtt {name}.{attribute}") from None

    def resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            ((key, arg),) = value.items()
            if key == "Ref":
                return self.ref(arg)
            if key == "Fn::GetAtt":
                name, attribute = arg if isinstance(arg, list) else str(arg).split(".", 1)
                return self.get_att(name, attribute)
            if key == "Fn::Sub":
                return self._sub(arg)
            if key == "Fn::Join":
                separator, items = arg
                return separator.join(str(self.resolve(i)) for i in self.resolve(items))
            if key == "Fn::Select":
                index, items = arg
                return self.resolve(items)[int(self.resolve(index))]
            if key.startswith("Fn::"):
                raise TemplateError(f"{key} is not supported by the local stack")
        return {k: self.resolve(v) for k, v in value.items()}

    def _sub(self, arg: Any) -> str:
        text, variables = (arg, {}) if isinstance(arg, str) else (arg[0], arg[1])

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in variables:
                return str(self.resolve(variables[name]))
            if "." in name and name.split(".", 1)[0] not in self._pseudo:
                resource, attribute = name.split(".", 1)
                return self.get_att(resource, attribute)
            return self.ref(name)

        return self._SUB.sub(replace, text)


def _retry_attempts(value: Any) -> int | None:
    """An event source mapping's MaximumRetryAttempts (-1, the default: until the record expires)."""
    attempts = int(value)
    return None if attempts < 0 else attempts
