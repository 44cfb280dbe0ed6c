#!/usr/bin/env python3
"""Strict, single-threaded moto S3 server for the rmos-runs integration tests.

Run it with the venv made by scripts/install-deps.sh:

    .tools/s3-venv/bin/python scripts/s3_server.py --port 45123 [--host 127.0.0.1]

It prints "ready" on stdout once the socket is listening, serves until SIGTERM
or SIGINT, then exits 0. Use path-style addressing (http://HOST:PORT/bucket/key);
any access key / secret / region is accepted.

Why single-threaded
-------------------
moto's stock server (`moto_server`, `moto.server.main`) runs werkzeug with
threaded=True: one thread per request. moto's S3 backend is not written for
that. A conditional PUT checks If-Match / If-None-Match against the current
object and then stores the new one as separate, unlocked steps, and the key
store itself is updated non-atomically. Two concurrent conditional writes can
both pass the check, and the last one silently wins: a lost update where real
S3 would answer 412 to one of them. Tests of optimistic concurrency (the
compare-and-swap on run records) would then pass or fail at random.

So this launcher serves moto's DomainDispatcherApplication with werkzeug's
server in threaded=False, processes=1 mode: requests are handled strictly one
after another, each check-then-write is atomic, and concurrent clients get
exactly the serialisable behaviour S3 promises for conditional writes.

This uses werkzeug.serving.make_server(host, port, app, threaded=False,
processes=1, ...) + serve_forever(), which is exactly what
run_simple(host, port, app, threaded=False, processes=1) does when neither the
reloader nor the debugger is on; calling make_server directly lets us print
"ready" after the socket is bound and listening (run_simple blocks first).

The single-threaded server speaks HTTP/1.0 and closes each connection after one
response (werkzeug only turns on keep-alive for threaded/forking servers), so
one idle client cannot hold the server. Request logging is off; werkzeug's
logger is at WARNING, so errors still reach stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any


def _on_signal(signum: int, frame: Any) -> None:
    # Raised inside serve_forever()'s select(); unwinds to the finally below.
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    # moto builds some URLs (e.g. bucket Location) from MOTO_PORT, like moto_server does.
    os.environ.setdefault("MOTO_PORT", str(args.port))

    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    from werkzeug.serving import make_server

    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app

    class QuietHandler(MotoRequestHandler):
        # MotoRequestHandler keeps S3 metadata headers with underscores intact.
        def log_request(self, code: Any = "-", size: Any = "-") -> None:
            pass

    app = DomainDispatcherApplication(create_backend_app)

    # == run_simple(args.host, args.port, app, threaded=False, processes=1), see above.
    srv = make_server(
        args.host,
        args.port,
        app,
        threaded=False,
        processes=1,
        request_handler=QuietHandler,
    )
    try:
        print("ready", flush=True)
        srv.serve_forever()
    except SystemExit:
        pass
    finally:
        srv.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
