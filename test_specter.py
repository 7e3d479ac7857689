"""Tests for specter.py, in the module's section order.

Run with ``python -m unittest test_specter -v``. Standard-library unittest
only; nothing here monkey-patches. Waits are bounded: events, or
``gevent.sleep`` polling up to a deadline, never ``time.sleep``.
"""

import ast
import atexit
import collections
import contextlib
import decimal
import functools
import gc
import glob
import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest
import urllib.error
import urllib.request
from unittest import mock

import flask
import gevent
import gevent.event
import gevent.monkey
import gevent.queue
import gevent.subprocess
import greenlet
import redis
import socketio
import werkzeug.exceptions
from flask import Flask, abort, request
from flask_socketio import SocketIO
from gevent import pywsgi

import specter
from specter import (
    boot,
    Cache,
    Controller,
    create_cache,
    create_model,
    create_store,
    EventBus,
    expect_json,
    Field,
    Handler,
    HTTPError,
    json_endpoint,
    Model,
    Operation,
    OperationError,
    Outcome,
    QueueService,
    require_fields,
    route,
    Router,
    Schema,
    SchemaError,
    Service,
    ServiceManager,
    SocketIngress,
    SPECTERRegistry,
    Store,
)

HERE = os.path.dirname(os.path.abspath(__file__))

# Timing constants, in seconds. Everything time-based is bounded by these.
TEST_CEILING = 10  # hard per-test limit (gevent.Timeout armed in setUp)
WAIT = 2.0  # default bound of wait_until
STEP = 0.005  # polling step of wait_until
SHORT = 0.05  # a short delay or TTL
LONG = 30  # "forever" for greenlets that must be killed

# Every public name of API.md section 0.
API_NAMES = [
    "EventBus", "bus", "SPECTERRegistry", "Registry", "registry",
    "Service", "QueueService", "Watcher", "WatcherError",
    "Store", "create_store", "Model", "create_model", "Cache", "create_cache",
    "Field", "Schema", "SchemaError", "Outcome", "Operation", "OperationError",
    "HTTPError", "json_endpoint", "expect_json", "require_fields",
    "Router", "route", "Handler", "SocketIngress", "Controller",
    "ServiceManager", "boot", "ManagedProcess", "start_process",
    "Cluster", "ClusterQueue", "Lease",
]


# Helpers ######################################################################


def wait_until(predicate, timeout=WAIT, step=STEP):
    """Poll ``predicate`` cooperatively until it is truthy or ``timeout`` passes.

    Returns the predicate's last value, so callers can assert on it.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        gevent.sleep(step)


def live_greenlets():
    """Every greenlet in the process that is not dead, keyed by id.

    The returned dict holds references, so ids stay unique while it lives.
    """
    return {
        id(o): o
        for o in gc.get_objects()
        if isinstance(o, greenlet.greenlet) and not o.dead
    }


def new_live_greenlets(before):
    """Greenlets alive now that were not alive in ``before``."""
    return [g for key, g in live_greenlets().items() if key not in before]


class Recorder:
    """A callable that records the positional arguments of every call."""

    def __init__(self, result=None, side_effect=None):
        self.calls = []
        self.kwargs = []
        self.greenlets = []
        self.result = result
        self.side_effect = side_effect

    def __call__(self, *args, **kwargs):
        self.calls.append(args)
        self.kwargs.append(kwargs)
        self.greenlets.append(gevent.getcurrent())
        if self.side_effect is not None:
            return self.side_effect(*args, **kwargs)
        return self.result

    @property
    def count(self):
        return len(self.calls)

    @property
    def firsts(self):
        """The first positional argument of every call."""
        return [args[0] if args else None for args in self.calls]


def make_resource(log, *methods, **attributes):
    """An object whose named methods append ``(resource, method)`` to ``log``."""
    namespace = dict(attributes)
    for method in methods:
        namespace[method] = (lambda name: lambda self: log.append((self, name)))(method)
    return type("Resource", (), namespace)()


def deep_list(depth):
    """``[[[...]]]`` nested ``depth`` levels, built without recursion."""
    value = []
    for _ in range(depth):
        value = [value]
    return value


def deep_dict(depth):
    """``{'k': {'k': ...}}`` nested ``depth`` levels, built without recursion."""
    value = {}
    for _ in range(depth):
        value = {"k": value}
    return value


def yield_a_few(version):
    """Yield 0-2 times depending on ``version``, so delivery rounds overlap unevenly."""
    for _ in range(version % 3):
        gevent.sleep(0)


class Sink(QueueService):
    """A QueueService that records handled items; optional delay and failures."""

    def __init__(self, name="sink", *, delay=0.0, fail_on=(), gate=None, **kwargs):
        super().__init__(name, **kwargs)
        self.handled = []
        self.started_items = []
        self.delay = delay
        self.fail_on = set(fail_on)
        self.gate = gate
        self.active = 0
        self.peak = 0

    def handle_item(self, item):
        self.started_items.append(item)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if self.gate is not None:
                self.gate.wait(WAIT)
            if self.delay:
                gevent.sleep(self.delay)
            if item in self.fail_on:
                raise ValueError("cannot handle %r" % (item,))
            self.handled.append(item)
        finally:
            self.active -= 1


class SpecterTestCase(unittest.TestCase):
    """Clears the module singletons and arms a per-test time ceiling (``ceiling`` seconds)."""

    ceiling = TEST_CEILING

    def setUp(self):
        specter.bus.clear()
        specter.registry.clear()
        timer = gevent.Timeout.start_new(
            self.ceiling, AssertionError("test exceeded %ds" % self.ceiling)
        )
        self.addCleanup(timer.close)

    def started(self, service):
        """Start ``service`` and stop it when the test ends."""
        self.addCleanup(service.stop)
        return service.start()

    def assertEventually(self, predicate, timeout=WAIT, msg=None):
        value = wait_until(predicate, timeout)
        if not value:
            self.fail(msg or "condition not met within %.2fs" % timeout)
        return value

    def assertNoNewGreenlets(self, before, msg=None):
        leftovers = new_live_greenlets(before)
        self.assertEqual(leftovers, [], msg or "greenlets still alive: %r" % (leftovers,))

    def assertLoggedException(self, cm, text):
        """``cm`` (from assertLogs) holds a record with a traceback mentioning ``text``."""
        for record in cm.records:
            if record.exc_info and text in str(record.exc_info[1]):
                return
            if text in record.getMessage() and record.exc_info:
                return
        self.fail("no log record with a traceback mentioning %r: %r" % (text, cm.output))


# Module #######################################################################


class TestModule(SpecterTestCase):
    def test_all_lists_every_public_name(self):
        for name in API_NAMES:
            with self.subTest(name=name):
                self.assertIn(name, specter.__all__)
                self.assertTrue(hasattr(specter, name), name)

    def test_all_has_only_public_names_once(self):
        self.assertEqual(len(specter.__all__), len(set(specter.__all__)))
        self.assertEqual(set(specter.__all__), set(API_NAMES))

    def test_registry_alias_and_singletons(self):
        self.assertIs(specter.Registry, specter.SPECTERRegistry)
        self.assertIsInstance(specter.bus, EventBus)
        self.assertIsInstance(specter.registry, SPECTERRegistry)

    def test_version_is_a_string_literal(self):
        with open(specter.__file__, encoding="utf-8") as source:
            tree = ast.parse(source.read())
        literals = [
            node.value.value
            for node in tree.body
            if isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ]
        self.assertEqual(literals, [specter.__version__])
        self.assertTrue(specter.__version__)

    def test_logs_use_the_specter_logger_with_lazy_formatting(self):
        bus = EventBus()
        bus.on("job:done", lambda data: TestService._raise("listener broke"))
        svc = self.started(Service("logger-check"))
        store = create_store("logged")
        store.subscribe(lambda snap, st: TestService._raise("subscriber broke"))
        with self.assertLogs("specter", "ERROR") as cm:
            bus.emit("job:done")
            svc.spawn(TestService._raise, "task broke").join(timeout=1)
            store.set({"a": 1})
        self.assertGreaterEqual(len(cm.records), 3)
        for record in cm.records:
            with self.subTest(message=record.getMessage()):
                self.assertTrue(record.name == "specter" or record.name.startswith("specter."))
                self.assertTrue(record.args, "message formatted eagerly: %r" % record.msg)
                self.assertIsNotNone(record.exc_info)

    def test_import_has_no_side_effects(self):
        script = r"""
