"""A Flask + Flask-SocketIO chat app built from a Controller, a Router, a Handler and a provider.

The example shows:

* ``ChatController``: declared ``schemas``; HTTP routes added in
  ``build_routes`` with ``router.route(..., json_errors=...)`` that validate
  with ``schema.require`` and return ``Outcome``s; socket events added in
  ``build_events`` with ``handler.on(..., priority=..., schema=...)``; an
  owned ``create_model`` and ``create_store``; ``service('moderation')``
  resolving a provider; 503 on its routes once it is stopped.
* A plain Flask route using ``json_endpoint``, ``expect_json``,
  ``require_fields`` and ``HTTPError``.
* ``StatusRouter``: a ``Router`` subclass with ``@route`` class routes.
* ``PresenceHandler``: a ``Handler`` subclass with an ``events`` mapping;
  members keyed by ``request.sid``, rooms joined with ``join_room``, and a
  ``disconnect`` event that forgets a closed connection.
* A subscriber added straight on the ``SocketIngress`` with ``schema=``.
* ``boot(app, socketio, ..., providers=..., signals=False)``.
* The same wiring by hand (``wire_by_hand``): ``ServiceManager(app,
  socketio, signals=False)``, ``register_service``, ``register_controller``,
  ``register_handler``, then ``manager.boot(providers=...)``; nothing starts
  before ``boot()``. On that app, ``manager.socket_ingress.dispatch(...)``
  drives a socket event from server-side code (no client), and the message
  contract is served as JSON Schema (``Schema.to_json_schema()``).

With --once the app is driven in-process with Flask's test_client and
Flask-SocketIO's test_client, and every response and ack is printed; then a
second app, wired by hand, is driven the same way.
Without it the app is served on http://127.0.0.1:5001 by ``manager.run()``
(Ctrl-C to stop, or --seconds N to stop by itself).

Run:  python examples/controller_app.py --once
      python examples/controller_app.py [--port 5001] [--seconds N]
"""

import argparse
import json
import logging
import sys

import gevent
from flask import Flask, request
from flask_socketio import SocketIO, join_room, leave_room

from specter import (
    Controller,
    Field,
    Handler,
    HTTPError,
    Outcome,
    Router,
    Schema,
    Service,
    ServiceManager,
    SocketIngress,
    boot,
    expect_json,
    json_endpoint,
    require_fields,
    route,
)

# Contracts ####################################################################

message_schema = Schema("message", {
    "room": Field(str, required=True, pattern=r"[a-z0-9-]{1,32}"),
    "text": Field(str, required=True, min_length=1, max_length=280),
    "author": Field(str, default="anonymous", max_length=40),
})

typing_schema = Schema("typing", {
    "room": Field(str, required=True),
    "author": Field(str, required=True, min_length=1),
})


# A provider ###################################################################

class Moderation(Service):
    """Refuses messages with banned words; controllers reach it with service('moderation')."""

    name = "moderation"
    banned = ("spam", "scam")

    def on_start(self):
        self.set_state({"refused": 0})

    def review(self, text):
        """None when ``text`` may be posted, else the reason it may not."""
        for word in self.banned:
            if word in text.lower():
                self.set_state({"refused": self.state["refused"] + 1})
                return "contains the banned word %r" % word
        return None


# The feature ##################################################################

