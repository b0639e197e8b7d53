from __future__ import annotations

import json
from pathlib import Path

import pytest

from spool.devstack.template import (
    Resolver,
    Template,
    TemplateError,
    parse_parameter_overrides,
    samconfig_parameters,
)
from tests.support import ROOT


@pytest.fixture(scope="module")
def template() -> Template:
    return Template.load(ROOT / "template.yaml")


def test_parameter_overrides_in_both_sam_formats() -> None:
    assert parse_parameter_overrides("A=1 B='two words'") == {"A": "1", "B": "two words"}
    assert parse_parameter_overrides("ParameterKey=A,ParameterValue=1 ParameterKey=B,ParameterValue=x=y") == {
        "A": "1",
        "B": "x=y",
    }
    assert parse_parameter_overrides(None) == {}
    with pytest.raises(TemplateError):
        parse_parameter_overrides("novalue")


def test_samconfig_local_environment_sets_a_short_visibility_timeout(template: Template) -> None:
    stack_name, overrides = samconfig_parameters(ROOT / "samconfig.toml", "local")
    assert stack_name == "spool-local"
    assert int(overrides["WorkerVisibilityTimeoutSeconds"]) < 30
    assert samconfig_parameters(ROOT / "missing.toml", "local") == (None, {})


def test_parameter_values_use_defaults_and_reject_unknown_names(template: Template) -> None:
    values = template.parameter_values({"LogLevel": "DEBUG"})
    assert values["LogLevel"] == "DEBUG"
    assert values["WorkerVisibilityTimeoutSeconds"] == "720"
    with pytest.raises(TemplateError, match="Nope"):
        template.parameter_values({"Nope": "1"})


def test_worker_visibility_timeout_is_about_six_times_its_timeout(template: Template) -> None:
    worker = template.functions()["WorkerFunction"]
    visibility = int(template.parameter_values({})["WorkerVisibilityTimeoutSeconds"])
    assert visibility == 6 * worker.timeout
    (event,) = worker.sqs_events
    assert event.report_batch_item_failures
    assert event.queue == "JobsQueue"


def test_a_subscribe_handler_never_outlives_the_lease_of_its_last_claim(template: Template) -> None:
    """A subscription's lease is taken over (by the next stream delivery, or the sweeper's redelivered
    end) once it runs out: the handler that holds it must be gone by then, whatever it was pushing.
    Its invocation's timeout, which kills it, is shorter than the lease its claims take."""
    from spool_core.subscriptions import LEASE_MS

    assert template.functions()["WebSocketFunction"].timeout * 1000 < LEASE_MS


def test_the_websocket_stage_deploys_every_change_itself(template: Template) -> None:
    """A Deployment resource is created once: a stack update that changed a route or an integration
    left the stage on the old deployment. The stage deploys each change (AutoDeploy) instead."""
    (stage,) = template.resources_of_type("AWS::ApiGatewayV2::Stage").values()
    assert stage["Properties"]["AutoDeploy"] is True and "DeploymentId" not in stage["Properties"]
    assert not template.resources_of_type("AWS::ApiGatewayV2::Deployment")
    routes = set(template.resources_of_type("AWS::ApiGatewayV2::Route"))
    assert routes and routes <= set(stage["DependsOn"])  # the first deployment has every route


def test_functions_merge_globals_and_read_their_routes(template: Template) -> None:
    functions = template.functions()
    health = functions["HealthFunction"]
    assert health.module_file == "functions/health/app.py"
    assert health.function_name == "lambda_handler"
    assert health.environment["POWERTOOLS_SERVICE_NAME"] == "spool"
    assert {(e.path, e.authorized) for e in health.api_events} >= {
        ("/v1/health", False),
        ("/{proxy+}", False),
    }
    contexts = functions["ContextsFunction"]
    assert all(e.authorized for e in contexts.api_events)
    for spec in functions.values():
        assert (ROOT / spec.module_file).exists(), spec.logical_id


