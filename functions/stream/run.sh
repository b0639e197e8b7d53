#!/bin/sh
# AWS Lambda Web Adapter (the layer in template.yaml) starts this, then turns each invocation into an
# HTTP request to it and streams the response back (AWS_LWA_INVOKE_MODE=response_stream).
PATH="$PATH:$LAMBDA_TASK_ROOT/bin" PYTHONPATH="/opt/python:$LAMBDA_RUNTIME_DIR:$LAMBDA_TASK_ROOT" \
  exec python -m uvicorn --host 127.0.0.1 --port "${AWS_LWA_PORT:-8080}" --no-access-log app:app
