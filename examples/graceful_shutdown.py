"""Graceful shutdown: SIGTERM or SIGINT stops a served app once, cleanly, with exit code 0.

An app is booted with signal handling on (``boot(..., signals=True)``, the
default) and served by ``manager.run()``. Its service ticks on an
interval and owns a child process (a "sidecar"). On SIGTERM or SIGINT the
manager shuts down once: the handlers and services stop in reverse
order, ``on_stop`` runs, the sidecar is terminated, the server stops,
``run()`` returns, and the process exits 0.

This file is shaped like a production entry point, so it monkey-patches
first (SPECTER itself never patches, and works with or without it); the
patching lets the in-process probe below use plain ``urllib``.

With --once the example probes its own server over HTTP and then sends
itself SIGTERM (``os.kill(os.getpid(), signal.SIGTERM)`` from a gevent
timer) after about half a second, to show the whole shutdown path.

Run:  python examples/graceful_shutdown.py --once
      python examples/graceful_shutdown.py [--port N] [--seconds N]
      (then press Ctrl-C, or `kill -TERM <pid>`; --seconds N sends the
      SIGTERM by itself after N seconds)
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402  (imports come after patching, as gevent requires)
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

import gevent  # noqa: E402
from flask import Flask  # noqa: E402
from flask_socketio import SocketIO  # noqa: E402

from specter import ManagedProcess, Service, boot  # noqa: E402

SIDECAR = """
import time
for n in range(1, 10000):
    print("sidecar heartbeat", n, flush=True)
    time.sleep(0.2)
"""


class Heartbeat(Service):
    """Ticks every 0.1 s and owns a sidecar child process whose output it follows."""

    name = "heartbeat"

    def on_start(self):
        self.ticks = 0
        self.stops = 0
        self.sidecar = self.start_process([sys.executable, "-u", "-c", SIDECAR], name="sidecar",
                                          stdout=ManagedProcess.PIPE, text=True)
        self.sidecar.follow_output(stdout_handler=lambda line: print("  %s" % line))
        self.interval(self.tick, 0.1)
        print("heartbeat started; sidecar pid %d" % self.sidecar.pid)

    def tick(self):
        self.ticks += 1
        if self.ticks % 2 == 0:
            print("  tick %d" % self.ticks)

    def on_stop(self):
        self.stops += 1
        print("on_stop: after %d ticks; the sidecar is still running=%s (it is stopped right after)"
              % (self.ticks, self.sidecar.running))


def create_app(heartbeat):
    app = Flask(__name__)
    socketio = SocketIO(app, async_mode="gevent")

    @app.get("/health")
    def health():
        return {"status": heartbeat.health()["status"], "ticks": heartbeat.ticks}

    return app, socketio


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def probe(port):
    """GET /health over real HTTP once the server answers."""
    url = "http://127.0.0.1:%d/health" % port
    for _ in range(100):
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                print("probe: GET /health -> %d %s" % (response.status, json.loads(response.read())))
                return
        except OSError:
            gevent.sleep(0.02)  # not listening yet


def alive(pid):
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open("/proc/%d/stat" % pid) as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return True


def setup_logging():
    """Send specter's log to stdout, one line per record (an expected error shows no traceback)."""
    class OneLine(logging.Formatter):
        def format(self, record):
            text = "  log %s %s: %s" % (record.levelname, record.name, record.getMessage())
            if record.exc_info and record.exc_info[1] is not None:
                text += " [%s: %s]" % (type(record.exc_info[1]).__name__, record.exc_info[1])
            return text
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(OneLine())
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="probe, then SIGTERM itself after 0.5 s")
    parser.add_argument("--port", type=int, default=0, help="port to serve on (default: a free one)")
    parser.add_argument("--seconds", type=float, default=None, help="send SIGTERM to itself after N s")
    args = parser.parse_args()
    setup_logging()

    port = args.port or free_port()
    heartbeat = Heartbeat()
    app, socketio = create_app(heartbeat)
    manager = boot(app, socketio, services=[heartbeat], signals=True)
    sidecar = heartbeat.sidecar

    delay = 0.5 if args.once else args.seconds
    if args.once:
        gevent.spawn_later(0.25, probe, port)
    if delay is not None:
        gevent.spawn_later(delay, os.kill, os.getpid(), signal.SIGTERM)
        print("will send SIGTERM to pid %d in %.1f s" % (os.getpid(), delay))
    else:
        print("pid %d: press Ctrl-C or run `kill -TERM %d` to stop" % (os.getpid(), os.getpid()))

    print("serving on http://127.0.0.1:%d" % port)
    started = time.monotonic()
    manager.run(host="127.0.0.1", port=port)  # returns once a signal has shut everything down

    print("run() returned after %.2f s: booted=%s, heartbeat status=%s, on_stop ran %d time(s)"
          % (time.monotonic() - started, manager.booted, heartbeat.status, heartbeat.stops))
    manager.shutdown()  # idempotent: a second shutdown does nothing
    print("sidecar pid %d alive=%s, returncode=%r; on_stop still ran %d time(s)"
          % (sidecar.pid, alive(sidecar.pid), sidecar.returncode, heartbeat.stops))
    assert heartbeat.stops == 1 and not alive(sidecar.pid) and not manager.booted
    print("exiting with code 0")


if __name__ == "__main__":
    main()