import gc, json, logging, threading
import greenlet
root = logging.getLogger()
handlers_before = list(root.handlers)
level_before = root.level
import specter
import gevent, gevent.monkey
current = greenlet.getcurrent()
print(json.dumps({
    "patched": [m for m in ("socket", "threading", "time", "select", "ssl",
                            "subprocess", "os", "signal", "queue")
                if gevent.monkey.is_module_patched(m)],
    "saved": sorted(gevent.monkey.saved),
    "threads": threading.active_count(),
    "active_greenlets": sum(1 for o in gc.get_objects()
                            if isinstance(o, greenlet.greenlet) and o and o is not current),
    "gevent_greenlets": sum(1 for o in gc.get_objects() if isinstance(o, gevent.Greenlet)),
    "root_handlers_same": root.handlers == handlers_before,
    "root_level_same": root.level == level_before,
    "specter_handlers": [type(h).__name__ for h in logging.getLogger("specter").handlers
                         if not isinstance(h, logging.NullHandler)],
    "specter_level": logging.getLogger("specter").level,
}))
"""
        env = dict(os.environ, PYTHONPATH=HERE)
        proc = subprocess.run(
            [sys.executable, "-c", script], cwd=HERE, env=env,
            capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(proc.returncode, 0, proc.stderr)
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        self.assertEqual(report["patched"], [])
        self.assertEqual(report["saved"], [])
        self.assertEqual(report["threads"], 1)
        self.assertEqual(report["active_greenlets"], 0)
        self.assertEqual(report["gevent_greenlets"], 0)
        self.assertTrue(report["root_handlers_same"])
        self.assertTrue(report["root_level_same"])
        self.assertEqual(report["specter_handlers"], [])
        self.assertEqual(report["specter_level"], logging.NOTSET)
        self.assertEqual(proc.stderr.strip(), "")


# Bus ##########################################################################


class TestEventBus(SpecterTestCase):
    def setUp(self):
        super().setUp()
        self.bus = EventBus()

    def test_on_calls_callback_with_data(self):
        rec = Recorder()
        self.bus.on("job:done", rec)
        self.bus.emit("job:done", {"id": 1})
        self.bus.emit("job:done")
        self.assertEqual(rec.calls, [({"id": 1},), (None,)])

    def test_emit_is_synchronous_in_the_emitting_greenlet(self):
        rec = Recorder()
        self.bus.on("e", rec)
        self.assertIsNone(self.bus.emit("e", 1))
        self.assertEqual(rec.count, 1)  # before emit returned, without yielding
        self.assertIs(rec.greenlets[0], gevent.getcurrent())

    def test_listeners_run_in_subscription_order(self):
        order = []
        callbacks = [(lambda i: lambda data: order.append(i))(i) for i in range(40)]
        for cb in callbacks:
            self.bus.on("ordered", cb)
        self.bus.emit("ordered")
        self.assertEqual(order, list(range(40)))

    def test_same_callback_twice_keeps_one_registration(self):
        rec = Recorder()
        self.bus.on("e", rec)
        self.bus.on("e", rec)
        self.assertEqual(self.bus.listener_count("e"), 1)
        self.bus.emit("e")
        self.assertEqual(rec.count, 1)

    def test_duplicate_subscription_keeps_original_position(self):
        order = []
        first = lambda data: order.append("first")  # noqa: E731
        second = lambda data: order.append("second")  # noqa: E731
        self.bus.on("e", first)
        self.bus.on("e", second)
        self.bus.on("e", first)
        self.bus.emit("e")
        self.assertEqual(order, ["first", "second"])

    def test_on_returns_unsubscribe(self):
        rec = Recorder()
        unsubscribe = self.bus.on("e", rec)
        self.assertTrue(callable(unsubscribe))
        unsubscribe()
        self.bus.emit("e")
        self.assertEqual(rec.count, 0)
        self.assertFalse(self.bus.has_listeners("e"))
        unsubscribe()  # a second call is harmless

    def test_off_removes_and_ignores_unknown_pairs(self):
        rec, other = Recorder(), Recorder()
        self.bus.on("e", rec)
        self.bus.on("e", other)
        self.bus.off("e", rec)
        self.bus.off("e", rec)
        self.bus.off("never", rec)
        self.bus.off("e", Recorder())
        self.bus.emit("e", 5)
        self.assertEqual(rec.count, 0)
        self.assertEqual(other.calls, [(5,)])

    def test_once_fires_at_most_once(self):
        rec = Recorder()
        self.bus.once("e", rec)
        self.bus.emit("e", 1)
        self.bus.emit("e", 2)
        self.assertEqual(rec.calls, [(1,)])
        self.assertEqual(self.bus.listener_count("e"), 0)

    def test_once_fires_once_even_when_reemitted_from_inside(self):
        calls = []

        def handler(data):
            calls.append(data)
            if data < 3:
                self.bus.emit("e", data + 1)

        self.bus.once("e", handler)
        self.bus.emit("e", 1)
        self.assertEqual(calls, [1])

    def test_once_unsubscribe_and_off_cancel_it(self):
        rec = Recorder()
        unsubscribe = self.bus.once("e", rec)
        self.assertTrue(callable(unsubscribe))
        unsubscribe()
        self.bus.emit("e")
        other = Recorder()
        self.bus.once("e", other)
        self.bus.off("e", other)
        self.bus.emit("e")
        self.assertEqual((rec.count, other.count), (0, 0))

    def test_raising_listener_is_logged_and_others_still_run(self):
        before, after = Recorder(), Recorder()

        def broken(data):
            raise RuntimeError("listener exploded")

        self.bus.on("e", before)
        self.bus.on("e", broken)
        self.bus.on("e", after)
        with self.assertLogs("specter", "ERROR") as cm:
            self.bus.emit("e", 7)
        self.assertLoggedException(cm, "listener exploded")
        self.assertEqual((before.calls, after.calls), ([(7,)], [(7,)]))

    def test_subscribe_during_emit_takes_effect_next_emit(self):
        late = Recorder()

        def subscriber(data):
            self.bus.on("e", late)

        self.bus.on("e", subscriber)
        self.bus.emit("e", 1)
        self.assertEqual(late.count, 0)
        self.bus.emit("e", 2)
        self.assertEqual(late.calls, [(2,)])

    def test_unsubscribe_during_emit_takes_effect_next_emit(self):
        victim = Recorder()
        calls = []

        def remover(data):
            calls.append(data)
            self.bus.off("e", victim)
            self.bus.off("e", remover)

        self.bus.on("e", remover)
        self.bus.on("e", victim)
        self.bus.emit("e", 1)
        self.assertEqual(victim.calls, [(1,)])
        self.bus.emit("e", 2)
        self.assertEqual(victim.calls, [(1,)])
        self.assertEqual(calls, [1])

    def test_clear_one_event_or_all(self):
        a, b = Recorder(), Recorder()
        self.bus.on("a", a)
        self.bus.on("b", b)
        self.bus.clear("a")
        self.assertFalse(self.bus.has_listeners("a"))
        self.assertTrue(self.bus.has_listeners("b"))
        self.bus.clear()
        self.assertFalse(self.bus.has_listeners("b"))
        self.bus.emit("a")
        self.bus.emit("b")
        self.assertEqual((a.count, b.count), (0, 0))

    def test_has_listeners_and_counts(self):
        self.assertFalse(self.bus.has_listeners("a"))
        self.assertEqual(self.bus.listener_count("a"), 0)
        self.assertEqual(self.bus.listener_count(), 0)
        self.bus.on("a", Recorder())
        self.bus.on("a", Recorder())
        self.bus.once("b", Recorder())
        self.assertTrue(self.bus.has_listeners("a"))
        self.assertEqual(self.bus.listener_count("a"), 2)
        self.assertEqual(self.bus.listener_count("b"), 1)
        self.assertEqual(self.bus.listener_count(), 3)

    def test_non_callable_is_type_error(self):
        for bad in (None, 5, "callback"):
            with self.subTest(bad=bad):
                with self.assertRaises(TypeError):
                    self.bus.on("e", bad)
                with self.assertRaises(TypeError):
                    self.bus.once("e", bad)
        self.assertEqual(self.bus.listener_count(), 0)

    def test_non_str_event_is_type_error(self):
        for bad in (None, 1, b"e", ("e",), ""):
            with self.subTest(bad=bad):
                with self.assertRaises(TypeError):
                    self.bus.on(bad, Recorder())
                with self.assertRaises(TypeError):
                    self.bus.once(bad, Recorder())
                with self.assertRaises(TypeError):
                    self.bus.emit(bad)
                calls = (self.bus.has_listeners,) if bad is None else (
                    self.bus.has_listeners, self.bus.listener_count, self.bus.clear)  # None = all
                for call in calls:
                    with self.assertRaises(TypeError):
                        call(bad)
                with self.assertRaises(TypeError):
                    self.bus.off(bad, Recorder())


    def test_module_bus_is_shared(self):
        rec = Recorder()
        specter.bus.on("shared", rec)
        specter.bus.emit("shared", 1)
        self.assertEqual(rec.calls, [(1,)])


# Registry #####################################################################


class OwnerStub:
    """Anything with add_cleanup may own a registry key."""

    def __init__(self):
        self.cleanups = []

    def add_cleanup(self, fn):
        self.cleanups.append(fn)
        return self

    def run_cleanups(self):
        while self.cleanups:
            self.cleanups.pop()()


class TestRegistry(SpecterTestCase):
    def setUp(self):
        super().setUp()
        self.reg = SPECTERRegistry()

    def test_provide_resolve_has_list(self):
        db, cache = object(), object()
        self.assertIs(self.reg.provide("db", db), db)
        self.assertIs(self.reg.provide("cache", cache), cache)
        self.assertIs(self.reg.resolve("db"), db)
        self.assertIs(self.reg.require("cache"), cache)
        self.assertTrue(self.reg.has("db"))
        self.assertFalse(self.reg.has("mail"))
        self.assertIsNone(self.reg.resolve("mail"))
        self.assertEqual(self.reg.list(), ["db", "cache"])

    def test_provide_existing_key_needs_replace(self):
        first, second = object(), object()
        self.reg.provide("db", first)
        with self.assertRaises(KeyError):
            self.reg.provide("db", second)
        self.assertIs(self.reg.resolve("db"), first)
        self.assertIs(self.reg.provide("db", second, replace=True), second)
        self.assertIs(self.reg.resolve("db"), second)

    def test_unregister(self):
        self.reg.provide("db", 1)
        self.assertTrue(self.reg.unregister("db"))
        self.assertFalse(self.reg.unregister("db"))
        self.assertFalse(self.reg.has("db"))

    def test_require_missing_key_lists_known_keys(self):
        self.reg.provide("alpha", 1)
        self.reg.provide("beta", 2)
        with self.assertRaises(KeyError) as cm:
            self.reg.require("gamma")
        message = str(cm.exception)
        self.assertIn("gamma", message)
        self.assertIn("alpha", message)
        self.assertIn("beta", message)

    def test_require_returns_provided_falsy_values(self):
        for key, value in (("zero", 0), ("empty", ""), ("none", None), ("false", False), ("list", [])):
            with self.subTest(key=key):
                self.reg.provide(key, value)
                self.assertEqual(self.reg.require(key), value)
                self.assertIs(type(self.reg.require(key)), type(value))
                self.assertTrue(self.reg.has(key))

    def test_owner_without_callable_add_cleanup_is_type_error(self):
        for owner in (object(), type("Half", (), {"add_cleanup": 5})()):
            with self.subTest(owner=owner):
                with self.assertRaises(TypeError):
                    self.reg.provide("db", 1, owner=owner)
                self.assertFalse(self.reg.has("db"))

    def test_owner_cleanup_removes_key(self):
        owner = OwnerStub()
        self.reg.provide("db", "conn", owner=owner)
        self.assertEqual(len(owner.cleanups), 1)
        owner.run_cleanups()
        self.assertFalse(self.reg.has("db"))

    def test_owner_service_stop_removes_key(self):
        svc = self.started(Service("db-service"))
        specter.registry.provide("db", svc, owner=svc)
        self.assertIs(specter.registry.require("db"), svc)
        svc.stop()
        self.assertFalse(specter.registry.has("db"))

    def test_owner_cleanup_keeps_a_later_replacement(self):
        owner = OwnerStub()
        self.reg.provide("db", "old", owner=owner)
        self.reg.provide("db", "new", replace=True)
        owner.run_cleanups()
        self.assertEqual(self.reg.resolve("db"), "new")

    def test_owner_cleanup_keeps_a_reprovided_key(self):
        owner = OwnerStub()
        self.reg.provide("db", "old", owner=owner)
        self.reg.unregister("db")
        self.reg.provide("db", "other")
        owner.run_cleanups()
        self.assertEqual(self.reg.resolve("db"), "other")

    def test_wait_for_returns_at_once_when_present(self):
        self.reg.provide("db", "conn")
        self.reg.provide("none", None)
        self.reg.provide("zero", 0)
        started = time.monotonic()
        self.assertEqual(self.reg.wait_for("db"), "conn")
        self.assertIsNone(self.reg.wait_for("none", timeout=0.5))
        self.assertEqual(self.reg.wait_for("zero", timeout=0.5), 0)
        self.assertLess(time.monotonic() - started, 0.2)

    def test_wait_for_wakes_every_waiter_when_provided_elsewhere(self):
        waiters = [gevent.spawn(self.reg.wait_for, "db", 2.0) for _ in range(3)]
        gevent.sleep(0.01)
        self.assertFalse(any(w.ready() for w in waiters))
        started = time.monotonic()
        provider = gevent.spawn(self.reg.provide, "db", "conn")
        gevent.joinall(waiters + [provider], timeout=WAIT)
        self.assertEqual([w.value for w in waiters], ["conn"] * 3)
        self.assertLess(time.monotonic() - started, 0.5)

    def test_wait_for_times_out(self):
        started = time.monotonic()
        with self.assertRaises(TimeoutError):
            self.reg.wait_for("never", timeout=SHORT)
        elapsed = time.monotonic() - started
        self.assertGreaterEqual(elapsed, SHORT * 0.8)
        self.assertLess(elapsed, 1.0)

    def test_wait_for_timeouts_leave_no_waiter_behind(self):
        reg = SPECTERRegistry()
        for _ in range(3):
            with self.assertRaises(TimeoutError):
                reg.wait_for("never", timeout=0.001)
        self.assertEqual(reg._waiters, {})  # internal, but a leak is only visible there

    def test_wait_for_negative_timeout_is_value_error(self):
        with self.assertRaises(ValueError):
            self.reg.wait_for("db", timeout=-1)

    def test_clear_drops_entries_and_fails_waiters(self):
        self.reg.provide("db", 1)

        def wait():
            try:
                self.reg.wait_for("mail", timeout=2.0)
            except Exception as exc:  # the outcome under test
                return exc
            return None

        waiter = gevent.spawn(wait)
        gevent.sleep(0.01)
        self.reg.clear()
        self.assertEqual(self.reg.list(), [])
        self.assertIsInstance(waiter.get(timeout=1.0), RuntimeError)

    def test_key_validation(self):
        for bad in ("", "   ", None, 1, b"db", ("db",)):
            with self.subTest(bad=bad):
                with self.assertRaises(TypeError):
                    self.reg.provide(bad, 1)
                for method in (self.reg.resolve, self.reg.require, self.reg.has,
                               self.reg.unregister):
                    with self.assertRaises(TypeError):
                        method(bad)
                with self.assertRaises(TypeError):
                    self.reg.wait_for(bad, timeout=0.01)

    def test_surrounding_whitespace_is_ignored(self):
        self.reg.provide("  db  ", "conn")
        self.assertEqual(self.reg.resolve("db"), "conn")
        self.assertTrue(self.reg.has("\tdb\n"))
        self.assertEqual(self.reg.list(), ["db"])
        self.assertEqual(self.reg.wait_for(" db", timeout=0.1), "conn")
        self.assertTrue(self.reg.unregister("db "))

    def test_module_registry_is_shared(self):
        specter.registry.provide("shared", 1)
        self.assertEqual(specter.registry.require("shared"), 1)


# Lifecycle: Service ###########################################################


class TestService(SpecterTestCase):
    def test_seed_shape_without_init(self):
        orders = []

        class MetricsService(Service):
            def on_start(self):
                self.interval(self._collect, 60)
                self.listen("order:completed", self._on_order)

            def on_stop(self):
                pass

            def _collect(self):
                self.emit("metrics:updated", {"cpu": 42.5})

            def _on_order(self, data):
                orders.append(data)

        svc = MetricsService()
        self.assertEqual(svc.name, "MetricsService")
        self.assertIs(svc.start(), svc)
        self.addCleanup(svc.stop)
        self.assertTrue(svc.running)
        specter.bus.emit("order:completed", {"id": 7})
        self.assertEqual(orders, [{"id": 7}])
        self.assertIs(svc.stop(), svc)
        self.assertFalse(svc.running)

    def test_name_and_initial_state(self):
        svc = Service("polling", {"tick_count": 0})
        self.assertEqual(svc.name, "polling")
        self.assertEqual(svc.state, {"tick_count": 0})
        self.assertEqual(Service().name, "Service")
        self.assertEqual(Service().state, {})

    def test_start_and_stop_are_idempotent(self):
        calls = []

        class Counter(Service):
            def on_start(self):
                calls.append("start")

            def on_stop(self):
                calls.append("stop")

        svc = Counter()
        self.assertIs(svc.start(), svc)
        self.assertIs(svc.start(), svc)
        self.assertIs(svc.stop(), svc)
        self.assertIs(svc.stop(), svc)
        self.assertEqual(calls, ["start", "stop"])

    def test_status_transitions(self):
        seen = []

        class Watched(Service):
            def on_start(self):
                seen.append((self.status, self.running))

            def on_stop(self):
                seen.append((self.status, self.running))

        svc = Watched()
        self.assertEqual(svc.status, "created")
        self.assertFalse(svc.running)
        svc.start()
        self.assertEqual(svc.status, "running")
        self.assertTrue(svc.running)
        svc.stop()
        self.assertEqual(svc.status, "stopped")
        self.assertFalse(svc.running)
        self.assertEqual([s for s, _ in seen], ["starting", "stopping"])

    def test_health_basic_shape(self):
        svc = Service("h")
        self.assertEqual(svc.health()["status"], "stopped")
        self.assertEqual(svc.health()["name"], "h")
        self.started(svc)
        self.assertEqual(svc.health()["status"], "ok")
        svc.stop()
        self.assertEqual(svc.health()["status"], "stopped")

    def test_managed_methods_work_inside_on_start(self):
        class Early(Service):
            def on_start(self):
                self.g = self.spawn(lambda: "ran")
                self.i = self.interval(lambda: None, 10)
                self.t = self.timeout(lambda: None, 10)
                self.listen("e", lambda data: None)

        svc = self.started(Early())
        self.assertEqual(svc.g.get(timeout=1), "ran")
        self.assertIsInstance(svc.i, str)
        self.assertIsInstance(svc.t, str)
        self.assertTrue(specter.bus.has_listeners("e"))

    def test_managed_methods_raise_runtime_error_when_not_running(self):
        ran = Recorder()
        for phase in ("created", "stopped"):
            svc = Service("idle")
            if phase == "stopped":
                svc.start()
                svc.stop()
            attempts = {
                "spawn": lambda: svc.spawn(ran),
                "spawn_later": lambda: svc.spawn_later(0, ran),
                "interval": lambda: svc.interval(ran, 0.01),
                "timeout": lambda: svc.timeout(ran, 0),
                "supervise": lambda: svc.supervise(ran),
                "listen": lambda: svc.listen("e", ran),
            }
            for name, attempt in attempts.items():
                with self.subTest(phase=phase, method=name):
                    with self.assertRaises(RuntimeError):
                        attempt()
        gevent.sleep(0.03)
        specter.bus.emit("e")
        self.assertEqual(ran.count, 0)

    def test_bad_arguments(self):
        svc = self.started(Service("args"))
        noop = lambda: None  # noqa: E731
        for bad in (0, -1, -0.5):
            with self.subTest(interval=bad):
                with self.assertRaises(ValueError):
                    svc.interval(noop, bad)
        for call in (lambda: svc.timeout(noop, -1), lambda: svc.spawn_later(-1, noop)):
            with self.assertRaises(ValueError):
                call()
        for call in (
            lambda: svc.interval("noop", 1),
            lambda: svc.interval(None, 1),
            lambda: svc.timeout(5, 1),
            lambda: svc.spawn(None),
            lambda: svc.spawn_later(1, "noop"),
            lambda: svc.supervise(42),
            lambda: svc.interval(noop, "1"),
            lambda: svc.interval(noop, True),
            lambda: svc.timeout(noop, None),
        ):
            with self.assertRaises(TypeError):
                call()
        self.assertEqual(svc.health()["counts"]["intervals"], 0)
        self.assertEqual(svc.health()["counts"]["timeouts"], 0)

    def test_spawn_returns_greenlet_with_value_and_label(self):
        svc = self.started(Service("spawner"))
        glet = svc.spawn(lambda a, b=0: a + b, 2, b=3, label="adder")
        self.assertIsInstance(glet, gevent.Greenlet)
        self.assertEqual(glet.get(timeout=1), 5)
        self.assertEqual(glet.name, "adder")

    def test_spawn_exception_is_logged_and_counted(self):
        svc = self.started(Service("crashy"))
        with self.assertLogs("specter", "ERROR") as cm:
            glet = svc.spawn(self._raise, "task kaput")
            glet.join(timeout=1)
        self.assertTrue(glet.dead)
        self.assertIsNone(glet.value)
        self.assertLoggedException(cm, "task kaput")
        health = svc.health()
        self.assertEqual(health["errors"], 1)
        self.assertIn("task kaput", health["last_error"])
        self.assertEqual(health["status"], "ok")

    @staticmethod
    def _raise(message):
        raise RuntimeError(message)

    def test_spawn_later_waits_then_runs(self):
        svc = self.started(Service("later"))
        rec = Recorder()
        started = time.monotonic()
        glet = svc.spawn_later(SHORT, rec, "x", label="delayed")
        self.assertIsInstance(glet, gevent.Greenlet)
        gevent.sleep(0.01)
        self.assertEqual(rec.count, 0)
        glet.join(timeout=1)
        self.assertEqual(rec.calls, [("x",)])
        self.assertGreaterEqual(time.monotonic() - started, SHORT * 0.8)

    def test_interval_ticks_repeatedly_and_returns_an_id(self):
        svc = self.started(Service("ticker"))
        rec = Recorder()
        interval_id = svc.interval(rec, 0.01)
        self.assertIsInstance(interval_id, str)
        self.assertEqual(rec.count, 0)
        self.assertEventually(lambda: rec.count >= 3)
        self.assertEqual(svc.health()["counts"]["intervals"], 1)

    def test_interval_first_tick_comes_one_period_later(self):
        svc = self.started(Service("first-tick"))
        ticks = []
        started = time.monotonic()
        svc.interval(lambda: ticks.append(time.monotonic()), SHORT)
        self.assertEventually(lambda: ticks)
        self.assertGreaterEqual(ticks[0] - started, SHORT * 0.8)

    def test_interval_keeps_a_fixed_rate_without_drift(self):
        # Tick k is due at t0 + k*period. The callback naps 0-15 ms (7.2 ms on
        # average), so an interval that re-arms after the callback would be
        # ~0.1 s late by tick 16; a fixed-rate one is not late at all.
        period, n = 0.025, 16
        naps = itertools.cycle([0.0, 0.012, 0.006, 0.015, 0.003])
        ticks = []

        def tick():
            ticks.append(time.monotonic())
            gevent.sleep(next(naps))

        svc = self.started(Service("rate"))
        t0 = time.monotonic()
        svc.interval(tick, period)
        self.assertEventually(lambda: len(ticks) >= n, timeout=3)
        elapsed = ticks[n - 1] - t0
        self.assertGreaterEqual(elapsed, n * period - 0.005)
        self.assertLess(elapsed, n * period + 0.05, "tick %d came %.3fs after start" % (n, elapsed))

    def test_interval_overrun_skips_ticks_instead_of_piling_up(self):
        period, nap = 0.03, 0.045
        starts = []
        state = {"active": 0, "peak": 0}

        def slow():
            starts.append(time.monotonic())
            state["active"] += 1
            state["peak"] = max(state["peak"], state["active"])
            try:
                gevent.sleep(nap)
            finally:
                state["active"] -= 1

        svc = self.started(Service("overrun"))
        svc.interval(slow, period)
        self.assertEventually(lambda: len(starts) >= 5, timeout=3)
        self.assertEqual(state["peak"], 1)
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        # The tick due while the callback still runs is skipped: the next
        # start is two periods later, not as soon as the callback ends.
        self.assertGreaterEqual(min(gaps), 2 * period - 0.01, gaps)
        self.assertLess(starts[4] - starts[0], 4 * 2 * period + 0.03, gaps)

    def test_interval_keeps_running_after_a_raising_callback(self):
        calls = []

        def flaky():
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("tick failed")

        svc = self.started(Service("flaky-tick"))
        with self.assertLogs("specter", "ERROR") as cm:
            svc.interval(flaky, 0.01)
            self.assertEventually(lambda: len(calls) >= 3)
        self.assertLoggedException(cm, "tick failed")
        self.assertGreaterEqual(svc.health()["errors"], 1)

    def test_timeout_fires_once_and_forgets_itself(self):
        svc = self.started(Service("once"))
        rec = Recorder()
        timeout_id = svc.timeout(rec, 0.01)
        self.assertIsInstance(timeout_id, str)
        self.assertEqual(svc.health()["counts"]["timeouts"], 1)
        self.assertEventually(lambda: rec.count == 1)
        gevent.sleep(SHORT)
        self.assertEqual(rec.count, 1)
        self.assertEqual(svc.health()["counts"]["timeouts"], 0)
        self.assertFalse(svc.cancel_timeout(timeout_id))

    def test_timeout_zero_is_allowed(self):
        svc = self.started(Service("zero"))
        rec = Recorder()
        svc.timeout(rec, 0)
        self.assertEventually(lambda: rec.count == 1)

    def test_timeout_exception_is_logged(self):
        svc = self.started(Service("bad-timeout"))
        with self.assertLogs("specter", "ERROR") as cm:
            svc.timeout(lambda: self._raise("timer boom"), 0)
            self.assertEventually(lambda: svc.health()["errors"] == 1)
        self.assertLoggedException(cm, "timer boom")

    def test_cancel_interval_and_timeout(self):
        svc = self.started(Service("cancel"))
        tick, fire = Recorder(), Recorder()
        interval_id = svc.interval(tick, 0.01)
        timeout_id = svc.timeout(fire, 0.02)
        self.assertNotEqual(interval_id, timeout_id)
        self.assertTrue(svc.cancel_interval(interval_id))
        self.assertTrue(svc.cancel_timeout(timeout_id))
        gevent.sleep(SHORT)
        self.assertEqual((tick.count, fire.count), (0, 0))
        self.assertFalse(svc.cancel_interval(interval_id))
        self.assertFalse(svc.cancel_interval("interval-unknown"))
        counts = svc.health()["counts"]
        self.assertEqual((counts["intervals"], counts["timeouts"]), (0, 0))

    def test_cancel_greenlet_refuses_a_greenlet_it_does_not_own(self):
        svc = self.started(Service("owner"))
        stranger = gevent.spawn(gevent.sleep, 1)
        self.addCleanup(stranger.kill)
        with self.assertRaises(ValueError):
            svc.cancel_greenlet(stranger)
        self.assertFalse(stranger.dead)

    def test_cancel_greenlet_kills_it_and_runs_finally(self):
        svc = self.started(Service("cancel-glet"))
        finals = []

        def task():
            try:
                gevent.sleep(LONG)
            finally:
                finals.append("done")

        glet = svc.spawn(task)
        gevent.sleep(0)
        self.assertIs(svc.cancel_greenlet(glet), svc)
        self.assertTrue(glet.dead)
        self.assertEqual(finals, ["done"])
        pending = svc.spawn_later(0.01, finals.append, "never")
        svc.cancel_greenlet(pending)
        gevent.sleep(SHORT)
        self.assertEqual(finals, ["done"])
        self.assertEqual(svc.health()["counts"]["tasks"], 0)

    def test_two_services_listening_with_one_function_keep_their_own_registration(self):
        seen = []

        def on_job(data):
            seen.append(data)

        class Listener(Service):
            def on_start(self):
                self.listen("job", on_job)

        a, b = self.started(Listener("a")), self.started(Listener("b"))
        a.stop()
        specter.bus.emit("job", 1)
        self.assertEqual(seen, [1])
        b.stop()
        specter.bus.emit("job", 2)
        self.assertEqual(seen, [1])

    def test_listen_then_unsubscribed_on_stop(self):
        svc = self.started(Service("listener"))
        rec = Recorder()
        self.assertIs(svc.listen("job:done", rec), svc)
        specter.bus.emit("job:done", 1)
        svc.stop()
        specter.bus.emit("job:done", 2)
        self.assertEqual(rec.calls, [(1,)])
        self.assertFalse(specter.bus.has_listeners("job:done"))

    def test_emit_publishes_on_the_bus(self):
        svc = self.started(Service("emitter"))
        rec = Recorder()
        specter.bus.on("metrics:updated", rec)
        self.assertIs(svc.emit("metrics:updated", {"cpu": 1}), svc)
        svc.emit("metrics:updated")
        self.assertEqual(rec.calls, [({"cpu": 1},), (None,)])

    def test_adopt(self):
        order = []

        class Child(Service):
            def on_stop(self):
                order.append(self.name)

        parent = self.started(Service("parent"))
        self.assertIs(parent.adopt(None), parent)
        with self.assertRaises(TypeError):
            parent.adopt(object())
        a, b, c = Child("a"), Child("b"), Child("c")
        for child in (a, b, c):
            self.assertIs(parent.adopt(child), parent)
        self.assertTrue(all(child.running for child in (a, b, c)))
        lazy = Child("lazy")
        parent.adopt(lazy, start=False)
        self.assertEqual(lazy.status, "created")
        self.assertEqual(parent.health()["counts"]["children"], 4)
        parent.stop()
        self.assertEqual([n for n in order if n != "lazy"], ["c", "b", "a"])
        self.assertFalse(any(child.running for child in (a, b, c)))

    def test_own_picks_the_cleanup_method(self):
        log = []
        expected = {}
        svc = self.started(Service("owner"))
        cases = [
            (("stop", "close"), "stop"),
            (("close", "disconnect"), "close"),
            (("disconnect", "destroy"), "disconnect"),
            (("destroy", "terminate"), "destroy"),
            (("terminate", "kill"), "terminate"),
            (("kill",), "kill"),
        ]
        for methods, chosen in cases:
            resource = make_resource(log, *methods)
            self.assertIs(svc.own(resource), resource)
            expected[id(resource)] = chosen
        not_callable = make_resource(log, "close", stop=5)
        svc.own(not_callable)
        expected[id(not_callable)] = "close"
        named = make_resource(log, "close", "shutdown")
        self.assertIs(svc.own(named, stop_method="shutdown"), named)
        expected[id(named)] = "shutdown"
        self.assertIsNone(svc.own(None))
        with self.assertRaises(TypeError):
            svc.own(object())
        self.assertEqual(log, [])
        svc.stop()
        self.assertEqual(len(log), len(expected))
        for resource, method in log:
            self.assertEqual(method, expected[id(resource)])

    def test_start_process_is_owned_and_started(self):
        svc = self.started(Service("spawner"))
        process = svc.start_process([sys.executable, "-c", "import time; time.sleep(30)"], name="sleeper")
        self.assertIsInstance(process, specter.ManagedProcess)
        self.assertTrue(process.running)
        self.assertIsNotNone(process.pid)
        svc.stop()
        self.assertFalse(process.running)
        self.assertIsNotNone(process.returncode)

    def test_add_cleanup_runs_last_in_first_out(self):
        order = []
        svc = self.started(Service("cleanups"))
        self.assertIs(svc.add_cleanup(lambda: order.append(1)), svc)
        svc.add_cleanup(lambda: self._raise("cleanup failed"))
        svc.add_cleanup(lambda: order.append(3))
        with self.assertLogs("specter", "ERROR") as cm:
            svc.stop()
        self.assertLoggedException(cm, "cleanup failed")
        self.assertEqual(order, [3, 1])
        self.assertEqual(svc.status, "stopped")

    def test_stop_on_a_never_started_service_runs_cleanups(self):
        ran = Recorder()
        svc = Service("never")
        svc.add_cleanup(ran)
        svc.stop()
        self.assertEqual(ran.count, 1)

    def test_on_stop_failure_is_logged_and_teardown_continues(self):
        closed = Recorder()

        class Faulty(Service):
            def on_start(self):
                self.add_cleanup(closed)

            def on_stop(self):
                raise RuntimeError("on_stop failed")

        svc = self.started(Faulty())
        with self.assertLogs("specter", "ERROR") as cm:
            svc.stop()
        self.assertLoggedException(cm, "on_stop failed")
        self.assertEqual(closed.count, 1)
        self.assertEqual(svc.status, "stopped")

    def test_stop_runs_teardown_steps_in_documented_order(self):
        log = []

        class Child(Service):
            def on_stop(self):
                log.append(("child", specter.bus.has_listeners("ev")))

        child = Child("child")

        class Parent(Service):
            def on_start(self):
                self.interval(lambda: None, 10)
                self.timeout(lambda: None, 10)
                self.spawn(self._task)
                self.listen("ev", lambda data: None)
                self.adopt(child)
                self.add_cleanup(self._first_cleanup)
                self.add_cleanup(lambda: log.append(("cleanup-2", child.status)))
                self.subscribe(lambda state, svc: log.append(("subscriber", state.get("x"))))

            def on_stop(self):
                counts = self.health()["counts"]
                log.append(("on_stop", counts["intervals"], counts["timeouts"], counts["tasks"],
                            specter.bus.has_listeners("ev"), child.status))

            def _task(self):
                try:
                    gevent.sleep(LONG)
                finally:
                    counts = self.health()["counts"]
                    log.append(("task", counts["intervals"], counts["timeouts"],
                                specter.bus.has_listeners("ev"), child.status))

            def _first_cleanup(self):
                log.append(("cleanup-1", child.status))
                self.set_state({"x": 1})

        parent = self.started(Parent("parent"))
        gevent.sleep(0)
        parent.stop()
        parent.set_state({"x": 2})
        self.assertEqual(log, [
            ("on_stop", 1, 1, 1, True, "running"),
            ("task", 0, 0, True, "running"),
            ("child", False),
            ("cleanup-2", "stopped"),
            ("cleanup-1", "stopped"),
            ("subscriber", 1),
        ])

    def test_stop_leaves_no_live_greenlet_and_runs_finally_blocks(self):
        entered, finals, kinds = [], [], []

        class Busy(Service):
            def on_start(self):
                self.tasks = [
                    self.spawn(self._forever, "spawn"),
                    self.spawn_later(0, self._forever, "spawn_later"),
                    self.supervise(self._forever, "supervise"),
                    self.spawn_later(LONG, finals.append, "never"),
                ]
                self.interval(self._tick, 0.01)
                self.timeout(lambda: finals.append("timeout"), LONG)

            def _forever(self, label):
                entered.append(label)
                try:
                    gevent.sleep(LONG)
                except BaseException as exc:
                    kinds.append(type(exc))
                    raise
                finally:
                    finals.append(label)

            def _tick(self):
                self._forever("interval")

        svc = Busy("busy")
        before = live_greenlets()
        svc.start()
        self.addCleanup(svc.stop)
        self.assertEventually(lambda: len(entered) == 4)
        self.assertEqual(sorted(entered), ["interval", "spawn", "spawn_later", "supervise"])
        svc.stop()
        # Checked the moment stop() returns, without yielding.
        self.assertTrue(all(task.dead for task in svc.tasks))
        self.assertNoNewGreenlets(before)
        self.assertEqual(sorted(finals), ["interval", "spawn", "spawn_later", "supervise"])
        self.assertEqual(kinds, [greenlet.GreenletExit] * 4)
        gevent.sleep(SHORT)
        self.assertNotIn("never", finals)
        self.assertNotIn("timeout", finals)
        self.assertNoNewGreenlets(before)

    def test_stop_from_inside_an_interval_callback(self):
        log = []

        class SelfStopping(Service):
            def on_start(self):
                self.interval(self._tick, 0.01)

            def on_stop(self):
                log.append("on_stop")

            def _tick(self):
                log.append("tick")
                self.stop()
                log.append("after-stop:%s" % self.status)

        svc = SelfStopping()
        before = live_greenlets()
        svc.start()
        self.addCleanup(svc.stop)
        self.assertEventually(lambda: svc.status == "stopped")
        self.assertEventually(lambda: len(log) == 3)
        self.assertEqual(log, ["tick", "on_stop", "after-stop:stopped"])
        self.assertEventually(lambda: not new_live_greenlets(before))
        gevent.sleep(SHORT)
        self.assertEqual(log.count("tick"), 1)

    def test_stop_from_inside_a_spawned_task(self):
        log = []

        class SelfStopping(Service):
            def on_start(self):
                self.spawn(self._work)
                self.spawn(self._sibling)

            def on_stop(self):
                log.append("on_stop")

            def _work(self):
                gevent.sleep(0.01)
                self.stop()
                log.append("after-stop:%s" % self.status)

            def _sibling(self):
                try:
                    gevent.sleep(LONG)
                finally:
                    log.append("sibling-finally")

        svc = SelfStopping()
        before = live_greenlets()
        svc.start()
        self.addCleanup(svc.stop)
        self.assertEventually(lambda: "after-stop:stopped" in log)
        self.assertEqual(log, ["on_stop", "sibling-finally", "after-stop:stopped"])
        self.assertEventually(lambda: not new_live_greenlets(before))

    def test_stop_from_inside_a_timeout_callback(self):
        svc = self.started(Service("timeout-stopper"))
        after = []
        svc.timeout(lambda: (svc.stop(), after.append(svc.status)), 0)
        self.assertEventually(lambda: after == ["stopped"])

    def test_concurrent_stop_waits_for_the_first(self):
        class Slow(Service):
            def on_stop(self):
                gevent.sleep(SHORT)

        svc = self.started(Slow())
        first = gevent.spawn(svc.stop)
        gevent.sleep(0.01)
        self.assertEqual(svc.status, "stopping")
        svc.stop()
        self.assertEqual(svc.status, "stopped")
        first.join(timeout=1)
        self.assertTrue(first.successful())

    def test_start_rollback_releases_everything(self):
        log = []
        boom = ValueError("on_start failed")
        fail = [True]

        class Child(Service):
            def on_stop(self):
                log.append("child")

        class Resource:
            def close(self):
                log.append("resource")

        child = Child("child")

        class Fragile(Service):
            def on_start(self):
                self.interval(lambda: log.append("interval"), 0.01)
                self.timeout(lambda: log.append("timeout"), 0.01)
                self.task = self.spawn(self._task)
                self.listen("ping", lambda data: log.append("listener"))
                self.own(Resource())
                self.add_cleanup(lambda: log.append("cleanup"))
                self.adopt(child)
                gevent.sleep(0)
                if fail[0]:
                    raise boom

            def on_stop(self):
                log.append("on_stop")

            def _task(self):
                try:
                    gevent.sleep(LONG)
                finally:
                    log.append("task-finally")

        svc = Fragile()
        self.addCleanup(svc.stop)
        before = live_greenlets()
        with self.assertRaises(ValueError) as cm:
            svc.start()
        self.assertIs(cm.exception, boom)
        self.assertFalse(svc.running)
        self.assertNotEqual(svc.status, "running")
        self.assertEqual(svc.status, "stopped")
        self.assertTrue(svc.task.dead)
        self.assertNoNewGreenlets(before)
        self.assertEqual(child.status, "stopped")
        self.assertFalse(specter.bus.has_listeners("ping"))
        specter.bus.emit("ping")
        gevent.sleep(SHORT)
        self.assertIn("task-finally", log)
        for missing in ("interval", "timeout", "listener", "on_stop"):
            self.assertNotIn(missing, log)
        released = [entry for entry in log if entry in ("child", "cleanup", "resource")]
        self.assertEqual(released, ["child", "cleanup", "resource"])
        # A fixed service starts again with fresh resources.
        fail[0] = False
        del log[:]
        svc.start()
        self.assertEqual(svc.status, "running")
        self.assertEventually(lambda: "interval" in log and "timeout" in log)
        self.assertEqual(specter.bus.listener_count("ping"), 1)

    def test_restart_after_stop_gets_fresh_resources(self):
        ticks = []

        class Ticker(Service):
            def on_start(self):
                self.interval(lambda: ticks.append(1), 0.01)
                self.listen("ping", lambda data: None)

        svc = self.started(Ticker())
        self.assertEventually(lambda: len(ticks) >= 2)
        svc.stop()
        counts = svc.health()["counts"]
        self.assertEqual((counts["intervals"], counts["listeners"]), (0, 0))
        stopped_at = len(ticks)
        gevent.sleep(0.03)
        self.assertEqual(len(ticks), stopped_at)
        svc.start()
        self.assertEqual(svc.status, "running")
        self.assertEventually(lambda: len(ticks) >= stopped_at + 2)
        counts = svc.health()["counts"]
        self.assertEqual((counts["intervals"], counts["listeners"]), (1, 1))
        self.assertEqual(specter.bus.listener_count("ping"), 1)

    def test_set_state_get_state_and_subscribe(self):
        svc = Service("stateful", {"a": 1})
        rec = Recorder()
        unsubscribe = svc.subscribe(rec)
        svc.set_state({"b": 2})
        self.assertEqual(svc.state, {"a": 1, "b": 2})
        self.assertEqual(rec.calls, [({"a": 1, "b": 2}, svc)])
        rec.calls[0][0]["evil"] = True
        self.assertNotIn("evil", svc.state)
        copy = svc.get_state()
        self.assertEqual(copy, {"a": 1, "b": 2})
        copy["evil"] = True
        self.assertNotIn("evil", svc.state)
        unsubscribe()
        svc.set_state({"c": 3})
        self.assertEqual(rec.count, 1)

    def test_set_state_is_a_shallow_merge(self):
        svc = Service("shallow", {"a": {"x": 1}, "b": 1})
        self.assertIs(svc.set_state({"a": {"y": 2}}), svc)
        self.assertEqual(svc.state, {"a": {"y": 2}, "b": 1})

    def test_subscribe_immediate(self):
        svc = Service("immediate", {"a": 1})
        rec = Recorder()
        svc.subscribe(rec, immediate=True)
        self.assertEqual(rec.calls, [({"a": 1}, svc)])

    def test_subscriber_runs_outside_the_lock(self):
        svc = Service("reentrant", {"n": 0})
        seen = []

        def bump(state, service):
            seen.append(state["n"])
            service.get_state()
            if state["n"] < 3:
                service.set_state({"n": state["n"] + 1})

        svc.subscribe(bump)
        with gevent.Timeout(1, AssertionError("set_state deadlocked")):
            svc.set_state({"n": 1})
        self.assertEqual(seen, [1, 2, 3])
        self.assertEqual(svc.state["n"], 3)

    def test_reentrant_write_is_delivered_after_the_current_round(self):
        svc = Service("rounds", {"n": 0})
        first_seen, second_seen = [], []

        def first(state, service):
            first_seen.append(state["n"])
            if state["n"] == 1:
                service.set_state({"n": 2})

        svc.subscribe(first)
        svc.subscribe(lambda state, service: second_seen.append(state["n"]))
        svc.set_state({"n": 1})
        self.assertEqual(first_seen, [1, 2])
        self.assertEqual(second_seen, [1, 2])

    def test_subscribers_see_commits_in_order_with_concurrent_writers(self):
        writers, writes = 3, 30
        svc = Service("seq")
        seen = {"a": [], "b": []}

        def make(name):
            def subscriber(state, service):
                version = sum(state.values())
                seen[name].append(version)
                yield_a_few(version)
            return subscriber

        svc.subscribe(make("a"))
        svc.subscribe(make("b"))

        def writer(index):
            for count in range(1, writes + 1):
                svc.set_state({"w%d" % index: count})
                gevent.sleep(0)

        gevent.joinall([gevent.spawn(writer, i) for i in range(writers)], timeout=5, raise_error=True)
        total = writers * writes
        self.assertEventually(lambda: all(len(v) == total for v in seen.values()))
        for name, versions in seen.items():
            self.assertEqual(versions, list(range(1, total + 1)), name)

    def test_state_subscriber_that_raises_is_isolated(self):
        svc = Service("isolated")
        rec = Recorder()
        svc.subscribe(lambda state, service: self._raise("subscriber broke"))
        svc.subscribe(rec)
        with self.assertLogs("specter", "ERROR") as cm:
            svc.set_state({"a": 1})
        self.assertLoggedException(cm, "subscriber broke")
        self.assertEqual(rec.count, 1)

    def test_subscribe_owner(self):
        svc = Service("observed")
        with self.assertRaises(TypeError):
            svc.subscribe(Recorder(), owner=object())
        owner = self.started(Service("observer"))
        rec = Recorder()
        svc.subscribe(rec, owner=owner)
        svc.set_state({"a": 1})
        owner.stop()
        svc.set_state({"a": 2})
        self.assertEqual(rec.count, 1)

    def test_watch_is_immediate_and_dropped_on_stop(self):
        svc = self.started(Service("watched", {"a": 1}))
        rec = Recorder()
        unsubscribe = svc.watch(rec)
        self.assertTrue(callable(unsubscribe))
        self.assertEqual(rec.calls, [({"a": 1}, svc)])
        quiet = Recorder()
        svc.watch(quiet, immediate=False)
        self.assertEqual(quiet.count, 0)
        svc.set_state({"a": 2})
        self.assertEqual((rec.count, quiet.count), (2, 1))
        svc.stop()
        svc.set_state({"a": 3})
        self.assertEqual((rec.count, quiet.count), (2, 1))

    def test_supervise_restarts_with_capped_exponential_backoff(self):
        attempts = []

        class Supervised(Service):
            restart_backoff = 0.005
            restart_max_backoff = 0.01

            def on_start(self):
                self.runner = self.supervise(self._work, "arg", max_restarts=10, within=60.0)

            def _work(self, arg):
                attempts.append(time.monotonic())
                if len(attempts) <= 5:
                    raise RuntimeError("attempt %d failed" % len(attempts))
                return arg

        with self.assertLogs("specter", "ERROR"):
            svc = self.started(Supervised())
            self.assertIsInstance(svc.runner, gevent.Greenlet)
            self.assertEventually(lambda: len(attempts) == 6)
        gevent.sleep(SHORT)
        self.assertEqual(len(attempts), 6)  # returning normally ends supervision
        gaps = [b - a for a, b in zip(attempts, attempts[1:])]
        # backoff 0.005, 0.01, then capped at 0.01 (uncapped would reach 0.08)
        self.assertGreaterEqual(gaps[0], 0.004, gaps)
        self.assertGreaterEqual(gaps[1], 0.009, gaps)
        self.assertLess(gaps[4], 0.05, gaps)
        health = svc.health()
        self.assertEqual(health["restarts"], 5)
        self.assertEqual(health["status"], "ok")
        self.assertEqual(svc.status, "running")

    def test_an_escaping_gevent_timeout_is_a_failure_that_gets_restarted(self):
        attempts = []

        class Fetcher(Service):
            restart_backoff = 0.001

            def on_start(self):
                self.supervise(self.fetch)

            def fetch(self):
                attempts.append(1)
                if len(attempts) < 3:
                    with gevent.Timeout(0.001):
                        gevent.sleep(1)
                return "fetched"

        with self.assertLogs("specter", "ERROR"):
            svc = self.started(Fetcher())
            self.assertEventually(lambda: len(attempts) == 3)
        self.assertEqual((svc.health()["restarts"], svc.status), (2, "running"))

    def test_stop_from_a_greenlet_spawned_by_on_start_is_deferred_not_deadlocked(self):
        class Connector(Service):
            def on_start(self):
                self.spawn(self.stop).join()  # gives up while on_start still waits for it

        svc = Connector()
        self.assertIs(svc.start(), svc)
        self.assertEqual(svc.status, "stopped")
        self.assertEqual(svc.health()["counts"]["tasks"], 0)

    def test_stop_inside_on_start_stops_once_on_start_returns(self):
        steps = []

        class Quitter(Service):
            def on_start(self):
                self.interval(lambda: None, 1)
                self.stop()
                steps.append(self.status)

        svc = Quitter().start()
        self.assertEqual((steps, svc.status), (["starting"], "stopped"))
        self.assertEqual(svc.health()["counts"]["intervals"], 0)
        svc.start()  # and it can start again
        self.assertEqual(svc.status, "stopped")

    def test_supervise_gives_up_after_max_restarts_within_window(self):
        attempts = []
        failures = Recorder()
        specter.bus.on("service:failed", failures)

        class Doomed(Service):
            restart_backoff = 0.001
            restart_max_backoff = 0.002

            def on_start(self):
                self.supervise(self._work, max_restarts=2, within=10.0)

            def _work(self):
                attempts.append(1)
                raise RuntimeError("disk on fire")

        with self.assertLogs("specter", "ERROR"):
            svc = self.started(Doomed())
            self.assertEventually(lambda: svc.status == "failed")
        gevent.sleep(SHORT)
        self.assertEqual(len(attempts), 3)  # failed more than twice: no fourth run
        self.assertEqual(failures.count, 1)
        event = failures.calls[0][0]
        self.assertEqual(event["service"], "Doomed")
        self.assertIn("disk on fire", event["error"])
        health = svc.health()
        self.assertEqual(health["status"], "failed")
        self.assertIn("disk on fire", str(health["failure"]))
        svc.stop()
        self.assertEqual(svc.status, "stopped")

    def test_supervise_failures_outside_the_window_do_not_fail_the_service(self):
        attempts = []

        class Sporadic(Service):
            restart_backoff = 0.03
            restart_max_backoff = 0.03

            def on_start(self):
                self.supervise(self._work, max_restarts=1, within=0.02)

            def _work(self):
                attempts.append(1)
                raise RuntimeError("sporadic")

        with self.assertLogs("specter", "ERROR"):
            svc = self.started(Sporadic())
            self.assertEventually(lambda: len(attempts) >= 4)
        self.assertEqual(svc.status, "running")
        self.assertIsNone(svc.health()["failure"])

    def test_health_reports_live_counts(self):
        noop = lambda *args: None  # noqa: E731
        svc = self.started(Service("counted"))
        svc.spawn(gevent.sleep, LONG)
        svc.spawn(gevent.sleep, LONG)
        svc.interval(noop, 10)
        svc.timeout(noop, 10)
        svc.listen("x", noop)
        svc.adopt(Service("kid"))
        svc.add_cleanup(noop)
        svc.add_cleanup(noop)
        gevent.sleep(0)
        health = svc.health()
        self.assertEqual(health["counts"], {
            "tasks": 2, "intervals": 1, "timeouts": 1,
            "listeners": 1, "children": 1, "cleanups": 2,
        })
        self.assertEqual(health["errors"], 0)
        self.assertIsNone(health["last_error"])
        self.assertEqual(health["restarts"], 0)
        self.assertEqual(health["stuck"], [])
        self.assertEqual([child["name"] for child in health["children"]], ["kid"])
        svc.stop()
        counts = svc.health()["counts"]
        self.assertEqual(sum(counts.values()), 0, counts)

    def test_stuck_greenlet_is_logged_and_reported(self):
        release = gevent.event.Event()
        refusals = []

        class Stubborn(Service):
            stop_timeout = 0.05

            def on_start(self):
                self.clinger = self.spawn(self._cling, label="clinger")

            def _cling(self):
                while not release.is_set():
                    try:
                        release.wait(LONG)
                    except greenlet.GreenletExit:
                        refusals.append(1)

        svc = self.started(Stubborn())
        gevent.sleep(0)
        started = time.monotonic()
        with self.assertLogs("specter", "WARNING") as cm:
            svc.stop()
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertTrue(refusals)
        self.assertTrue(any("clinger" in line for line in cm.output), cm.output)
        self.assertIn("clinger", svc.health()["stuck"])
        self.assertEqual(svc.status, "stopped")
        release.set()
        self.assertEventually(lambda: svc.clinger.dead)


# Lifecycle: QueueService ######################################################


class TestQueueService(SpecterTestCase):
    def test_handle_item_processes_items_in_order(self):
        svc = self.started(Sink())
        for item in range(5):
            self.assertTrue(svc.enqueue(item))
        self.assertEventually(lambda: svc.handled == list(range(5)))

    def test_default_handle_item_raises_not_implemented(self):
        with self.assertRaises(NotImplementedError):
            QueueService("plain").handle_item(1)
        svc = self.started(QueueService("plain"))
        with self.assertLogs("specter", "ERROR") as cm:
            svc.enqueue(1)
            self.assertTrue(svc.join(timeout=1))
        self.assertTrue(any(r.exc_info and r.exc_info[0] is NotImplementedError for r in cm.records))
        self.assertEqual(svc.get_state()["failed"], 1)

    def test_constructor_and_queue_attribute(self):
        svc = Sink("configured", worker_count=3, maxsize=7, poll_interval=0.1, initial_state={"x": 1})
        self.assertEqual(svc.name, "configured")
        self.assertIsInstance(svc.queue, gevent.queue.JoinableQueue)
        self.assertIsInstance(svc, Service)
        self.started(svc)
        state = svc.get_state()
        self.assertEqual(state["x"], 1)
        self.assertEqual(state["worker_count"], 3)
        self.assertEqual(state["queue_size"], 0)

    def test_worker_count_workers_run_concurrently(self):
        svc = self.started(Sink(worker_count=3, delay=SHORT))
        for item in range(6):
            svc.enqueue(item)
        self.assertEventually(lambda: len(svc.handled) == 6)
        self.assertEqual(svc.peak, 3)
        self.assertEqual(sorted(svc.handled), list(range(6)))

    def test_raising_handler_is_logged_and_worker_keeps_running(self):
        svc = self.started(Sink(fail_on={"bad"}))
        with self.assertLogs("specter", "ERROR") as cm:
            svc.enqueue("bad")
            svc.enqueue("good")
            self.assertEventually(lambda: svc.handled == ["good"])
        self.assertLoggedException(cm, "cannot handle 'bad'")
        state = svc.get_state()
        self.assertEqual(state["failed"], 1)
        self.assertEqual(state["processed"], 1)

    def test_every_item_is_marked_done(self):
        svc = self.started(Sink(worker_count=2, fail_on={3, 5}))
        with self.assertLogs("specter", "ERROR"):
            for item in range(8):
                svc.enqueue(item)
            self.assertTrue(svc.queue.join(timeout=WAIT))
        self.assertEqual(svc.queue.unfinished_tasks, 0)
        self.assertEqual(sorted(svc.handled), [0, 1, 2, 4, 6, 7])
        state = svc.get_state()
        self.assertEqual((state["processed"], state["failed"]), (6, 2))

    def test_enqueue_false_when_full_and_on_timeout(self):
        gate = gevent.event.Event()
        svc = self.started(Sink(maxsize=2, gate=gate))
        self.assertTrue(svc.enqueue(1))
        self.assertEventually(lambda: svc.started_items == [1])
        self.assertTrue(svc.enqueue(2))
        self.assertTrue(svc.enqueue(3))
        self.assertEqual(svc.pending_count(), 2)
        self.assertFalse(svc.enqueue(4))
        started = time.monotonic()
        self.assertFalse(svc.enqueue(5, block=True, timeout=SHORT))
        self.assertGreaterEqual(time.monotonic() - started, SHORT * 0.8)
        gate.set()
        self.assertTrue(svc.join(timeout=WAIT))
        self.assertEqual(svc.handled, [1, 2, 3])
        self.assertEqual(svc.pending_count(), 0)

    def test_blocking_enqueue_waits_for_room(self):
        svc = self.started(Sink(maxsize=1, delay=0.01))
        self.assertTrue(svc.enqueue(1))
        self.assertEventually(lambda: svc.started_items == [1])
        self.assertTrue(svc.enqueue(2))
        self.assertFalse(svc.enqueue(3))
        self.assertTrue(svc.enqueue(3, block=True, timeout=1.0))
        self.assertTrue(svc.join(timeout=WAIT))
        self.assertEqual(svc.handled, [1, 2, 3])

    def test_enqueue_on_a_stopped_service_returns_false(self):
        svc = Sink()
        self.assertFalse(svc.enqueue(1))
        svc.start()
        svc.stop()
        self.assertFalse(svc.enqueue(2))
        self.assertEqual(svc.pending_count(), 0)
        self.assertEqual(svc.handled, [])

    def test_join(self):
        svc = self.started(Sink(delay=SHORT))
        self.assertTrue(svc.join())
        svc.enqueue(1)
        self.assertEventually(lambda: svc.started_items == [1])
        self.assertEqual(svc.pending_count(), 0)
        # Empty but not idle: the item is still in hand.
        self.assertFalse(svc.join(timeout=0.01))
        self.assertTrue(svc.join(timeout=WAIT))
        self.assertEqual(svc.handled, [1])

    def test_state_and_health_report_counts(self):
        svc = self.started(Sink(worker_count=2, fail_on={"x"}))
        with self.assertLogs("specter", "ERROR"):
            for item in (1, "x", 2):
                svc.enqueue(item)
            self.assertTrue(svc.join(timeout=WAIT))
        state = svc.get_state()
        for key in ("queue_size", "worker_count", "processed", "failed"):
            self.assertIn(key, state)
        self.assertEqual(state["worker_count"], 2)
        self.assertEqual(state["queue_size"], 0)
        self.assertEqual((state["processed"], state["failed"]), (2, 1))
        queue = svc.health()["queue"]
        self.assertEqual(queue, {"size": 0, "workers": 2, "processed": 2, "failed": 1})

    def test_pending_count_and_queue_size(self):
        gate = gevent.event.Event()
        svc = self.started(Sink(gate=gate))
        for item in range(4):
            svc.enqueue(item)
        self.assertEventually(lambda: svc.started_items == [0])
        self.assertEqual(svc.pending_count(), 3)
        self.assertEqual(svc.get_state()["queue_size"], 3)
        gate.set()
        self.assertTrue(svc.join(timeout=WAIT))
        self.assertEqual(svc.pending_count(), 0)

    def test_a_worker_that_stops_its_service_ends_with_it(self):
        class Poison(QueueService):
            def handle_item(self, item):
                if item == "stop":
                    self.stop()

        svc = Poison("poison", worker_count=1).start()
        self.addCleanup(svc.stop)
        started = time.monotonic()
        svc.enqueue("stop")
        self.assertTrue(wait_until(lambda: svc.status == "stopped"))
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertTrue(wait_until(lambda: svc.health()["counts"]["tasks"] == 0))
        svc.start()
        svc.enqueue("work")
        self.assertTrue(svc.join(timeout=1))
        self.assertEqual(svc.health()["counts"]["tasks"], 1)  # only the new worker

    def test_workers_run_without_super_on_start_or_on_stop(self):
        hooks = []

        class Custom(Sink):
            def on_start(self):
                hooks.append("on_start")

            def on_stop(self):
                hooks.append("on_stop")

        svc = Custom(worker_count=2)
        before = live_greenlets()
        svc.start()
        self.addCleanup(svc.stop)
        svc.enqueue("a")
        self.assertEventually(lambda: svc.handled == ["a"])
        svc.stop()
        self.assertEqual(hooks, ["on_start", "on_stop"])
        self.assertNoNewGreenlets(before)

    def test_stop_drains_queued_items(self):
        dropped = []

        class Quick(Sink):
            def on_dropped(self, items):
                dropped.extend(items)

        svc = self.started(Quick(delay=0.001))
        for item in range(20):
            self.assertTrue(svc.enqueue(item))
        svc.stop()
        self.assertEqual(svc.handled, list(range(20)))
        self.assertEqual(dropped, [])

    def test_on_dropped_gets_exactly_the_unprocessed_items(self):
        batches = []

        class Slow(Sink):
            drain_timeout = SHORT

            def on_dropped(self, items):
                batches.append(list(items))

        svc = Slow(delay=0.02)
        before = live_greenlets()
        svc.start()
        self.addCleanup(svc.stop)
        for item in range(30):
            self.assertTrue(svc.enqueue(item))
        gevent.sleep(0)
        started = time.monotonic()
        svc.stop()
        self.assertLess(time.monotonic() - started, 1.0)
        dropped = [item for batch in batches for item in batch]
        self.assertTrue(dropped, "nothing was dropped; drain_timeout was ignored")
        # No loss, no duplicate: the item in hand finished, the rest were handed over.
        self.assertEqual(len(svc.handled) + len(dropped), 30)
        self.assertEqual(sorted(svc.handled + dropped), list(range(30)))
        self.assertEqual(svc.started_items, svc.handled)
        self.assertEqual(svc.handled, list(range(len(svc.handled))))
        self.assertEqual(svc.queue.unfinished_tasks, 0)
        self.assertNoNewGreenlets(before)
        handled = len(svc.handled)
        gevent.sleep(SHORT)
        self.assertEqual(len(svc.handled), handled)

    def test_default_on_dropped_logs_a_warning_with_the_count(self):
        class Slow(Sink):
            drain_timeout = 0.02

        svc = self.started(Slow(delay=0.02))
        for item in range(30):
            svc.enqueue(item)
        gevent.sleep(0)
        with self.assertLogs("specter", "WARNING") as cm:
            svc.stop()
        count = 30 - len(svc.handled)
        self.assertGreater(count, 0)
        self.assertTrue(any(str(count) in line for line in cm.output), cm.output)

    def test_worker_hooks(self):
        log = []

        class Hooked(Sink):
            def on_workers_started(self):
                log.append("workers_started")

            def on_workers_stopping(self):
                log.append("workers_stopping")

            def on_dropped(self, items):
                log.append("dropped")

        svc = Hooked()
        svc.start()
        self.addCleanup(svc.stop)
        self.assertEqual(log, ["workers_started"])
        svc.stop()
        self.assertEqual(log[:2], ["workers_started", "workers_stopping"])
        self.assertEqual(log.count("workers_stopping"), 1)

    def test_restart(self):
        svc = self.started(Sink(worker_count=2))
        svc.enqueue(1)
        self.assertTrue(svc.join(timeout=WAIT))
        svc.stop()
        before = live_greenlets()
        svc.start()
        self.assertTrue(svc.enqueue(2))
        self.assertTrue(svc.join(timeout=WAIT))
        self.assertEqual(svc.handled, [1, 2])
        svc.stop()
        self.assertNoNewGreenlets(before)


# Lifecycle: Watcher ###########################################################


class TestWatcher(SpecterTestCase):

    def make(self, name="w", **kwargs):
        watcher = specter.Watcher(name, **kwargs)
        self.addCleanup(watcher.stop)
        return watcher

    def counter_poll(self):
        calls = []

        def poll():
            calls.append(time.monotonic())
            return len(calls)

        return poll, calls

    # Construction -------------------------------------------------------------

    def test_needs_exactly_one_of_poll_or_stream(self):
        with self.assertRaises(ValueError):
            specter.Watcher("w")
        with self.assertRaises(ValueError):
            specter.Watcher("w", poll=lambda: 1, stream=lambda: iter(()))

    def test_non_callable_poll_is_type_error(self):
        with self.assertRaises(TypeError):
            specter.Watcher("w", poll=5)
        with self.assertRaises(TypeError):
            specter.Watcher("w", stream="not callable")

    def test_interval_must_be_positive(self):
        for bad in (0, 0.0, -1, -0.5):
            with self.subTest(interval=bad), self.assertRaises(ValueError):
                specter.Watcher("w", poll=lambda: 1, interval=bad)

    # Poll mode ----------------------------------------------------------------

    def test_poll_delivers_values_to_subscribers(self):
        poll, _ = self.counter_poll()
        watcher = self.make(poll=poll, interval=0.01)
        got = []
        watcher.subscribe(lambda value, w: got.append((value, w)))
        self.assertIs(watcher.start(), watcher)
        self.assertTrue(watcher.running)
        self.assertTrue(wait_until(lambda: len(got) >= 3))
        self.assertEqual([v for v, _ in got[:3]], [1, 2, 3])
        self.assertTrue(all(w is watcher for _, w in got))
        self.assertEqual(watcher.last_value, got[-1][0])

    def test_poll_samples_every_interval(self):
        poll, calls = self.counter_poll()
        self.make(poll=poll, interval=0.05).start()
        self.assertTrue(wait_until(lambda: len(calls) >= 3))
        gaps = [b - a for a, b in zip(calls, calls[1:])]
        for gap in gaps:
            self.assertGreaterEqual(gap, 0.05 - SLACK)

    def test_transform_applies_to_each_value(self):
        poll, _ = self.counter_poll()
        watcher = self.make(poll=poll, interval=0.01, transform=lambda v: v * 10)
        got = []
        watcher.subscribe(lambda value, w: got.append(value))
        watcher.start()
        self.assertTrue(wait_until(lambda: len(got) >= 3))
        self.assertEqual(got[:3], [10, 20, 30])
        self.assertEqual(watcher.last_value % 10, 0)

    def test_dedupe_delivers_only_changes(self):
        samples = [1, 1, 2, 2, 2, 3, 3, 1]
        calls = []

        def poll():
            calls.append(1)
            return samples[min(len(calls), len(samples)) - 1]

        watcher = self.make(poll=poll, interval=0.005, dedupe=True)
        got = []
        watcher.subscribe(lambda value, w: got.append(value))
        watcher.start()
        self.assertTrue(wait_until(lambda: len(calls) >= len(samples) + 3))
        self.assertEqual(got, [1, 2, 3, 1])
        self.assertEqual(watcher.last_value, 1)

    def test_without_dedupe_repeats_are_delivered(self):
        watcher = self.make(poll=lambda: "same", interval=0.005)
        got = []
        watcher.subscribe(lambda value, w: got.append(value))
        watcher.start()
        self.assertTrue(wait_until(lambda: len(got) >= 3))
        self.assertEqual(set(got), {"same"})

    def test_dedupe_compares_transformed_values(self):
        poll, calls = self.counter_poll()
        watcher = self.make(poll=poll, interval=0.005, dedupe=True, transform=lambda v: v // 3)
        got = []
        watcher.subscribe(lambda value, w: got.append(value))
        watcher.start()
        self.assertTrue(wait_until(lambda: len(calls) >= 9))
        watcher.stop()
        self.assertEqual(got, sorted(set(got)))
        self.assertEqual(got[:3], [0, 1, 2])

    # Stream mode --------------------------------------------------------------

    def test_stream_delivers_items_as_they_come(self):
        gate = gevent.event.Event()

        def stream():
            yield "a"
            gate.wait()
            yield "b"
            gevent.sleep(30)

        watcher = self.make(stream=stream, interval=5.0)
        got = []
        watcher.subscribe(lambda value, w: got.append(value))
        watcher.start()
        self.assertTrue(wait_until(lambda: got == ["a"]))
        gevent.sleep(0.02)
        self.assertEqual(got, ["a"])  # "b" is not produced yet, and nothing was batched
        self.assertEqual(watcher.health()["mode"], "stream")
        gate.set()
        self.assertTrue(wait_until(lambda: got == ["a", "b"]))
        self.assertEqual(watcher.last_value, "b")

    def test_stream_that_ends_is_reopened_after_interval_with_retry(self):
        opens = []

        def stream():
            opens.append(time.monotonic())
            yield len(opens)

        watcher = self.make(stream=stream, interval=0.05, retry=True)
        got = []
        watcher.subscribe(lambda value, w: got.append(value))
        watcher.start()
        self.assertTrue(wait_until(lambda: len(opens) >= 3))
        self.assertEqual(got[:3], [1, 2, 3])
        for a, b in zip(opens, opens[1:]):
            self.assertGreaterEqual(b - a, 0.05 - SLACK)
        self.assertTrue(watcher.running)

    def test_stream_that_ends_is_not_reopened_without_retry(self):
        opens = []

        def stream():
            opens.append(time.monotonic())
            yield "only"

        watcher = self.make(stream=stream, interval=0.01, retry=False)
        got = []
        watcher.subscribe(lambda value, w: got.append(value))
        watcher.start()
        self.assertTrue(wait_until(lambda: not watcher.running))
        self.assertFalse(wait_until(lambda: len(opens) > 1, timeout=0.1))
        self.assertEqual(got, ["only"])
        self.assertEqual(watcher.health()["error_count"], 0)

    def test_stream_error_counts_and_retries(self):
        opens = []

        def stream():
            opens.append(1)
            yield len(opens)
            raise ValueError("stream broke")

        watcher = self.make(stream=stream, interval=0.01, max_backoff=0.01)
        got = []
        watcher.subscribe(lambda value, w: got.append(value))
        with self.assertLogs("specter", "ERROR"):
            watcher.start()
            self.assertTrue(wait_until(lambda: len(opens) >= 3))
        self.assertGreaterEqual(watcher.health()["error_count"], 2)
        self.assertEqual(got[:3], [1, 2, 3])
        self.assertIn("stream broke", watcher.health()["last_error"])

    # Errors and backoff -------------------------------------------------------

    def test_errors_count_and_set_last_error(self):
        def poll():
            raise ValueError("sensor offline")

        watcher = self.make(poll=poll, interval=0.01, max_backoff=0.01)
        self.assertEqual(watcher.health()["error_count"], 0)
        self.assertIsNone(watcher.health()["last_error"])
        with self.assertLogs("specter", "ERROR") as logs:
            watcher.start()
            self.assertTrue(wait_until(lambda: watcher.health()["error_count"] >= 2))
        self.assertIn("sensor offline", watcher.health()["last_error"])
        self.assertTrue(any(r.exc_info for r in logs.records))  # traceback kept
        self.assertTrue(watcher.running)

    def test_transform_error_counts_as_error(self):
        def transform(value):
            raise KeyError("bad sample")

        watcher = self.make(poll=lambda: 1, interval=0.01, max_backoff=0.01, transform=transform)
        got = []
        watcher.subscribe(lambda value, w: got.append(value))
        with self.assertLogs("specter", "ERROR"):
            watcher.start()
            self.assertTrue(wait_until(lambda: watcher.health()["error_count"] >= 2))
        self.assertEqual(got, [])
        self.assertIn("bad sample", watcher.health()["last_error"])

    def test_watcher_error_is_logged_at_warning(self):
        def poll():
            raise specter.WatcherError("upstream returned 503")

        watcher = self.make(poll=poll, interval=0.01, max_backoff=0.01)
        with self.assertLogs("specter", "WARNING") as logs:
            watcher.start()
            self.assertTrue(wait_until(lambda: watcher.health()["error_count"] >= 1))
            watcher.stop()
        warnings = [r for r in logs.records
                    if r.levelno == logging.WARNING and "upstream returned 503" in r.getMessage()]
        self.assertTrue(warnings, logs.output)
        self.assertIn("upstream returned 503", watcher.health()["last_error"])

    def test_backoff_grows_and_is_capped(self):
        # 5 failures then success. Nominal delays with interval=0.02 and
        # max_backoff=0.06: 0.02, 0.04, 0.06, 0.06, 0.06, each times a jitter
        # in [0.5, 1.0]. Uncapped, the 4th and 5th would be >= 0.08 and 0.16.
        attempts = []

        def poll():
            attempts.append(time.monotonic())
            if len(attempts) <= 5:
                raise ValueError("attempt %d" % len(attempts))
            return "ok"

        watcher = self.make(poll=poll, interval=0.02, max_backoff=0.06)
        got = []
        watcher.subscribe(lambda value, w: got.append(value))
        with self.assertLogs("specter", "ERROR"):
            watcher.start()
            self.assertTrue(wait_until(lambda: got))
        self.assertEqual(len(attempts), 6)
        gaps = [b - a for a, b in zip(attempts, attempts[1:])]
        nominal = [0.02, 0.04, 0.06, 0.06, 0.06]
        for gap, base in zip(gaps, nominal):
            self.assertGreaterEqual(gap, 0.5 * base - SLACK, gaps)  # grows, jitter floor 0.5x
        for gap in gaps:
            self.assertLessEqual(gap, 0.06 + 0.06, gaps)  # capped (uncapped 5th >= 0.16)
        self.assertEqual(watcher.health()["error_count"], 5)

    def test_backoff_has_jitter(self):
        # With max_backoff == interval every backoff is 0.04 x jitter, jitter
        # in [0.5, 1.0]. A busy machine only lengthens gaps, so a gap clearly
        # under 0.04 shows jitter (all 7 landing above 0.9x: ~1e-7).
        attempts = []

        def poll():
            attempts.append(time.monotonic())
            raise ValueError("down")

        watcher = self.make(poll=poll, interval=0.04, max_backoff=0.04)
        with self.assertLogs("specter", "ERROR"):
            watcher.start()
            self.assertTrue(wait_until(lambda: len(attempts) >= 8))
        watcher.stop()
        gaps = [b - a for a, b in zip(attempts, attempts[1:])]
        self.assertTrue(all(gap >= 0.02 - SLACK for gap in gaps), gaps)
        self.assertLess(min(gaps), 0.036, gaps)

    def test_backoff_resets_after_success(self):
        # 4 failures (nominal 0.02, 0.04, 0.08, 0.16), a success, then a
        # failure: after a reset its backoff is <= 0.02; without one it would
        # be 0.32 * jitter >= 0.16.
        attempts = []
        outcomes = ["fail", "fail", "fail", "fail", "ok", "fail", "ok"]

        def poll():
            attempts.append(time.monotonic())
            outcome = outcomes[min(len(attempts), len(outcomes)) - 1]
            if outcome == "fail":
                raise ValueError("attempt %d" % len(attempts))
            return len(attempts)

        watcher = self.make(poll=poll, interval=0.02, max_backoff=1.0)
        with self.assertLogs("specter", "ERROR"):
            watcher.start()
            self.assertTrue(wait_until(lambda: len(attempts) >= 7, timeout=3.0))
        gaps = [b - a for a, b in zip(attempts, attempts[1:])]
        self.assertGreaterEqual(gaps[3], 0.08 - SLACK, gaps)  # 4th failure backed off 0.16 x jitter
        self.assertLess(gaps[5], 0.1, gaps)  # the failure after the success starts over

    def test_without_retry_the_first_error_ends_the_loop(self):
        calls = []

        def poll():
            calls.append(1)
            raise ValueError("once")

        watcher = self.make(poll=poll, interval=0.01, retry=False)
        with self.assertLogs("specter", "ERROR"):
            watcher.start()
            self.assertTrue(wait_until(lambda: not watcher.running))
        self.assertFalse(wait_until(lambda: len(calls) > 1, timeout=0.05))
        self.assertEqual(calls, [1])
        health = watcher.health()
        self.assertFalse(health["running"])
        self.assertEqual(health["error_count"], 1)

    # Stop ---------------------------------------------------------------------

    def test_stop_is_prompt_mid_interval(self):
        loops = []

        def poll():
            loops.append(gevent.getcurrent())
            return 1

        watcher = self.make(poll=poll, interval=5.0)
        watcher.start()
        self.assertTrue(wait_until(lambda: loops))
        started = time.monotonic()
        self.assertIs(watcher.stop(), watcher)
        self.assertLess(time.monotonic() - started, 0.1)
        self.assertTrue(loops[0].dead)
        self.assertFalse(watcher.running)
        self.assertFalse(watcher.health()["running"])

    def test_stop_is_prompt_during_backoff(self):
        loops = []

        def poll():
            loops.append(gevent.getcurrent())
            raise ValueError("down")

        watcher = self.make(poll=poll, interval=5.0, max_backoff=30.0)
        with self.assertLogs("specter", "ERROR"):
            watcher.start()
            self.assertTrue(wait_until(lambda: watcher.health()["error_count"] >= 1))
        started = time.monotonic()
        watcher.stop()
        self.assertLess(time.monotonic() - started, 0.1)
        self.assertTrue(loops[0].dead)
        self.assertFalse(watcher.running)
        self.assertEqual(len(loops), 1)

    def test_stop_is_prompt_while_stream_blocks(self):
        loops = []

        def stream():
            loops.append(gevent.getcurrent())
            yield 1
            gevent.sleep(30)
            yield 2

        watcher = self.make(stream=stream, interval=5.0)
        watcher.start()
        self.assertTrue(wait_until(lambda: watcher.last_value == 1))
        started = time.monotonic()
        watcher.stop()
        self.assertLess(time.monotonic() - started, 0.1)
        self.assertTrue(loops[0].dead)

    def test_stop_is_idempotent_and_safe_before_start(self):
        watcher = self.make(poll=lambda: 1, interval=5.0)
        self.assertIs(watcher.stop(), watcher)
        watcher.start()
        watcher.stop()
        self.assertIs(watcher.stop(), watcher)
        self.assertFalse(watcher.running)

    def test_teardown_is_an_alias_of_stop(self):
        loops = []

        def poll():
            loops.append(gevent.getcurrent())
            return 1

        watcher = self.make(poll=poll, interval=5.0)
        watcher.start()
        self.assertTrue(wait_until(lambda: loops))
        self.assertIs(watcher.teardown(), watcher)
        self.assertFalse(watcher.running)
        self.assertTrue(loops[0].dead)

    def test_start_is_idempotent(self):
        poll, calls = self.counter_poll()
        watcher = self.make(poll=poll, interval=5.0)
        self.assertIs(watcher.start(), watcher)
        self.assertIs(watcher.start(), watcher)
        self.assertTrue(wait_until(lambda: calls))
        self.assertFalse(wait_until(lambda: len(calls) > 1, timeout=0.05))  # one loop, not two

    def test_restart_after_stop(self):
        poll, calls = self.counter_poll()
        watcher = self.make(poll=poll, interval=0.01)
        got = []
        watcher.subscribe(lambda value, w: got.append(value))
        watcher.start()
        self.assertTrue(wait_until(lambda: len(got) >= 2))
        watcher.stop()
        seen = len(got)
        self.assertFalse(wait_until(lambda: len(got) > seen, timeout=0.05))
        watcher.start()
        self.assertTrue(watcher.running)
        self.assertTrue(wait_until(lambda: len(got) >= seen + 2))
        self.assertTrue(watcher.health()["running"])

    def test_service_owns_watcher(self):
        service = specter.Service("owner")
        service.start()
        self.addCleanup(service.stop)
        watcher = self.make(poll=lambda: 1, interval=5.0)
        self.assertIs(service.own(watcher), watcher)
        watcher.start()
        self.assertTrue(wait_until(lambda: watcher.last_value == 1))
        service.stop()
        self.assertFalse(watcher.running)

    # Subscribers --------------------------------------------------------------

    def test_subscriber_that_raises_is_logged_and_loop_goes_on(self):
        poll, _ = self.counter_poll()
        watcher = self.make(poll=poll, interval=0.01)
        bad_calls, good = [], []

        def bad(value, w):
            bad_calls.append(value)
            raise RuntimeError("subscriber bug")

        watcher.subscribe(bad)
        watcher.subscribe(lambda value, w: good.append(value))
        with self.assertLogs("specter", "ERROR") as logs:
            watcher.start()
            self.assertTrue(wait_until(lambda: len(good) >= 3))
        self.assertGreaterEqual(len(bad_calls), 3)  # still called after raising
        self.assertEqual(good[:3], [1, 2, 3])
        self.assertTrue(watcher.running)
        self.assertEqual(watcher.health()["error_count"], 0)  # the source did not fail
        self.assertTrue(any(r.exc_info for r in logs.records), logs.output)  # traceback kept

    def test_subscribe_returns_working_unsubscribe(self):
        poll, _ = self.counter_poll()
        watcher = self.make(poll=poll, interval=0.01)
        first, second = [], []
        unsubscribe = watcher.subscribe(lambda value, w: first.append(value))
        watcher.subscribe(lambda value, w: second.append(value))
        self.assertEqual(watcher.health()["subscribers"], 2)
        watcher.start()
        self.assertTrue(wait_until(lambda: len(first) >= 1))
        unsubscribe()
        self.assertEqual(watcher.health()["subscribers"], 1)
        frozen = list(first)
        seen = len(second)
        self.assertTrue(wait_until(lambda: len(second) >= seen + 3))
        self.assertEqual(first, frozen)

    def test_subscribe_rejects_non_callable(self):
        watcher = self.make(poll=lambda: 1)
        with self.assertRaises(TypeError):
            watcher.subscribe("nope")

    # Health -------------------------------------------------------------------

    def test_health_keys_and_values(self):
        watcher = self.make("sensors", poll=lambda: 42, interval=0.01)
        health = watcher.health()
        for key in ("name", "running", "mode", "error_count", "uptime_seconds", "subscribers",
                    "last_error", "last_value_at"):
            self.assertIn(key, health)
        self.assertEqual(health["name"], "sensors")
        self.assertEqual(health["mode"], "poll")
        self.assertFalse(health["running"])
        self.assertIsNone(health["last_value_at"])
        self.assertIsNone(watcher.last_value)
        watcher.subscribe(lambda value, w: None)
        watcher.start()
        self.assertTrue(wait_until(lambda: watcher.last_value == 42))
        gevent.sleep(0.02)
        health = watcher.health()
        self.assertTrue(health["running"])
        self.assertEqual(health["subscribers"], 1)
        self.assertIsNotNone(health["last_value_at"])
        self.assertGreater(health["uptime_seconds"], 0)
        self.assertEqual(health["error_count"], 0)
        self.assertIsNone(health["last_error"])
        watcher.stop()
        self.assertFalse(watcher.health()["running"])
        self.assertEqual(watcher.last_value, 42)  # kept after stop


# State: Store #################################################################


class TestStore(SpecterTestCase):
    def test_changes_left_by_a_killed_round_are_delivered_before_newer_ones(self):
        store = create_store("s", {"v": 0})
        seen = []
        gate = gevent.event.Event()

        def slow(snapshot, s):
            seen.append(snapshot["v"])
            if snapshot["v"] == 1:
                gate.wait()
        store.subscribe(slow)
        writer = gevent.spawn(store.set, {"v": 1})
        gevent.sleep(0)
        store.set({"v": 2})  # queued behind the round of 1
        writer.kill()  # the round's greenlet dies with 2 still queued
        store.set({"v": 3})
        self.assertEqual(seen, [1, 2, 3])

    def test_create_store(self):
        store = create_store("connections", {"count": 0, "active": []})
        self.assertIsInstance(store, Store)
        self.assertEqual(store.name, "connections")
        self.assertEqual(store.get(), {"count": 0, "active": []})
        self.assertEqual(create_store("empty").get(), {})

    def test_get_key_default_and_snapshots(self):
        store = create_store("s", {"a": 1})
        self.assertEqual(store.get("a"), 1)
        self.assertIsNone(store.get("missing"))
        self.assertEqual(store.get("missing", 5), 5)
        copy = store.get()
        copy["b"] = 2
        snap = store.snapshot()
        snap["c"] = 3
        self.assertEqual(store.get(), {"a": 1})

    def test_access_reads_the_live_mapping_without_notifying(self):
        store = create_store("s", {"a": 1})
        rec = Recorder()
        store.subscribe(rec)
        self.assertEqual(store.access(lambda state: state["a"] + 1), 2)
        self.assertEqual(store.access(lambda state: dict(state)), {"a": 1})
        self.assertEqual(rec.count, 0)

    def test_set_shallow_merges_and_returns_a_snapshot(self):
        store = create_store("s", {"a": {"x": 1}, "b": 2})
        rec = Recorder()
        store.subscribe(rec)
        snap = store.set({"a": {"y": 2}, "c": 3})
        self.assertEqual(snap, {"a": {"y": 2}, "b": 2, "c": 3})
        self.assertEqual(store.get(), snap)
        snap["d"] = 4
        self.assertNotIn("d", store.get())
        self.assertEqual(rec.count, 1)
        self.assertEqual(rec.calls[0][1], store)

    def test_set_non_dict_is_type_error(self):
        store = create_store("s", {"a": 1})
        for bad in (None, [("a", 2)], "a", 5):
            with self.subTest(bad=bad):
                with self.assertRaises(TypeError):
                    store.set(bad)
        self.assertEqual(store.get(), {"a": 1})

    def test_replace(self):
        store = create_store("s", {"a": 1, "b": 2})
        rec = Recorder()
        store.subscribe(rec)
        self.assertEqual(store.replace({"c": 3}), {"c": 3})
        self.assertEqual(store.get(), {"c": 3})
        self.assertEqual(rec.firsts, [{"c": 3}])

    def test_delete_notifies_only_when_something_was_removed(self):
        store = create_store("s", {"a": 1, "b": 2})
        rec = Recorder()
        store.subscribe(rec)
        store.delete("missing")
        self.assertEqual(rec.count, 0)
        self.assertEqual(store.delete("a", "missing"), {"b": 2})
        self.assertEqual(rec.firsts, [{"b": 2}])

    def test_clear_notifies_only_when_not_empty(self):
        store = create_store("s", {"a": 1})
        rec = Recorder()
        store.subscribe(rec)
        self.assertEqual(store.clear(), {})
        store.clear()
        self.assertEqual(rec.firsts, [{}])

    def test_update_mutates_a_draft_or_takes_a_replacement(self):
        store = create_store("s", {"count": 0})
        before = store.get()
        snap = store.update(lambda draft: draft.update({"count": draft["count"] + 1}))
        self.assertEqual(snap, {"count": 1})
        self.assertEqual(before, {"count": 0})
        self.assertEqual(store.update(lambda draft: {"fresh": True}), {"fresh": True})
        self.assertEqual(store.get(), {"fresh": True})

    def test_update_bad_return_is_type_error_and_changes_nothing(self):
        store = create_store("s", {"count": 0})
        rec = Recorder()
        store.subscribe(rec)
        for bad in (5, [("count", 2)], "x"):
            with self.subTest(bad=bad):
                def mutator(draft, bad=bad):
                    draft["count"] = 99
                    return bad
                with self.assertRaises(TypeError):
                    store.update(mutator)
        self.assertEqual(store.get(), {"count": 0})
        self.assertEqual(rec.count, 0)

    def test_update_that_raises_changes_nothing(self):
        store = create_store("s", {"count": 0})

        def mutator(draft):
            draft["count"] = 99
            raise KeyError("nope")

        with self.assertRaises(KeyError):
            store.update(mutator)
        self.assertEqual(store.get(), {"count": 0})

    def test_subscribe_immediate_unsubscribe_and_watch(self):
        store = create_store("s", {"a": 1})
        rec = Recorder()
        unsubscribe = store.subscribe(rec, immediate=True)
        self.assertEqual(rec.calls, [({"a": 1}, store)])
        store.set({"a": 2})
        unsubscribe()
        store.set({"a": 3})
        self.assertEqual(rec.firsts, [{"a": 1}, {"a": 2}])
        watcher = Recorder()
        store.watch(watcher)
        self.assertEqual(watcher.firsts, [{"a": 3}])
        quiet = Recorder()
        store.watch(quiet, immediate=False)
        self.assertEqual(quiet.count, 0)

    def test_subscriber_that_raises_is_isolated(self):
        store = create_store("s")
        rec = Recorder()
        store.subscribe(lambda snap, st: TestService._raise("store subscriber broke"))
        store.subscribe(rec)
        with self.assertLogs("specter", "ERROR") as cm:
            store.set({"a": 1})
        self.assertLoggedException(cm, "store subscriber broke")
        self.assertEqual(rec.count, 1)

    def test_subscribe_owner(self):
        store = create_store("s")
        with self.assertRaises(TypeError):
            store.subscribe(Recorder(), owner=object())
        owner = self.started(Service("owner"))
        rec = Recorder()
        store.subscribe(rec, owner=owner)
        store.set({"a": 1})
        owner.stop()
        store.set({"a": 2})
        self.assertEqual(rec.count, 1)

    def test_emit_events(self):
        changed = Recorder()
        specter.bus.on("conn:changed", changed)
        store = create_store("conn", {"count": 0}, emit_events=True)
        store.set({"count": 1})
        self.assertEqual(changed.firsts, [{"count": 1}])
        quiet = create_store("quiet", {"count": 0})
        silent = Recorder()
        specter.bus.on("quiet:changed", silent)
        quiet.set({"count": 1})
        self.assertEqual(silent.count, 0)

    def test_change_event(self):
        custom = Recorder()
        specter.bus.on("conn:custom", custom)
        store = create_store("conn", emit_events=True, change_event="conn:custom")
        store.set({"a": 1})
        self.assertEqual(custom.firsts, [{"a": 1}])

    def test_stop_is_destroy_and_owned_by_a_service(self):
        for method in ("stop", "destroy"):
            with self.subTest(method=method):
                store = create_store("s")
                rec = Recorder()
                store.subscribe(rec)
                getattr(store, method)()
                store.set({"a": 1})
                self.assertEqual(rec.count, 0)
        svc = self.started(Service("holder"))
        store = svc.own(create_store("owned"))
        rec = Recorder()
        store.subscribe(rec)
        svc.stop()
        store.set({"a": 1})
        self.assertEqual(rec.count, 0)

    def test_subscribers_see_commits_in_order_with_concurrent_writers(self):
        # Each commit raises exactly one writer's counter by one, so the sum of
        # the counters is the commit number: every subscriber must see 1..N.
        writers, writes = 4, 40
        store = create_store("seq")
        seen = {"a": [], "b": []}

        def make(name):
            def subscriber(snap, st):
                version = sum(snap.values())
                seen[name].append(version)
                yield_a_few(version)
                intact.append(sum(snap.values()) == version)
            return subscriber

        intact = []

        store.subscribe(make("a"))
        store.subscribe(make("b"))

        def writer(index):
            for count in range(1, writes + 1):
                store.set({"w%d" % index: count})
                gevent.sleep(0)

        gevent.joinall([gevent.spawn(writer, i) for i in range(writers)], timeout=5, raise_error=True)
        total = writers * writes
        self.assertEventually(lambda: all(len(s) == total for s in seen.values()))
        for name, versions in seen.items():
            self.assertEqual(versions, list(range(1, total + 1)), name)
        self.assertTrue(all(intact), "a snapshot changed after delivery")

    def test_reentrant_write_is_delivered_after_the_current_round(self):
        store = create_store("s", {"n": 0})
        first_seen, second_seen = [], []

        def first(snap, st):
            first_seen.append(snap["n"])
            if snap["n"] == 1:
                st.set({"n": 2})

        store.subscribe(first)
        store.subscribe(lambda snap, st: second_seen.append(snap["n"]))
        store.set({"n": 1})
        self.assertEqual(first_seen, [1, 2])
        self.assertEqual(second_seen, [1, 2])


# State: Model #################################################################


def _tv():
    return create_model("tv", {"playback": {"url": None, "position": 0}, "casting": False})


class TestModel(SpecterTestCase):
    def test_create_model(self):
        model = _tv()
        self.assertIsInstance(model, Model)
        self.assertEqual(model.name, "tv")
        self.assertEqual(create_model("empty").get(), {})

    def test_paths_as_string_tuple_or_list(self):
        model = create_model("m", {"a": {"b": {"c": 1}}})
        self.assertEqual(model.get("a.b.c"), 1)
        self.assertEqual(model.get(("a", "b", "c")), 1)
        self.assertEqual(model.get(["a", "b", "c"]), 1)
        self.assertEqual(model.get("a.b"), {"c": 1})
        self.assertIsNone(model.get("a.x.c"))
        self.assertEqual(model.get("a.x.c", "dflt"), "dflt")
        model.set(("a", "b", "d"), 2)
        model.set(["a", "e"], 3)
        self.assertEqual(model.get(), {"a": {"b": {"c": 1, "d": 2}, "e": 3}})

    def test_get_and_snapshot_return_deep_copies(self):
        model = create_model("m", {"a": {"b": {"c": [1]}}})
        model.get("a")["b"]["c"].append(2)
        model.get()["a"]["b"]["x"] = 1
        model.snapshot()["a"]["b"]["c"].append(3)
        self.assertEqual(model.get(), {"a": {"b": {"c": [1]}}})

    def test_values_stored_are_copies(self):
        initial = {"a": {"b": 1}}
        model = create_model("m", initial)
        initial["a"]["b"] = 99
        value = {"k": [1]}
        model.set("x", value)
        value["k"].append(2)
        patch = {"p": {"q": [1]}}
        model.patch(patch)
        patch["p"]["q"].append(2)
        self.assertEqual(model.get(), {"a": {"b": 1}, "x": {"k": [1]}, "p": {"q": [1]}})

    def test_set_creates_missing_dicts(self):
        model = create_model("m")
        model.set("x.y.z", 1)
        self.assertEqual(model.get(), {"x": {"y": {"z": 1}}})

    def test_empty_path_is_value_error(self):
        model = create_model("m")
        for bad in ("", (), []):
            with self.subTest(bad=bad):
                with self.assertRaises(ValueError):
                    model.set(bad, 1)

    def test_path_through_a_non_dict_is_type_error(self):
        model = create_model("m", {"a": 5})
        with self.assertRaises(TypeError):
            model.set("a.b", 1)
        self.assertEqual(model.get(), {"a": 5})

    def test_patch_is_a_shallow_merge_at_the_root(self):
        model = _tv()
        model.patch({"casting": True, "playback": {"url": "/new.mp4"}})
        self.assertEqual(model.get(), {"playback": {"url": "/new.mp4"}, "casting": True})

    def test_update(self):
        model = create_model("m", {"a": {"b": 1}, "c": 1})
        before = model.get()
        model.update(lambda draft: draft["a"].update({"b": 2}))
        self.assertEqual(model.get(), {"a": {"b": 2}, "c": 1})
        self.assertEqual(before, {"a": {"b": 1}, "c": 1})
        model.update(lambda draft: {"fresh": {"x": 1}})
        self.assertEqual(model.get(), {"fresh": {"x": 1}})

    def test_delete_and_clear(self):
        model = create_model("m", {"a": {"b": 1, "c": 2}, "d": 3})
        model.delete("a.b")
        self.assertEqual(model.get(), {"a": {"c": 2}, "d": 3})
        model.delete(("d",))
        self.assertEqual(model.get(), {"a": {"c": 2}})
        model.clear()
        self.assertEqual(model.get(), {})

    def test_select_path_or_callable(self):
        model = create_model("m", {"a": {"b": [1, 2]}})
        self.assertEqual(model.select("a.b"), [1, 2])
        self.assertEqual(model.select(("a", "b")), [1, 2])
        self.assertEqual(model.select(lambda s: s["a"]["b"][1]), 2)
        self.assertEqual(model.select("a.zzz", "dflt"), "dflt")
        model.select("a.b").append(3)
        self.assertEqual(model.get("a.b"), [1, 2])

    def test_subscribe_without_selector_gets_every_change(self):
        model = create_model("m", {"a": 1})
        rec = Recorder()
        model.subscribe(rec)
        model.set("a", 2)
        model.patch({"b": 1})
        self.assertEqual(rec.firsts, [{"a": 2}, {"a": 2, "b": 1}])
        self.assertIs(rec.calls[0][1], model)
        rec.calls[1][0]["a"] = 99
        self.assertEqual(model.get("a"), 2)

    def test_path_selector_fires_only_when_the_selected_value_changes(self):
        model = _tv()
        rec = Recorder()
        model.subscribe(rec, selector="playback.url")
        model.set("casting", True)
        model.set("playback.position", 5)
        model.set("playback.url", None)
        model.patch({"casting": False})
        self.assertEqual(rec.count, 0)
        model.set("playback.url", "/movie.mp4")
        self.assertEqual(rec.calls, [("/movie.mp4", model)])
        model.update(lambda draft: draft.update({"casting": True}))
        model.patch({"playback": {"url": "/movie.mp4", "position": 9}})
        self.assertEqual(rec.count, 1)
        model.delete("playback.url")
        self.assertEqual(rec.firsts, ["/movie.mp4", None])

    def test_callable_selector(self):
        model = _tv()
        rec = Recorder()
        model.subscribe(rec, selector=lambda s: s["playback"]["url"])
        model.set("playback.position", 3)
        model.set("playback.url", "/a.mp4")
        model.set("playback.url", "/a.mp4")
        self.assertEqual(rec.firsts, ["/a.mp4"])

    def test_selected_value_is_a_copy(self):
        model = create_model("m", {"a": {"list": [1]}})
        rec = Recorder(side_effect=lambda value, m: value["list"].append("evil"))
        model.subscribe(rec, selector="a", immediate=True)
        model.set("a.x", 1)
        self.assertEqual(rec.count, 2)
        self.assertEqual(model.get(), {"a": {"list": [1], "x": 1}})

    def test_subscribe_immediate_and_watch(self):
        model = _tv()
        rec = Recorder()
        unsubscribe = model.subscribe(rec, selector="playback.position", immediate=True)
        self.assertEqual(rec.calls, [(0, model)])
        unsubscribe()
        model.set("playback.position", 1)
        self.assertEqual(rec.count, 1)
        watched = Recorder()
        model.watch(watched, selector="casting")
        self.assertEqual(watched.firsts, [False])
        model.set("casting", True)
        self.assertEqual(watched.firsts, [False, True])
        whole = Recorder()
        model.watch(whole)
        self.assertEqual(whole.firsts, [model.get()])

    def test_subscriber_that_raises_is_isolated(self):
        model = create_model("m")
        rec = Recorder()
        model.subscribe(lambda value, m: TestService._raise("model subscriber broke"))
        model.subscribe(rec)
        with self.assertLogs("specter", "ERROR") as cm:
            model.set("a", 1)
        self.assertLoggedException(cm, "model subscriber broke")
        self.assertEqual(rec.count, 1)

    def test_subscribe_owner(self):
        model = create_model("m")
        with self.assertRaises(TypeError):
            model.subscribe(Recorder(), owner=object())
        owner = self.started(Service("owner"))
        rec = Recorder()
        model.subscribe(rec, owner=owner)
        model.set("a", 1)
        owner.stop()
        model.set("a", 2)
        self.assertEqual(rec.count, 1)

    def test_emit_events_and_change_event(self):
        changed, custom = Recorder(), Recorder()
        specter.bus.on("tv:changed", changed)
        specter.bus.on("tv:custom", custom)
        model = create_model("tv", {"a": 1}, emit_events=True)
        model.set("a", 2)
        self.assertEqual(changed.firsts, [{"a": 2}])
        other = create_model("tv", {}, emit_events=True, change_event="tv:custom")
        other.set("b", 1)
        self.assertEqual(custom.firsts, [{"b": 1}])

    def test_stop_is_destroy_and_owned_by_a_service(self):
        for method in ("stop", "destroy"):
            with self.subTest(method=method):
                model = create_model("m")
                rec = Recorder()
                model.subscribe(rec)
                getattr(model, method)()
                model.set("a", 1)
                self.assertEqual(rec.count, 0)
        svc = self.started(Service("holder"))
        model = svc.own(create_model("owned"))
        rec = Recorder()
        model.subscribe(rec)
        svc.stop()
        model.set("a", 1)
        self.assertEqual(rec.count, 0)

    def test_subscribers_see_commits_in_order_with_concurrent_writers(self):
        writers, writes = 4, 30
        model = create_model("seq", {"w": {}})
        seen = {"all": [], "selected": []}

        def whole(snap, m):
            version = sum(snap["w"].values())
            seen["all"].append(version)
            yield_a_few(version)

        def selected(value, m):
            version = sum(value.values())
            seen["selected"].append(version)
            yield_a_few(version)

        model.subscribe(whole)
        model.subscribe(selected, selector="w")

        def writer(index):
            for count in range(1, writes + 1):
                model.set(("w", "k%d" % index), count)
                gevent.sleep(0)

        gevent.joinall([gevent.spawn(writer, i) for i in range(writers)], timeout=5, raise_error=True)
        total = writers * writes
        self.assertEventually(lambda: all(len(s) == total for s in seen.values()))
        for name, versions in seen.items():
            self.assertEqual(versions, list(range(1, total + 1)), name)

    def test_reentrant_write_is_delivered_after_the_current_round(self):
        model = create_model("m", {"n": 0})
        first_seen, second_seen = [], []

        def first(value, m):
            first_seen.append(value)
            if value == 1:
                m.set("n", 2)

        model.subscribe(first, selector="n")
        model.subscribe(lambda value, m: second_seen.append(value), selector="n")
        model.set("n", 1)
        self.assertEqual(first_seen, [1, 2])
        self.assertEqual(second_seen, [1, 2])

    def test_large_model_unrelated_subtree_subscriber_stays_quiet(self):
        big = {"g%d" % g: {"k%d" % k: k for k in range(100)} for g in range(100)}
        model = create_model("big", {"big": big, "other": {"x": 1}})
        by_path, by_callable = Recorder(), Recorder()
        model.subscribe(by_path, selector="other")
        model.subscribe(by_callable, selector=lambda s: s["other"])
        model.set("big.g5.k5", -1)
        model.patch({"big": model.get("big")})
        self.assertEqual((by_path.count, by_callable.count), (0, 0))
        model.set("other.x", 2)
        self.assertEqual(by_path.firsts, [{"x": 2}])
        self.assertEqual(by_callable.firsts, [{"x": 2}])
        self.assertEqual(model.get("big.g5.k5"), -1)
        self.assertEqual(model.get("big.g6.k5"), 5)

    def test_set_shares_every_subtree_off_the_written_path(self):
        # Structural sharing, seen through a callable selector (which gets the
        # read-only internal state): a write replaces the dicts on its path and
        # keeps every other subtree the very same object.
        model = create_model("shared", {
            "a": {"b": {"c": 0}},
            "groups": {"g%d" % g: {"i%d" % i: i for i in range(100)} for g in range(100)},
        })
        roots = []
        model.subscribe(lambda value, m: None, selector=lambda state: roots.append(state) or id(state))
        model.set("a.b.c", 1)
        after = roots[-1]
        self.assertIsNot(after, roots[0])
        self.assertIs(after["groups"], roots[0]["groups"])
        self.assertIs(after["groups"]["g7"], roots[0]["groups"]["g7"])
        self.assertIsNot(after["a"], roots[0]["a"])
        self.assertEqual(roots[0]["a"]["b"]["c"], 0)  # the old tree was not mutated
        self.assertEqual(model.get("a.b.c"), 1)


# State: Cache #################################################################


class TestCache(SpecterTestCase):
    def test_caller_after_invalidate_does_not_join_the_overtaken_computation(self):
        cache = create_cache("c")
        release = gevent.event.Event()
        versions = iter(["old", "new"])

        def slow():
            value = next(versions)
            if value == "old":
                release.wait()
            return value
        first = gevent.spawn(cache.get_or_compute, slow)
        gevent.sleep(0)
        cache.invalidate()
        later = gevent.spawn(cache.get_or_compute, slow)
        gevent.sleep(0)
        release.set()
        self.assertEqual((first.get(timeout=1), later.get(timeout=1)), ("old", "new"))
        self.assertEqual(cache.get(), "new")

    def test_concurrent_cascades_through_a_cycle_terminate(self):
        counts = {"a": 0, "b": 0}
        a = create_cache("a", depends_on=["b:invalidated"])
        b = create_cache("b", depends_on=["a:invalidated"])
        for cache in (a, b):
            cache.on_invalidate(lambda c: (counts.__setitem__(c.name, counts[c.name] + 1), gevent.sleep(0)))
        gevent.joinall([gevent.spawn(a.invalidate), gevent.spawn(b.invalidate)], timeout=2)
        self.assertEqual(counts, {"a": 2, "b": 2})  # each cascade invalidates each cache once

    def test_concurrent_invalidations_from_two_greenlets_both_happen(self):
        cache = create_cache("c")
        calls = []

        def slow_callback(c):
            calls.append(gevent.getcurrent())
            gevent.sleep(0.01)
        cache.on_invalidate(slow_callback)
        cache.set(1)
        first = gevent.spawn(cache.invalidate)
        gevent.sleep(0)
        cache.set(2)  # lands while the first invalidation's callback yields
        cache.invalidate()
        first.join()
        self.assertEqual(len(calls), 2)
        self.assertFalse(cache.is_valid())

    def test_create_cache_and_properties(self):
        cache = create_cache("drives", ttl=300)
        self.assertIsInstance(cache, Cache)
        self.assertEqual(cache.name, "drives")
        self.assertEqual(cache.ttl, 300)
        self.assertFalse(cache.is_valid())
        self.assertIsNone(cache.get())
        self.assertEqual(cache.get("dflt"), "dflt")
        cache.set([1])
        self.assertTrue(cache.is_valid())
        self.assertEqual(cache.get(), [1])
        first = cache.updated_at
        self.assertIsInstance(first, (int, float))
        gevent.sleep(0.01)
        cache.set([2])
        self.assertGreater(cache.updated_at, first)

    def test_none_and_falsy_values_are_cached(self):
        for value in (None, 0, "", False, [], {}):
            with self.subTest(value=value):
                cache = create_cache("c")
                cache.set(value)
                self.assertTrue(cache.is_valid())
                self.assertEqual(cache.get("dflt"), value)
                factory = Recorder(result="computed")
                self.assertEqual(cache.get_or_compute(factory), value)
                self.assertEqual(factory.count, 0)
        cache = create_cache("computed-none")
        factory = Recorder(result=None)
        self.assertIsNone(cache.get_or_compute(factory))
        self.assertIsNone(cache.get_or_compute(factory))
        self.assertEqual(factory.count, 1)

    def test_ttl_expiry(self):
        cache = create_cache("c", ttl=SHORT)
        started = time.monotonic()
        cache.set("v")
        self.assertTrue(cache.is_valid())
        self.assertEventually(lambda: not cache.is_valid(), timeout=1.0)
        self.assertGreaterEqual(time.monotonic() - started, SHORT * 0.8)
        self.assertEqual(cache.get("dflt"), "dflt")
        factory = Recorder(result="again")
        self.assertEqual(cache.get_or_compute(factory), "again")
        self.assertEqual(factory.count, 1)

    def test_ttl_zero_never_expires(self):
        cache = create_cache("c", ttl=0)
        cache.set("v")
        gevent.sleep(0.1)
        self.assertTrue(cache.is_valid())
        self.assertEqual(cache.get(), "v")

    def test_set_and_get_or_compute_ttl_override(self):
        for ttl in (0, 300):
            with self.subTest(cache_ttl=ttl):
                cache = create_cache("c", ttl=ttl)
                cache.set("v", ttl=SHORT)
                self.assertTrue(cache.is_valid())
                self.assertEventually(lambda: not cache.is_valid(), timeout=1.0)
                cache.get_or_compute(lambda: "w", ttl=SHORT)
                self.assertTrue(cache.is_valid())
                self.assertEventually(lambda: not cache.is_valid(), timeout=1.0)
        cache = create_cache("c", ttl=SHORT)
        cache.set("v", ttl=0)
        gevent.sleep(SHORT * 2)
        self.assertTrue(cache.is_valid())

    def test_bad_ttl(self):
        with self.assertRaises(ValueError):
            create_cache("c", ttl=-1)
        for bad in ("soon", True, [1]):
            with self.subTest(bad=bad):
                with self.assertRaises(TypeError):
                    create_cache("c", ttl=bad)
        cache = create_cache("c")
        with self.assertRaises(ValueError):
            cache.set(1, ttl=-5)
        with self.assertRaises(ValueError):
            cache.get_or_compute(lambda: 1, ttl=-5)
        self.assertFalse(cache.is_valid())

    def test_get_or_compute_is_single_flight(self):
        cache = create_cache("c")
        gate = gevent.event.Event()
        calls = []

        def factory():
            calls.append(1)
            gate.wait(WAIT)
            return {"n": 42}

        callers = [gevent.spawn(cache.get_or_compute, factory) for _ in range(3)]
        gevent.sleep(0.01)
        self.assertEqual(len(calls), 1)
        gate.set()
        gevent.joinall(callers, timeout=WAIT)
        self.assertEqual([c.value for c in callers], [{"n": 42}] * 3)
        self.assertEqual(len(calls), 1)
        self.assertEqual(cache.get(), {"n": 42})

    def test_raising_factory_releases_waiters_with_the_same_error(self):
        cache = create_cache("c")
        gate = gevent.event.Event()
        calls = []

        def factory():
            calls.append(1)
            gate.wait(WAIT)
            raise ValueError("backend down")

        def call():
            try:
                return ("value", cache.get_or_compute(factory))
            except Exception as exc:  # the outcome under test
                return ("error", exc)

        callers = [gevent.spawn(call) for _ in range(3)]
        gevent.sleep(0.01)
        gate.set()
        gevent.joinall(callers, timeout=WAIT)
        self.assertTrue(all(c.dead for c in callers), "a waiter deadlocked")
        for caller in callers:
            kind, exc = caller.value
            self.assertEqual(kind, "error")
            self.assertIsInstance(exc, ValueError)
            self.assertIn("backend down", str(exc))
        self.assertEqual(len(calls), 1)
        self.assertFalse(cache.is_valid())
        self.assertEqual(cache.get_or_compute(lambda: "recovered"), "recovered")
        self.assertEqual(cache.get(), "recovered")

    def test_readers_never_wait_behind_a_running_factory(self):
        cache = create_cache("c")
        gate = gevent.event.Event()

        def factory():
            gate.wait(WAIT)
            return "fresh"

        computing = gevent.spawn(cache.get_or_compute, factory)
        gevent.sleep(0.01)
        with gevent.Timeout(0.5, AssertionError("a reader waited behind the factory")):
            self.assertEqual(cache.get("dflt"), "dflt")
            self.assertFalse(cache.is_valid())
            cache.invalidate()
        gate.set()
        self.assertEqual(computing.get(timeout=WAIT), "fresh")
        # invalidated while computing: the result went to its callers, not the cache
        self.assertFalse(cache.is_valid())

    def test_invalidate_calls_callbacks_and_emits(self):
        cache = create_cache("drives")
        events = Recorder()
        specter.bus.on("drives:invalidated", events)
        callback = Recorder()
        unsubscribe = cache.on_invalidate(callback)
        cache.set("v")
        cache.invalidate()
        self.assertFalse(cache.is_valid())
        self.assertEqual(cache.get("dflt"), "dflt")
        self.assertEqual(callback.calls, [(cache,)])
        self.assertEqual(events.firsts, [{"name": "drives"}])
        unsubscribe()
        cache.set("w")
        cache.invalidate()
        self.assertEqual(callback.count, 1)

    def test_on_invalidate_callback_that_raises_is_logged(self):
        cache = create_cache("c")
        after = Recorder()
        cache.on_invalidate(lambda c: TestService._raise("invalidate hook broke"))
        cache.on_invalidate(after)
        cache.set(1)
        with self.assertLogs("specter", "ERROR") as cm:
            cache.invalidate()
        self.assertLoggedException(cm, "invalidate hook broke")
        self.assertEqual(after.count, 1)
        self.assertFalse(cache.is_valid())

    def test_depends_on_cascades(self):
        a = create_cache("a")
        b = create_cache("b", depends_on=["a:invalidated"])
        c = create_cache("c", depends_on=["b:invalidated", "storage:mount_changed"])
        for cache in (a, b, c):
            cache.set(cache.name)
        a.invalidate()
        self.assertEqual([x.is_valid() for x in (a, b, c)], [False, False, False])
        c.set("c")
        specter.bus.emit("storage:mount_changed", {"path": "/mnt"})
        self.assertFalse(c.is_valid())

    def test_depends_on_cycle_terminates_with_one_invalidation_each(self):
        a = create_cache("a", depends_on=["c:invalidated"])
        b = create_cache("b", depends_on=["a:invalidated"])
        c = create_cache("c", depends_on=["b:invalidated"])
        counts = {"a": 0, "b": 0, "c": 0}
        for cache in (a, b, c):
            cache.on_invalidate(lambda x: counts.__setitem__(x.name, counts[x.name] + 1))
            cache.set(1)
        a.invalidate()
        self.assertEqual(counts, {"a": 1, "b": 1, "c": 1})
        self.assertFalse(any(x.is_valid() for x in (a, b, c)))
        for cache in (a, b, c):
            cache.set(2)
        b.invalidate()  # a second, separate cascade
        self.assertEqual(counts, {"a": 2, "b": 2, "c": 2})

    def test_destroy_drops_depends_on_subscriptions(self):
        for method in ("destroy", "stop"):
            with self.subTest(method=method):
                specter.bus.clear()
                cache = create_cache("dep", depends_on=["src:invalidated", "other"])
                self.assertTrue(specter.bus.has_listeners("src:invalidated"))
                callback = Recorder()
                cache.on_invalidate(callback)
                getattr(cache, method)()
                self.assertFalse(specter.bus.has_listeners("src:invalidated"))
                self.assertFalse(specter.bus.has_listeners("other"))
                specter.bus.emit("src:invalidated")
                self.assertEqual(callback.count, 0)

    def test_owned_by_a_service(self):
        svc = self.started(Service("holder"))
        cache = svc.own(create_cache("owned", depends_on=["src"]))
        svc.stop()
        self.assertFalse(specter.bus.has_listeners("src"))
        self.assertIsInstance(cache, Cache)


# Schema: Field and Schema #####################################################


class TestField(SpecterTestCase):
    def outcome(self, field, raw):
        return Schema("t", {"f": field}).validate({"f": raw})

    def assertAccepts(self, field, raw, expected):
        out = self.outcome(field, raw)
        self.assertTrue(out.ok, "%r refused: %s" % (raw, out.error))
        self.assertEqual(out.value["f"], expected)
        self.assertIs(type(out.value["f"]), type(expected))

    def assertRefuses(self, field, raw):
        out = self.outcome(field, raw)
        self.assertFalse(out.ok, "%r accepted as %r" % (raw, out.value))
        self.assertEqual(out.status, 400)
        self.assertIn("f", out.meta["errors"])
        self.assertIn("f", out.error)
        return out

    def test_field_defaults(self):
        field = Field()
        out = Schema("t", {"f": field}).validate({"f": "x"})
        self.assertEqual(out.value, {"f": "x"})

    def test_label_is_accepted_and_errors_stay_keyed_by_field_name(self):
        out = Schema("t", {"age": Field(int, label="Age in years")}).validate({"age": "x"})
        self.assertFalse(out.ok)
        self.assertEqual(list(out.meta["errors"]), ["age"])

    def test_int(self):
        for raw, expected in (("42", 42), (" 42 ", 42), (42, 42), (4.0, 4), (-3, -3)):
            with self.subTest(raw=raw):
                self.assertAccepts(Field(int), raw, expected)
        for raw in (4.5, True, False, float("nan"), float("inf"), "abc", "", "4.5", [1], {"a": 1}):
            with self.subTest(raw=raw):
                self.assertRefuses(Field(int), raw)

    def test_float(self):
        for raw, expected in (("1.5", 1.5), (" 2.5 ", 2.5), (2, 2.0), (0, 0.0), ("-1e3", -1000.0)):
            with self.subTest(raw=raw):
                self.assertAccepts(Field(float), raw, expected)
        for raw in (float("nan"), float("inf"), float("-inf"), "nan", "NaN", "inf", "-inf",
                    "Infinity", "1e400", True, "abc", [1.0], {}):
            with self.subTest(raw=raw):
                self.assertRefuses(Field(float), raw)

    def test_str(self):
        self.assertAccepts(Field(str), "abc", "abc")
        self.assertAccepts(Field(str), 5, "5")
        self.assertAccepts(Field(str), 1.5, "1.5")
        for raw in ({"a": 1}, [1], ["a"], True):
            with self.subTest(raw=raw):
                self.assertRefuses(Field(str), raw)

    def test_bool(self):
        words = {
            True: ("true", "TRUE", "True", "yes", "YES", "on", "On", "1", " yes "),
            False: ("false", "FALSE", "no", "No", "off", "OFF", "0"),
        }
        for expected, raws in words.items():
            for raw in raws + (expected, int(expected)):
                with self.subTest(raw=raw):
                    self.assertAccepts(Field(bool), raw, expected)
        for raw in ("maybe", "truthy", "", 2, -1, 1.5, [], {}):
            with self.subTest(raw=raw):
                self.assertRefuses(Field(bool), raw)

    def test_list_and_dict(self):
        self.assertAccepts(Field(list), [1, "a"], [1, "a"])
        self.assertAccepts(Field(list), [], [])
        self.assertAccepts(Field(dict), {"a": 1}, {"a": 1})
        for raw in ("abc", {"a": 1}, 5, True):
            with self.subTest(type="list", raw=raw):
                self.assertRefuses(Field(list), raw)
        for raw in ([1], "x", 5, True):
            with self.subTest(type="dict", raw=raw):
                self.assertRefuses(Field(dict), raw)

    def test_callable_coercer(self):
        self.assertAccepts(Field(lambda v: v.upper()), "abc", "ABC")
        self.assertAccepts(Field(decimal.Decimal), "1.10", decimal.Decimal("1.10"))

    def test_whatever_a_coercer_raises_fails_the_field(self):
        def overflow(value):
            raise OverflowError("too big")

        def key_error(value):
            raise KeyError(value)

        def arithmetic(value):
            return 1 / 0

        for coercer, raw in ((decimal.Decimal, "abc"), (overflow, 1), (key_error, "k"),
                             (arithmetic, 1), (int, "9" * 5000)):
            with self.subTest(coercer=coercer):
                self.assertRefuses(Field(coercer), raw)

    def test_defaults_and_callable_default_factory(self):
        schema = Schema("t", {"n": Field(int, default=5), "tags": Field(list, default=list)})
        first = schema.validate({}).value
        second = schema.validate({"n": None, "tags": None}).value
        self.assertEqual(first, {"n": 5, "tags": []})
        self.assertEqual(second, {"n": 5, "tags": []})
        self.assertIsNot(first["tags"], second["tags"])
        self.assertEqual(schema.validate({"n": "7"}).value["n"], 7)

    def test_required(self):
        schema = Schema("t", {"name": Field(str, required=True)})
        for raw in ({}, {"name": None}):
            with self.subTest(raw=raw):
                out = schema.validate(raw)
                self.assertFalse(out.ok)
                self.assertIn("name", out.meta["errors"])
        self.assertTrue(schema.validate({"name": "x"}).ok)

    def test_none_means_absent_for_optional_fields(self):
        out = Schema("t", {"n": Field(int)}).validate({"n": None})
        self.assertTrue(out.ok, out.error)
        self.assertIsNone(out.value.get("n"))

    def test_choices_apply_after_coercion(self):
        self.assertAccepts(Field(int, choices=[1, 2, 3]), "2", 2)
        self.assertRefuses(Field(int, choices=[1, 2, 3]), "5")
        self.assertAccepts(Field(bool, choices=[True]), "yes", True)

    def test_validator(self):
        seen = []

        def positive(value):
            seen.append(value)
            return value > 0

        self.assertAccepts(Field(int, validator=positive), "5", 5)
        self.assertEqual(seen, [5])
        self.assertRefuses(Field(int, validator=positive), -1)
        self.assertAccepts(Field(int, validator=lambda v: None), 1, 1)

        def raising(value):
            raise ValueError("not allowed")

        def overflowing(value):
            raise OverflowError("huge")

        for validator in (raising, overflowing, lambda v: decimal.Decimal("x")):
            with self.subTest(validator=validator):
                self.assertRefuses(Field(int, validator=validator), 1)

    def test_min_and_max(self):
        field = Field(int, min=1, max=10)
        for ok in (1, 10, "5"):
            self.assertTrue(self.outcome(field, ok).ok)
        for bad in (0, 11):
            with self.subTest(bad=bad):
                self.assertRefuses(field, bad)
        self.assertRefuses(Field(float, min=0.5), 0.4)

    def test_min_length_and_max_length(self):
        for field, good, bad in (
            (Field(str, min_length=2, max_length=4), ("ab", "abcd"), ("a", "abcde")),
            (Field(list, min_length=1, max_length=2), ([1], [1, 2]), ([], [1, 2, 3])),
        ):
            for value in good:
                self.assertTrue(self.outcome(field, value).ok, value)
            for value in bad:
                with self.subTest(value=value):
                    self.assertRefuses(field, value)

    def test_length_messages_are_grammatical(self):
        schema = Schema("t", {"name": Field(str, min_length=1), "tags": Field(list, max_length=2)})
        errors = schema.validate({"name": "", "tags": [1, 2, 3]}).meta["errors"]
        self.assertEqual(errors, {"name": "must have at least 1 character",
                                  "tags": "must have at most 2 items"})

    def test_pattern(self):
        field = Field(str, pattern=r"^[a-z]+$")
        self.assertAccepts(field, "abc", "abc")
        self.assertRefuses(field, "ab1")

    def test_items(self):
        schema = Schema("t", {"tags": Field(list, items=Field(int, min=0))})
        self.assertEqual(schema.validate({"tags": ["1", 2]}).value, {"tags": [1, 2]})
        out = schema.validate({"tags": [1, "x", 2, -5]})
        self.assertFalse(out.ok)
        self.assertEqual(set(out.meta["errors"]), {"tags[1]", "tags[3]"})
        self.assertIn("tags[1]", out.error)
        self.assertIn("tags[3]", out.error)


class TestSchema(SpecterTestCase):
    def create_schema(self):
        return Schema("create", {
            "name": Field(str, required=True),
            "age": Field(int),
            "active": Field(bool, default=True),
        })

    def test_validate_success_value_is_the_cleaned_dict(self):
        out = self.create_schema().validate({"name": "Ada", "age": "36"})
        self.assertIsInstance(out, Outcome)
        self.assertTrue(out.ok)
        self.assertEqual(out.status, 200)
        self.assertEqual(out.value, {"name": "Ada", "age": 36, "active": True})

    def test_failure_names_every_bad_field(self):
        out = self.create_schema().validate({"age": "x", "active": "maybe"})
        self.assertFalse(out.ok)
        self.assertEqual(out.status, 400)
        self.assertEqual(set(out.meta["errors"]), {"name", "age", "active"})
        for name in ("name", "age", "active"):
            self.assertIn(name, out.error)
            self.assertIsInstance(out.meta["errors"][name], str)

    def test_non_dict_input_is_a_failure(self):
        schema = self.create_schema()
        for raw in (None, [], [("name", "x")], "text", 42, 4.2, True, b"bytes", object()):
            with self.subTest(raw=raw):
                out = schema.validate(raw)
                self.assertFalse(out.ok)
                self.assertEqual(out.status, 400)

    def test_field_type_must_be_a_type_coercer_or_schema(self):
        for bad in ([1], {}, 5, "int"):
            with self.subTest(bad=bad):
                with self.assertRaisesRegex(TypeError, "Field type must be"):
                    Field(bad)

    def test_fields_must_be_field_instances(self):
        for bad in (str, "str", None, {"type": int}):
            with self.subTest(bad=bad):
                with self.assertRaises(TypeError):
                    Schema("t", {"a": bad})

    def test_strict_rejects_unknown_keys(self):
        fields = {"a": Field(int)}
        self.assertTrue(Schema("loose", fields).validate({"a": 1, "extra": 2}).ok)
        out = Schema("strict", fields, strict=True).validate({"a": 1, "extra": 2})
        self.assertFalse(out.ok)
        self.assertIn("extra", out.meta["errors"])
        self.assertIn("extra", out.error)

    def test_strict_rejects_unknown_keys_even_when_optional_fields_are_absent(self):
        schema = Schema("user", {"name": Field(str), "age": Field(int, default=0)}, strict=True)
        for payload in ({"nmae": "Ada"}, {"name": "Ada", "is_admin": True}):
            out = schema.validate(payload)
            self.assertFalse(out.ok, payload)
        self.assertEqual(schema.validate({"name": "Ada"}).value, {"name": "Ada", "age": 0})

    def test_coercer_exception_text_is_logged_not_returned(self):
        def lookup(value):
            raise ConnectionError("could not connect to postgres://app:s3cret@db/users")
        schema = Schema("t", {"user": Field(lookup)})
        with self.assertLogs("specter.schema", "WARNING") as logs:
            out = schema.validate({"user": "ada"})
        self.assertEqual(out.meta["errors"], {"user": "is invalid"})
        self.assertNotIn("s3cret", out.error)
        self.assertIn("s3cret", "".join(logs.output))

    def test_raising_default_factory_is_a_field_error(self):
        schema = Schema("t", {"n": Field(int, default=lambda: 1 / 0)})
        with self.assertLogs("specter.schema", "ERROR"):
            out = schema.validate({})
        self.assertEqual((out.ok, out.status), (False, 400))
        self.assertIn("n", out.meta["errors"])

    def test_extend_returns_a_new_schema(self):
        base = Schema("base", {"a": Field(int)})
        extended = base.extend("ext", {"b": Field(str, required=True)}, strict=True)
        self.assertIsNot(extended, base)
        self.assertEqual(extended.name, "ext")
        self.assertEqual(list(base.field_names), ["a"])
        self.assertEqual(list(extended.field_names), ["a", "b"])
        self.assertEqual(list(extended.required_fields), ["b"])
        self.assertFalse(extended.validate({"a": 1, "b": "x", "c": 1}).ok)
        self.assertTrue(extended.validate({"a": 1, "b": "x"}).ok)
        self.assertTrue(base.validate({"a": 1, "c": 1}).ok)

    def test_field_names_and_required_fields(self):
        schema = self.create_schema()
        self.assertEqual(list(schema.field_names), ["name", "age", "active"])
        self.assertEqual(list(schema.required_fields), ["name"])

    def test_nested_schema(self):
        owner = Schema("owner", {
            "email": Field(str, required=True, pattern=r"^[^@]+@[^@]+$"),
            "name": Field(str, default="anon"),
        })
        doc = Schema("doc", {"owner": Field(owner, required=True),
                             "owners": Field(list, items=Field(owner))})
        out = doc.validate({"owner": {"email": "a@b"}})
        self.assertTrue(out.ok, out.error)
        self.assertEqual(out.value["owner"], {"email": "a@b", "name": "anon"})
        out = doc.validate({"owner": {"email": "nope"}})
        self.assertFalse(out.ok)
        self.assertIn("owner.email", out.meta["errors"])
        self.assertIn("owner.email", out.error)
        out = doc.validate({"owner": "a@b"})
        self.assertIn("owner", out.meta["errors"])
        out = doc.validate({"owner": {"email": "a@b"}, "owners": [{"email": "c@d"}, {"email": "bad"}]})
        self.assertIn("owners[1].email", out.meta["errors"])

    def test_require(self):
        schema = self.create_schema()
        clean = schema.require({"name": "Ada", "age": "3"})
        self.assertEqual(clean, {"name": "Ada", "age": 3, "active": True})
        with self.assertRaises(specter.HTTPError) as cm:
            schema.require({"age": "x"})
        error = cm.exception
        self.assertEqual(error.status_code, 400)
        self.assertEqual(set(error.payload["errors"]), {"name", "age"})
        self.assertIn("age", error.message)

    def test_schema_error(self):
        error = SchemaError("bad payload", field="age", errors={"age": "must be an integer"})
        self.assertIsInstance(error, Exception)
        self.assertIn("bad payload", str(error))
        self.assertEqual(error.field, "age")
        self.assertEqual(error.errors, {"age": "must be an integer"})
        plain = SchemaError("bad")
        self.assertIsNone(plain.field)

    def test_to_json_schema(self):
        owner = Schema("owner", {"email": Field(str, required=True)})
        schema = Schema("person", {
            "name": Field(str, required=True, min_length=1, max_length=50, pattern="^[A-Z]"),
            "age": Field(int, min=0, max=150),
            "score": Field(float),
            "active": Field(bool, default=True),
            "tags": Field(list, items=Field(str)),
            "extra": Field(dict),
            "color": Field(str, choices=["red", "green"]),
            "owner": Field(owner),
        }, strict=True)
        js = schema.to_json_schema()
        json.dumps(js)
        self.assertEqual(js["$schema"], "https://json-schema.org/draft/2020-12/schema")
        self.assertEqual(js["type"], "object")
        props = js["properties"]
        self.assertEqual(set(props), {"name", "age", "score", "active", "tags", "extra", "color", "owner"})
        self.assertEqual(js["required"], ["name"])
        types = {name: props[name].get("type") for name in ("name", "age", "score", "active", "tags", "extra")}
        self.assertEqual(types, {"name": "string", "age": "integer", "score": "number",
                                 "active": "boolean", "tags": "array", "extra": "object"})
        self.assertEqual((props["age"]["minimum"], props["age"]["maximum"]), (0, 150))
        self.assertEqual((props["name"]["minLength"], props["name"]["maxLength"]), (1, 50))
        # The exported pattern (JSON Schema: unanchored search) accepts what validate accepts.
        for sample in ("A", "Abc", "abc", "1A"):
            with self.subTest(sample=sample):
                exported = re.search(props["name"]["pattern"], sample) is not None
                self.assertEqual(exported, schema.validate({"name": sample}).ok)
        self.assertEqual(props["tags"]["items"]["type"], "string")
        self.assertEqual(props["color"]["enum"], ["red", "green"])
        self.assertEqual(props["owner"]["type"], "object")
        self.assertIn("email", props["owner"]["properties"])
        self.assertFalse(js["additionalProperties"])

    def assertCleanRefusal(self, schema, payload, limit=1.0):
        started = time.monotonic()
        out = schema.validate(payload)
        elapsed = time.monotonic() - started
        self.assertIsInstance(out, Outcome)
        self.assertFalse(out.ok)
        self.assertEqual(out.status, 400)
        self.assertLess(elapsed, limit)
        self.assertLess(len(out.error), 2000, "the error message echoes the payload")
        json.dumps(out.to_dict())
        return out

    def test_hostile_huge_list(self):
        huge = ["x"] * 1_000_000
        self.assertCleanRefusal(Schema("h", {"tags": Field(list, items=Field(str))}), {"tags": huge})
        self.assertCleanRefusal(Schema("h", {"tags": Field(list)}), {"tags": huge})

    def test_hostile_deep_nesting(self):
        depth = 10_000
        self.assertCleanRefusal(Schema("h", {"data": Field(dict)}), {"data": deep_dict(depth)})
        self.assertCleanRefusal(Schema("h", {"data": Field(list)}), {"data": deep_list(depth)})
        self.assertCleanRefusal(Schema("h", {"data": Field(str)}), {"data": deep_dict(depth)})
        nested = Schema("inner", {"x": Field(int)})
        self.assertCleanRefusal(Schema("h", {"data": Field(nested)}), {"data": {"x": deep_list(depth)}})
        self.assertCleanRefusal(Schema("h", {"data": Field(list)}, strict=True),
                                {"data": [], "junk": deep_dict(depth)})
        out = Schema("h", {"data": Field(list)}).validate({"data": [], "junk": deep_list(depth)})
        self.assertIsInstance(out, Outcome)

    def test_hostile_huge_strings(self):
        self.assertCleanRefusal(Schema("h", {"n": Field(int)}), {"n": "9" * 1_000_000})
        self.assertCleanRefusal(Schema("h", {"n": Field(float)}), {"n": "1" * 1_000_000})
        self.assertCleanRefusal(Schema("h", {"b": Field(bool)}), {"b": "x" * 10_000_000})
        self.assertCleanRefusal(Schema("h", {"s": Field(str, max_length=100)}), {"s": "x" * 10_000_000})
        self.assertCleanRefusal(Schema("h", {"s": Field(str, pattern=r"^[a-z]+$")}),
                                {"s": "a" * 1_000_000 + "!"})
        started = time.monotonic()
        out = Schema("h", {"s": Field(str)}).validate({"s": "x" * 10_000_000})
        self.assertIsInstance(out, Outcome)
        self.assertLess(time.monotonic() - started, 1.0)


# Schema: Outcome and Operation ################################################


class TestOutcome(SpecterTestCase):
    def test_success(self):
        out = Outcome.success({"id": 1})
        self.assertEqual((out.ok, out.value, out.error, out.status, out.meta), (True, {"id": 1}, None, 200, {}))
        out = Outcome.success(5, status=201, page=2)
        self.assertEqual((out.status, out.meta), (201, {"page": 2}))
        self.assertIsNone(Outcome.success().value)

    def test_failure(self):
        out = Outcome.failure("bad")
        self.assertEqual((out.ok, out.value, out.error, out.status, out.meta), (False, None, "bad", 400, {}))
        out = Outcome.failure("gone", status=404, value={"id": 1}, hint="retry")
        self.assertEqual((out.status, out.value, out.meta), (404, {"id": 1}, {"hint": "retry"}))

    def test_immutable(self):
        out = Outcome.success(1)
        for attr in ("ok", "value", "error", "status", "meta"):
            with self.subTest(attr=attr):
                with self.assertRaises(AttributeError):
                    setattr(out, attr, None)
        with self.assertRaises(AttributeError):
            out.extra = 1
        self.assertEqual((out.ok, out.value), (True, 1))

    def test_truthiness(self):
        self.assertTrue(Outcome.success(None))
        self.assertFalse(Outcome.failure("x"))

    def test_unwrap(self):
        self.assertEqual(Outcome.success(3).unwrap(), 3)
        with self.assertRaises(RuntimeError) as cm:
            Outcome.failure("no such job").unwrap()
        self.assertIn("no such job", str(cm.exception))

    def test_to_dict(self):
        self.assertEqual(Outcome.success(1, page=2).to_dict(),
                         {"page": 2, "ok": True, "status": 200, "value": 1})
        self.assertEqual(Outcome.failure("bad", status=422, value={"x": 1}, field="x").to_dict(),
                         {"field": "x", "ok": False, "status": 422, "error": "bad", "value": {"x": 1}})

    def test_to_tuple(self):
        self.assertEqual(Outcome.success(1).to_tuple(), (True, 1, None))
        self.assertEqual(Outcome.failure("bad").to_tuple(), (False, None, "bad"))


class TestOperation(SpecterTestCase):
    class CreateJob(Operation):
        def validate(self, name, priority=0):
            if not name:
                raise OperationError("name is required", status=422, meta={"field": "name"})

        def perform(self, name, priority=0):
            if name == "gone":
                return self.failure("job is gone", status=410)
            if name == "created":
                return Outcome.success({"name": name}, status=201)
            if name == "boom":
                raise KeyError("secret-token-123")
            if name == "conflict":
                raise OperationError("conflict", status=409,
                                     meta={"status": "pending", "value": 7, "other": 1})
            return {"name": name, "priority": priority}

    def test_operation_error(self):
        error = OperationError("nope", status=404, meta={"id": 1})
        self.assertIsInstance(error, Exception)
        self.assertIn("nope", str(error))
        self.assertEqual((error.status, error.meta), (404, {"id": 1}))
        self.assertEqual(OperationError("x").status, 400)

    def test_run_success(self):
        out = self.CreateJob().run("build", priority=2)
        self.assertTrue(out.ok)
        self.assertEqual(out.status, 200)
        self.assertEqual(out.value, {"name": "build", "priority": 2})

    def test_validate_operation_error_is_a_failure(self):
        out = self.CreateJob().run("")
        self.assertFalse(out.ok)
        self.assertEqual((out.status, out.error, out.meta["field"]), (422, "name is required", "name"))

    def test_returned_outcome_passes_through(self):
        op = self.CreateJob()
        gone = op.run("gone")
        self.assertEqual((gone.ok, gone.status, gone.error), (False, 410, "job is gone"))
        created = op.run("created")
        self.assertEqual((created.ok, created.status, created.value), (True, 201, {"name": "created"}))

    def test_operation_error_meta_keeps_status_and_value_keys(self):
        out = self.CreateJob().run("conflict")
        self.assertFalse(out.ok)
        self.assertEqual(out.status, 409)
        self.assertEqual(out.error, "conflict")
        self.assertEqual(out.meta["status"], "pending")
        self.assertEqual(out.meta["value"], 7)
        self.assertEqual(out.meta["other"], 1)

    def test_generic_exception_is_a_logged_500_with_a_generic_error(self):
        with self.assertLogs("specter", "ERROR") as cm:
            out = self.CreateJob().run("boom")
        self.assertFalse(out.ok)
        self.assertEqual(out.status, 500)
        self.assertTrue(out.error)
        self.assertNotIn("secret-token-123", out.error)
        self.assertNotIn("secret-token-123", json.dumps(out.to_dict()))
        self.assertLoggedException(cm, "secret-token-123")

    def test_validate_raising_a_generic_exception_is_a_500(self):
        class Broken(Operation):
            def validate(self):
                raise ValueError("validator bug")

            def perform(self):
                raise AssertionError("perform must not run")

        with self.assertLogs("specter", "ERROR"):
            out = Broken().run()
        self.assertEqual((out.ok, out.status), (False, 500))

    def test_helpers(self):
        op = self.CreateJob()
        ok = op.success(5, status=201)
        self.assertIsInstance(ok, Outcome)
        self.assertEqual((ok.ok, ok.value, ok.status), (True, 5, 201))
        bad = op.failure("x", status=409)
        self.assertEqual((bad.ok, bad.error, bad.status), (False, "x", 409))

    def test_default_validate_passes(self):
        class Echo(Operation):
            def perform(self, *args, **kwargs):
                return (args, kwargs)

        out = Echo().run(1, 2, key="v")
        self.assertEqual(out.value, ((1, 2), {"key": "v"}))


# Web ##########################################################################


# Bound for anything a real client or a child process has to do.
CLIENT_TIMEOUT = 5.0


# The directory holding specter.py, for child processes.
SPECTER_DIR = os.path.dirname(os.path.abspath(specter.__file__))


def pid_gone(pid):
    """True once ``pid`` no longer runs: absent, or a zombie/dead entry awaiting a slow reaper."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open("/proc/%d/stat" % pid, "rb") as stat:
            data = stat.read()
    except OSError:
        return True  # vanished between the two looks
    return data[data.rfind(b")") + 2:].split()[0] in (b"Z", b"X")