class ChatController(Controller):
    """Rooms of messages, over HTTP and Socket.IO, under one lifecycle."""

    name = "chat"
    schemas = {"message": message_schema}

    def on_start(self):
        self.rooms = self.create_model("chat.rooms", {"rooms": {}})  # destroyed when chat stops
        self.stats = self.create_store("chat.stats", {"posted": 0})
        self.moderation = self.service("moderation")  # the provider, resolved by key

    def build_routes(self, router):
        @router.route("/rooms/<room>/messages", methods=["POST"], json_errors="Could not post the message")
        def post_message(room):
            # expect_json and schema.require raise HTTPError; json_errors turns them into 4xx JSON.
            message = self.schema("message").require(dict(expect_json(), room=room))
            return self.post(message)

        @router.route("/rooms/<room>/messages")
        def list_messages(room):
            return Outcome.success(self.rooms.get(("rooms", room), []), room=room)

        @router.route("/schemas/message")
        def message_contract():
            return self.schema("message").to_json_schema()  # clients can validate before sending

    def build_events(self, handler):
        handler.on("send_message", self.audit, priority=10)  # runs first, sees the raw payload
        handler.on("send_message", self.on_send_message, priority=50, schema=self.schema("message"))

    def post(self, message):
        """Store and broadcast ``message``; an Outcome either way."""
        reason = self.moderation.review(message["text"])
        if reason:
            return Outcome.failure("Message refused: %s" % reason, status=422, room=message["room"])
        self.rooms.update(lambda draft: draft["rooms"].setdefault(message["room"], []).append(message))
        self.stats.update(lambda draft: draft.update(posted=draft["posted"] + 1))
        self.socketio.emit("new_message", message, to=message["room"])
        return Outcome.success(message, status=201)

    def audit(self, payload):
        print("    audit (priority 10) saw the raw payload %s" % json.dumps(payload))

    def on_send_message(self, message):
        return self.post(message).to_dict()  # the last non-None result is the client's ack


class PresenceHandler(Handler):
    """Who is in which room: an ``events`` mapping of socket events to methods.

    Members are keyed by ``request.sid``, the connection's id. A client that
    closes its tab never sends 'leave', so 'disconnect' forgets the
    connection in every room (Flask-SocketIO empties its own rooms; this
    dict is ours to clean).
    """

    name = "presence"
    events = {"join": "on_join", "leave": "on_leave", "disconnect": "on_disconnect"}
    event_priorities = {"join": 10}

    def on_setup(self):
        self.members = {}

    def on_join(self, data):
        room = data["room"]
        join_room(room)
        self.members.setdefault(room, set()).add(request.sid)
        return {"joined": room, "members": len(self.members[room])}

    def on_leave(self, data):
        room = data["room"]
        leave_room(room)
        self.forget(request.sid, [room])
        return {"left": room}

    def on_disconnect(self):
        self.forget(request.sid, list(self.members))

    def forget(self, sid, rooms):
        for room in rooms:
            members = self.members.get(room, set())
            members.discard(sid)
            if not members:
                self.members.pop(room, None)  # an empty room is no room


class StatusRouter(Router):
    """Read-only status pages: class routes marked with @route."""

    url_prefix = "/status"

    def on_mount(self):
        print("StatusRouter mounted at %s" % self.url_prefix)

    def on_unmount(self):
        print("StatusRouter unmounted (teardown ran as a cleanup of the manager)")

    @route("/")
    def index(self):
        manager = self.require("service_manager")
        return {"booted": manager.booted, "services": list(manager.health()["services"])}

    @route("/services/<name>", json_errors="Could not read the service status")
    def service_status(self, name):
        health = self.require("service_manager").health()["services"].get(name)  # keyed by name
        if health is None:
            return Outcome.failure("No service named %r" % name, status=404)
        return Outcome.success({"status": health["status"], "errors": health["errors"]})


# The app ######################################################################

def create_app():
    app = Flask(__name__)
    socketio = SocketIO(app, async_mode="gevent")

    @app.post("/api/feedback")
    @json_endpoint("Could not record the feedback")
    def feedback():
        payload = expect_json(error="Send a JSON object with 'rating' and 'comment'")
        require_fields(payload, ["rating", "comment"])  # blank strings count as missing
        rating = payload["rating"]
        if isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5:
            raise HTTPError("rating must be a whole number from 1 to 5", 422, payload={"field": "rating"})
        return {"thanks": True, "rating": rating}, 201

    return app, socketio


def wire(app, socketio):
    """The composition root: mount, register and boot everything; returns (manager, chat)."""
    chat = ChatController()
    chat.build_blueprint(url_prefix="/chat")  # built once; boot() registers this blueprint
    router = StatusRouter().register(app)
    manager = boot(app, socketio, controllers=[chat], handlers=[PresenceHandler()],
                   providers={"moderation": Moderation()}, signals=False)
    manager.add_cleanup(router.teardown)  # the router is torn down when the manager stops

    def on_typing(data):
        socketio.emit("typing", data, to=data["room"], include_self=False)
        return {"ok": True}
    # Straight on the ingress: invalid payloads never reach on_typing.
    manager.socket_ingress.subscribe("typing", on_typing, priority=5, schema=typing_schema)
    return manager, chat


