"""A notes app in the Flask app-factory style: a module-level manager that create_app() binds.

The example shows:

* ``manager = ServiceManager(probes=True, block_threshold=...)`` made at
  import time, before any app exists, with a controller and two services
  registered on it; ``create_app()`` builds the Flask app and its SocketIO
  and calls ``manager.init_app(app, socketio)``, which mounts the
  controller's routes, adds ``/livez`` and ``/readyz`` and the
  ``flask specter`` commands.
* Background work in the application context: ``NoteWriter`` (a
  QueueService) opens a "database connection" in ``flask.g`` per item and
  a ``teardown_appcontext`` handler closes it after each one; ``Digest``
  reads ``current_app.config`` on every interval tick.
* ``flask specter routes`` and ``flask specter schemas note``, run through
  Flask's CLI runner.
* The probes through a lifecycle: 503 before boot, 200 once booted, 503
  ("stopping") while the shutdown is under way, 503 ("stopped") after it.
* gevent's loop monitor catching a ``time.sleep`` in a view: a warning with
  the stack on ``specter.loop``, ``health()['loop']``, a ``'loop:blocked'``
  bus event, and ``/livez`` answering 503 right after the block.

With --once everything is driven in-process (Flask's test client and CLI
runner, Flask-SocketIO's test client) and printed. Without it the app is
served on http://127.0.0.1:5002 by ``manager.run()`` until Ctrl-C or SIGTERM;
the same app runs from the command line with
``flask --app examples/factory_app.py specter run --port 5002``.

Run:  python examples/factory_app.py --once
      python examples/factory_app.py [--port 5002]
      flask --app examples/factory_app.py specter routes
"""

import argparse
import json
import logging
import sys
import time

import flask
import gevent
from flask_socketio import SocketIO

from specter import (
    Controller,
    Field,
    QueueService,
    Schema,
    Service,
    ServiceManager,
    bus,
    json_endpoint,
)

BLOCK_THRESHOLD = 0.2  # seconds the event loop may be held before it is reported

# The extension, made at import time ###########################################

manager = ServiceManager(probes=True, block_threshold=BLOCK_THRESHOLD)


class NoteWriter(QueueService):
    """Saves each note through a per-item "connection" kept in flask.g."""

    name = "note_writer"

    def on_start(self):
        self.saved = []

    def handle_item(self, note):
        get_db().append(note)  # the same connection for the whole item
        self.saved.append(note)


class Digest(Service):
    """Every tick reads the app's config: the tick runs in the app context."""

    name = "digest"

    def on_start(self):
        self.ticks = 0
        self.titles = set()
        self.interval(self.tick, 0.05)

    def tick(self):
        self.ticks += 1
        self.titles.add(flask.current_app.config["DIGEST_TITLE"])


class Notes(Controller):
    name = "notes"
    url_prefix = "/notes"
    schemas = {"note": Schema("note", {"text": Field(str, required=True, min_length=1, max_length=200)})}

    def __init__(self, writer):
        super().__init__()
        self.writer = writer  # handed in: the manager registers both before any app exists

    def on_start(self):
        self.notes = self.create_store("notes.items", {"items": []})

    def build_routes(self, router):
        @router.route("/")
        def listing():
            return {"notes": self.notes.get("items")}

        @router.route("/", methods=["POST"], json_errors="Could not save the note")
        def add():
            return self.add(self.schema("note").require(flask.request.get_json(silent=True))), 201

        @router.route("/schema")
        def schema():
            return self.schema("note").to_json_schema()

    def build_events(self, handler):
        handler.on("add_note", self.audit, priority=10)
        handler.on("add_note", self.add_from_socket, priority=50, schema=self.schema("note"))

    def add(self, note):
        self.notes.update(lambda draft: draft["items"].append(note["text"]))
        self.writer.enqueue(note["text"])
        return note

    def audit(self, payload):
        print("    audit (priority 10) saw %s" % json.dumps(payload))

    def add_from_socket(self, note):
        return {"saved": self.add(note)}


