"""The bus, the registry, and structured results: EventBus, registry, Operation and Outcome.

The example shows:

* ``EventBus``: listeners run synchronously in subscription order; a
  listener that raises is logged and the others still run; subscribing
  twice keeps one registration; subscribing during an emit takes effect
  from the next emit; ``once``, ``off`` and the unsubscribe function; two
  buses are isolated from each other.
* ``registry``: ``provide``, ``require`` (a KeyError naming the known
  keys), ``resolve``, ``replace=True``; ``wait_for`` binding late to a
  value another greenlet provides, or timing out; entries provided with
  ``owner=`` a service disappear when that service stops.
* ``SPECTERRegistry`` (also exported as ``Registry``): ``registry`` is one
  instance of it; code that takes its registry as an argument can be wired
  with a private ``SPECTERRegistry()`` in a test, isolated from the global
  one.
* ``Operation`` / ``OperationError`` / ``Outcome``: ``run()`` always returns
  an Outcome, for a success, a refusal (with status and meta) and an
  unexpected crash (a generic 500; the details stay in the log).

Run:  python examples/registry_and_bus.py [--once]
      (the demo ends by itself in well under a second; --once is accepted so
      every example can be run the same way)
"""

import argparse
import logging
import sys

import gevent

from specter import (
    EventBus,
    Operation,
    OperationError,
    Outcome,
    Registry,
    Service,
    SPECTERRegistry,
    bus,
    registry,
)


def bus_demo():
    print("== EventBus")
    jobs_bus = EventBus()
    chat_bus = EventBus()
    calls = []

    def first(data):
        calls.append("first")

    def broken(data):
        raise RuntimeError("listener bug")

    def late(data):
        calls.append("late")

    def third(data):
        calls.append("third")
        jobs_bus.on("job:done", late)  # subscribed during an emit: runs from the next emit

    jobs_bus.on("job:done", first)
    jobs_bus.on("job:done", broken)
    jobs_bus.on("job:done", third)
    jobs_bus.on("job:done", first)  # already subscribed: still one registration
    jobs_bus.once("job:done", lambda data: calls.append("once"))
    chat_calls = []
    chat_bus.on("job:done", lambda data: chat_calls.append("chat bus"))

    jobs_bus.emit("job:done", {"id": 1})
    print("emit 1 ran: %s  (subscription order; 'broken' raised and was logged)" % calls)
    calls.clear()
    jobs_bus.emit("job:done", {"id": 2})
    print("emit 2 ran: %s  ('once' is gone, 'late' joined)" % calls)
    assert calls == ["first", "third", "late"]

    calls.clear()
    jobs_bus.off("job:done", broken)
    unsubscribe = jobs_bus.on("job:failed", lambda data: calls.append("failed"))
    unsubscribe()
    jobs_bus.emit("job:failed")
    print("emit('job:failed') after its unsubscribe() ran: %s; has_listeners('job:failed') -> %s"
          % (calls, jobs_bus.has_listeners("job:failed")))
    jobs_bus.emit("job:done", {"id": 3})
    print("emit 3 after off(broken) ran: %s, no error logged; listener_count('job:done') -> %d"
          % (calls, jobs_bus.listener_count("job:done")))
    print("the other bus has its own listener, which none of these emits reached: %s"
          % ("chat bus" not in calls and chat_calls == []))
    chat_bus.emit("job:done")
    print("chat_bus.emit('job:done') reached only its own listener: %s" % chat_calls)
    jobs_bus.clear()
    print("after clear(): %d listeners" % jobs_bus.listener_count())


class JobStore(Service):
    """Provides itself as 'jobs.store' for as long as it runs."""

    name = "job-store"

    def on_start(self):
        self.jobs = {}
        registry.provide("jobs.store", self, owner=self)