def wire_by_hand(app, socketio):
    """What wire() does with boot(), as explicit ServiceManager calls; returns (manager, chat).

    Registration only records things (and mounts the controller's blueprint);
    ``manager.boot()`` provides the registry keys, starts the services in
    registration order and sets up the handlers.
    """
    manager = ServiceManager(app, socketio, signals=False)
    moderation, chat, presence = Moderation(), ChatController(), PresenceHandler()
    (manager.register_service(moderation)  # registered first: started first
     .register_controller(chat, url_prefix="/chat")
     .register_handler(presence))  # each register_* returns the manager
    print("registered, before boot(): moderation=%s chat=%s presence.registered=%s booted=%s"
          % (moderation.status, chat.status, presence.registered, manager.booted))
    manager.boot(providers={"moderation": moderation})  # also provided under a key, for service()
    print("after boot(): moderation=%s chat=%s presence.registered=%s booted=%s; "
          "chat.service('moderation') is moderation -> %s"
          % (moderation.status, chat.status, presence.registered, manager.booted,
             chat.service("moderation") is moderation))
    return manager, chat


# Demo #########################################################################

def show_http(http, method, url, **kwargs):
    response = http.open(url, method=method, **kwargs)
    print("%-6s %-32s -> %d %s" % (method, url, response.status_code,
                                   json.dumps(response.get_json(silent=True))))
    return response


def show_ack(client, event, payload):
    ack = client.emit(event, payload, callback=True)
    answer = "ack %s" % json.dumps(ack) if ack not in (None, []) else "no answer (ack carries no value)"
    print("emit   %-12s %-40s -> %s" % (event, json.dumps(payload), answer))
    return ack


def demo(app, socketio, manager, chat):
    http = app.test_client()
    alice = socketio.test_client(app)
    bob = socketio.test_client(app)

    print("\n== HTTP: controller routes (schema-validated, Outcome returns)")
    show_http(http, "POST", "/chat/rooms/general/messages", json={"text": "hello", "author": "ana"})
    invalid = show_http(http, "POST", "/chat/rooms/general/messages", json={"text": "", "author": 42 * "x"})
    show_http(http, "POST", "/chat/rooms/general/messages", data="not json", content_type="application/json")
    show_http(http, "POST", "/chat/rooms/general/messages", json={"text": "cheap spam here"})
    show_http(http, "GET", "/chat/rooms/general/messages")
    assert invalid.status_code == 400

    print("\n== HTTP: a plain Flask route with json_endpoint / expect_json / require_fields / HTTPError")
    show_http(http, "POST", "/api/feedback")
    show_http(http, "POST", "/api/feedback", json={"rating": 5, "comment": "   "})
    show_http(http, "POST", "/api/feedback", json={"rating": 9, "comment": "great"})
    show_http(http, "POST", "/api/feedback", json={"rating": 5, "comment": "great"})

    print("\n== HTTP: Router subclass with @route class routes")
    show_http(http, "GET", "/status/")
    show_http(http, "GET", "/status/services/chat")
    show_http(http, "GET", "/status/services/billing")

    print("\n== Socket.IO: a Handler subclass, prioritised subscribers, schema= on subscriptions")
    show_ack(alice, "join", {"room": "general"})
    show_ack(bob, "join", {"room": "general"})
    show_ack(alice, "send_message", {"room": "general", "text": "hi bob", "author": "alice"})
    invalid_ack = show_ack(alice, "send_message", {"room": "General!", "text": ""})
    show_ack(bob, "typing", {"room": "general", "author": "bob"})
    show_ack(bob, "typing", {"room": "general"})
    for name, client in (("alice", alice), ("bob", bob)):
        events = ["%s %s" % (e["name"], json.dumps(e["args"][0])) for e in client.get_received()]
        print("%s received: %s" % (name, events))
    assert invalid_ack["status"] == 400

    print("\n== Socket.IO: bob disconnects without 'leave'; 'disconnect' takes him out of the room")
    bob.disconnect()
    carol = socketio.test_client(app)
    joined = show_ack(carol, "join", {"room": "general"})
    assert joined["members"] == 2, "alice and carol, not bob"
    carol.disconnect()

    print("\n== health and provider state")
    health = chat.health()
    print("chat: status=%s schemas=%s has_blueprint=%s has_handler=%s resources=%s"
          % (health["status"], health["schemas"], health["has_blueprint"], health["has_handler"],
             [r["name"] for r in health["resources"]]))
    print("moderation state: %s; chat stats: %s" % (chat.service("moderation").get_state(), chat.stats.get()))

    print("\n== chat.stop(): its routes answer 503 and its socket events are not delivered")
    chat.stop()
    stopped = show_http(http, "POST", "/chat/rooms/general/messages", json={"text": "anyone?"})
    show_ack(alice, "send_message", {"room": "general", "text": "anyone?"})
    show_http(http, "GET", "/status/services/chat")
    assert stopped.status_code == 503

    alice.disconnect()
    manager.shutdown()
    print("\nshutdown: booted=%s, manager status=%s" % (manager.booted, manager.status))


