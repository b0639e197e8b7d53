"""The fork server of the local Lambda runtime (see ``runtime.py``).

``python -m spool.devstack.zygote <fd> <module>...`` imports the given modules (and loads the tiktoken
encodings named in ``SPOOL_DEVSTACK_ENCODINGS``, which every container would otherwise read and
build on its first request), answers ``ready`` on the control socket ``fd``, then forks one container
per request: a request carries the function's
spec, environment and code root, plus the container's end of its channel (passed as a file
descriptor). It ends when the control socket closes, that is when the stack that started it ends.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import signal
import socket
import sys
import traceback
from typing import Any

ENCODINGS_ENV = "SPOOL_DEVSTACK_ENCODINGS"


def main(argv: list[str]) -> None:
    control = socket.socket(fileno=int(argv[0]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # containers are reaped by the kernel
    for module in argv[1:]:
        importlib.import_module(module)
    for encoding in filter(None, os.environ.get(ENCODINGS_ENV, "").split(",")):
        with contextlib.suppress(Exception):  # a missing file: each container loads it as Lambda would
            importlib.import_module("tiktoken").get_encoding(encoding)
    from spool.devstack import runtime
    from spool.devstack.template import FunctionSpec

    control.send(b"ready")
    serve(control, runtime, FunctionSpec)
    # The stack has gone: run the exit hooks (coverage) and leave without the teardown of every
    # preloaded module (two seconds of a stack's stop).
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def serve(control: socket.socket, runtime: Any, FunctionSpec: Any) -> None:  # noqa: N803 - a class
    """Fork one child per request until the control socket closes: a container (its channel is the
    passed file descriptor), or (``kind: function``) a function's own fork server, which imports the
    function's handler with its environment and then forks that function's containers (its control
    socket is the passed file descriptor)."""
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 1 << 20, 1)
        except OSError:
            return
        if not message:
            return  # the stack has gone
        request = json.loads(message)
        pid = os.fork()
        if pid == 0:
            control.close()
            code = 0
            try:
                spec = FunctionSpec(**request["spec"])
                if request.get("kind") == "function":
                    runtime.preload_function(spec, request["environment"], request["root"])
                    own = socket.socket(fileno=fds[0])
                    own.send(b"ready")
                    serve(own, runtime, FunctionSpec)
                else:
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    runtime.container_main(
                        socket.socket(fileno=fds[0]), spec, request["environment"], request["root"]
                    )
            except BaseException:
                traceback.print_exc()
                code = 1
            # Run the exit hooks (a coverage run measuring the container saves its data there), then
            # leave without the interpreter's teardown of every module: seconds of CPU per container.
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        for fd in fds:
            os.close(fd)
        if request.get("kind") != "function":
            runtime.forked_container()  # the next container of a function's fork server starts warm
        control.send(json.dumps({"pid": pid}).encode())


if __name__ == "__main__":
    main(sys.argv[1:])