class Farewell(Service):
    """Registered first, so it stops last: it looks at /readyz while the shutdown is under way."""

    name = "farewell"

    def on_stop(self):
        response = flask.current_app.test_client().get("/readyz")  # on_stop runs in the app context
        print("during shutdown: GET /readyz -> %d %s" % (response.status_code, response.get_json()["status"]))


manager.register_service(Farewell())
writer = NoteWriter()
manager.register_service(writer)
digest = Digest()
manager.register_service(digest)
manager.register_controller(Notes(writer))  # no app yet: mounted by init_app()


# The factory ##################################################################

CONNECTIONS = {"opened": 0, "closed": 0}


def get_db():
    """A per-context "connection", as Flask-SQLAlchemy keeps its session."""
    if "db" not in flask.g:
        flask.g.db = []
        CONNECTIONS["opened"] += 1
    return flask.g.db


def close_db(exc):
    if flask.g.pop("db", None) is not None:
        CONNECTIONS["closed"] += 1


def create_app(config=None):
    app = flask.Flask(__name__)
    app.config.update(DIGEST_TITLE="Today's notes", **(config or {}))
    app.teardown_appcontext(close_db)
    socketio = SocketIO(app, async_mode="gevent")

    @app.get("/status")
    @json_endpoint("Could not read the status")
    def status():
        health = manager.health()
        return {"status": health["status"], "loop": health["loop"]["blocked"]}

    @app.get("/slow")
    def slow():
        time.sleep(2 * BLOCK_THRESHOLD + 0.1)  # a blocking call: every greenlet waits for it
        return {"slept": True}

    manager.init_app(app, socketio)
    return app


# Demo #########################################################################

def show(http, method, url, **kwargs):
    response = http.open(url, method=method, **kwargs)
    print("%-5s %-10s -> %d %s" % (method, url, response.status_code, json.dumps(response.get_json())))
    return response


def demo():
    app = create_app()
    runner = app.test_cli_runner()
    print("== flask specter routes")
    print(runner.invoke(args=["specter", "routes"]).output)
    print("== flask specter schemas note")
    print(runner.invoke(args=["specter", "schemas", "note"]).output)

    http = app.test_client()
    print("== probes before boot")
    assert show(http, "GET", "/readyz").status_code == 503
    show(http, "GET", "/livez")

    manager.boot()
    print("\n== booted")
    assert show(http, "GET", "/readyz").status_code == 200
    show(http, "POST", "/notes/", json={"text": "buy milk"})
    show(http, "POST", "/notes/", json={"text": ""})
    client = manager.socketio.test_client(app)
    print("emit  add_note -> ack %s" % json.dumps(client.emit("add_note", {"text": "call ada"}, callback=True)))
    client.disconnect()
    show(http, "GET", "/notes/")
    writer.join(timeout=2.0)
    gevent.sleep(0.12)
    print("note_writer saved %s; connections opened %d, closed %d (one per item)"
          % (writer.saved, CONNECTIONS["opened"], CONNECTIONS["closed"]))
    print("digest ticked %d times, each seeing current_app.config: %s" % (digest.ticks, sorted(digest.titles)))
    assert CONNECTIONS["opened"] == CONNECTIONS["closed"] == len(writer.saved) == 2

    print("\n== a blocking call in a view (time.sleep, not monkey-patched)")
    seen = []
    bus.on("loop:blocked", seen.append)
    show(http, "GET", "/slow")
    assert show(http, "GET", "/livez").status_code == 503  # answered right after the block
    gevent.sleep(0.05)
    loop = manager.health()["loop"]
    print("health()['loop']: blocked=%d longest=%.2f s; 'loop:blocked' events: %d"
          % (loop["blocked"], loop["longest"], len(seen)))
    gevent.sleep(2 * BLOCK_THRESHOLD)
    show(http, "GET", "/livez")
    show(http, "GET", "/status")

    print("\n== shutdown")
    manager.shutdown()
    show(http, "GET", "/readyz")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--once", action="store_true", help="drive the app in-process and exit")
    parser.add_argument("--port", type=int, default=5002)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(levelname)s %(name)s: %(message)s")
    if args.once:
        demo()
        return
    create_app()
    print("serving on http://127.0.0.1:%d (probes at /livez and /readyz; Ctrl-C to stop)" % args.port)
    manager.run(host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