def demo_by_hand(app, socketio, manager, chat):
    http = app.test_client()

    print("\n== the message contract as JSON Schema: GET /chat/schemas/message")
    contract = http.get("/chat/schemas/message").get_json()
    print(json.dumps(contract, indent=2))
    assert contract == message_schema.to_json_schema() and contract["required"] == ["room", "text"]

    print("\n== SocketIngress.dispatch: a socket event driven from server-side code")
    ingress = manager.socket_ingress  # the one SocketIngress every handler of this app goes through
    print("manager.socket_ingress is a SocketIngress: %s; events: %s"
          % (isinstance(ingress, SocketIngress), ingress.health()["events"]))
    carol = socketio.test_client(app)
    show_ack(carol, "join", {"room": "ops"})
    # A cron job or a webhook can reuse the event's whole pipeline (priorities, schema, ack):
    ack = ingress.dispatch("send_message", {"room": "ops", "text": "deploy finished", "author": "ci-bot"})
    print("dispatch('send_message', valid)   -> %s" % json.dumps(ack))
    refused = ingress.dispatch("send_message", {"room": "ops"})
    print("dispatch('send_message', invalid) -> %s" % json.dumps(refused))
    print("dispatch('no_such_event') -> %r (no subscribers)" % ingress.dispatch("no_such_event"))
    received = ["%s %s" % (e["name"], json.dumps(e["args"][0])) for e in carol.get_received()]
    print("carol, in room 'ops', received: %s" % received)
    assert ack["ok"] and ack["status"] == 201 and refused["status"] == 400
    assert [e.split()[0] for e in received] == ["new_message"]

    carol.disconnect()
    manager.shutdown()
    print("\nshutdown: booted=%s, chat status=%s" % (manager.booted, chat.status))


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
    logging.getLogger("werkzeug").setLevel(logging.WARNING)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="drive the app with test clients and exit")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--seconds", type=float, default=None, help="serve this long, then shut down")
    args = parser.parse_args()
    setup_logging()

    app, socketio = create_app()
    manager, chat = wire(app, socketio)
    if args.once:
        demo(app, socketio, manager, chat)
        print("\n== a second app, wired by hand: ServiceManager + register_* + boot()")
        app, socketio = create_app()
        demo_by_hand(app, socketio, *wire_by_hand(app, socketio))
        return
    if args.seconds is not None:
        gevent.spawn_later(args.seconds, manager.shutdown)
    print("serving on http://127.0.0.1:%d (try: curl -X POST -H 'Content-Type: application/json' "
          "-d '{\"text\": \"hi\"}' http://127.0.0.1:%d/chat/rooms/general/messages)" % (args.port, args.port))
    try:
        manager.run(host="127.0.0.1", port=args.port)
    except KeyboardInterrupt:
        print("interrupted; run() already shut everything down")


if __name__ == "__main__":
    main()
