#!/bin/sh
# EventsFunction's start script: as run.sh, for the readers' app (events.py).
PATH="$PATH:$LAMBDA_TASK_ROOT/bin" PYTHONPATH="/opt/python:$LAMBDA_RUNTIME_DIR:$LAMBDA_TASK_ROOT" \
  exec python -m uvicorn --host 127.0.0.1 --port "${AWS_LWA_PORT:-8080}" --no-access-log events:app