def make_web_app():
    """A fresh Flask app and its gevent Flask-SocketIO server."""
    app = Flask(__name__)
    return app, SocketIO(app, async_mode="gevent")


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@contextlib.contextmanager
def captured_logs(name="specter"):
    """Collect ``name``'s records without asserting any (keeps expected noise off stderr)."""
    logger = logging.getLogger(name)
    handler = _ListHandler()
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.level, logger.propagate = saved


class RecordingService(Service):
    """A Service that appends 'start:<name>' / 'stop:<name>' to a shared log."""

    def __init__(self, name, log):
        super().__init__(name)
        self.log = log

    def on_start(self):
        self.log.append("start:" + self.name)

    def on_stop(self):
        self.log.append("stop:" + self.name)


class RecordingHandler(Handler):
    """A Handler answering 'ping' that logs its setup and teardown."""

    events = {"ping": "ping"}

    def __init__(self, label, log):
        self.log = log
        self.calls = []
        super().__init__()
        self.name = label

    def on_setup(self):
        self.log.append("setup:" + self.name)

    def on_teardown(self):
        self.log.append("teardown:" + self.name)

    def ping(self, data=None):
        self.calls.append(data)
        return {"pong": data, "by": self.name}


class EchoController(Controller):
    """A Controller with one route and one socket event, counting deliveries."""

    name = "echo"

    def __init__(self, name=None):
        super().__init__(name)
        self.calls = []

    def build_routes(self, router):
        @router.route("/ping")
        def ping():
            return {"pong": True, "by": self.name}

    def build_events(self, handler):
        handler.on("echo", self.echo)

    def echo(self, data=None):
        self.calls.append(data)
        return {"echo": data}


