"""The worker side of the embedded stack, in its own process so that a crashed invocation can die
the way a Lambda sandbox does (no cleanup) while the API keeps serving. The stack restarts it."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType

from spool.devstack.instrument import AwsCallCounter
from spool.devstack.provision import StackDescription
from spool.devstack.runtime import LocalFunction
from spool.devstack.template import Template
from spool.devstack.worker_loop import SqsEventSource


def event_sources(description: StackDescription, template: Template) -> list[SqsEventSource]:
    import boto3

    resolver = description.resolver()
    sqs = boto3.session.Session().client(
        "sqs", endpoint_url=description.endpoint_url, region_name=description.region
    )
    sources = []
    for name, spec in template.functions().items():
        if not spec.sqs_events:
            continue
        function = LocalFunction(
            spec, template.root, region=description.region, name=resolver.ref(name), max_concurrency=1
        )
        for event in spec.sqs_events:
            sources.append(
                SqsEventSource(
                    sqs,
                    resolver.ref(event.queue),
                    resolver.get_att(event.queue, "Arn"),
                    function,
                    event,
                    region=description.region,
                )
            )
    return sources


CALL_COUNTS_ENV = "SPOOL_DEVSTACK_CALL_COUNTS"


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Run the template's SQS event sources against the local stack"
    )
    parser.add_argument("--state", type=Path, required=True, help="stack description written by the stack")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="worker: %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)
    if os.environ.get(CALL_COUNTS_ENV):  # benchmarks: count this process's AWS calls into a file
        AwsCallCounter(Path(os.environ[CALL_COUNTS_ENV]) / f"{os.getpid()}.json").install()
    description = StackDescription.load(args.state)
    template = Template.load(Path(description.template_path))
    os.environ.update(description.environment(template))

    sources = event_sources(description, template)
    threads = [threading.Thread(target=s.run, name="sqs-poller", daemon=True) for s in sources]

    def stop(signum: int, frame: FrameType | None) -> None:
        for source in sources:
            source.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(timeout=0.5)


if __name__ == "__main__":
    main()