def test_resolver_handles_ref_getatt_sub_join_select() -> None:
    resolver = Resolver(
        {"Stage": "prod"},
        {"AWS::Region": "us-east-1", "AWS::StackName": "s"},
        {"Bucket": "b-1"},
        {("Bucket", "Arn"): "arn:aws:s3:::b-1"},
    )
    assert resolver.resolve({"Ref": "Stage"}) == "prod"
    assert resolver.resolve({"Fn::GetAtt": ["Bucket", "Arn"]}) == "arn:aws:s3:::b-1"
    assert resolver.resolve({"Fn::Sub": "${Bucket.Arn}/t/* in ${AWS::Region} ${Stage}"}) == (
        "arn:aws:s3:::b-1/t/* in us-east-1 prod"
    )
    assert resolver.resolve({"Fn::Sub": ["${X}-${AWS::StackName}", {"X": {"Ref": "Bucket"}}]}) == "b-1-s"
    assert resolver.resolve({"Fn::Join": ["-", ["a", {"Ref": "Stage"}]]}) == "a-prod"
    assert resolver.resolve({"Fn::Select": [1, ["a", "b"]]}) == "b"
    assert resolver.resolve({"Nested": [{"Ref": "Stage"}]}) == {"Nested": ["prod"]}
    with pytest.raises(TemplateError):
        resolver.resolve({"Ref": "Missing"})
    with pytest.raises(TemplateError):
        resolver.resolve({"Fn::GetAtt": ["Bucket", "Nope"]})
    with pytest.raises(TemplateError):
        resolver.resolve({"Fn::If": ["C", 1, 2]})


def test_load_rejects_a_file_that_is_not_a_template(tmp_path: Path) -> None:
    bad = tmp_path / "t.yaml"
    bad.write_text("just: text\n")
    with pytest.raises(TemplateError):
        Template.load(bad)


def test_local_overrides_pass_knobs_but_never_resource_names(template: Template) -> None:
    from spool.devstack.stack import local_overrides, parse_dev_keys

    overrides = local_overrides(
        {
            "SPOOL_FLUSH_MS": "50",
            "SPOOL_BUCKET": "elsewhere",
            "HOME": "/root",
            "POWERTOOLS_LOG_LEVEL": "DEBUG",
        },
        template,
    )
    assert overrides["SPOOL_FLUSH_MS"] == "50"
    assert "SPOOL_BUCKET" not in overrides
    assert "HOME" not in overrides
    assert overrides["POWERTOOLS_TRACE_DISABLED"] == "true"
    assert parse_dev_keys("a:t1, b:t2") == {"a": "t1", "b": "t2"}
    with pytest.raises(ValueError, match="key:tenant"):
        parse_dev_keys("just-a-key")


def test_variables_named_by_env_key_references_reach_the_handlers(template: Template, tmp_path: Path) -> None:
    """README: ``SPOOL_OPENAI_API_KEY_PARAMETER=env:OPENAI_API_KEY make dev``. Only SPOOL_* and
    POWERTOOLS_* reached the handlers, so the key's variable never did and every attempt of a job on
    that model failed with a KeyError until the job was dead-lettered."""
    from spool.devstack.stack import local_overrides

    models = tmp_path / "models.json"
    models.write_text(json.dumps({"models": [{"id": "m", "options": {"api_key_parameter": "env:VLLM_KEY"}}]}))
    environ = {
        "SPOOL_OPENAI_API_KEY_PARAMETER": "env:OPENAI_API_KEY",
        "SPOOL_MODELS_FILE": str(models),
        "OPENAI_API_KEY": "sk-x",
        "VLLM_KEY": "v-1",
        "OTHER_SECRET": "never",
    }
    overrides = local_overrides(environ, template)
    assert overrides["OPENAI_API_KEY"] == "sk-x" and overrides["VLLM_KEY"] == "v-1"
    assert "OTHER_SECRET" not in overrides


def test_a_missing_env_key_says_which_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from spool_core.bootstrap import secret
    from spool_core.errors import ConfigurationError

    monkeypatch.delenv("SPOOL_TEST_ABSENT_KEY", raising=False)
    with pytest.raises(ConfigurationError, match="SPOOL_TEST_ABSENT_KEY"):
        secret("env:SPOOL_TEST_ABSENT_KEY")


@pytest.mark.parametrize(
    ("code", "deployments"),
    [
        ("ThrottlingException", False),
        ("InternalServerError", False),
        ("InvalidKeyId", True),
        ("ParameterVersionNotFound", True),
        ("AccessDeniedException", True),
    ],
)
def test_a_key_read_that_no_retry_mends_is_the_deployments_error_and_a_throttled_one_passes(
    monkeypatch: pytest.MonkeyPatch, code: str, deployments: bool
) -> None:
    """Powertools wraps every failed read alike: the wrapped error's code tells one that no retry can
    mend (a configuration error: the model cannot be called) from one that fails only the attempt."""
    from aws_lambda_powertools.utilities import parameters
    from botocore.exceptions import ClientError

    from spool_core.bootstrap import secret
    from spool_core.errors import ConfigurationError

    def failing(name: str, **_: object) -> str:
        try:
            raise ClientError({"Error": {"Code": code}}, "GetParameter")
        except ClientError as exc:
            raise parameters.exceptions.GetParameterError(str(exc))  # noqa: B904 - as Powertools does

    monkeypatch.setattr(parameters, "get_parameter", failing)
    with pytest.raises(ConfigurationError if deployments else parameters.exceptions.GetParameterError):
        secret("ssm:/spool/key")