class TestHTTPHelpers(SpecterTestCase):

    def client_for(self, view, methods=("GET", "POST"), **config):
        """A Flask test client whose app serves ``view`` at '/v'."""
        app, _ = make_web_app()
        app.config.update(config)
        app.add_url_rule("/v", "v", view, methods=list(methods))
        return app.test_client()

    def assertJSON(self, response, status):
        """The response's JSON body, after checking status, type and that no traceback leaked."""
        self.assertEqual(response.status_code, status, response.get_data(as_text=True))
        self.assertEqual(response.mimetype, "application/json")
        self.assertNotIn("Traceback", response.get_data(as_text=True))
        return response.get_json()

    def echo_client(self, **kwargs):
        """A client for a view returning what expect_json(**kwargs) accepted."""
        config = kwargs.pop("config", {})

        @json_endpoint
        def view():
            return {"got": expect_json(**kwargs)}
        return self.client_for(view, **config)

    # HTTPError ----------------------------------------------------------------

    def test_http_error_attributes_and_response(self):
        exc = HTTPError("Not yours", 403, payload={"owner": "ann"})
        self.assertEqual((exc.message, exc.status_code, exc.payload), ("Not yours", 403, {"owner": "ann"}))
        self.assertEqual(HTTPError("Bad").status_code, 400)
        self.assertEqual(HTTPError("Taken", 400, status=409).status_code, 409)
        self.assertIsInstance(exc, Exception)
        app, _ = make_web_app()
        with app.test_request_context():
            response = exc.to_response()
        self.assertEqual(response.status_code, 403)
        self.assertEqual(response.get_json(), {"owner": "ann", "error": "Not yours"})

    # json_endpoint ------------------------------------------------------------

    def test_json_endpoint_bare_returns_dict_as_json(self):
        @json_endpoint
        def view():
            return {"a": 1}
        self.assertEqual(self.assertJSON(self.client_for(view).get("/v"), 200), {"a": 1})

    def test_json_endpoint_called_returns_list_as_json(self):
        @json_endpoint("Could not list")
        def view():
            return [1, 2, {"b": 3}]
        self.assertEqual(self.assertJSON(self.client_for(view).get("/v"), 200), [1, 2, {"b": 3}])

    def test_json_endpoint_keeps_tuple_status_and_headers(self):
        @json_endpoint
        def created():
            return {"id": 7}, 201

        @json_endpoint()
        def accepted():
            return {"queued": True}, 202, {"X-Job": "42"}
        self.assertEqual(self.assertJSON(self.client_for(created).get("/v"), 201), {"id": 7})
        response = self.client_for(accepted).get("/v")
        self.assertEqual(self.assertJSON(response, 202), {"queued": True})
        self.assertEqual(response.headers["X-Job"], "42")

    def test_json_endpoint_converts_outcomes_with_their_status(self):
        @json_endpoint
        def failed():
            return Outcome.failure("nope", status=409, code="taken")

        @json_endpoint
        def made():
            return Outcome.success({"id": 1}, status=201)
        body = self.assertJSON(self.client_for(failed).get("/v"), 409)
        self.assertEqual(body, Outcome.failure("nope", status=409, code="taken").to_dict())
        self.assertEqual((body["ok"], body["error"], body["code"]), (False, "nope", "taken"))
        body = self.assertJSON(self.client_for(made).get("/v"), 201)
        self.assertEqual((body["ok"], body["status"], body["value"]), (True, 201, {"id": 1}))

    def test_json_endpoint_http_error_gives_payload_and_logs_its_log_message(self):
        @json_endpoint("Could not save")
        def view():
            raise HTTPError("Quota exceeded", 429, payload={"limit": 5},
                            log_message="user 9 hit the quota", log_level=logging.INFO)
        with self.assertLogs("specter", "INFO") as logs:
            response = self.client_for(view).get("/v")
        self.assertEqual(self.assertJSON(response, 429), {"limit": 5, "error": "Quota exceeded"})
        self.assertEqual([(r.levelno, r.getMessage()) for r in logs.records],
                         [(logging.INFO, "user 9 hit the quota")])
        self.assertNotIn("user 9", response.get_data(as_text=True))

    def test_http_error_in_a_plain_view_of_a_managed_app_is_json(self):
        app, sio = make_web_app()

        @app.route("/quota")
        def quota():
            raise HTTPError("Quota exceeded", 429, log_message="user 9 hit the quota")
        manager = ServiceManager(app, sio, signals=False).boot()
        self.addCleanup(manager.shutdown)
        with self.assertLogs("specter", "WARNING") as logs:
            response = app.test_client().get("/quota")
        self.assertEqual(self.assertJSON(response, 429), {"error": "Quota exceeded"})
        self.assertEqual(logs.records[0].getMessage(), "user 9 hit the quota")

    def test_json_endpoint_http_error_without_log_message_is_answered(self):
        @json_endpoint
        def view():
            raise HTTPError("Missing name")
        self.assertEqual(self.assertJSON(self.client_for(view).get("/v"), 400), {"error": "Missing name"})

    def test_json_endpoint_keeps_werkzeug_404_status_in_json(self):
        @json_endpoint
        def view():
            abort(404)
        body = self.assertJSON(self.client_for(view).get("/v"), 404)
        self.assertEqual(list(body), ["error"])
        self.assertIsInstance(body["error"], str)
        self.assertTrue(body["error"])

    def test_json_endpoint_keeps_405_status_and_allow_header(self):
        @json_endpoint
        def aborted():
            abort(405, valid_methods=["GET", "PUT"])

        @json_endpoint
        def raised():
            raise werkzeug.exceptions.MethodNotAllowed(valid_methods=["GET", "DELETE"])
        response = self.client_for(aborted).get("/v")
        self.assertIn("error", self.assertJSON(response, 405))
        self.assertEqual(set(response.headers["Allow"].replace(" ", "").split(",")), {"GET", "PUT"})
        response = self.client_for(raised).get("/v")
        self.assertIn("error", self.assertJSON(response, 405))
        self.assertEqual(set(response.headers["Allow"].replace(" ", "").split(",")), {"GET", "DELETE"})

    def test_json_endpoint_answers_other_exceptions_500_without_details(self):
        @json_endpoint("Could not save the job")
        def view():
            raise ValueError("db password is hunter2")
        with self.assertLogs("specter", "ERROR") as logs:
            response = self.client_for(view).get("/v")
        self.assertEqual(self.assertJSON(response, 500), {"error": "Could not save the job"})
        text = response.get_data(as_text=True)
        self.assertNotIn("hunter2", text)
        self.assertNotIn("ValueError", text)
        logged = "\n".join(logs.output)
        self.assertIn("hunter2", logged)
        self.assertIn("Traceback", logged)
        self.assertEqual(logs.records[-1].levelno, logging.ERROR)
        self.assertIsNotNone(logs.records[-1].exc_info)

    def test_json_endpoint_bare_500_has_an_error_message(self):
        @json_endpoint
        def view():
            raise KeyError("internal-key")
        with self.assertLogs("specter", "ERROR"):
            response = self.client_for(view).get("/v")
        body = self.assertJSON(response, 500)
        self.assertEqual(list(body), ["error"])
        self.assertIsInstance(body["error"], str)
        self.assertNotIn("internal-key", response.get_data(as_text=True))

    def test_json_endpoint_include_trace_false_logs_without_traceback(self):
        @json_endpoint("Failed", include_trace=False)
        def view():
            raise RuntimeError("disk full")
        with self.assertLogs("specter", "ERROR") as logs:
            response = self.client_for(view).get("/v")
        self.assertEqual(self.assertJSON(response, 500), {"error": "Failed"})
        self.assertTrue(all(not r.exc_info for r in logs.records))
        self.assertNotIn("Traceback", "\n".join(logs.output))

    def test_json_endpoint_uses_the_given_logger(self):
        custom = logging.getLogger("webtests.custom")

        @json_endpoint("Failed", logger=custom)
        def view():
            raise RuntimeError("boom")
        with self.assertLogs("webtests.custom", "ERROR") as logs:
            self.assertJSON(self.client_for(view).get("/v"), 500)
        self.assertEqual(logs.records[0].name, "webtests.custom")

    # expect_json --------------------------------------------------------------

    def test_expect_json_returns_the_object(self):
        response = self.echo_client().post("/v", json={"name": "job", "n": 2})
        self.assertEqual(self.assertJSON(response, 200), {"got": {"name": "job", "n": 2}})

    def test_expect_json_missing_body_is_400_with_error(self):
        client = self.echo_client(error="Send a job")
        for response in (client.post("/v"), client.post("/v", data="", content_type="application/json"),
                         client.post("/v", data="   ", content_type="application/json")):
            body = self.assertJSON(response, 400)
            self.assertIn("Send a job", body["error"])

    def test_expect_json_invalid_json_is_400(self):
        response = self.echo_client().post("/v", data="{bad json", content_type="application/json")
        body = self.assertJSON(response, 400)
        self.assertIsInstance(body["error"], str)

    def test_expect_json_empty_object_counts_as_missing_unless_allowed(self):
        body = self.assertJSON(self.echo_client().post("/v", json={}), 400)
        self.assertEqual(body["error"], "Request body is required")
        self.assertEqual(self.assertJSON(self.echo_client(allow_empty=True).post("/v", json={}), 200),
                         {"got": {}})

    def test_expect_json_non_object_body_is_400(self):
        client = self.echo_client(allow_empty=True)
        for data in ("[]", "[1, 2]", '"x"', "1", "null"):
            with self.subTest(data=data):
                response = client.post("/v", data=data, content_type="application/json")
                self.assertIn("error", self.assertJSON(response, 400))

    def test_expect_json_required_fields_give_missing_list(self):
        client = self.echo_client(required=["name", "size"])
        body = self.assertJSON(client.post("/v", json={"name": "a"}), 400)
        self.assertEqual(body["missing"], ["size"])
        body = self.assertJSON(client.post("/v", json={"name": "  ", "other": 1}), 400)
        self.assertEqual(body["missing"], ["name", "size"])
        self.assertEqual(self.assertJSON(client.post("/v", json={"name": "a", "size": 0}), 200),
                         {"got": {"name": "a", "size": 0}})

    def test_expect_json_form_or_text_body_is_400_saying_to_send_json(self):
        client = self.echo_client()
        body = self.assertJSON(client.post("/v", data={"name": "a"}), 400)
        self.assertIn("application/json", body["error"])
        for content_type in ("application/x-www-form-urlencoded", "text/plain"):
            response = client.post("/v", data='{"name": "a"}', content_type=content_type)
            self.assertIn(content_type, self.assertJSON(response, 400)["error"])

    def test_expect_json_refuses_nan_and_infinity(self):
        client = self.echo_client()
        for literal in ("NaN", "Infinity", "-Infinity"):
            response = client.post("/v", data='{"name": "a", "size": %s}' % literal,
                                   content_type="application/json")
            self.assertIn("not valid JSON", self.assertJSON(response, 400)["error"])

    def test_expect_json_over_specter_limit_is_413(self):
        client = self.echo_client(config={"SPECTER_MAX_JSON_BYTES": 100})
        big = {"name": "x" * 200}
        self.assertIn("error", self.assertJSON(client.post("/v", json=big), 413))
        self.assertEqual(self.assertJSON(client.post("/v", json={"name": "x"}), 200), {"got": {"name": "x"}})

    def test_expect_json_over_max_content_length_is_413(self):
        client = self.echo_client(config={"MAX_CONTENT_LENGTH": 100})
        self.assertIn("error", self.assertJSON(client.post("/v", json={"name": "x" * 200}), 413))
        self.assertEqual(self.assertJSON(client.post("/v", json={"name": "x"}), 200), {"got": {"name": "x"}})

    def test_expect_json_max_content_length_wins_over_specter_limit(self):
        client = self.echo_client(config={"MAX_CONTENT_LENGTH": 1000, "SPECTER_MAX_JSON_BYTES": 100})
        payload = {"name": "x" * 300}
        self.assertEqual(self.assertJSON(client.post("/v", json=payload), 200), {"got": payload})
        self.assertIn("error", self.assertJSON(client.post("/v", json={"name": "x" * 2000}), 413))

    def test_expect_json_absurdly_nested_body_is_a_clean_4xx(self):
        @json_endpoint
        def view():
            payload = expect_json()
            return {"keys": len(payload)}
        client = self.client_for(view)
        depth = 100000
        for data in ("[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth):
            with self.subTest(shape=data[:6]):
                response = client.post("/v", data=data, content_type="application/json")
                self.assertTrue(400 <= response.status_code < 500, response.status_code)
                self.assertEqual(response.mimetype, "application/json")
                self.assertIsInstance(response.get_json()["error"], str)
                self.assertNotIn("Traceback", response.get_data(as_text=True))

    def test_schema_require_inside_json_endpoint_is_400_with_field_errors(self):
        schema = Schema("job", {"name": Field(str, required=True), "size": Field(int, required=True)})

        @json_endpoint("Could not create the job")
        def view():
            return {"clean": schema.require(expect_json())}
        client = self.client_for(view)
        body = self.assertJSON(client.post("/v", json={"size": "big"}), 400)
        self.assertEqual(set(body["errors"]), {"name", "size"})
        self.assertIsInstance(body["error"], str)
        body = self.assertJSON(client.post("/v", json={"name": "a", "size": "3"}), 200)
        self.assertEqual(body, {"clean": {"name": "a", "size": 3}})

    # require_fields -----------------------------------------------------------

    def test_require_fields_returns_the_payload(self):
        payload = {"a": 1, "b": "x", "c": 0, "d": False}
        self.assertIs(require_fields(payload, ["a", "b", "c", "d"]), payload)

    def test_require_fields_missing_none_and_blank(self):
        with self.assertRaises(HTTPError) as caught:
            require_fields({"a": None, "b": "  ", "d": "ok"}, ["a", "b", "c", "d"])
        self.assertEqual(caught.exception.status_code, 400)
        self.assertEqual(caught.exception.payload, {"missing": ["a", "b", "c"]})
        self.assertIsInstance(caught.exception.message, str)

    def test_require_fields_blank_allowed_when_blank_is_not_missing(self):
        payload = {"a": "  "}
        self.assertIs(require_fields(payload, ["a"], blank_is_missing=False), payload)
        with self.assertRaises(HTTPError) as caught:
            require_fields({"a": None}, ["a"], blank_is_missing=False)
        self.assertEqual(caught.exception.payload, {"missing": ["a"]})

    def test_require_fields_custom_error(self):
        with self.assertRaises(HTTPError) as caught:
            require_fields({}, ["title"], error="A job needs a title")
        self.assertEqual(caught.exception.message, "A job needs a title")
        self.assertEqual(caught.exception.payload, {"missing": ["title"]})


class JobsRouter(Router):
    name = "jobs"
    url_prefix = "/jobs"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mounts = 0
        self.log = []

    def on_mount(self):
        self.mounts += 1

    def on_unmount(self):
        self.log.append("unmount")

    @route("/list")
    @route("/all")
    def index(self):
        return {"jobs": ["a", "b"], "router": self.name}

    @route("/list", methods=["POST"], endpoint="create_job")
    def create(self):
        return {"created": request.get_json()}, 201

    @route("/boom", json_errors="Jobs are unavailable")
    def boom(self):
        raise ValueError("queue socket /var/run/secret.sock")

    @route("/taken")
    def taken(self):
        return Outcome.failure("name taken", status=409, field="name")


class TestRouter(SpecterTestCase):

    def served(self, router):
        app, _ = make_web_app()
        self.assertIs(router.register(app), router)
        return app, app.test_client()

    def test_class_routes_are_served_under_the_class_prefix(self):
        app, client = self.served(JobsRouter())
        for path in ("/jobs/list", "/jobs/all"):
            response = client.get(path)
            self.assertEqual(response.status_code, 200)
            self.assertEqual(response.get_json(), {"jobs": ["a", "b"], "router": "jobs"})
        self.assertEqual(client.get("/list").status_code, 404)

    def test_stacked_rules_share_one_endpoint(self):
        app, _ = self.served(JobsRouter())
        get_endpoints = {rule.rule: rule.endpoint for rule in app.url_map.iter_rules()
                         if "GET" in rule.methods and rule.rule.startswith("/jobs/")}
        self.assertEqual(get_endpoints["/jobs/all"], get_endpoints["/jobs/list"])
        shared = [r.rule for r in app.url_map.iter_rules() if r.endpoint == get_endpoints["/jobs/all"]]
        self.assertEqual(sorted(shared), ["/jobs/all", "/jobs/list"])

    def test_methods_and_endpoint(self):
        app, client = self.served(JobsRouter())
        response = client.post("/jobs/list", json={"name": "x"})
        self.assertEqual(response.status_code, 201)
        self.assertEqual(response.get_json(), {"created": {"name": "x"}})
        self.assertEqual(client.post("/jobs/all").status_code, 405)
        self.assertEqual(client.delete("/jobs/list").status_code, 405)
        with app.test_request_context():
            self.assertEqual(flask.url_for("jobs.create_job"), "/jobs/list")
        self.assertIn("jobs.create_job", {r.endpoint for r in app.url_map.iter_rules()})

    def test_json_errors_wraps_the_view(self):
        _, client = self.served(JobsRouter())
        with self.assertLogs("specter", "ERROR") as logs:
            response = client.get("/jobs/boom")
        self.assertEqual(response.status_code, 500)
        self.assertEqual(response.get_json(), {"error": "Jobs are unavailable"})
        self.assertNotIn("secret.sock", response.get_data(as_text=True))
        self.assertIn("secret.sock", "\n".join(logs.output))

    def test_outcome_return_becomes_json_with_its_status(self):
        _, client = self.served(JobsRouter())
        response = client.get("/jobs/taken")
        self.assertEqual(response.status_code, 409)
        self.assertEqual(response.get_json(), Outcome.failure("name taken", status=409, field="name").to_dict())

    def test_url_prefix_from_constructor_overrides_class_attribute(self):
        router = JobsRouter(url_prefix="/v2/jobs")
        self.assertEqual(router.url_prefix, "/v2/jobs")
        _, client = self.served(router)
        self.assertEqual(client.get("/v2/jobs/list").status_code, 200)
        self.assertEqual(client.get("/jobs/list").status_code, 404)

    def test_instance_routes(self):
        router = Router("api", url_prefix="/api")
        seen = []

        @router.route("/ping", methods=["GET", "POST"])
        def ping():
            seen.append(request.method)
            return {"pong": True}

        @router.route("/state")
        def state():
            return Outcome.success({"up": True}, status=202)

        @router.route("/fail", json_errors="API down")
        def fail():
            raise RuntimeError("no")
        _, client = self.served(router)
        self.assertEqual(client.get("/api/ping").get_json(), {"pong": True})
        self.assertEqual(client.post("/api/ping").status_code, 200)
        self.assertEqual(seen, ["GET", "POST"])
        response = client.get("/api/state")
        self.assertEqual((response.status_code, response.get_json()["value"]), (202, {"up": True}))
        with self.assertLogs("specter", "ERROR"):
            response = client.get("/api/fail")
        self.assertEqual((response.status_code, response.get_json()), (500, {"error": "API down"}))

    def test_mount_is_idempotent_and_on_mount_runs_once(self):
        router = JobsRouter()
        blueprint = router.mount()
        self.assertIsInstance(blueprint, flask.Blueprint)
        self.assertIs(router.mount(), blueprint)
        self.assertIs(router.blueprint(), blueprint)
        self.served(router)
        self.assertIs(router.mount(), blueprint)
        self.assertEqual(router.mounts, 1)

    def test_route_after_mount_raises(self):
        router = Router("late", url_prefix="/late")
        router.mount()
        with self.assertRaises(RuntimeError):
            @router.route("/x")
            def x():
                return {}

    def test_bad_rule_raises_value_error(self):
        with self.assertRaises(ValueError):
            route("no-slash")
        router = Router("bad")
        with self.assertRaises(ValueError):
            router.route("relative/path")

    def test_bad_methods_raise_type_error(self):
        for methods in (5, "GET", [1]):
            with self.subTest(methods=methods):
                with self.assertRaisesRegex(TypeError, "methods must be a list"):
                    route("/x", methods=methods)

    def test_teardown_runs_on_unmount_then_cleanups_lifo(self):
        router = JobsRouter()
        router.mount()

        class Resource:
            def close(self):
                router.log.append("close")
        resource = Resource()
        self.assertIs(router.add_cleanup(lambda: router.log.append("first")), router)
        self.assertIs(router.own(resource), resource)
        router.add_cleanup(lambda: router.log.append("last"))
        self.assertIs(router.teardown(), router)
        self.assertEqual(router.log, ["unmount", "last", "close", "first"])
        router.teardown()
        self.assertEqual(router.log.count("close"), 1)
        self.assertEqual(router.log.count("first"), 1)

    def test_own_rejects_unstoppable_and_ignores_none(self):
        router = Router("owner")
        self.assertIsNone(router.own(None))
        with self.assertRaises(TypeError):
            router.own(object())
        closed = []
        self.assertEqual(router.own("res", stop_method=lambda: closed.append(1)), "res")
        router.teardown()
        self.assertEqual(closed, [1])

    def test_require_and_resolve_use_the_registry(self):
        db = object()
        specter.registry.provide("db", db)
        router = Router("deps")
        self.assertIs(router.require("db"), db)
        self.assertIs(router.resolve("db"), db)
        self.assertIsNone(router.resolve("cache"))
        with self.assertRaises(KeyError):
            router.require("cache")


class ChatHandler(Handler):
    name = "chat"
    events = {"say": "on_say", "ping": "on_ping"}
    event_priorities = {"say": 1}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log = []

    def on_setup(self):
        self.log.append("setup")

    def on_teardown(self):
        self.log.append("teardown")

    def on_say(self, data=None):
        self.log.append(("say", data))
        return {"said": data}

    def on_ping(self, data=None):
        self.log.append(("ping", data))
        return {"pong": data}


class TestHandler(SpecterTestCase):

    def test_binds_directly_without_an_ingress(self):
        app, sio = make_web_app()
        handler = ChatHandler()
        self.addCleanup(handler.teardown)
        self.assertFalse(handler.registered)
        self.assertIs(handler.setup(sio), handler)
        self.assertTrue(handler.registered)
        self.assertIs(handler.socketio, sio)
        client = sio.test_client(app)
        self.assertEqual(client.emit("ping", {"x": 1}, callback=True), {"pong": {"x": 1}})
        self.assertEqual(client.emit("say", "hi", callback=True), {"said": "hi"})
        self.assertIs(handler.teardown(), handler)
        self.assertFalse(handler.registered)
        self.assertIn(client.emit("ping", {"x": 2}, callback=True), (None, []))
        self.assertEqual(handler.log, ["setup", ("ping", {"x": 1}), ("say", "hi"), "teardown"])

    def test_direct_handlers_of_one_event_coexist_in_priority_order(self):
        app, sio = make_web_app()
        calls = []

        class Audit(Handler):
            events = {"say": "on_say"}
            event_priorities = {"say": 0}

            def on_say(self, data=None):
                calls.append(("audit", data))

        chat, audit = ChatHandler(), Audit()
        for handler in (chat, audit):
            handler.setup(sio)
            self.addCleanup(handler.teardown)
        client = sio.test_client(app)
        self.assertEqual(client.emit("say", "hi", callback=True), {"said": "hi"})
        self.assertEqual(calls, [("audit", "hi")])
        self.assertEqual(chat.log[-1], ("say", "hi"))
        audit.teardown()
        self.assertEqual(client.emit("say", "again", callback=True), {"said": "again"})
        self.assertEqual(calls, [("audit", "hi")])

    def test_setup_teardown_and_stop_are_idempotent(self):
        app, sio = make_web_app()
        handler = ChatHandler()
        self.addCleanup(handler.teardown)
        handler.setup(sio)
        self.assertIs(handler.setup(sio), handler)
        self.assertEqual(handler.log, ["setup"])
        handler.teardown()
        self.assertIs(handler.teardown(), handler)
        handler.stop()
        self.assertEqual(handler.log, ["setup", "teardown"])
        handler.setup(sio)
        self.assertIs(handler.stop(), handler)
        self.assertFalse(handler.registered)
        self.assertEqual(handler.log, ["setup", "teardown", "setup", "teardown"])

    def test_can_be_set_up_again_after_teardown(self):
        app, sio = make_web_app()
        handler = ChatHandler()
        self.addCleanup(handler.teardown)
        handler.setup(sio).teardown()
        handler.setup(sio)
        client = sio.test_client(app)
        self.assertEqual(client.emit("ping", 3, callback=True), {"pong": 3})
        self.assertEqual(handler.log.count(("ping", 3)), 1)

    def test_events_go_through_the_ingress_when_provided(self):
        app, sio = make_web_app()
        ingress = SocketIngress(sio)
        specter.registry.provide("socket_ingress", ingress)
        order = []

        class Ordered(ChatHandler):
            def on_say(self, data=None):
                order.append("handler")
                return super().on_say(data)
        ingress.subscribe("say", lambda data=None: order.append("other"), priority=50)
        handler = Ordered()
        self.addCleanup(handler.teardown)
        handler.setup(sio)
        client = sio.test_client(app)
        self.assertEqual(client.emit("say", "hi", callback=True), {"said": "hi"})
        self.assertEqual(order, ["handler", "other"])  # event_priorities: 1 runs before 50
        self.assertEqual(ingress.dispatch("ping", 5), {"pong": 5})
        handler.teardown()
        self.assertIsNone(ingress.dispatch("ping", 6))
        self.assertIn(client.emit("say", "bye", callback=True), (None, []))
        self.assertEqual(order, ["handler", "other", "other"])
        self.assertEqual(handler.log, ["setup", ("say", "hi"), ("ping", 5), "teardown"])

    def test_setup_without_socketio_uses_the_ingress(self):
        app, sio = make_web_app()
        specter.registry.provide("socket_ingress", SocketIngress(sio))
        handler = ChatHandler()
        self.addCleanup(handler.teardown)
        handler.setup()
        self.assertIs(handler.socketio, sio)
        self.assertEqual(sio.test_client(app).emit("ping", 1, callback=True), {"pong": 1})

    def test_class_namespace(self):
        class RoomHandler(ChatHandler):
            namespace = "/chat"
        app, sio = make_web_app()
        handler = RoomHandler()
        self.addCleanup(handler.teardown)
        handler.setup(sio)
        client = sio.test_client(app, namespace="/chat")
        self.assertTrue(client.is_connected("/chat"))
        self.assertEqual(client.emit("ping", "x", namespace="/chat", callback=True), {"pong": "x"})
        root = sio.test_client(app)
        self.assertIn(root.emit("ping", "y", callback=True), (None, []))
        self.assertEqual([e for e in handler.log if e != "setup"], [("ping", "x")])

    def test_owns_resources_and_cleanups_released_at_teardown(self):
        app, sio = make_web_app()
        handler = ChatHandler()
        released = []

        class Conn:
            def disconnect(self):
                released.append("conn")
        conn = Conn()
        handler.setup(sio)
        self.assertIs(handler.add_cleanup(lambda: released.append("cleanup")), handler)
        self.assertIs(handler.own(conn), conn)
        handler.teardown()
        self.assertEqual(released, ["conn", "cleanup"])
        handler.teardown()
        self.assertEqual(released, ["conn", "cleanup"])

    def test_require_and_resolve(self):
        store = specter.create_store("sessions", {})
        specter.registry.provide("sessions", store)
        handler = ChatHandler()
        self.assertIs(handler.require("sessions"), store)
        self.assertIs(handler.resolve("sessions"), store)
        self.assertIsNone(handler.resolve("nothing"))
        with self.assertRaises(KeyError):
            handler.require("nothing")

    def test_events_mapping_to_a_missing_method_is_a_type_error(self):
        class Broken(Handler):
            events = {"say": "no_such_method"}
        with self.assertRaises(TypeError):
            Broken()


class TestSocketIngress(SpecterTestCase):

    def make(self):
        app, sio = make_web_app()
        ingress = SocketIngress(sio)
        return app, sio, ingress

    def test_one_real_handler_per_event(self):
        app, sio = make_web_app()
        counts = []
        with mock.patch.object(sio, "on_event", wraps=sio.on_event) as on_event:
            ingress = SocketIngress(sio)
            for label in "abc":
                ingress.subscribe("job", lambda data, label=label: counts.append(label))
            ingress.subscribe("other", lambda data: None)
        bound = [c.args[0] for c in on_event.call_args_list]
        self.assertEqual(sorted(bound), ["job", "other"])
        self.assertIn("job", sio.server.handlers["/"])
        client = sio.test_client(app)
        client.emit("job", 1)
        self.assertEqual(counts, ["a", "b", "c"])
        client.emit("job", 2)
        self.assertEqual(counts, ["a", "b", "c"] * 2)

    def test_outcome_result_is_acked_as_its_dict(self):
        app, sio, ingress = self.make()
        ingress.subscribe("job", lambda data: Outcome.success({"id": data}, status=201))
        ack = sio.test_client(app).emit("job", 7, callback=True)
        self.assertEqual(ack, {"ok": True, "status": 201, "value": {"id": 7}})

    def test_connect_subscriber_can_refuse_the_client(self):
        app, sio, ingress = self.make()

        def authenticate(auth=None):
            if not auth or auth.get("token") != "good":
                raise ConnectionRefusedError("bad token")
        ingress.subscribe("connect", authenticate)
        self.assertFalse(sio.test_client(app, auth={"token": "bad"}).is_connected())
        self.assertTrue(sio.test_client(app, auth={"token": "good"}).is_connected())

    def test_connect_fails_closed(self):
        app, sio, ingress = self.make()

        def crashing_check(auth=None):
            raise KeyError("token store unavailable")
        ingress.subscribe("connect", crashing_check, priority=1)
        ingress.subscribe("connect", lambda auth=None: True, priority=2)
        with self.assertLogs("specter", "ERROR"):
            self.assertFalse(sio.test_client(app, auth={"token": "x"}).is_connected())
        ingress.clear()
        ingress.subscribe("connect", lambda auth=None: False, priority=1)
        ingress.subscribe("connect", lambda auth=None: True, priority=2)
        self.assertFalse(sio.test_client(app, auth={"token": "x"}).is_connected())

    def test_connect_and_disconnect_subscribers_may_take_no_arguments(self):
        app, sio, ingress = self.make()
        seen = []
        ingress.subscribe("connect", lambda: seen.append("connect"))
        ingress.subscribe("disconnect", lambda: seen.append("disconnect"))
        client = sio.test_client(app, auth={"token": "x"})
        self.assertTrue(client.is_connected())
        client.disconnect()
        self.assertEqual(seen, ["connect", "disconnect"])

    def test_priority_order_with_stable_ties(self):
        app, sio, ingress = self.make()
        order = []
        for label, priority in (("a", 100), ("b", 10), ("c", 100), ("d", 10), ("e", 50)):
            ingress.subscribe("job", lambda data, label=label: order.append(label), priority=priority)
        sio.test_client(app).emit("job", None)
        self.assertEqual(order, ["b", "d", "e", "a", "c"])

    def test_raising_subscriber_is_logged_and_others_run(self):
        app, sio, ingress = self.make()
        errors, ran = [], []
        error = ValueError("bad job")

        def boom(data):
            raise error
        ingress.subscribe("job", boom, priority=1)
        ingress.subscribe("job", lambda data: ran.append(data) or "fine", priority=2)
        ingress.subscribe_error_default(errors.append)
        with self.assertLogs("specter", "ERROR") as logs:
            ack = sio.test_client(app).emit("job", 7, callback=True)
        self.assertEqual(ran, [7])
        self.assertEqual(ack, "fine")
        self.assertEqual(errors, [error])
        self.assertIn("bad job", "\n".join(logs.output))

    def test_error_default_decorator_and_unsubscribe(self):
        app, sio, ingress = self.make()
        seen = []

        @ingress.on_error_default
        def first(exc, *args, **kwargs):
            seen.append(("first", type(exc)))

        @ingress.on_error_default(priority=1)
        def early(exc, *args, **kwargs):
            seen.append(("early", type(exc)))
        ingress.subscribe("job", lambda data: 1 / 0)
        with self.assertLogs("specter", "ERROR"):
            ingress.dispatch("job", None)
        self.assertEqual(seen, [("early", ZeroDivisionError), ("first", ZeroDivisionError)])
        self.assertTrue(ingress.unsubscribe_error_default(first))
        self.assertFalse(ingress.unsubscribe_error_default(first))
        seen.clear()
        with self.assertLogs("specter", "ERROR"):
            ingress.dispatch("job", None)
        self.assertEqual(seen, [("early", ZeroDivisionError)])

    def test_last_non_none_result_is_the_ack(self):
        app, sio, ingress = self.make()
        for result in ("first", None, "third", None):
            ingress.subscribe("job", lambda data, result=result: result)
        self.assertEqual(sio.test_client(app).emit("job", 0, callback=True), "third")
        self.assertEqual(ingress.dispatch("job", 0), "third")

    def test_on_and_handler_decorators(self):
        app, sio, ingress = self.make()
        calls = []

        @ingress.on("job")
        def on_job(data):
            calls.append(("on", data))

        @ingress.handler("job", priority=1)
        def handle_job(data):
            calls.append(("handler", data))
            return "handled"

        def plain(data):
            calls.append(("plain", data))
        self.assertIs(ingress.on("job", plain), plain)
        self.assertTrue(callable(on_job) and callable(handle_job))
        ack = sio.test_client(app).emit("job", 5, callback=True)
        self.assertEqual(calls, [("handler", 5), ("on", 5), ("plain", 5)])
        self.assertEqual(ack, "handled")

    def test_subscribe_returns_unsubscribe_and_unsubscribe_returns_bool(self):
        app, sio, ingress = self.make()
        calls = []

        def first(data):
            calls.append("first")

        def second(data):
            calls.append("second")
        unsubscribe = ingress.subscribe("job", first)
        ingress.subscribe("job", second)
        self.assertTrue(callable(unsubscribe))
        unsubscribe()
        ingress.dispatch("job", 1)
        self.assertEqual(calls, ["second"])
        self.assertTrue(ingress.unsubscribe("job", second))
        self.assertFalse(ingress.unsubscribe("job", second))
        self.assertFalse(ingress.unsubscribe("never", second))
        self.assertIsNone(ingress.dispatch("job", 1))
        self.assertEqual(calls, ["second"])

    def test_owner_stop_unsubscribes(self):
        app, sio, ingress = self.make()
        owner = Service("owner").start()
        self.addCleanup(owner.stop)
        calls = []
        ingress.subscribe("job", lambda data: calls.append(data) or "ok", owner=owner)
        client = sio.test_client(app)
        self.assertEqual(client.emit("job", 1, callback=True), "ok")
        owner.stop()
        self.assertIn(client.emit("job", 2, callback=True), (None, []))
        self.assertEqual(calls, [1])
        with self.assertRaises(TypeError):
            ingress.subscribe("job", print, owner=object())

    def test_namespaces_are_isolated(self):
        app, sio, ingress = self.make()
        calls = []
        ingress.subscribe("job", lambda data: calls.append(("root", data)) or "root")
        ingress.subscribe("job", lambda data: calls.append(("admin", data)) or "admin", namespace="/admin")
        client = sio.test_client(app)
        client.connect(namespace="/admin")
        self.assertEqual(client.emit("job", 1, callback=True), "root")
        self.assertEqual(client.emit("job", 2, namespace="/admin", callback=True), "admin")
        self.assertEqual(calls, [("root", 1), ("admin", 2)])
        self.assertEqual(ingress.dispatch("job", 3, namespace="/admin"), "admin")

    def test_schema_validation_on_subscription(self):
        app, sio, ingress = self.make()
        schema = Schema("job", {"n": Field(int, required=True), "tag": Field(str, default="none")})
        received = []
        ingress.subscribe("job", lambda data: received.append(data) or {"queued": data["n"]}, schema=schema)
        client = sio.test_client(app)
        ack = client.emit("job", {"n": "many"}, callback=True)
        self.assertEqual(received, [])
        self.assertIsInstance(ack, dict)
        self.assertEqual((ack["ok"], ack["status"]), (False, 400))
        self.assertIn("n", ack["errors"])
        self.assertIsInstance(ack["error"], str)
        ack = client.emit("job", callback=True)
        self.assertEqual(received, [])
        self.assertEqual((ack["ok"], ack["status"]), (False, 400))
        ack = client.emit("job", {"n": "5"}, callback=True)
        self.assertEqual(received, [{"n": 5, "tag": "none"}])
        self.assertEqual(ack, {"queued": 5})

    def test_dispatch_runs_subscribers_directly(self):
        _, _, ingress = self.make()
        calls = []
        ingress.subscribe("job", lambda *args, **kwargs: calls.append((args, kwargs)) or "done")
        self.assertEqual(ingress.dispatch("job", 1, 2, flag=True), "done")
        self.assertEqual(calls, [((1, 2), {"flag": True})])
        self.assertIsNone(ingress.dispatch("unknown", 1))

    def test_dispatch_default_error(self):
        _, _, ingress = self.make()
        ingress.subscribe_error_default(lambda exc: "first")
        ingress.subscribe_error_default(lambda exc: None)
        self.assertEqual(ingress.dispatch_default_error(RuntimeError("x")), "first")

    def test_clear_drops_every_subscriber(self):
        app, sio, ingress = self.make()
        calls = []
        ingress.subscribe("job", lambda data: calls.append(data) or "ok")
        errors = []
        ingress.subscribe_error_default(errors.append)
        ingress.clear()
        self.assertIsNone(ingress.dispatch("job", 1))
        self.assertIn(sio.test_client(app).emit("job", 2, callback=True), (None, []))
        ingress.subscribe("boom", lambda data: 1 / 0)
        with self.assertLogs("specter", "ERROR"):
            ingress.dispatch("boom", None)
        self.assertEqual((calls, errors), ([], []))

    def test_event_without_subscribers_answers_nothing(self):
        app, sio, ingress = self.make()
        calls = []
        unsubscribe = ingress.subscribe("job", lambda data: calls.append(data) or "ok")
        client = sio.test_client(app)
        self.assertEqual(client.emit("job", 1, callback=True), "ok")
        unsubscribe()
        self.assertIn(client.emit("job", 2, callback=True), (None, []))
        self.assertEqual(calls, [1])

    def test_attach_binds_pending_events(self):
        app, sio = make_web_app()
        ingress = SocketIngress()
        self.assertIsNone(ingress.socketio)
        ingress.subscribe("job", lambda data: {"got": data})
        self.assertIs(ingress.attach(sio), ingress)
        self.assertIs(ingress.socketio, sio)
        self.assertEqual(sio.test_client(app).emit("job", 4, callback=True), {"got": 4})
        with self.assertRaises(TypeError):
            SocketIngress().attach(None)


class TestController(SpecterTestCase):

    def test_schema_lookup(self):
        class Jobs(Controller):
            schemas = {"create": Schema("create", {"name": Field(str, required=True)}),
                       "update": Schema("update", {"name": Field(str)})}
        ctl = Jobs()
        self.assertIs(ctl.schema("create"), Jobs.schemas["create"])
        with self.assertRaises(KeyError) as caught:
            ctl.schema("delete")
        message = str(caught.exception)
        self.assertIn("delete", message)
        self.assertIn("create", message)
        self.assertIn("update", message)

    def test_url_prefix_class_attribute(self):
        class Jobs(EchoController):
            url_prefix = "/v2"
        app, sio = make_web_app()
        manager = boot(app, sio, controllers=[Jobs()], signals=False)
        self.addCleanup(manager.shutdown)
        self.assertEqual(app.test_client().get("/v2/ping").status_code, 200)
        self.assertEqual(app.test_client().get("/ping").status_code, 404)

    def test_build_blueprint_once_served_under_prefix(self):
        routes = []

        class Jobs(EchoController):
            def build_routes(self, router):
                routes.append(router)
                super().build_routes(router)
        ctl = Jobs()
        self.addCleanup(ctl.stop)
        blueprint = ctl.build_blueprint("/api")
        self.assertIsInstance(blueprint, flask.Blueprint)
        self.assertIs(ctl.build_blueprint("/api"), blueprint)
        self.assertIs(ctl.build_blueprint(), blueprint)
        self.assertEqual(len(routes), 1)
        self.assertIsInstance(routes[0], Router)
        app, _ = make_web_app()
        app.register_blueprint(blueprint)
        ctl.start()
        response = app.test_client().get("/api/ping")
        self.assertEqual((response.status_code, response.get_json()), (200, {"pong": True, "by": "echo"}))
        self.assertEqual(app.test_client().get("/ping").status_code, 404)

    def test_create_handler_and_build_handler(self):
        handlers = []

        class Jobs(EchoController):
            def build_events(self, handler):
                handlers.append(handler)
                super().build_events(handler)
        ctl = Jobs()
        self.addCleanup(ctl.stop)
        fresh = ctl.create_handler()
        self.assertIsInstance(fresh, Handler)
        self.assertIsNot(ctl.create_handler(), fresh)
        self.assertEqual(handlers[:2], [fresh, handlers[1]])
        app, sio = make_web_app()
        handler = ctl.build_handler(sio)
        self.assertIsInstance(handler, Handler)
        self.assertTrue(handler.registered)
        self.assertIs(ctl.build_handler(), handler)
        self.assertIs(ctl.socketio, sio)
        ctl.start()
        self.assertEqual(sio.test_client(app).emit("echo", 9, callback=True), {"echo": 9})

    def test_owned_model_and_store_are_destroyed_on_stop(self):
        ctl = Controller("owner").start()
        self.addCleanup(ctl.stop)
        model = ctl.create_model("owner.model", {"a": 1})
        store = ctl.create_store("owner.store", {"b": 1})
        self.assertIsInstance(model, specter.Model)
        self.assertIsInstance(store, specter.Store)
        seen = []
        model.subscribe(lambda value, m: seen.append(("model", value)))
        store.subscribe(lambda snap, s: seen.append(("store", snap)))
        model.set("a", 2)
        store.set({"b": 2})
        self.assertEqual(seen, [("model", {"a": 2}), ("store", {"b": 2})])
        ctl.stop()
        model.set("a", 3)
        store.set({"b": 3})
        self.assertEqual(len(seen), 2)

    def test_service_require_and_resolve(self):
        db = {"kind": "db"}
        specter.registry.provide("db", db)
        ctl = Controller("deps")
        self.assertIs(ctl.service("db"), db)
        self.assertIs(ctl.require("db"), db)
        self.assertIs(ctl.resolve("db"), db)
        self.assertIsNone(ctl.resolve("mail"))
        with self.assertRaises(KeyError):
            ctl.service("mail")
        with self.assertRaises(KeyError):
            ctl.require("mail")

    def test_health(self):
        class Jobs(EchoController):
            schemas = {"create": Schema("create", {"name": Field(str)})}
        ctl = Jobs()
        self.addCleanup(ctl.stop)
        health = ctl.health()
        self.assertEqual((health["has_blueprint"], health["has_handler"]), (False, False))
        self.assertEqual(list(health["schemas"]), ["create"])
        self.assertEqual((health["name"], health["status"]), ("echo", "stopped"))
        ctl.build_blueprint()
        ctl.build_handler()
        ctl.start()
        health = ctl.health()
        self.assertEqual((health["has_blueprint"], health["has_handler"], health["status"]), (True, True, "ok"))

    def test_gated_while_not_running_and_restartable(self):
        ctl = EchoController()
        self.addCleanup(ctl.stop)
        app, sio = make_web_app()
        app.register_blueprint(ctl.build_blueprint("/api"))
        ctl.build_handler(sio)
        http = app.test_client()
        sock = sio.test_client(app)

        def answers():
            response = http.get("/api/ping")
            ack = sock.emit("echo", "hi", callback=True)
            return response, ack

        response, ack = answers()
        self.assertEqual(response.status_code, 503)
        self.assertEqual(response.mimetype, "application/json")
        self.assertIsInstance(response.get_json()["error"], str)
        self.assertEqual(ctl.calls, [])
        ctl.start()
        response, ack = answers()
        self.assertEqual((response.status_code, ack), (200, {"echo": "hi"}))
        self.assertEqual(ctl.calls, ["hi"])
        ctl.stop()
        response, ack = answers()
        self.assertEqual(response.status_code, 503)
        self.assertIn("error", response.get_json())
        self.assertIn(ack, (None, []))
        self.assertEqual(ctl.calls, ["hi"])
        ctl.start()
        response, ack = answers()
        self.assertEqual((response.status_code, ack), (200, {"echo": "hi"}))
        self.assertEqual(ctl.calls, ["hi", "hi"])

    def test_stop_tears_the_handler_down_first(self):
        seen = []

        class Jobs(EchoController):
            def on_stop(self):
                seen.append(self.build_handler().registered)
        app, sio = make_web_app()
        ctl = Jobs()
        self.addCleanup(ctl.stop)
        handler = ctl.build_handler(sio)
        ctl.start()
        self.assertTrue(handler.registered)
        ctl.stop()
        self.assertEqual(seen, [False])
        self.assertFalse(handler.registered)

    def test_gated_through_the_manager(self):
        app, sio = make_web_app()
        ctl = EchoController()
        manager = ServiceManager(app, sio, signals=False)
        self.addCleanup(manager.shutdown)
        manager.register_controller(ctl, url_prefix="/echo")
        http = app.test_client()
        sock = sio.test_client(app)
        self.assertEqual(http.get("/echo/ping").status_code, 503)
        self.assertIn(sock.emit("echo", 1, callback=True), (None, []))
        manager.boot()
        self.assertIs(ctl.socketio, sio)
        self.assertEqual(http.get("/echo/ping").status_code, 200)
        self.assertEqual(sock.emit("echo", 2, callback=True), {"echo": 2})
        ctl.stop()
        self.assertEqual(http.get("/echo/ping").status_code, 503)
        self.assertIn(sock.emit("echo", 3, callback=True), (None, []))
        ctl.start()
        self.assertEqual(http.get("/echo/ping").status_code, 200)
        self.assertEqual(sock.emit("echo", 4, callback=True), {"echo": 4})
        self.assertEqual(ctl.calls, [2, 4])

    def test_seed_item_controller_end_to_end(self):
        class ItemController(Controller):
            name = 'items'

            schemas = {
                'create': Schema('create', {
                    'name': Field(str, required=True),
                    'active': Field(bool, default=True),
                })
            }

            def on_start(self):
                self.state = self.create_model('items.state', {'items': []})

            def build_routes(self, router):
                @router.route('/api/items', methods=['POST'])
                def create():
                    clean = self.schema('create').require(request.get_json(silent=True) or {})
                    return {'ok': True, 'name': clean['name']}

            def build_events(self, handler):
                handler.on('item_created', self._on_item_created)

            def _on_item_created(self, data=None):
                return {'ok': True}

        app, sio = make_web_app()
        ctl = ItemController()
        manager = boot(app, sio, controllers=[ctl], signals=False)
        self.addCleanup(manager.shutdown)
        self.assertTrue(ctl.running)
        self.assertIsInstance(ctl.state, specter.Model)
        self.assertEqual(ctl.state.get("items"), [])
        response = app.test_client().post("/api/items", json={"name": "lamp"})
        self.assertEqual((response.status_code, response.get_json()), (200, {"ok": True, "name": "lamp"}))
        self.assertEqual(sio.test_client(app).emit("item_created", {"id": 1}, callback=True), {"ok": True})
        self.assertEqual(manager.health()["services"][0]["name"], "items")
        model = ctl.state
        seen = []
        model.subscribe(lambda value, m: seen.append(value))
        manager.shutdown()
        self.assertFalse(ctl.running)
        model.set("items", ["late"])
        self.assertEqual(seen, [])


class TestServiceManager(SpecterTestCase):

    def manager(self, **kwargs):
        app, sio = make_web_app()
        manager = ServiceManager(app, sio, signals=False, **kwargs)
        self.addCleanup(manager.shutdown)
        return manager

    def test_start_and_stop_order(self):
        log = []
        manager = self.manager()
        for name in ("a", "b", "c"):
            manager.register_service(RecordingService(name, log))
        for name in ("h1", "h2"):
            manager.register_handler(RecordingHandler(name, log))
        self.assertIs(manager.boot(), manager)
        self.assertEqual(log, ["start:a", "start:b", "start:c", "setup:h1", "setup:h2"])
        del log[:]
        self.assertIs(manager.shutdown(), manager)
        self.assertEqual(log, ["teardown:h2", "teardown:h1", "stop:c", "stop:b", "stop:a"])

    def test_registry_holds_manager_and_ingress_until_shutdown(self):
        manager = self.manager()
        manager.boot()
        self.assertIs(specter.registry.require("service_manager"), manager)
        self.assertIs(specter.registry.require("socket_ingress"), manager.socket_ingress)
        specter.registry.provide("extra", 1)
        manager.shutdown()
        for key in ("service_manager", "socket_ingress", "extra"):
            self.assertNotIn(key, specter.registry)
        self.assertFalse(manager.running)

    def test_boot_and_shutdown_are_idempotent(self):
        log = []
        manager = self.manager()
        manager.register_service(RecordingService("a", log))
        manager.register_handler(RecordingHandler("h", log))
        manager.boot()
        manager.boot()
        self.assertEqual(log, ["start:a", "setup:h"])
        manager.shutdown()
        manager.shutdown()
        self.assertEqual(log, ["start:a", "setup:h", "teardown:h", "stop:a"])
        self.assertFalse(manager.booted)

    def test_a_second_shutdown_waits_for_the_first(self):
        class Slow(Service):
            def on_stop(self):
                gevent.sleep(0.05)
        manager = self.manager()
        slow = manager.register_service(Slow())
        manager.boot()
        first = gevent.spawn(manager.shutdown)
        gevent.sleep(0.01)
        self.assertEqual(slow.status, "stopping")
        manager.shutdown()
        self.assertEqual((slow.status, manager.booted), ("stopped", False))
        first.join()

    def test_shutdown_gives_signals_back_their_previous_handlers(self):
        before = signal.getsignal(signal.SIGINT)
        app, sio = make_web_app()
        manager = ServiceManager(app, sio).boot()
        self.addCleanup(manager.shutdown)
        manager.shutdown()
        self.assertIs(signal.getsignal(signal.SIGINT), before)

    def test_run_refuses_unknown_options(self):
        app, sio = make_web_app()
        manager = ServiceManager(app, sio, signals=False)
        with self.assertRaisesRegex(TypeError, "debug"):
            manager.run(port=0, debug=True)
        self.assertFalse(manager.booted)

    def test_an_interrupted_shutdown_still_stops_everything(self):
        class Slow(Service):
            def on_stop(self):
                gevent.sleep(0.2)
        manager = self.manager()
        fast = manager.register_service(Service("fast"))
        manager.register_service(Slow())
        manager.boot()
        with self.assertRaises(gevent.Timeout):
            with gevent.Timeout(0.05):
                manager.shutdown()
        self.assertEqual((fast.status, manager.booted), ("stopped", False))
        self.assertEqual(specter.registry.list(), [])

    def test_registration_after_boot_starts_at_once(self):
        log = []
        manager = self.manager()
        manager.boot()
        service = RecordingService("late", log)
        manager.register_service(service)
        handler = RecordingHandler("late_h", log)
        manager.register_handler(handler)
        self.assertEqual(log, ["start:late", "setup:late_h"])
        self.assertTrue(handler.registered)
        ctl = EchoController()
        manager.register_controller(ctl, url_prefix="/late")
        self.assertTrue(ctl.running)
        response = manager.app.test_client().get("/late/ping")
        self.assertEqual((response.status_code, response.get_json()), (200, {"pong": True, "by": "echo"}))
        sock = manager.socketio.test_client(manager.app)
        self.assertEqual(sock.emit("echo", 1, callback=True), {"echo": 1})
        self.assertEqual(sock.emit("ping", 2, callback=True), {"pong": 2, "by": "late_h"})
        manager.shutdown()
        self.assertFalse(ctl.running)
        self.assertFalse(handler.registered)
        self.assertFalse(service.running)
        self.assertEqual(log[-2:], ["teardown:late_h", "stop:late"])

    def test_handlers_set_up_through_the_ingress(self):
        manager = self.manager()
        handler = RecordingHandler("h", [])
        manager.register_handler(handler)
        manager.boot()
        self.assertEqual(manager.socket_ingress.dispatch("ping", 1), {"pong": 1, "by": "h"})
        sock = manager.socketio.test_client(manager.app)
        self.assertEqual(sock.emit("ping", 2, callback=True), {"pong": 2, "by": "h"})
        manager.shutdown()
        self.assertIsNone(manager.socket_ingress.dispatch("ping", 3))
        self.assertEqual(handler.calls, [1, 2])

    def test_providers_are_provided_and_service_providers_start_first(self):
        log = []
        metrics = RecordingService("metrics", log)
        seen = {}

        class Dashboard(Controller):
            def on_start(self):
                seen["metrics"] = self.service("metrics")
                seen["config"] = self.require("config")
        app, sio = make_web_app()
        manager = boot(app, sio, services=[RecordingService("a", log)], controllers=[Dashboard("dash")],
                       providers={"metrics": metrics, "config": {"debug": True}}, signals=False)
        self.addCleanup(manager.shutdown)
        self.assertIs(specter.registry.require("metrics"), metrics)
        self.assertEqual(specter.registry.require("config"), {"debug": True})
        self.assertEqual(seen, {"metrics": metrics, "config": {"debug": True}})
        self.assertEqual(log, ["start:metrics", "start:a"])
        self.assertTrue(metrics.running)
        manager.shutdown()
        self.assertFalse(metrics.running)
        self.assertEqual(log, ["start:metrics", "start:a", "stop:a", "stop:metrics"])
        self.assertNotIn("metrics", specter.registry)
        self.assertNotIn("config", specter.registry)

    def test_boot_rolls_back_when_a_service_fails(self):
        log = []

        class Broken(RecordingService):
            def on_start(self):
                super().on_start()
                raise RuntimeError("cannot open the queue")
        manager = self.manager()
        services = [RecordingService("a", log), RecordingService("b", log), Broken("broken", log),
                    RecordingService("c", log)]
        for service in services:
            manager.register_service(service)
        handler = RecordingHandler("h", log)
        manager.register_handler(handler)
        with captured_logs():
            with self.assertRaises(RuntimeError) as caught:
                manager.boot()
        self.assertEqual(str(caught.exception), "cannot open the queue")
        self.assertEqual(log, ["start:a", "start:b", "start:broken", "stop:b", "stop:a"])
        self.assertFalse(manager.booted)
        self.assertFalse(any(service.running for service in services))
        self.assertFalse(handler.registered)
        self.assertNotIn("service_manager", specter.registry)

    def test_boot_function_registers_everything(self):
        log = []
        app, sio = make_web_app()
        handler = RecordingHandler("h", log)
        ctl = EchoController()
        manager = boot(app, sio, services=[RecordingService("a", log)], handlers=[handler],
                       controllers=[ctl], signals=False)
        self.addCleanup(manager.shutdown)
        self.assertIsInstance(manager, ServiceManager)
        self.assertTrue(manager.booted)
        self.assertTrue(ctl.running)
        self.assertTrue(handler.registered)
        self.assertEqual(app.test_client().get("/ping").get_json(), {"pong": True, "by": "echo"})
        self.assertEqual(log, ["start:a", "setup:h"])

    def test_health_is_a_tree(self):
        class Parent(Service):
            def on_start(self):
                self.adopt(Service("child"))
                self.own(specter.create_model("parent.model", {"a": 1}))
        manager = self.manager()
        manager.register_service(Parent("parent"))
        manager.register_handler(RecordingHandler("h", []))
        manager.boot()
        health = manager.health()
        self.assertEqual(health["status"], "ok")
        (parent,) = [s for s in health["services"] if s["name"] == "parent"]
        self.assertEqual(parent["status"], "ok")
        self.assertEqual([c["name"] for c in parent["children"]], ["child"])
        self.assertEqual(parent["children"][0]["status"], "ok")
        self.assertIn("parent.model", [r.get("name") for r in parent["resources"]])
        self.assertEqual([h["name"] for h in health["handlers"]], ["h"])
        manager.shutdown()
        self.assertEqual(manager.health()["status"], "stopped")

    def test_health_is_degraded_while_a_service_is_down(self):
        manager = self.manager()
        worker = manager.register_service(Service("worker"))
        manager.boot()
        self.assertEqual(manager.health()["status"], "ok")
        worker.stop()
        self.assertEqual(manager.health()["status"], "degraded")

    def test_the_manager_is_the_apps_specter_extension(self):
        manager = self.manager()
        self.assertIs(manager.app.extensions["specter"], manager)

    def test_two_controllers_with_one_name_are_refused(self):
        manager = self.manager()
        manager.register_controller(EchoController())
        with self.assertRaisesRegex(ValueError, "already has a blueprint named 'echo'"):
            manager.register_controller(EchoController())

    def test_properties(self):
        app, sio = make_web_app()
        manager = ServiceManager(app, sio, signals=False)
        self.addCleanup(manager.shutdown)
        self.assertIs(manager.app, app)
        self.assertIs(manager.socketio, sio)
        self.assertIsInstance(manager.socket_ingress, SocketIngress)
        self.assertIs(manager.socket_ingress.socketio, sio)
        self.assertIsInstance(manager, Service)
        self.assertFalse(manager.booted)
        manager.boot()
        self.assertTrue(manager.booted)
        self.assertTrue(manager.running)
        manager.shutdown()
        self.assertFalse(manager.booted)

    def test_boot_registers_an_atexit_shutdown(self):
        log = []
        app, sio = make_web_app()
        with mock.patch.object(atexit, "register") as register:
            manager = boot(app, sio, services=[RecordingService("a", log)], signals=False)
        self.addCleanup(manager.shutdown)
        self.assertEqual(register.call_count, 1)
        callback, args, kwargs = register.call_args[0][0], register.call_args[0][1:], register.call_args[1]
        self.assertTrue(manager.booted)
        callback(*args, **kwargs)
        self.assertFalse(manager.booted)
        self.assertEqual(log, ["start:a", "stop:a"])
        callback(*args, **kwargs)
        self.assertEqual(log, ["start:a", "stop:a"])

    def test_signals_true_installs_handlers_and_shutdown_removes_them(self):
        saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
        for signum, handler in saved.items():
            self.addCleanup(signal.signal, signum, handler)
        app, sio = make_web_app()
        manager = ServiceManager(app, sio)
        self.addCleanup(manager.shutdown)
        self.assertEqual(manager._signal_watchers, [])
        manager.boot()
        self.assertEqual(len(manager._signal_watchers), 2)
        manager.shutdown()
        self.assertEqual(manager._signal_watchers, [])
        quiet = ServiceManager(*make_web_app(), signals=False)
        self.addCleanup(quiet.shutdown)
        quiet.boot()
        self.assertEqual(quiet._signal_watchers, [])

    def test_signal_handler_shuts_down_once(self):
        log = []
        app, sio = make_web_app()
        with mock.patch.object(gevent, "signal_handler") as install:
            manager = boot(app, sio, services=[RecordingService("a", log)])
        self.addCleanup(manager.shutdown)
        calls = install.call_args_list
        self.assertEqual({c[0][0] for c in calls}, {signal.SIGTERM, signal.SIGINT})
        for call in (calls[0], calls[1]):
            callback, args = call[0][1], call[0][2:]
            try:
                callback(*args)
            except SystemExit as exc:
                self.assertIn(exc.code, (0, None))
        self.assertFalse(manager.booted)
        self.assertEqual(log, ["start:a", "stop:a"])
        self.assertTrue(wait_until(lambda: install.return_value.cancel.called))
        with mock.patch.object(gevent, "signal_handler") as install:
            manager = boot(*make_web_app(), signals=False)
        self.addCleanup(manager.shutdown)
        self.assertFalse(install.called)


class UpgradeClosingHandler(pywsgi.WSGIHandler):
    """Close a connection once its websocket session ends.

    Without gevent-websocket, pywsgi would keep the connection alive and
    read the client's late close frame as an HTTP request, printing noise.
    """

    def handle_one_response(self):
        super().handle_one_response()
        if self.environ.get("HTTP_UPGRADE", "").lower() == "websocket":
            self.close_connection = True


class TestRealClients(SpecterTestCase):

    def blocking(self, fn, *args, **kwargs):
        """Run a blocking call in a native thread, waiting for it cooperatively."""
        return gevent.get_hub().threadpool.spawn(fn, *args, **kwargs).get()

    def serve(self, app, sio, **boot_kwargs):
        """Boot the app, serve it on an ephemeral port; the base URL and the manager."""
        manager = boot(app, sio, signals=False, **boot_kwargs)
        self.addCleanup(manager.shutdown)
        server = pywsgi.WSGIServer(("127.0.0.1", 0), app, log=None, handler_class=UpgradeClosingHandler)
        server.start()
        self.addCleanup(server.stop, timeout=1)
        return "http://127.0.0.1:%d" % server.server_port, manager

    def connect(self, url, client=None, **kwargs):
        client = client or socketio.Client()
        self.blocking(client.connect, url, wait_timeout=CLIENT_TIMEOUT, **kwargs)
        self.addCleanup(self.disconnect, client)
        return client

    def disconnect(self, client):
        if client.connected:
            self.blocking(client.disconnect)

    def call(self, client, event, data=None, **kwargs):
        return self.blocking(client.call, event, data, timeout=CLIENT_TIMEOUT, **kwargs)

    def http_get(self, url):
        def fetch():
            try:
                with urllib.request.urlopen(url, timeout=CLIENT_TIMEOUT) as response:
                    return response.status, response.headers.get_content_type(), response.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.headers.get_content_type(), exc.read()
        return self.blocking(fetch)

    def test_connect_and_ack_through_a_handler(self):
        app, sio = make_web_app()
        handler = RecordingHandler("h", [])
        url, _ = self.serve(app, sio, handlers=[handler])
        client = self.connect(url)
        self.assertTrue(client.connected)
        self.assertTrue(client.sid)
        self.assertEqual(self.call(client, "ping", {"x": 1}), {"pong": {"x": 1}, "by": "h"})
        self.assertEqual(handler.calls, [{"x": 1}])

    def test_ack_through_a_controller_and_http(self):
        app, sio = make_web_app()
        ctl = EchoController()
        url, _ = self.serve(app, sio, controllers=[ctl])
        client = self.connect(url)
        self.assertEqual(self.call(client, "echo", [1, 2]), {"echo": [1, 2]})
        status, kind, body = self.http_get(url + "/ping")
        self.assertEqual((status, kind), (200, "application/json"))
        self.assertEqual(flask.json.loads(body), {"pong": True, "by": "echo"})

    def test_receives_emits_from_a_service_interval(self):
        app, sio = make_web_app()

        class Ticker(Service):
            def on_start(self):
                self.ticks = 0
                self.interval(self.tick, 0.02)

            def tick(self):
                self.ticks += 1
                sio.emit("tick", {"n": self.ticks})
        ticker = Ticker()
        url, _ = self.serve(app, sio, services=[ticker])
        got = []
        client = socketio.Client()
        client.on("tick", got.append)
        self.connect(url, client)
        self.assertTrue(wait_until(lambda: len(got) >= 3, timeout=CLIENT_TIMEOUT))
        numbers = [item["n"] for item in got[:3]]
        self.assertEqual(numbers, sorted(numbers))
        self.assertGreaterEqual(numbers[0], 1)

    def test_receives_emits_from_a_bus_driven_service(self):
        app, sio = make_web_app()

        class Relay(Service):
            def on_start(self):
                self.listen("job:done", lambda data: sio.emit("job_done", data))
        url, manager = self.serve(app, sio, services=[Relay()])
        got = []
        client = socketio.Client()
        client.on("job_done", got.append)
        self.connect(url, client)
        specter.bus.emit("job:done", {"id": 7})
        self.assertTrue(wait_until(lambda: got, timeout=CLIENT_TIMEOUT))
        self.assertEqual(got, [{"id": 7}])
        manager.shutdown()
        self.assertFalse(specter.bus.has_listeners("job:done"))

    def test_namespace(self):
        class RoomHandler(RecordingHandler):
            namespace = "/chat"
        app, sio = make_web_app()
        url, _ = self.serve(app, sio, handlers=[RoomHandler("room", [])])
        client = self.connect(url, namespaces=["/chat"])
        self.assertIn("/chat", client.namespaces)
        self.assertEqual(self.call(client, "ping", "hi", namespace="/chat"), {"pong": "hi", "by": "room"})

    def test_connect_and_disconnect_events(self):
        class Presence(Handler):
            events = {"connect": "joined", "disconnect": "left"}

            def __init__(self):
                super().__init__()
                self.log = []

            def joined(self, *args):
                self.log.append(("joined", flask.request.sid))

            def left(self, *args):
                self.log.append(("left", flask.request.sid))
        app, sio = make_web_app()
        presence = Presence()
        url, _ = self.serve(app, sio, handlers=[presence])
        client = self.connect(url)
        self.assertTrue(wait_until(lambda: presence.log, timeout=CLIENT_TIMEOUT))
        self.assertEqual(presence.log[0][0], "joined")
        self.blocking(client.disconnect)
        self.assertFalse(client.connected)
        self.assertTrue(wait_until(lambda: len(presence.log) >= 2, timeout=CLIENT_TIMEOUT))
        self.assertEqual(presence.log[1], ("left", presence.log[0][1]))

    def test_controller_stop_over_real_clients(self):
        app, sio = make_web_app()
        ctl = EchoController()
        url, _ = self.serve(app, sio, controllers=[ctl])
        client = self.connect(url)
        self.assertEqual(self.call(client, "echo", 1), {"echo": 1})
        self.assertEqual(self.http_get(url + "/ping")[0], 200)
        ctl.stop()
        status, kind, body = self.http_get(url + "/ping")
        self.assertEqual((status, kind), (503, "application/json"))
        self.assertIn("error", flask.json.loads(body))
        try:
            ack = self.call(client, "echo", 2)
        except socketio.exceptions.TimeoutError:
            ack = None
        self.assertIsNone(ack)
        self.assertEqual(ctl.calls, [1])
        ctl.start()
        self.assertEqual(self.call(client, "echo", 3), {"echo": 3})
        self.assertEqual(self.http_get(url + "/ping")[0], 200)
        self.assertEqual(ctl.calls, [1, 3])


SIGNAL_APP = textwrap.dedent("""
    import socket
    import sys

    import gevent
    from flask import Flask
    from flask_socketio import SocketIO

    import specter

    marker = sys.argv[1]
    app = Flask(__name__)
    sio = SocketIO(app, async_mode="gevent")


    @app.route("/ready")
    def ready():
        return "ok"


    class Worker(specter.Service):
        def on_start(self):
            self.proc = self.start_process(["sh", "-c", "sleep 60 & echo $!; wait"],
                                           stdout=specter.ManagedProcess.PIPE)
            self.proc.watch_stream("stdout", self.announce)
            self.interval(lambda: None, 0.05)

        def announce(self, line):
            if isinstance(line, bytes):
                line = line.decode()
            print("grandchild", line.strip(), flush=True)

        def on_stop(self):
            gevent.sleep(float(sys.argv[3]))  # a slow teardown, when asked for
            with open(marker, "w") as f:
                f.write("stopped")


    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    print("port", port, flush=True)
    if sys.argv[2] == "manager":
        manager = specter.ServiceManager(app, sio)
        manager.register_service(Worker())
        manager.run("127.0.0.1", port)
    else:  # boot() with signals on, then the usual Flask-SocketIO server
        manager = specter.boot(app, sio, services=[Worker()])
        sio.run(app, host="127.0.0.1", port=port)
    print("run returned", manager.booted, flush=True)
""")


class TestSignals(SpecterTestCase):

    def blocking(self, fn, *args, **kwargs):
        return gevent.get_hub().threadpool.spawn(fn, *args, **kwargs).get()

    def served(self, port):
        def fetch():
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/ready" % port, timeout=1) as response:
                    return response.status == 200
            except OSError:
                return False
        return self.blocking(fetch)

    def run_and_signal(self, signum, mode="manager", stop_delay=0.0, again_after=None):
        workdir = tempfile.mkdtemp(prefix="specter-web-")
        self.addCleanup(shutil.rmtree, workdir, True)
        script = os.path.join(workdir, "sigapp.py")
        with open(script, "w") as f:
            f.write(SIGNAL_APP)
        marker = os.path.join(workdir, "stopped")
        env = dict(os.environ, PYTHONPATH=SPECTER_DIR)
        # stderr goes to a file: the grandchild inherits it, so a pipe would stay open while it lives.
        errors_path = os.path.join(workdir, "stderr.txt")
        with open(errors_path, "w") as errors:
            child = gevent.subprocess.Popen([sys.executable, "-u", script, marker, mode, str(stop_delay)],
                                            stdout=gevent.subprocess.PIPE,
                                            stderr=errors, env=env, cwd=workdir, universal_newlines=True)
        self.addCleanup(self.reap, child)

        def stderr():
            with open(errors_path) as f:
                return f.read()
        lines = {}
        with gevent.Timeout(CLIENT_TIMEOUT, AssertionError("the child never became ready")):
            while "port" not in lines or "grandchild" not in lines:
                line = child.stdout.readline()
                if not line:
                    self.fail("the child ended early: %s" % stderr())
                word, _, rest = line.strip().partition(" ")
                lines[word] = rest
        grandchild = int(lines["grandchild"])
        self.addCleanup(self.kill_stray, grandchild)
        self.assertFalse(pid_gone(grandchild))
        port = int(lines["port"])
        self.assertTrue(wait_until(lambda: self.served(port), timeout=CLIENT_TIMEOUT, step=0.02))
        child.send_signal(signum)
        if again_after is not None:
            gevent.sleep(again_after)
            child.send_signal(signum)
        try:
            code = child.wait(timeout=CLIENT_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            self.fail("the child did not exit within %s s of signal %d; its stderr:\n%s"
                      % (CLIENT_TIMEOUT, signum, stderr()))
        rest = child.stdout.read()
        self.assertEqual(code, 0, stderr())
        if mode == "manager":
            self.assertIn("run returned False", rest)
        self.assertTrue(os.path.exists(marker))
        with open(marker) as f:
            self.assertEqual(f.read(), "stopped")
        self.assertTrue(wait_until(lambda: pid_gone(grandchild), timeout=3.0, step=0.01))
        self.assertNotIn("Traceback", stderr())
        return stderr()

    def reap(self, child):
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()

    def kill_stray(self, pid):
        if not pid_gone(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def test_sigterm_shuts_down_cleanly(self):
        self.run_and_signal(signal.SIGTERM)

    def test_sigint_shuts_down_cleanly(self):
        self.run_and_signal(signal.SIGINT)

    def test_sigterm_after_boot_without_run_exits_cleanly(self):
        self.run_and_signal(signal.SIGTERM, mode="socketio")

    def test_second_signal_during_a_slow_shutdown_does_not_cut_it_short(self):
        errors = self.run_and_signal(signal.SIGINT, stop_delay=0.4, again_after=0.15)
        self.assertIn("already shutting down", errors)


# Processes ####################################################################


# Slack for bounds measured on a busy machine (seconds).
SLACK = 0.005


def child_args(code):
    """argv running ``code`` in an unbuffered Python child."""
    return [sys.executable, "-u", "-c", code]


class TestManagedProcess(SpecterTestCase):

    def make(self, name="child", **kwargs):
        proc = specter.ManagedProcess(name, **kwargs)
        self.addCleanup(proc.stop)
        return proc

    def run_child(self, code, name="child", make_kwargs=None, **popen_kwargs):
        proc = self.make(name, **(make_kwargs or {}))
        proc.start(child_args(code), **popen_kwargs)
        return proc

    def piped(self, code, **kwargs):
        return self.run_child(code, stdout=specter.ManagedProcess.PIPE,
                              stderr=specter.ManagedProcess.PIPE, **kwargs)

    def collect(self, proc, stream_name, **kwargs):
        items = []
        reader = proc.watch_stream(stream_name, items.append, **kwargs)
        return items, reader

    # Argument checks ----------------------------------------------------------

    def test_empty_args_is_value_error(self):
        for args in ([], ""):
            proc = self.make()
            with self.subTest(args=args), self.assertRaises(ValueError):
                proc.start(args)
            self.assertFalse(proc.running)

    def test_non_list_args_is_type_error(self):
        for args in (42, None, {"argv": "ls"}):
            proc = self.make()
            with self.subTest(args=args), self.assertRaises(TypeError):
                proc.start(args)

    def test_negative_terminate_timeout_is_value_error(self):
        with self.assertRaises(ValueError):
            specter.ManagedProcess("p", terminate_timeout=-1)

    def test_start_while_running_is_runtime_error(self):
        proc = self.run_child("import time; time.sleep(30)")
        pid = proc.pid
        with self.assertRaises(RuntimeError):
            proc.start(child_args("pass"))
        self.assertEqual(proc.pid, pid)  # the running child is untouched
        self.assertTrue(proc.running)

    def test_string_args_run_a_program(self):
        proc = self.make()
        self.assertIs(proc.start("exit 7", shell=True), proc)
        self.assertEqual(proc.wait(timeout=5), 7)

    # Properties, wait, poll ---------------------------------------------------

    def test_properties_before_start(self):
        proc = self.make()
        self.assertFalse(proc.running)
        self.assertIsNone(proc.pid)
        self.assertIsNone(proc.returncode)
        self.assertIsNone(proc.poll())
        self.assertIs(proc.stop(), proc)  # a no-op

    def test_wait_returns_exit_code(self):
        proc = self.run_child("import sys; sys.exit(3)")
        self.assertIsInstance(proc.pid, int)
        self.assertEqual(proc.wait(), 3)
        self.assertEqual(proc.returncode, 3)
        self.assertEqual(proc.poll(), 3)
        self.assertFalse(proc.running)

    def test_wait_with_timeout_returns_none_while_running(self):
        proc = self.run_child("import time; time.sleep(30)")
        started = time.monotonic()
        self.assertIsNone(proc.wait(timeout=0.05))
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertTrue(proc.running)
        self.assertIsNone(proc.poll())
        self.assertIsNone(proc.returncode)
        self.assertGreater(proc.pid, 0)

    def test_returncode_readable_after_stop(self):
        proc = self.run_child("import time; time.sleep(30)")
        pid = proc.pid
        self.assertIs(proc.stop(), proc)
        self.assertFalse(proc.running)
        self.assertEqual(proc.returncode, -signal.SIGTERM)
        self.assertEqual(proc.poll(), -signal.SIGTERM)
        self.assertEqual(proc.pid, pid)
        self.assertIs(proc.stop(), proc)  # idempotent
        self.assertEqual(proc.returncode, -signal.SIGTERM)

    def test_restart_after_exit(self):
        proc = self.run_child("import sys; sys.exit(0)", stdout=specter.ManagedProcess.PIPE)
        self.assertEqual(proc.wait(timeout=5), 0)
        proc.start(child_args("print('again'); raise SystemExit(5)"), stdout=specter.ManagedProcess.PIPE)
        self.assertTrue(proc.running or proc.poll() == 5)  # a new child, not the old exit code
        lines, reader = self.collect(proc, "stdout")
        self.assertEqual(proc.wait(timeout=5), 5)
        reader.join(timeout=2)
        self.assertEqual(lines, [b"again"])
        self.assertEqual(proc.returncode, 5)

    # Reading ------------------------------------------------------------------

    def test_stdout_lines_stripped(self):
        proc = self.piped(r"import sys; sys.stdout.buffer.write(b'one\r\ntwo\nthree\n')")
        lines, reader = self.collect(proc, "stdout")
        reader.join(timeout=2)
        self.assertTrue(reader.dead)
        self.assertEqual(lines, [b"one", b"two", b"three"])

    def test_stdout_lines_unstripped(self):
        proc = self.piped(r"import sys; sys.stdout.buffer.write(b'one\r\ntwo\nthree')")
        lines, reader = self.collect(proc, "stdout", strip=False)
        reader.join(timeout=2)
        self.assertTrue(reader.dead)
        self.assertEqual(lines, [b"one\r\n", b"two\n", b"three"])

    def test_stderr_lines_stripped_and_unstripped(self):
        code = r"import sys; sys.stderr.buffer.write(b'err1\nerr2\r\n')"
        proc = self.piped(code)
        lines, reader = self.collect(proc, "stderr")
        reader.join(timeout=2)
        self.assertEqual(lines, [b"err1", b"err2"])
        proc = self.piped(code, name="child2")
        lines, reader = self.collect(proc, "stderr", strip=False)
        reader.join(timeout=2)
        self.assertEqual(lines, [b"err1\n", b"err2\r\n"])

    def test_chunk_mode_passes_raw_bytes(self):
        proc = self.piped(
            r"import sys; sys.stdout.buffer.write(bytes(range(256)) * 4 + b'tail\r\n')"
        )
        chunks, reader = self.collect(proc, "stdout", chunk_size=64)
        reader.join(timeout=2)
        self.assertTrue(reader.dead)
        expected = bytes(range(256)) * 4 + b"tail\r\n"
        self.assertTrue(all(isinstance(c, bytes) for c in chunks))
        self.assertTrue(all(0 < len(c) <= 64 for c in chunks), [len(c) for c in chunks])
        self.assertGreaterEqual(len(chunks), len(expected) // 64)
        self.assertEqual(b"".join(chunks), expected)

    def test_text_mode_gives_str_lines(self):
        proc = self.piped("print('alpha'); print('beta')", text=True)
        lines, reader = self.collect(proc, "stdout")
        reader.join(timeout=2)
        self.assertEqual(lines, ["alpha", "beta"])
        self.assertTrue(all(isinstance(line, str) for line in lines))

    def test_lines_arrive_while_the_child_runs(self):
        proc = self.piped("import time; print('first'); time.sleep(30)")
        lines, reader = self.collect(proc, "stdout")
        self.assertTrue(wait_until(lambda: lines == [b"first"]))
        self.assertTrue(proc.running)
        self.assertFalse(reader.dead)

    def test_label_names_the_reader_in_logs(self):
        proc = self.piped("print('hello')")

        def handler(line):
            raise ValueError("cannot parse")

        with self.assertLogs("specter", "ERROR") as logs:
            reader = proc.watch_stream("stdout", handler, label="jobs-out")
            reader.join(timeout=2)
        self.assertTrue(any("jobs-out" in line for line in logs.output), logs.output)

    def test_close_on_exit_closes_the_stream_when_reading_ends(self):
        proc = self.piped("print('bye')")
        lines, reader = self.collect(proc, "stdout", close_on_exit=True)
        reader.join(timeout=2)
        self.assertTrue(reader.dead)
        self.assertEqual(lines, [b"bye"])
        self.assertTrue(proc._popen.stdout.closed)

    def test_without_close_on_exit_the_stream_stays_open_until_stop(self):
        proc = self.piped("print('bye')")
        lines, reader = self.collect(proc, "stdout")
        reader.join(timeout=2)
        self.assertTrue(reader.dead)
        self.assertFalse(proc._popen.stdout.closed)
        proc.stop()
        self.assertTrue(proc._popen.stdout.closed)

    def test_follow_output_with_handlers(self):
        proc = self.piped("import sys; print('to-out'); print('to-err', file=sys.stderr)")
        out, err = [], []
        readers = proc.follow_output(stdout_handler=out.append, stderr_handler=err.append)
        self.assertEqual(len(readers), 2)
        gevent.joinall(readers, timeout=2)
        self.assertTrue(all(r.dead for r in readers))
        self.assertEqual(out, [b"to-out"])
        self.assertEqual(err, [b"to-err"])

    def test_follow_output_without_handlers_logs_at_info(self):
        proc = self.piped("import sys; print('out-line'); print('err-line', file=sys.stderr)")
        with self.assertLogs("specter", "INFO") as logs:
            readers = proc.follow_output(stdout_label="OUT", stderr_label="ERR")
            gevent.joinall(readers, timeout=2)
        info = [r.getMessage() for r in logs.records if r.levelno == logging.INFO]
        self.assertTrue(any("out-line" in m and "OUT" in m for m in info), info)
        self.assertTrue(any("err-line" in m and "ERR" in m for m in info), info)

    def test_follow_output_skips_unpiped_streams(self):
        proc = self.run_child("print('x')", stdout=specter.ManagedProcess.PIPE)
        out = []
        readers = proc.follow_output(stdout_handler=out.append, stderr_handler=out.append)
        self.assertEqual(len(readers), 1)
        gevent.joinall(readers, timeout=2)
        self.assertEqual(out, [b"x"])

    def test_watch_stream_unknown_or_unpiped_is_value_error(self):
        proc = self.run_child("import time; time.sleep(30)", stdout=specter.ManagedProcess.PIPE)
        with self.assertRaises(ValueError):
            proc.watch_stream("stdin", lambda line: None)
        with self.assertRaises(ValueError):
            proc.watch_stream("bogus", lambda line: None)
        with self.assertRaises(ValueError):
            proc.watch_stream("stderr", lambda line: None)  # not piped

    def test_watch_stream_non_callable_handler_is_type_error(self):
        proc = self.piped("import time; time.sleep(30)")
        with self.assertRaises(TypeError):
            proc.watch_stream("stdout", "not callable")

    def test_handler_that_raises_is_logged_and_reading_goes_on(self):
        proc = self.piped("print('one'); print('two'); print('three')")
        seen = []

        def handler(line):
            seen.append(line)
            if line == b"one":
                raise ValueError("bad line")

        with self.assertLogs("specter", "ERROR") as logs:
            reader = proc.watch_stream("stdout", handler)
            reader.join(timeout=2)
        self.assertEqual(seen, [b"one", b"two", b"three"])
        self.assertTrue(any(r.exc_info for r in logs.records))

    # Stop ---------------------------------------------------------------------

    def test_stop_kills_a_child_that_ignores_sigterm(self):
        proc = self.piped(
            "import signal, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ready')\n"
            "time.sleep(30)\n",
            make_kwargs={"terminate_timeout": 0.2},
        )
        lines, _ = self.collect(proc, "stdout")
        self.assertTrue(wait_until(lambda: lines == [b"ready"], timeout=5))
        started = time.monotonic()
        with self.assertLogs("specter.process", "WARNING") as logs:
            proc.stop()
        elapsed = time.monotonic() - started
        self.assertIn("killing", logs.output[0])
        self.assertEqual(proc.returncode, -signal.SIGKILL)
        self.assertGreaterEqual(elapsed, 0.2 - 0.02)
        self.assertLess(elapsed, 1.0)
        self.assertTrue(pid_gone(proc.pid))

    def test_stop_timeout_argument_overrides_terminate_timeout(self):
        proc = self.piped(
            "import signal, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ready')\n"
            "time.sleep(30)\n",
            make_kwargs={"terminate_timeout": 5.0},
        )
        lines, _ = self.collect(proc, "stdout")
        self.assertTrue(wait_until(lambda: lines == [b"ready"], timeout=5))
        started = time.monotonic()
        with self.assertLogs("specter.process", "WARNING"):
            proc.stop(timeout=0.1)
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual(proc.returncode, -signal.SIGKILL)

    def test_stop_ends_grandchildren(self):
        proc = self.make("tree")
        proc.start(["sh", "-c", "sleep 30 & echo $!; sleep 30 & echo $!; wait"],
                   stdout=specter.ManagedProcess.PIPE)
        lines, _ = self.collect(proc, "stdout")
        self.assertTrue(wait_until(lambda: len(lines) >= 2, timeout=5))
        pids = [int(line) for line in lines[:2]]
        self.assertFalse(any(pid_gone(pid) for pid in pids))  # really running before stop
        shell_pid = proc.pid
        proc.stop()
        for pid in pids + [shell_pid]:
            self.assertTrue(pid_gone(pid), "pid %d survived stop()" % pid)
        self.assertIsNotNone(proc.returncode)

    def test_stop_kills_readers_and_closes_pipes(self):
        proc = self.piped("import sys, time; print('o'); print('e', file=sys.stderr); time.sleep(30)")
        out, err = [], []
        out_reader = proc.watch_stream("stdout", out.append)
        err_reader = proc.watch_stream("stderr", err.append)
        self.assertTrue(wait_until(lambda: out and err))
        self.assertFalse(out_reader.dead or err_reader.dead)
        proc.stop()
        self.assertTrue(out_reader.dead)
        self.assertTrue(err_reader.dead)
        self.assertTrue(proc._popen.stdout.closed)
        self.assertTrue(proc._popen.stderr.closed)

    def test_stop_kills_a_reader_busy_in_its_handler(self):
        # EOF cannot end this reader: it is parked in its handler, so only
        # stop() can; GreenletExit must reach it (its finally runs).
        proc = self.piped("print('work')")
        entered, finished = [], []

        def handler(line):
            entered.append(line)
            try:
                gevent.sleep(30)
            finally:
                finished.append(line)

        reader = proc.watch_stream("stdout", handler)
        self.assertTrue(wait_until(lambda: entered))
        started = time.monotonic()
        proc.stop()
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertTrue(reader.dead)
        self.assertEqual(finished, [b"work"])

    def test_waiting_does_not_block_the_hub(self):
        proc = self.run_child("import time; time.sleep(0.3)")
        ticks = [0]

        def ticker():
            while True:
                ticks[0] += 1
                gevent.sleep(0.01)

        tick = gevent.spawn(ticker)
        self.addCleanup(tick.kill)
        self.assertEqual(proc.wait(timeout=5), 0)
        self.assertGreaterEqual(ticks[0], 10)

    def test_reading_does_not_block_the_hub(self):
        proc = self.piped("import time; time.sleep(0.3); print('late')")
        ticks = [0]

        def ticker():
            while True:
                ticks[0] += 1
                gevent.sleep(0.01)

        tick = gevent.spawn(ticker)
        self.addCleanup(tick.kill)
        lines, reader = self.collect(proc, "stdout")
        reader.join(timeout=5)
        self.assertEqual(lines, [b"late"])
        self.assertGreaterEqual(ticks[0], 10)

    # Ownership ----------------------------------------------------------------

    def test_start_process_with_owner_is_stopped_with_the_service(self):
        service = specter.Service("jobs")
        service.start()
        self.addCleanup(service.stop)
        proc = specter.start_process("sleeper", child_args("import time; time.sleep(30)"), owner=service)
        self.addCleanup(proc.stop)
        self.assertIsInstance(proc, specter.ManagedProcess)
        self.assertEqual(proc.name, "sleeper")
        self.assertTrue(proc.running)
        service.stop()
        self.assertFalse(proc.running)
        self.assertIsNotNone(proc.returncode)
        self.assertTrue(pid_gone(proc.pid))

    def test_processes_stopped_early_leave_their_owner(self):
        service = specter.Service("runner").start()
        self.addCleanup(service.stop)
        for _ in range(5):
            proc = service.start_process(child_args("pass"))
            proc.wait()
            proc.stop()
        self.assertEqual(service.health()["counts"]["cleanups"], 0)
        self.assertEqual(service.health()["resources"], [])
        live = service.start_process(child_args("import time; time.sleep(30)"))
        self.assertEqual(service.health()["counts"]["cleanups"], 1)
        service.stop()
        self.assertIsNotNone(live.returncode)

    def test_start_process_without_owner(self):
        proc = specter.start_process("quick", child_args("raise SystemExit(4)"))
        self.addCleanup(proc.stop)
        self.assertEqual(proc.wait(timeout=5), 4)

    def test_service_start_process_is_owned(self):
        service = specter.Service("jobs")
        service.start()
        self.addCleanup(service.stop)
        proc = service.start_process(child_args("import time; print('up'); time.sleep(30)"),
                                     stdout=specter.ManagedProcess.PIPE)
        self.addCleanup(proc.stop)
        self.assertIsInstance(proc, specter.ManagedProcess)
        self.assertTrue(proc.running)
        lines, _ = self.collect(proc, "stdout")
        self.assertTrue(wait_until(lambda: lines == [b"up"], timeout=5))
        resources = service.health()["resources"]
        self.assertTrue(any(r.get("pid") == proc.pid for r in resources), resources)
        service.stop()
        self.assertFalse(proc.running)
        self.assertIsNotNone(proc.returncode)

    def test_service_start_process_takes_a_name(self):
        service = specter.Service("jobs")
        service.start()
        self.addCleanup(service.stop)
        proc = service.start_process(child_args("import time; time.sleep(30)"), name="cruncher")
        self.addCleanup(proc.stop)
        self.assertEqual(proc.name, "cruncher")
        service.stop()
        self.assertIsNotNone(proc.returncode)

    def test_start_with_owner_and_attach(self):
        service = specter.Service("jobs")
        service.start()
        self.addCleanup(service.stop)
        by_start = self.run_child("import time; time.sleep(30)", owner=service)
        by_attach = self.run_child("import time; time.sleep(30)", name="other")
        self.assertIs(by_attach.attach(service), by_attach)
        service.stop()
        self.assertIsNotNone(by_start.returncode)
        self.assertIsNotNone(by_attach.returncode)

    def test_attach_to_owner_without_add_cleanup_is_type_error(self):
        proc = self.make()
        with self.assertRaises(TypeError):
            proc.attach(object())
        with self.assertRaises(TypeError):
            proc.start(child_args("pass"), owner=object())
        self.assertFalse(proc.running)

    def test_a_process_that_exits_and_was_read_releases_itself(self):
        service = specter.Service("runner").start()
        self.addCleanup(service.stop)
        lines = []
        for _ in range(3):
            proc = service.start_process(child_args("print('hi')"), stdout=specter.ManagedProcess.PIPE)
            proc.watch_stream("stdout", lines.append)
            self.assertTrue(wait_until(lambda: proc.stdout.closed, timeout=5))
        self.assertEqual(lines, [b"hi"] * 3)
        self.assertEqual(service.health()["counts"]["cleanups"], 0)

    def test_a_pipe_read_by_hand_stays_open_after_the_process_releases_itself(self):
        service = specter.Service("runner").start()
        self.addCleanup(service.stop)
        proc = service.start_process(child_args("print('by hand')"), stdout=specter.ManagedProcess.PIPE)
        self.assertEqual(proc.wait(), 0)
        self.assertTrue(wait_until(lambda: service.health()["counts"]["cleanups"] == 0))
        self.assertEqual(proc.stdout.readline(), b"by hand\n")  # still there for its reader
        proc.stop()
        self.assertTrue(proc.stdout.closed)

    def test_a_restarted_process_is_still_owned(self):
        service = specter.Service("runner").start()
        self.addCleanup(service.stop)
        proc = specter.ManagedProcess("again").attach(service)
        proc.start(child_args("pass"))
        self.assertEqual(proc.wait(), 0)
        proc.start(child_args("import time; time.sleep(30)"))
        self.assertEqual(service.health()["counts"]["cleanups"], 1)
        service.stop()
        self.assertIsNotNone(proc.returncode)  # the owner stopped the second run

    def test_watch_stream_added_late_still_gets_all_output(self):
        proc = self.make("late")
        proc.start(child_args("import sys\nprint('out')\nsys.stderr.write('err\\n' * 200)"),
                   stdout=specter.ManagedProcess.PIPE, stderr=specter.ManagedProcess.PIPE)
        errors = []

        def slow_stdout(line):
            gevent.sleep(0.05)  # still busy when the child exits
            errors_reader.append(proc.watch_stream("stderr", errors.append))
        errors_reader = []
        proc.watch_stream("stdout", slow_stdout)
        self.assertTrue(wait_until(lambda: errors_reader and errors_reader[0].dead, timeout=5))
        self.assertEqual(len(errors), 200)

    def test_undecodable_output_is_logged_and_the_pipe_keeps_draining(self):
        proc = self.make("binary")
        # 200 kB after the bad bytes: more than a pipe holds, so the child
        # finishes only if the reader keeps draining after the decode error.
        proc.start(child_args("import sys\nsys.stdout.buffer.write(b'\\xff\\xfe\\n' + b'x' * 200000)"),
                   stdout=specter.ManagedProcess.PIPE, text=True)
        with self.assertLogs("specter.process", "ERROR") as logs:
            reader = proc.watch_stream("stdout", lambda line: None)
            self.assertEqual(proc.wait(timeout=5), 0)
            reader.join(timeout=5)
        self.assertTrue(reader.dead)
        self.assertIn("reading stdout failed", logs.output[0])

    def test_restarting_ends_the_previous_process_group(self):
        proc = self.make("tree")
        # The shell exits at once and leaves its background child in the group.
        proc.start(["sh", "-c", "sleep 30 & echo $!"], stdout=specter.ManagedProcess.PIPE)
        grandchild = int(proc.stdout.readline())
        proc.wait()
        self.assertFalse(pid_gone(grandchild))
        proc.start(child_args("pass"))
        self.assertTrue(wait_until(lambda: pid_gone(grandchild), timeout=3))
        self.assertEqual(proc.wait(), 0)

    def test_stream_properties_expose_the_pipes(self):
        proc = self.make("echo")
        self.assertIsNone(proc.stdin)
        proc.start(child_args("import sys; print(sys.stdin.readline().upper(), end='')"),
                   stdin=specter.ManagedProcess.PIPE, stdout=specter.ManagedProcess.PIPE)
        proc.stdin.write(b"hello\n")
        proc.stdin.flush()
        self.assertEqual(proc.stdout.readline(), b"HELLO\n")
        self.assertIsNone(proc.stderr)
        self.assertEqual(proc.wait(), 0)
        proc.stop()
        self.assertTrue(proc.stdin.closed and proc.stdout.closed)

    def test_health_keys(self):
        proc = self.run_child("import time; time.sleep(30)", name="sleeper")
        health = proc.health()
        for key in ("name", "pid", "running", "returncode"):
            self.assertIn(key, health)
        self.assertEqual(health["name"], "sleeper")
        self.assertEqual(health["pid"], proc.pid)
        self.assertTrue(health["running"])
        self.assertIsNone(health["returncode"])
        proc.stop()
        health = proc.health()
        self.assertFalse(health["running"])
        self.assertEqual(health["returncode"], -signal.SIGTERM)


# Cluster ######################################################################


REDIS_SERVER = shutil.which("redis-server")
REDIS_MISSING = "redis-server is not installed: apt-get install -y redis-server"
NODE_TIMEOUT = 15  # a child node's start (imports included) on a loaded machine


def free_port():
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server of the test's own: a free 127.0.0.1 port, a temp dir, killed by pid."""

    def __init__(self, appendonly=False):
        self.dir = tempfile.mkdtemp(prefix="specter-redis-")
        self.port = free_port()
        self.appendonly = appendonly
        self.process = None

    @property
    def url(self):
        return "redis://127.0.0.1:%d/0" % self.port

    def start(self):
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
                "--dir", self.dir]
        self.process = gevent.subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                               start_new_session=True)
        client = self.client()
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.RedisError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("redis-server did not start on port %d" % self.port)
                gevent.sleep(0.01)
            finally:
                client.close()

    def kill(self):
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def cleanup(self):
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def client(self):
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=5)


# What every child node runs first: out() reports JSON lines, serve() boots and waits.
NODE_PRELUDE = '''
import os
if os.environ.get("PATCH"):
    from gevent import monkey
    monkey.patch_all()
import json, sys, time
import flask, gevent, specter

def out(kind, **data):
    sys.stdout.write(json.dumps(dict(data, kind=kind, t=time.time())) + "\\n")
    sys.stdout.flush()

cluster = specter.Cluster(os.environ["SPECTER_REDIS_URL"], node_id=os.environ["NODE_ID"])

def serve(*services):
    manager = specter.boot(flask.Flask("node"), None, services=services, cluster=cluster)
    out("ready")
    try:
        gevent.sleep(120)
    finally:
        out("exited")
'''


class Node:
    """A real app process joined to the test's Redis, in its own process group.

    It reports JSON lines on stdout (``out(kind, ...)``); the test reads them
    as they come and kills the process by pid at the end.
    """

    def __init__(self, test, url, node_id, body, env=None):
        self.node_id = node_id
        environment = dict(os.environ, PYTHONPATH=HERE, SPECTER_REDIS_URL=url, NODE_ID=node_id)
        environment.update(env or {})
        self.process = gevent.subprocess.Popen(
            [sys.executable, "-u", "-c", NODE_PRELUDE + textwrap.dedent(body)], env=environment,
            stdout=gevent.subprocess.PIPE, stderr=gevent.subprocess.PIPE, universal_newlines=True,
            start_new_session=True)
        self.lines = []
        self.errors = []
        self.readers = [gevent.spawn(self._read), gevent.spawn(self._read_errors)]
        test.addCleanup(self.kill)

    def _read(self):
        for line in self.process.stdout:
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                self.lines.append({"kind": "text", "text": line})

    def _read_errors(self):
        for line in self.process.stderr:
            self.errors.append(line)

    def records(self, kind):
        return [record for record in self.lines if record["kind"] == kind]

    def wait_for(self, kind, count=1, timeout=NODE_TIMEOUT):
        if not wait_until(lambda: len(self.records(kind)) >= count or self.process.poll() is not None,
                          timeout) or len(self.records(kind)) < count:
            raise AssertionError("node %s: no %d %r record(s) within %s s; stderr:\n%s"
                                 % (self.node_id, count, kind, timeout, "".join(self.errors)[-3000:]))
        return self.records(kind)

    def signal(self, signum):
        os.kill(self.process.pid, signum)

    def kill(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        gevent.joinall(self.readers, timeout=2)


class ClusterTestCase(SpecterTestCase):
    """A redis-server per TestCase (emptied before each test) and helpers for nodes."""

    ceiling = 40
    redis_server = None

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        if REDIS_SERVER is not None:
            cls.redis_server = RedisServer().start()

    @classmethod
    def tearDownClass(cls):
        if cls.redis_server is not None:
            cls.redis_server.cleanup()
        super().tearDownClass()

    def setUp(self):
        super().setUp()
        self.require_redis()
        self.redis = self.redis_server.client()
        self.addCleanup(self.redis.close)
        self.redis.flushall()

    def require_redis(self):
        if REDIS_SERVER is None:
            if os.environ.get("CI"):
                self.fail(REDIS_MISSING + " (the tests need it when CI is set)")
            self.skipTest(REDIS_MISSING)

    def own_redis(self, **kwargs):
        server = RedisServer(**kwargs).start()
        self.addCleanup(server.cleanup)
        return server

    def join(self, url=None, **kwargs):
        """This process as a node; stopped at the end, after what the test starts later."""
        kwargs.setdefault("node_id", "test-node")
        cluster = specter.Cluster(url or self.redis_server.url, **kwargs)
        return self.started(cluster)

    def node(self, node_id, body, url=None, **env):
        return Node(self, url or self.redis_server.url, node_id, body, env)


class TestCluster(ClusterTestCase):

    def test_core_works_when_redis_cannot_be_imported(self):
        code = textwrap.dedent('''
            import sys
            sys.modules["redis"] = None  # import redis now raises ImportError
            import specter
            got = []
            specter.bus.on("x", got.append)
            specter.bus.emit("x", 1)
            class S(specter.Service):
                def on_start(self):
                    self.interval(lambda: got.append("tick"), 0.01, singleton=True)
                    self.lease_token = self.lease("l").token
            s = S().start()
            import gevent; gevent.sleep(0.05)
            s.stop()
            assert got[0] == 1 and "tick" in got and s.lease_token == 1, got
            try:
                specter.Cluster("redis://127.0.0.1:1").start()
            except ImportError as exc:
                print("ImportError:", exc)
        ''')
        result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=HERE),
                                capture_output=True, text=True, timeout=NODE_TIMEOUT)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn('pip install "specter-runtime[redis]"', result.stdout)

    def test_url_comes_from_the_environment_or_a_value_error_names_both(self):
        with mock.patch.dict(os.environ, {"SPECTER_REDIS_URL": self.redis_server.url}):
            self.assertEqual(specter.Cluster().url, self.redis_server.url)
        with mock.patch.dict(os.environ, {}, clear=True):
            with self.assertRaisesRegex(ValueError, "url=.*SPECTER_REDIS_URL"):
                specter.Cluster()
        with self.assertRaisesRegex(ValueError, "redis://, rediss:// or unix://"):
            specter.Cluster("http://127.0.0.1:6379")
        with self.assertRaises(TypeError):
            specter.Cluster(6379)

    def test_unreachable_redis_fails_start_with_the_url_masked(self):
        url = "redis://user:s3cret@127.0.0.1:%d/0" % free_port()
        cluster = specter.Cluster(url)
        started = time.monotonic()
        with self.assertRaises(ConnectionError) as caught:
            cluster.start()
        self.assertLess(time.monotonic() - started, 3)
        self.assertIn("redis://user:***@127.0.0.1", str(caught.exception))
        self.assertNotIn("s3cret", str(caught.exception) + repr(cluster.health()))
        self.assertEqual(cluster.status, "stopped")
        self.assertIsNone(specter._cluster_active)

    def test_boot_starts_the_cluster_first_stops_it_last_and_provides_it(self):
        seen = []

        class Uses(Service):
            def on_start(self):
                seen.append(("start", self.require("cluster").connected))

            def on_stop(self):
                seen.append(("stop", self.require("cluster").connected))
        manager = boot(Flask(__name__), None, services=[Uses()], cluster=self.redis_server.url,
                       signals=False)
        cluster = specter.registry.require("cluster")
        self.assertIsInstance(cluster, specter.Cluster)
        manager.shutdown()
        self.assertEqual(seen, [("start", True), ("stop", True)])
        self.assertEqual(cluster.status, "stopped")

    def test_boot_with_unreachable_redis_starts_nothing(self):
        service = RecordingService("s", [])
        with self.assertRaises(ConnectionError), self.assertLogs("specter", "ERROR"):
            boot(Flask(__name__), None, services=[service], cluster="redis://127.0.0.1:%d" % free_port(),
                 signals=False)
        self.assertEqual(service.status, "created")

    def test_boot_warns_when_socketio_does_not_share_emits(self):
        app = Flask(__name__)
        sio = SocketIO(app, async_mode="gevent")
        with self.assertLogs("specter.cluster", "WARNING") as logs:
            manager = boot(app, sio, cluster=self.redis_server.url, signals=False)
        self.addCleanup(manager.shutdown)
        self.assertIn("socketio_manager()", "\n".join(logs.output))

    def test_nodes_lists_live_nodes_and_drops_a_killed_one(self):
        cluster = self.join()
        other = self.node("node-b", "serve()")
        other.wait_for("ready")
        nodes = cluster.nodes()
        self.assertEqual([node["node_id"] for node in nodes], ["node-b", "test-node"])
        self.assertEqual(nodes[0]["pid"], other.process.pid)
        self.assertEqual(set(nodes[0]), {"node_id", "host", "pid", "started_at"})
        other.kill()
        self.assertEventually(lambda: [n["node_id"] for n in cluster.nodes()] == ["test-node"],
                              timeout=cluster.node_timeout + 2 * cluster.heartbeat)

    def test_the_hub_never_stalls_while_the_cluster_reads_unpatched(self):
        self.assertFalse(gevent.monkey.is_anything_patched())
        cluster = specter.Cluster(self.redis_server.url, node_id="test-node", share=["x:*"])
        cluster.block = 0.3  # several blocking reads end within the measurement
        self.started(cluster)
        self.started(specter.ClusterQueue("idle"))
        manager = cluster.socketio_manager()
        listener = gevent.spawn(lambda: next(manager._listen()))
        self.addCleanup(listener.kill)
        gaps = []
        last = time.monotonic()
        deadline = last + 1.2
        while last < deadline:
            gevent.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now
        self.assertLess(max(gaps), 0.05 + 0.01, "the hub stalled %.0f ms" % (max(gaps) * 1000))

    def test_redis_restart_degrades_health_then_recovers_with_a_gap(self):
        server = self.own_redis()
        cluster = self.join(server.url, share=["x:*"])
        gaps = []
        specter.bus.on("cluster:gap", gaps.append)
        cache = create_cache("prices", shared=True)
        cache.set(1)
        specter.bus.emit("x:one", 1)
        self.assertEventually(lambda: cluster.health()["bus"]["sent"] == 1)
        with self.assertLogs("specter.cluster", "WARNING") as logs:
            server.kill()
            self.assertEventually(lambda: cluster.health()["status"] == "degraded", timeout=3)
            health = cluster.health()
            self.assertFalse(health["connected"])
            self.assertTrue(health["last_error"])
            specter.bus.emit("x:two", 2)  # local delivery goes on; the shared copy is dropped and counted
            self.assertEqual(cluster.health()["bus"]["dropped"], 1)
            server.start()
            back = time.monotonic()
            self.assertEventually(lambda: cluster.health()["status"] == "ok", timeout=3)
            self.assertLess(time.monotonic() - back, 2.0)
            self.assertEventually(lambda: gaps)
        self.assertIn("lost Redis at %s" % server.url, "\n".join(logs.output))
        self.assertIn("lost the shared events", gaps[0]["reason"])
        self.assertIn("1 shared emit(s) of this node were dropped", gaps[0]["reason"])
        self.assertEqual(cluster.health()["reconnects"], 1)
        self.assertFalse(cache.is_valid())

    def test_health_reports_the_contract_fields(self):
        cluster = self.join()
        health = cluster.health()
        for key in ("connected", "node_id", "nodes", "reconnects", "last_error", "lag", "gaps",
                    "leases", "queues"):
            self.assertIn(key, health)
        self.assertEqual((health["status"], health["node_id"], health["nodes"]), ("ok", "test-node", ["test-node"]))

    def test_one_cluster_per_process(self):
        self.join()
        with self.assertRaisesRegex(RuntimeError, "already running"):
            specter.Cluster(self.redis_server.url).start()