def registry_demo():
    print("\n== registry")
    registry.provide("config", {"region": "eu-west", "retries": 3})
    registry.provide("feature.flags", {})  # a falsy value, provided on purpose
    print("require('config') -> %s" % registry.require("config"))
    print("require('feature.flags') -> %r (falsy values are values)" % registry.require("feature.flags"))
    print("resolve('mailer') -> %r (optional dependencies resolve to None)" % registry.resolve("mailer"))
    try:
        registry.require("mailer")
    except KeyError as exc:
        print("require('mailer') -> KeyError: %s" % exc.args[0])
    try:
        registry.provide("config", {})
    except KeyError as exc:
        print("provide('config') again -> KeyError: %s" % exc.args[0])
    registry.provide("config", {"region": "us-east", "retries": 5}, replace=True)
    print("after replace=True: %s" % registry.require("config"))

    print("-- late binding with wait_for")
    waiter = gevent.spawn(registry.wait_for, "mailer", timeout=2)
    gevent.spawn_later(0.1, registry.provide, "mailer", "smtp://mail.internal")
    print("a greenlet waits for 'mailer'; another provides it 0.1 s later; the waiter got %r"
          % waiter.get(timeout=3))
    try:
        registry.wait_for("sms", timeout=0.05)
    except TimeoutError as exc:
        print("wait_for('sms', timeout=0.05) -> TimeoutError: %s" % exc)

    print("-- owner-scoped entries")
    store = JobStore().start()
    print("JobStore running: has('jobs.store') -> %s; keys: %s"
          % (registry.has("jobs.store"), registry.list()))
    store.stop()
    print("JobStore stopped: has('jobs.store') -> %s; keys: %s"
          % (registry.has("jobs.store"), registry.list()))
    assert not registry.has("jobs.store")
    registry.clear()


def send_welcome(user, services=registry):
    """Feature code that takes its registry as an argument: the global one unless told otherwise."""
    mailer = services.require("mailer")
    return mailer("Welcome, %s!" % user)


def private_registry_demo():
    print("\n== SPECTERRegistry: a private registry for isolated wiring")
    print("Registry is SPECTERRegistry -> %s; the global registry is one: isinstance -> %s"
          % (Registry is SPECTERRegistry, isinstance(registry, SPECTERRegistry)))
    sent = []

    def fake_mailer(text):
        sent.append(text)
        return "queued"

    test_services = SPECTERRegistry()  # a test's own composition root
    test_services.provide("mailer", fake_mailer)
    print("send_welcome('ana', services=test_services) -> %r; the fake mailer recorded %s"
          % (send_welcome("ana", services=test_services), sent))
    print("the global registry never saw it: has('mailer') -> %s; keys: %s"
          % (registry.has("mailer"), registry.list()))
    try:
        send_welcome("bob")  # the default: the global registry, where nothing is provided
    except KeyError as exc:
        print("send_welcome('bob') on the global registry -> KeyError: %s" % exc.args[0])
    worker = JobStore().start()  # provides itself in the *global* registry, owned by itself
    scoped = Registry()
    scoped.provide("jobs.store", worker, owner=worker)  # owner= works on any registry
    worker.stop()
    print("owner-scoped entries leave every registry: global has('jobs.store') -> %s, private -> %s"
          % (registry.has("jobs.store"), scoped.has("jobs.store")))
    assert sent == ["Welcome, ana!"] and not registry.has("mailer") and not scoped.has("jobs.store")
    test_services.clear()


class ScheduleJob(Operation):
    """Schedule a job: refuse bad input with OperationError, crash on a 'boom' job."""

    def validate(self, name, delay):
        if not name:
            raise OperationError("A job needs a name", status=422, meta={"field": "name"})
        if delay < 0:
            raise OperationError("delay must be 0 or more", meta={"field": "delay", "given": delay})

    def perform(self, name, delay):
        if name == "boom":
            raise ZeroDivisionError("a bug in perform()")
        if delay > 3600:
            return self.failure("Too far in the future", status=409, limit=3600)
        return {"job": name, "runs_in": delay}


def operation_demo():
    print("\n== Operation, OperationError, Outcome")
    operation = ScheduleJob()
    for name, delay in (("backup", 30), ("", 5), ("report", -1), ("archive", 7200), ("boom", 0)):
        outcome = operation.run(name, delay)
        print("run(%r, %r) -> %r" % (name, delay, outcome))
        print("    to_dict() -> %s" % outcome.to_dict())
    ok = operation.run("backup", 30)
    print("to_tuple() -> %s; unwrap() -> %s; bool -> %s" % (ok.to_tuple(), ok.unwrap(), bool(ok)))
    try:
        operation.run("", 0).unwrap()
    except RuntimeError as exc:
        print("unwrap() of a failure -> RuntimeError: %s" % exc)
    made = Outcome.success({"id": 7}, status=201, location="/jobs/7")
    print("Outcome.success(..., status=201, location=...) -> %s" % made.to_dict())
    try:
        made.status = 200
    except AttributeError as exc:
        print("outcomes are immutable: %s" % exc)


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
    logging.basicConfig(level=logging.WARNING, handlers=[handler])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="accepted for uniformity; the demo is short")
    parser.parse_args()
    setup_logging()
    bus_demo()
    registry_demo()
    private_registry_demo()
    operation_demo()
    print("\nthe module-level bus has %d listeners left" % bus.listener_count())


if __name__ == "__main__":
    main()