def test_a_push_to_a_connection_gives_up_well_before_a_subscription_lease_runs_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fanout reads a shard one batch at a time, so a stuck push holds every subscribed job of the
    shard: a push is bounded to a few seconds, far under the lease a claim takes."""
    from spool_core.adapters import aws
    from spool_core.settings import Settings
    from spool_core.subscriptions import LEASE_MS

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # no credential lookup on the network
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    env = {name: "x" for name in ("SPOOL_API_KEYS_TABLE", "SPOOL_CONTEXTS_TABLE", "SPOOL_JOBS_TABLE")}
    env |= {
        n: "x" for n in ("SPOOL_CHUNKS_TABLE", "SPOOL_BUCKET", "SPOOL_JOBS_QUEUE_URL", "SPOOL_USAGE_TABLE")
    }
    env |= {n: "x" for n in ("SPOOL_DEAD_LETTER_QUEUE_URL", "SPOOL_SYSTEM_TABLE", "SPOOL_CONNECTIONS_TABLE")}
    env["SPOOL_WEBSOCKET_MANAGEMENT_URL"] = "https://example.execute-api.us-east-1.amazonaws.com/v1"
    config = aws.websocket_management(Settings.from_env(env)).meta.config
    attempts = config.retries["total_max_attempts"]
    assert attempts == 2 and config.read_timeout == 3 and config.connect_timeout == 2
    assert attempts * (config.connect_timeout + config.read_timeout) * 1000 < LEASE_MS / 4


def test_the_gateways_own_answers_expose_what_the_functions_do(template: Template) -> None:
    """DESIGN: browsers are exposed X-Request-Id, Retry-After and the rate-limit headers. The
    gateway's own answers (401, 403, 413, 429, 504...) exposed only the first two."""
    from spool_core.api.cors import ALLOWED_HEADERS, EXPOSED_HEADERS

    (api,) = template.resources_of_type("AWS::Serverless::Api").values()
    answers = api["Properties"]["GatewayResponses"]
    assert len(answers) >= 10
    for kind, answer in answers.items():
        headers = answer["ResponseParameters"]["Headers"]
        assert headers["Access-Control-Expose-Headers"] == f"'{','.join(EXPOSED_HEADERS)}'", kind
        assert headers["X-Request-Id"] == "context.requestId", kind
    assert api["Properties"]["Cors"]["AllowHeaders"] == f"'{','.join(ALLOWED_HEADERS)}'"


@pytest.mark.parametrize(
    ("parameter", "accepted", "refused"),
    [
        ("DefaultTokensPerMinute", ["200000", "1"], ["1.5", "0", "-3", ""]),
        ("DefaultMaxConcurrentJobs", ["16"], ["1.5", "0"]),
        ("DefaultDailyBudgetUsd", ["", "2.5", "10", "0", "0.0", "00"], ["-1", "1e3", "abc"]),
    ],
)
def test_the_default_limits_parameters_take_only_what_every_function_reads(
    template: Template, parameter: str, accepted: list[str], refused: list[str]
) -> None:
    """A reviewer: "0.0" passed DefaultDailyBudgetUsd's pattern and every function then refused its
    settings at start (a budget must be above 0), and a Number parameter took 1.5 tokens a minute.
    What the pattern takes, a function reads (a zero budget is none); what it refuses, CloudFormation
    refuses at deploy."""
    import re

    from spool_core.bootstrap import default_limits
    from spool_core.settings import Settings

    pattern = re.compile(template.body["Parameters"][parameter]["AllowedPattern"])
    globals_ = template.body["Globals"]["Function"]["Environment"]["Variables"]
    (variable,) = [name for name, value in globals_.items() if value == {"Ref": parameter}]
    required = {f.alias: "x" for f in Settings.model_fields.values() if f.is_required() and f.alias}
    for value in accepted:
        assert pattern.fullmatch(value), value
        limits = default_limits(Settings.from_env({**required, variable: value}))  # starts
        if parameter == "DefaultDailyBudgetUsd" and not value.strip("0."):
            assert limits.daily_budget_nanos is None  # a zero budget is none, as "0" always was
    for value in refused:
        assert not pattern.fullmatch(value), value