BUS_NODE = '''
cluster.share("job:*")

class Echo(specter.Service):
    def on_start(self):
        self.listen("job:ping", lambda data: out("ping", data=data))
        self.listen("job:seq", lambda data: out("seq-local", data=data), origin="local")
        self.listen("job:seq", lambda data: out("seq-remote", data=data), origin="remote")
        self.listen("job:go", self.go, origin="remote")

    def go(self, data):
        for number in range(data["n"]):
            specter.bus.emit("job:seq", number)

serve(Echo())
'''


class TestClusterBus(ClusterTestCase):

    def test_shared_events_cross_processes_in_order_without_echo(self):
        self.join(share=["job:*"])
        node = self.node("node-b", BUS_NODE, PATCH="1")  # a monkey-patched app, this one is not
        node.wait_for("ready")
        seq, local_pings, remote_pings = [], [], []
        specter.bus.on("job:seq", seq.append)
        specter.bus.on("job:ping", local_pings.append, origin="local")
        specter.bus.on("job:ping", remote_pings.append, origin="remote")
        for number in range(100):
            specter.bus.emit("job:ping", number)
        specter.bus.emit("job:go", {"n": 100})
        self.assertEventually(lambda: len(seq) == 100 and len(node.records("ping")) == 100, timeout=5)
        gevent.sleep(0.1)
        self.assertEqual(seq, list(range(100)))
        self.assertEqual([r["data"] for r in node.records("ping")], list(range(100)))
        self.assertEqual(local_pings, list(range(100)))
        self.assertEqual(remote_pings, [])  # our own events never come back to us
        self.assertEqual([r["data"] for r in node.records("seq-local")], list(range(100)))
        self.assertEqual(node.records("seq-remote"), [])

    def test_non_json_payload_is_a_type_error_before_any_listener(self):
        self.join(share=["job:*"])
        heard = Recorder()
        specter.bus.on("job:x", heard)
        with self.assertRaisesRegex(TypeError, "JSON"):
            specter.bus.emit("job:x", {"when": object()})
        self.assertEqual(heard.count, 0)
        specter.bus.emit("other", object())  # not shared: anything goes
        specter.bus.emit("job:x", {"ok": [1, "two", None]})
        self.assertEqual(heard.count, 1)

    def test_origin_must_be_any_local_or_remote(self):
        with self.assertRaisesRegex(ValueError, "origin"):
            specter.bus.on("x", print, origin="elsewhere")
        local = Recorder()
        unsubscribe = specter.bus.on("x", local, origin="local")
        specter.bus.emit("x", 1)
        self.assertTrue(unsubscribe())
        specter.bus.emit("x", 2)
        self.assertEqual(local.firsts, [1])
        specter.bus.on("x", local, origin="remote")
        self.assertTrue(specter.bus.off("x", local))
        self.assertFalse(specter.bus.has_listeners("x"))

    def test_a_trimmed_read_position_is_reported_as_a_gap(self):
        cluster = self.join(share=["job:*"])
        gaps = []
        specter.bus.on("cluster:gap", gaps.append)
        with self.assertLogs("specter.cluster", "WARNING"):
            # Another node's events, 5 of which were trimmed before this node read them.
            for seq in (1, 7):
                self.redis.incr("specter:bus:seq")
                self.redis.xadd("specter:bus", {"n": "elsewhere", "s": seq, "e": "job:x", "d": "1"})
            self.assertEventually(lambda: gaps)
        self.assertEqual(gaps[0]["missed"], 5)
        self.assertEqual(cluster.health()["gaps"], 1)


