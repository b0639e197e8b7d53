"""The embedded stack: everything Spool needs, on one machine, with no cloud account.

A moto server stands in for AWS (real wire protocol on 127.0.0.1); the tables, queues and bucket are
created from template.yaml itself through moto's CloudFormation; an API Gateway emulator turns HTTP
requests into REST proxy events (authorizer included) for the handlers the template names; a worker
loop feeds the worker handler real SQS event batches. The handlers run unchanged.
"""

import warnings

# Locally EMF output is off, so Powertools' reminder that an invocation emitted no metrics is noise.
warnings.filterwarnings("ignore", message="No application metrics to publish")