QUEUE_NODE = '''
class Jobs(specter.ClusterQueue):
    def handle_item(self, item):
        out("start", item=item)
        if item.get("nap_on") == cluster.node_id:
            gevent.sleep(item["nap"])
        elif item.get("sleep"):
            gevent.sleep(item["sleep"])
        out("done", item=item)

    def on_dropped(self, items):
        out("dropped", items=items)

serve(Jobs("jobs", worker_count=int(os.environ.get("WORKERS", "2")),
           visibility_timeout=float(os.environ.get("VT", "30"))))
'''


class RecordingQueue(specter.ClusterQueue):
    """A ClusterQueue that records what it starts and finishes, optionally failing or sleeping."""

    def __init__(self, name="jobs", *, fail=lambda item, deliveries: False, **kwargs):
        super().__init__(name, **kwargs)
        self.started_items, self.handled, self.dead = [], [], []
        self.fail = fail
        self.attempts = collections.Counter()

    def handle_item(self, item):
        key = json.dumps(item, sort_keys=True)
        self.attempts[key] += 1
        self.started_items.append(item)
        if isinstance(item, dict) and item.get("sleep"):
            gevent.sleep(item["sleep"])
        if self.fail(item, self.attempts[key]):
            raise ValueError("cannot handle %r" % (item,))
        self.handled.append(item)

    def on_dead_letter(self, item, error, deliveries):
        self.dead.append((item, error, deliveries))


class TestClusterQueue(ClusterTestCase):

    def test_every_item_is_handled_exactly_once_across_nodes(self):
        self.join()
        nodes = [self.node("node-b", QUEUE_NODE), self.node("node-c", QUEUE_NODE, PATCH="1")]
        for node in nodes:
            node.wait_for("ready")
        queue = self.started(RecordingQueue(worker_count=2))
        for number in range(300):
            self.assertTrue(queue.enqueue({"id": number}))
        self.assertTrue(queue.join(timeout=15))
        handled = [item["id"] for item in queue.handled]
        for node in nodes:
            handled += [record["item"]["id"] for record in node.records("done")]
        self.assertEqual(sorted(handled), list(range(300)))
        self.assertTrue(all(node.records("done") for node in nodes), "every node takes a share")
        self.assertEqual(queue.pending_count(), 0)

    def test_a_failing_item_is_retried_then_becomes_a_dead_letter(self):
        self.join()
        queue = self.started(RecordingQueue(max_deliveries=3, retry_backoff=(0.05, 0.1),
                                            fail=lambda item, n: item == "bad" or (item == "flaky" and n == 1)))
        with self.assertLogs("specter", "ERROR"):
            queue.enqueue("bad")
            queue.enqueue("flaky")
            self.assertTrue(queue.join(timeout=5))
        self.assertEqual(queue.handled, ["flaky"])
        self.assertEqual(queue.attempts[json.dumps("bad")], 3)
        self.assertEqual(queue.dead, [("bad", "ValueError: cannot handle 'bad'", 3)])
        [letter] = queue.dead_letters()
        self.assertEqual((letter["item"], letter["deliveries"], letter["node"]), ("bad", 3, "test-node"))
        queue.fail = lambda item, n: False
        self.assertEqual(queue.requeue_dead(), 1)
        self.assertTrue(queue.join(timeout=5))
        self.assertEqual(queue.handled, ["flaky", "bad"])
        self.assertEqual(queue.dead_letters(), [])

    def test_an_item_of_a_killed_node_is_finished_by_another(self):
        self.join()
        victim = self.node("node-b", QUEUE_NODE, VT="1.0", WORKERS="1")
        victim.wait_for("ready")
        self.redis.xadd("specter:queue:jobs", {"d": json.dumps({"id": 1, "nap_on": "node-b", "nap": 60}),
                                               "a": 0})
        victim.wait_for("start")
        victim.kill()
        killed = time.monotonic()
        queue = self.started(RecordingQueue(visibility_timeout=1.0))
        self.assertEventually(lambda: queue.handled, timeout=3)
        self.assertEqual(queue.handled, [{"id": 1, "nap_on": "node-b", "nap": 60}])
        self.assertLess(time.monotonic() - killed, 1.0 * 1.5 + 0.5)
        self.assertTrue(queue.join(timeout=2))

    def test_a_handler_longer_than_the_visibility_timeout_is_not_reclaimed(self):
        self.join()
        other = self.node("node-b", QUEUE_NODE, VT="0.4")
        other.wait_for("ready")
        queue = self.started(RecordingQueue(visibility_timeout=0.4, worker_count=2))
        queue.enqueue({"id": 1, "sleep": 1.5})
        self.assertTrue(queue.join(timeout=5))
        starts = len(queue.started_items) + len(other.records("start"))
        dones = len(queue.handled) + len(other.records("done"))
        self.assertEqual((starts, dones), (1, 1))

    def test_stop_hands_the_backlog_to_the_other_nodes(self):
        self.join()
        leaving = self.node("node-b", QUEUE_NODE, WORKERS="1")
        leaving.wait_for("ready")
        for number in range(10):
            self.redis.xadd("specter:queue:jobs", {"d": json.dumps({"id": number, "sleep": 0.2}), "a": 0})
        leaving.wait_for("start")
        leaving.signal(signal.SIGTERM)
        leaving.wait_for("exited")
        self.assertEqual(leaving.process.wait(timeout=5), 0)
        queue = self.started(RecordingQueue(worker_count=10))  # visibility_timeout stays 30 s
        self.assertTrue(queue.join(timeout=3), "the backlog came back at once, not after visibility_timeout")
        ids = sorted([item["id"] for item in queue.handled] + [r["item"]["id"] for r in leaving.records("done")])
        self.assertEqual(ids, list(range(10)))
        self.assertEqual(leaving.records("dropped"), [])

    def test_enqueue_refuses_non_json_and_returns_false_when_it_cannot_queue(self):
        self.join()
        queue = RecordingQueue(maxsize=2)
        self.assertFalse(queue.enqueue(1))  # not started
        with self.assertRaisesRegex(TypeError, "JSON"):
            queue.enqueue({1, 2})
        self.started(queue)
        queue.enqueue({"sleep": 0.3})
        queue.enqueue({"sleep": 0.3})
        self.assertFalse(queue.enqueue(3), "the backlog is at maxsize")
        self.assertTrue(queue.join(timeout=3))
        queue.stop()
        self.assertFalse(queue.enqueue(4))

    def test_a_delayed_item_waits(self):
        self.join()
        queue = self.started(RecordingQueue())
        started = time.monotonic()
        queue.enqueue("later", delay=0.3)
        self.assertEqual(queue.pending_count(), 1)
        self.assertEventually(lambda: queue.handled)
        self.assertGreaterEqual(time.monotonic() - started, 0.3)
        self.assertEqual(queue.health()["cluster"]["delayed"] is not None, True)

    def test_items_survive_a_redis_restart_with_persistence(self):
        server = self.own_redis(appendonly=True)
        self.join(server.url)
        gate = gevent.event.Event()
        queue = self.started(RecordingQueue(worker_count=2, fail=lambda item, n: not gate.wait(5)))
        for number in range(20):
            self.assertTrue(queue.enqueue(number))
        self.assertEventually(lambda: len(queue.started_items) == 2)  # two in hand, 18 waiting
        with self.assertLogs("specter.cluster", "WARNING"):
            server.kill()
            server.start()
            gate.set()
            self.assertTrue(queue.join(timeout=10))
        self.assertEqual(sorted(queue.handled), list(range(20)))

    def test_consumption_resumes_after_the_connections_are_killed(self):
        cluster = self.join()
        queue = self.started(RecordingQueue())
        queue.enqueue(1)
        self.assertTrue(queue.join(timeout=3))
        with self.assertLogs("specter.cluster", "WARNING"):
            self.redis.client_kill_filter(_type="normal", skipme=True)
            self.assertEventually(lambda: cluster.health()["reconnects"] >= 1, timeout=3)
        self.assertEventually(lambda: queue.enqueue(2), timeout=3)
        self.assertTrue(queue.join(timeout=5))
        self.assertEqual(queue.handled, [1, 2])

    def test_needs_a_started_cluster(self):
        with self.assertRaisesRegex(RuntimeError, "needs a started Cluster"):
            RecordingQueue().start()


LEASE_NODE = '''
class Ticker(specter.Service):
    def on_start(self):
        lease = self.lease("leader", ttl=float(os.environ["TTL"]))
        lease.on_acquired(lambda lease: out("acquired", token=lease.token))
        lease.on_lost(lambda lease: out("lost"))
        self.interval(lambda: out("tick", token=lease.token), 0.05, singleton="leader")

class Boss(specter.Service):
    singleton = True
    singleton_ttl = float(os.environ["TTL"])

    def on_start(self):
        out("boss-start")

    def on_stop(self):
        out("boss-stop")

serve(Ticker(), Boss())
'''


class TestLease(ClusterTestCase):

    def test_one_holder_ticks_and_another_takes_over_after_sigkill(self):
        ttl = 1.5
        nodes = [self.node("node-%s" % name, LEASE_NODE, TTL=str(ttl)) for name in "abc"]
        for node in nodes:
            node.wait_for("ready")
        self.assertEventually(lambda: sum(len(node.records("acquired")) for node in nodes) == 1, timeout=3)
        [holder] = [node for node in nodes if node.records("acquired")]
        first_token = holder.records("acquired")[0]["token"]
        holder.wait_for("tick", 5)
        self.assertEqual([node for node in nodes if node.records("tick")], [holder])
        holder.kill()
        killed = time.time()
        others = [node for node in nodes if node is not holder]
        self.assertEventually(lambda: any(node.records("acquired") for node in others), timeout=ttl * 2)
        [successor] = [node for node in others if node.records("acquired")]
        acquired = successor.records("acquired")[0]
        self.assertLessEqual(acquired["t"] - killed, ttl * 4 / 3)
        self.assertGreater(acquired["token"], first_token)
        successor.wait_for("tick")
        gevent.sleep(0.3)
        self.assertEqual([node for node in others if node.records("tick")], [successor])

    def test_a_paused_holder_does_not_tick_again_once_another_holds_the_lease(self):
        ttl = 1.0
        nodes = [self.node("node-%s" % name, LEASE_NODE, TTL=str(ttl)) for name in "ab"]
        for node in nodes:
            node.wait_for("ready")
        self.assertEventually(lambda: any(node.records("acquired") for node in nodes), timeout=3)
        [holder] = [node for node in nodes if node.records("acquired")]
        [other] = [node for node in nodes if node is not holder]
        holder.wait_for("tick")
        holder.signal(signal.SIGSTOP)
        stopped = time.time()
        other.wait_for("acquired", timeout=ttl * 2)
        holder.signal(signal.SIGCONT)
        holder.wait_for("lost", timeout=ttl)
        gevent.sleep(0.3)
        self.assertEqual([r for r in holder.records("tick") if r["t"] > stopped], [])
        self.assertTrue(other.records("tick"))

    def test_a_singleton_service_waits_in_standby_and_takes_over(self):
        holder = self.node("node-b", LEASE_NODE, TTL="1.0")
        holder.wait_for("boss-start")
        self.join()

        class Boss(Service):
            singleton = True
            singleton_ttl = 1.0

            def on_start(self):
                self.ticks = 0
                self.interval(self.tick, 0.02)

            def tick(self):
                self.ticks += 1
        boss = self.started(Boss("Boss"))
        gevent.sleep(0.5)
        self.assertEqual((boss.status, boss.running, boss.health()["status"]), ("standby", False, "ok"))
        with self.assertRaises(RuntimeError):
            boss.interval(print, 1)  # on_start has not run here: nothing may be acquired
        holder.signal(signal.SIGTERM)
        holder.wait_for("boss-stop")
        self.assertEventually(lambda: boss.status == "running", timeout=1.0)
        self.assertEventually(lambda: boss.ticks > 0)
        boss.stop()
        self.assertEqual(boss.status, "stopped")
        self.assertIsNone(self.redis.get("specter:lease:service:Boss"))

    def test_a_singleton_service_takes_over_when_its_holder_dies(self):
        ttl = 1.0
        nodes = [self.node("node-%s" % name, LEASE_NODE, TTL=str(ttl)) for name in "ab"]
        for node in nodes:
            node.wait_for("ready")
        self.assertEventually(lambda: any(node.records("boss-start") for node in nodes), timeout=3)
        gevent.sleep(0.2)
        [holder] = [node for node in nodes if node.records("boss-start")]
        [other] = [node for node in nodes if node is not holder]
        holder.kill()
        killed = time.time()
        started = other.wait_for("boss-start", timeout=ttl * 2)[0]
        self.assertLessEqual(started["t"] - killed, ttl * 4 / 3)

    def test_a_holder_that_loses_its_lease_stops_its_work_and_waits_again(self):
        self.join()
        stops = []

        class Boss(Service):
            singleton = True
            singleton_ttl = 0.6

            def on_stop(self):
                stops.append(self.status)
        boss = self.started(Boss("Boss"))
        self.assertEventually(lambda: boss.status == "running")
        self.redis.set("specter:lease:service:Boss", "someone else", px=60000)  # taken over
        self.assertEventually(lambda: boss.status == "standby", timeout=1.0)
        self.assertEqual(stops, ["stopping"])
        self.redis.delete("specter:lease:service:Boss")
        self.assertEventually(lambda: boss.status == "running", timeout=1.0)

    def test_tokens_grow_and_release_frees_the_lease_at_once(self):
        cluster = self.join()
        lease = cluster.lease("report", ttl=5)
        self.assertEventually(lambda: lease.held)
        first = lease.token
        self.assertGreater(lease.remaining(), 4)
        self.assertEqual(cluster.health()["leases"], ["report"])
        lost = Recorder()
        lease.on_lost(lost)
        lease.release()
        self.assertEqual((lease.held, lost.count), (False, 1))
        again = cluster.lease("report2", ttl=5)
        self.assertIsNone(self.redis.get("specter:lease:report"))
        self.redis.set("specter:lease:report2:fence", 41)
        later = cluster.lease("report", ttl=5)
        self.assertEventually(lambda: later.held)
        self.assertGreater(later.token, first)
        self.assertEventually(lambda: again.held)

    def test_without_a_cluster_singletons_behave_as_plain_ones(self):
        ticks = []

        class Boss(Service):
            singleton = True

            def on_start(self):
                self.token = self.lease("mine").token
                self.interval(lambda: ticks.append(1), 0.01, singleton=True)
        boss = self.started(Boss())
        self.assertEqual(boss.status, "running")
        self.assertIsNotNone(boss.token)
        self.assertEventually(lambda: len(ticks) >= 2)
        with self.assertRaisesRegex(TypeError, "singleton must be True, False or a lease name"):
            boss.interval(print, 1, singleton=1)


CACHE_NODE = '''
cluster.share("cmd:*")
prices = specter.create_cache("prices", shared=True)
specter.bus.on("prices:invalidated", lambda data: out("invalidated"))
specter.bus.on("cmd:invalidate", lambda data: prices.invalidate())
serve()
'''


class TestClusterCache(ClusterTestCase):

    def test_invalidate_on_one_node_invalidates_the_cache_on_every_node(self):
        self.join(share=["cmd:*"])
        node = self.node("node-b", CACHE_NODE)
        node.wait_for("ready")
        prices = create_cache("prices", shared=True)
        unshared = create_cache("prices")  # same name, not shared: remote invalidations leave it alone
        heard = Recorder()
        specter.bus.on("prices:invalidated", heard)
        unshared.set(1)
        prices.invalidate()
        node.wait_for("invalidated")
        prices.set(1)
        specter.bus.emit("cmd:invalidate")  # the other node invalidates its copy
        self.assertEventually(lambda: heard.count == 2)
        self.assertFalse(prices.is_valid())
        self.assertTrue(unshared.is_valid())
        gevent.sleep(0.2)
        self.assertEqual((heard.count, len(node.records("invalidated"))), (2, 2))  # no echo, no loop


SOCKET_NODE = '''
from flask_socketio import SocketIO
app = flask.Flask("node")
sio = SocketIO(app, async_mode="gevent", client_manager=cluster.socketio_manager())
manager = specter.boot(app, sio, cluster=cluster)

def report_port():
    while manager.server is None or not manager.server.server_port:
        gevent.sleep(0.01)
    out("ready", port=manager.server.server_port)

gevent.spawn(report_port)
manager.run(port=0)
'''


class TestClusterSocketIO(ClusterTestCase):

    def test_an_emit_on_one_node_reaches_a_client_of_another(self):
        node = self.node("node-b", SOCKET_NODE)
        port = node.wait_for("ready")[0]["port"]
        app = Flask(__name__)
        cluster = specter.Cluster(self.redis_server.url, node_id="test-node")
        sio = SocketIO(app, async_mode="gevent", client_manager=cluster.socketio_manager())
        manager = boot(app, sio, cluster=cluster, signals=False)
        self.addCleanup(manager.shutdown)
        got = []
        client = socketio.Client()
        client.on("news", got.append)
        pool = gevent.get_hub().threadpool
        pool.spawn(client.connect, "http://127.0.0.1:%d" % port, wait_timeout=CLIENT_TIMEOUT).get()
        self.addCleanup(lambda: client.connected and pool.spawn(client.disconnect).get())
        sio.emit("news", {"from": "test-node"})
        self.assertEventually(lambda: got, timeout=3)
        self.assertEqual(got, [{"from": "test-node"}])
        self.assertEqual(cluster.health()["socketio"][0]["published"], 1)


# Examples #####################################################################


# examples/ beside this file (the repository root) or beside the specter module under test.
EXAMPLES = next((path for path in (
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples"),
    os.path.join(os.path.dirname(os.path.abspath(specter.__file__)), "examples"),
) if os.path.isfile(os.path.join(path, "jobboard", "app.py"))), None)


# Short timings so each test takes a fraction of a second.
DEMO_CONFIG = {
    "JOBBOARD_WORKERS": 2,
    "JOBBOARD_HOST_INTERVAL": 0.05,
    "JOBBOARD_PUSH_INTERVAL": 0.005,
    "JOBBOARD_PRUNE_INTERVAL": 0.02,
    "JOBBOARD_STOP_GRACE": 1.0,
    "TESTING": True,
}


def import_demo():
    """The demo's create_app, imported from examples/ (not a package on the path otherwise)."""
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    from jobboard.app import create_app
    return create_app


class TestJobBoardDemo(SpecterTestCase):

    def setUp(self):
        super().setUp()
        self.pool = gevent.get_hub().threadpool

    def start_board(self, **overrides):
        """Boot the demo and serve it on a free port; cleanups stop the server, then shut down."""
        app, _socketio, boot_board = import_demo()(dict(DEMO_CONFIG, **overrides))
        manager = boot_board(signals=False)
        self.addCleanup(manager.shutdown)
        server = pywsgi.WSGIServer(("127.0.0.1", 0), app, log=None, handler_class=UpgradeClosingHandler)
        server.start()
        self.addCleanup(server.stop, timeout=1)
        self.manager = manager
        self.http = app.test_client()
        self.url = "http://127.0.0.1:%d" % server.server_port
        self.runner = specter.registry.require("jobs.queue")
        self.model = specter.registry.require("jobs.model")
        return manager

    def connect(self):
        """A real Socket.IO client recording every pushed event as (name, data)."""
        client = socketio.Client(reconnection=False)
        events = []
        for name in ("job:update", "job:removed", "host:update"):
            client.on(name, functools.partial(self._record, events, name))
        self.pool.spawn(client.connect, self.url, wait_timeout=5).get()
        self.addCleanup(lambda: self.pool.spawn(client.disconnect).get())
        return client, events

    def call(self, client, event, data=None):
        """Emit ``event`` and return the server's ack, waiting cooperatively."""
        args = (event,) if data is None else (event, data)
        return self.pool.spawn(client.call, *args, timeout=5).get()

    def submit(self, **job):
        response = self.http.post("/api/jobs", json=job)
        self.assertEqual(response.status_code, 201, response.get_json())
        return response.get_json()

    @staticmethod
    def _record(events, name, data):
        events.append((name, data))  # runs in the client's thread: list.append is atomic

    @staticmethod
    def updates(events, job_id):
        return [data for name, data in events if name == "job:update" and data["id"] == job_id]

    def statuses(self, events, job_id):
        """The statuses pushed for ``job_id``, in order."""
        return [update["status"] for update in self.updates(events, job_id)]

    def test_http_job_progresses_live_over_socketio_and_finishes(self):
        self.start_board()
        _client, events = self.connect()
        job = self.submit(name="nightly report", steps=4, delay=0.02)
        self.assertEqual((job["status"], job["progress"], job["steps"]), ("queued", 0, 4))

        self.assertTrue(wait_until(lambda: "done" in self.statuses(events, job["id"])))
        seen = self.updates(events, job["id"])
        progress = [u["progress"] for u in seen]
        self.assertEqual(progress, sorted(progress), "progress never goes backwards")
        self.assertIn("running", self.statuses(events, job["id"]))
        final = seen[-1]
        self.assertEqual((final["status"], final["progress"], final["returncode"]), ("done", 4, 0))
        self.assertEqual(final["output"], ["progress %d/4" % step for step in (1, 2, 3, 4)] + ["done"])
        self.assertTrue(pid_gone(final["pid"]))
        self.assertEqual(self.http.get("/api/jobs/%s" % job["id"]).get_json(), final)
        listing = self.http.get("/api/jobs").get_json()
        self.assertEqual((listing["count"], listing["jobs"]), (1, [final]))

        first = self.http.get("/api/stats").get_json()
        self.assertFalse(first["cached"])
        self.assertEqual(first["stats"]["counts"]["done"], 1)
        self.assertGreater(first["stats"]["average_duration"], 0)
        self.assertTrue(self.http.get("/api/stats").get_json()["cached"])
        self.submit(name="another", steps=1, delay=0.01)  # 'jobs:submitted' invalidates the cache
        again = self.http.get("/api/stats").get_json()
        self.assertFalse(again["cached"])
        self.assertEqual(again["stats"]["total"], 2)

    def test_invalid_jobs_get_a_400_with_per_field_errors(self):
        self.start_board()
        response = self.http.post("/api/jobs", json={"name": "  ", "steps": 0, "delay": "fast",
                                                     "fail_at": 2.5, "colour": "red"})
        self.assertEqual(response.status_code, 400)
        body = response.get_json()
        self.assertEqual(set(body["errors"]), {"name", "steps", "delay", "fail_at", "colour"})
        self.assertIn("steps", body["error"])

        empty = self.http.post("/api/jobs")
        self.assertEqual(empty.status_code, 400)
        self.assertEqual(empty.get_json()["errors"], {"name": "is required"})
        too_long = self.http.post("/api/jobs", json={"name": "x" * 61})
        self.assertEqual(set(too_long.get_json()["errors"]), {"name"})
        not_json = self.http.post("/api/jobs", data="name=x", content_type="text/plain")
        self.assertEqual(not_json.status_code, 400)
        self.assertIn("error", not_json.get_json())

        missing = self.http.get("/api/jobs/nope")
        self.assertEqual(missing.status_code, 404)
        self.assertIn("nope", missing.get_json()["error"])
        self.assertEqual(self.http.get("/api/jobs").get_json(), {"jobs": [], "count": 0})

    def test_socket_submit_acks_the_job_or_the_validation_error(self):
        self.start_board()
        client, events = self.connect()
        ack = self.call(client, "job:submit", {"name": "via socket", "steps": 2, "delay": 0.01})
        self.assertEqual((ack["ok"], ack["status"]), (True, 201))
        job = ack["value"]
        self.assertEqual((job["name"], job["steps"], job["status"]), ("via socket", 2, "queued"))

        bad = self.call(client, "job:submit", {"name": "x", "steps": 51, "delay": 5})
        self.assertEqual((bad["ok"], bad["status"]), (False, 400))
        self.assertEqual(set(bad["errors"]), {"steps", "delay"})

        failing = self.call(client, "job:submit",
                            {"name": "flaky", "steps": 5, "delay": 0.01, "fail_at": 2})["value"]
        self.assertTrue(wait_until(lambda: "done" in self.statuses(events, job["id"])
                                   and "failed" in self.statuses(events, failing["id"])))
        crashed = self.updates(events, failing["id"])[-1]
        self.assertEqual((crashed["returncode"], crashed["progress"]), (3, 1))
        self.assertEqual(crashed["output"][-1], "error: simulated failure at step 2")

        listing = self.call(client, "jobs:list")
        self.assertEqual(listing["count"], 2)
        self.assertEqual([j["status"] for j in listing["jobs"]], ["done", "failed"])

    def test_cancel_stops_a_running_job_and_skips_a_queued_one(self):
        self.start_board(JOBBOARD_WORKERS=1)
        _client, events = self.connect()
        running = self.submit(name="long", steps=50, delay=0.05)
        queued = self.submit(name="waiting", steps=2, delay=0.01)
        self.assertTrue(wait_until(lambda: self.runner.get(running["id"])["progress"] >= 1))
        pid = self.runner.get(running["id"])["pid"]
        self.assertFalse(pid_gone(pid))

        response = self.http.post("/api/jobs/%s/cancel" % queued["id"])
        self.assertEqual((response.status_code, response.get_json()["status"]), (200, "cancelled"))
        response = self.http.post("/api/jobs/%s/cancel" % running["id"])
        self.assertEqual((response.status_code, response.get_json()["status"]), (200, "cancelled"))
        self.assertTrue(wait_until(lambda: pid_gone(pid)))
        self.assertTrue(wait_until(lambda: self.runner.get(running["id"])["returncode"] is not None))
        self.assertLess(self.runner.get(running["id"])["returncode"], 0, "ended by a signal")
        self.assertLess(self.runner.get(running["id"])["progress"], 50)

        self.assertTrue(wait_until(lambda: self.runner.join(0)
                                   and self.statuses(events, queued["id"])[-1:] == ["cancelled"]))
        self.assertIsNone(self.runner.get(queued["id"])["pid"], "a cancelled queued job never starts")
        self.assertEqual(self.statuses(events, running["id"])[-1], "cancelled")
        again = self.http.post("/api/jobs/%s/cancel" % running["id"])
        self.assertEqual((again.status_code, again.get_json()["job"]["status"]), (409, "cancelled"))
        self.assertEqual(self.http.post("/api/jobs/nope/cancel").status_code, 404)

    def test_shutdown_while_a_job_runs_leaves_no_process_behind(self):
        manager = self.start_board(JOBBOARD_WORKERS=1)
        running = self.submit(name="long", steps=50, delay=0.05)
        queued = self.submit(name="waiting", steps=2, delay=0.01)
        self.assertTrue(wait_until(lambda: self.runner.get(running["id"])["pid"] is not None))
        pid = self.runner.get(running["id"])["pid"]

        started = time.monotonic()
        manager.shutdown()
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertTrue(pid_gone(pid), "the job process is gone when shutdown() returns")
        self.assertFalse(manager.booted)
        self.assertFalse(self.runner.running)
        self.assertEqual(specter.registry.list(), [])
        jobs = {job["id"]: job for job in self.model.get("jobs").values()}
        self.assertEqual(jobs[running["id"]]["status"], "cancelled")
        self.assertEqual(jobs[queued["id"]]["status"], "cancelled")
        self.assertIsNone(jobs[queued["id"]]["pid"])
        self.assertIn("cancelled: server shutting down", jobs[queued["id"]]["output"])
        self.assertEqual(self.http.get("/api/jobs").status_code, 503, "routes answer 503 once stopped")

    def test_health_host_updates_and_housekeeping(self):
        self.start_board(JOBBOARD_KEEP_FINISHED=1)
        client, events = self.connect()
        self.assertTrue(wait_until(lambda: any(name == "host:update" for name, _ in events)))
        host = next(data for name, data in events if name == "host:update")
        self.assertEqual(set(host), {"load", "cpus", "running", "queued"})

        response = self.http.get("/api/health")
        self.assertEqual(response.status_code, 200)
        health = response.get_json()
        self.assertEqual(health["status"], "ok")
        self.assertEqual([s["name"] for s in health["services"]],
                         ["jobs.runner", "host.monitor", "live", "jobs.housekeeper", "jobs"])
        self.assertTrue(all(s["status"] == "ok" for s in health["services"]))

        ids = [self.submit(name="quick %d" % n, steps=1, delay=0.01)["id"] for n in range(3)]
        removed = lambda: {data["id"] for name, data in events if name == "job:removed"}
        self.assertTrue(wait_until(lambda: len(removed()) == 2 and len(self.runner.jobs()) == 1))
        survivor = self.runner.jobs()[0]
        self.assertEqual(survivor["status"], "done")
        self.assertEqual(removed() | {survivor["id"]}, set(ids))
        self.assertEqual(self.call(client, "jobs:list")["count"], 1)
        self.assertEqual(self.http.get("/api/stats").get_json()["stats"]["total"], 1)


REPO = os.path.dirname(os.path.abspath(specter.__file__))


EXAMPLE_TIMEOUT = 20  # one example's wall-clock limit


# Examples whose short mode is not --once.
SHORT_MODE = {"quickstart.py": ["--seconds", "0.3"]}


# Directories under examples/ hold multi-file apps with their own tests.
EXCLUDED = ("jobboard",)


def example_files():
    """The single-file examples directly under examples/, sorted; packages are left out."""
    return sorted(
        path for path in glob.glob(os.path.join(EXAMPLES, "*.py"))
        if not os.path.basename(path).startswith(EXCLUDED + ("_",))
    )


def run_example(path):
    """Run one example in its short mode; (returncode, stdout, stderr, seconds).

    The example gets a session of its own, so a hung one is killed with
    every process it started.
    """
    name = os.path.basename(path)
    args = [sys.executable, os.path.relpath(path, REPO)] + SHORT_MODE.get(name, ["--once"])
    env = dict(os.environ, PYTHONPATH=REPO)
    started = time.monotonic()
    process = gevent.subprocess.Popen(
        args, cwd=REPO, env=env, stdout=gevent.subprocess.PIPE, stderr=gevent.subprocess.PIPE,
        universal_newlines=True, start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=EXAMPLE_TIMEOUT)
    except gevent.subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        stderr += "\n[killed after %d s]" % EXAMPLE_TIMEOUT
    return process.returncode, stdout, stderr, time.monotonic() - started


class TestExamples(SpecterTestCase):
    """Every examples/*.py runs to completion on its own, all of them concurrently."""

    ceiling = 60

    def test_discovers_every_small_example(self):
        names = [os.path.basename(path) for path in example_files()]
        for expected in ("quickstart.py", "polling_service.py", "queue_worker.py",
                         "controller_app.py", "state_primitives.py", "process_watcher.py",
                         "graceful_shutdown.py", "registry_and_bus.py", "cluster_demo.py"):
            self.assertIn(expected, names)
        self.assertFalse([name for name in names if name.startswith("jobboard")])

    def test_examples_document_themselves_and_have_a_short_mode(self):
        for path in example_files():
            name = os.path.basename(path)
            with self.subTest(example=name):
                with open(path, encoding="utf-8") as source:
                    text = source.read()
                docstring = ast.get_docstring(ast.parse(text))
                self.assertTrue(docstring, "%s has no module docstring" % name)
                self.assertIn("Run:", docstring)
                flag = SHORT_MODE.get(name, ["--once"])[0]
                self.assertIn('"%s"' % flag, text, "%s does not accept %s" % (name, flag))

    def test_every_example_exits_cleanly(self):
        self.assertFalse(gevent.monkey.is_anything_patched(), "the test process must not monkey-patch")
        paths = example_files()
        started = time.monotonic()
        runs = {path: gevent.spawn(run_example, path) for path in paths}
        self.assertTrue(wait_until(lambda: all(run.ready() for run in runs.values()),
                                   timeout=EXAMPLE_TIMEOUT + 10))
        elapsed = time.monotonic() - started
        for path, run in runs.items():
            name = os.path.basename(path)
            with self.subTest(example=name):
                returncode, stdout, stderr, seconds = run.get()
                report = "%s (%.1f s)\n--- stdout (tail)\n%s\n--- stderr\n%s" % (
                    name, seconds, stdout[-2000:], stderr[-4000:])
                self.assertEqual(returncode, 0, report)
                self.assertNotIn("Traceback", stderr, report)
                self.assertTrue(stdout.strip(), "%s printed nothing" % name)
        # Concurrency is the point: the whole set takes about as long as the slowest one.
        self.assertLess(elapsed, EXAMPLE_TIMEOUT)


if __name__ == "__main__":
    unittest.main()
