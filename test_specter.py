"""Tests for specter.py, in the module's section order.

Run with ``python -m unittest test_specter -v``. Standard-library unittest
only; nothing here monkey-patches. Waits are bounded: events, or
``gevent.sleep`` polling up to a deadline, never ``time.sleep``.
"""

import ast
import atexit
import collections
import contextlib
import copy
import dataclasses
import decimal
import functools
import gc
import importlib.util
import glob
import inspect
import itertools
import json
import logging
import os
import pickle
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import threading
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request
import zipfile
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
    "SpecterError",
    "EventBus", "bus", "SPECTERRegistry", "Registry", "registry",
    "Service", "QueueService", "Watcher", "WatcherError",
    "Store", "create_store", "Model", "create_model", "Cache", "create_cache",
    "Field", "Schema", "SchemaError", "Outcome", "Operation", "OperationError",
    "HTTPError", "json_endpoint", "expect_json", "require_fields",
    "Router", "route", "Handler", "SocketIngress", "Controller",
    "ServiceManager", "boot", "ManagedProcess", "start_process",
    "Cluster", "ClusterQueue", "Lease",
    "ManualClock", "isolated", "leak_check", "SpecterTestCase",
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


def outcome_of(fn, *args):
    """What ``fn(*args)`` returns, or the exception it raises (for greenlets expected to fail)."""
    try:
        return fn(*args)
    except Exception as exc:
        return exc


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


class SpecterTestCase(specter.SpecterTestCase):
    """The kit's test case (each test isolated, under a leak check) with a per-test time ceiling (``ceiling`` seconds)."""

    ceiling = TEST_CEILING

    def setUp(self):
        super().setUp()
        timer = gevent.Timeout.start_new(
            self.ceiling, AssertionError("test exceeded %ds" % self.ceiling)
        )
        self.addCleanup(timer.close)

    def use_manual_clock(self, start=0.0):
        """A ManualClock in force until the test's cleanups have run (those added later run first)."""
        clock = specter.ManualClock(start)
        clock.__enter__()
        self.addCleanup(clock.__exit__, None, None, None)
        return clock

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

    def test_every_exception_class_has_the_one_root_and_keeps_its_builtin_base(self):
        defined = {name: obj for name, obj in vars(specter).items()
                   if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == "specter"}
        self.assertEqual(set(defined) - {"SpecterError"},
                         {"WatcherError", "SchemaError", "OperationError", "HTTPError"})
        for name, cls in defined.items():
            with self.subTest(name=name):
                self.assertTrue(issubclass(cls, specter.SpecterError))
        self.assertTrue(issubclass(specter.WatcherError, RuntimeError))
        self.assertTrue(issubclass(specter.SchemaError, ValueError))
        with self.assertRaises(ValueError):  # an except clause written for 0.1.2 still catches it
            raise specter.SchemaError("bad", field="age")
        with self.assertRaises(specter.SpecterError):
            raise specter.HTTPError("gone", 410)

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

    def test_one_name_rule_with_the_documented_error_types(self):
        # R0 "Argument rules": names refuse an empty string with ValueError;
        # event names and registry keys refuse it with TypeError; a
        # non-string is a TypeError everywhere. Names and keys are stripped,
        # event names are taken as given.
        registry = SPECTERRegistry()
        bus = EventBus()
        named = {"service name": Service, "store name": create_store, "model name": create_model,
                 "watcher name": lambda name: specter.Watcher(name, poll=dict)}
        for what, make in named.items():
            with self.subTest(what=what):
                with self.assertRaisesRegex(ValueError, "%s must be a non-empty string" % what):
                    make("   ")
                with self.assertRaisesRegex(TypeError, "%s must be a non-empty string, got int 3" % what):
                    make(3)
                self.assertEqual(make(" padded ").name, "padded")
        for bad in ("", "   ", 3):
            with self.subTest(key=bad):
                with self.assertRaisesRegex(TypeError, "registry key must be a non-empty string"):
                    registry.provide(bad, 1)
        self.assertEqual(registry.provide(" db ", 1), 1)
        self.assertEqual(registry.require("db"), 1)
        for bad in ("", 3, b"e"):
            with self.subTest(event=bad):
                with self.assertRaisesRegex(TypeError, "event must be a non-empty string"):
                    bus.on(bad, print)
        bus.on(" spaced ", print)
        self.assertTrue(bus.has_listeners(" spaced "))
        self.assertFalse(bus.has_listeners("spaced"))

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
        self.addCleanup(specter.bus.on("shared", rec))
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
        self.addCleanup(specter.registry.unregister, "shared")
        self.assertEqual(specter.registry.require("shared"), 1)


# Lifecycle: Service ###########################################################


class Stubborn(Service):
    """Spawns 'clinger', a greenlet that ignores GreenletExit until ``release`` is set."""

    stop_timeout = SHORT

    def __init__(self, release):
        super().__init__("stubborn")
        self.release = release

    def on_start(self):
        self.clinger = self.spawn(self._cling, label="clinger")

    def _cling(self):
        while not self.release.is_set():
            try:
                self.release.wait(LONG)
            except greenlet.GreenletExit:
                pass


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
        # Tick k is due at t0 + k*period. The callback naps 0-15 s on SPECTER's
        # clock, so an interval that re-armed after the callback would be 115 s
        # late by tick 16; a fixed-rate one is not late at all.
        clock = self.use_manual_clock(start=1000)
        period, n = 25, 16
        naps = itertools.cycle([0, 12, 6, 15, 3])
        ticks = []

        def tick():
            ticks.append(clock.now())
            specter._clock.sleep(next(naps))

        svc = self.started(Service("rate"))
        svc.interval(tick, period)
        clock.advance(n * period)
        self.assertEqual(ticks, [1000.0 + k * period for k in range(1, n + 1)])

    def test_interval_overrun_skips_ticks_instead_of_piling_up(self):
        clock = self.use_manual_clock()
        period, nap = 30, 45
        starts = []
        state = {"active": 0, "peak": 0}

        def slow():
            starts.append(clock.now())
            state["active"] += 1
            state["peak"] = max(state["peak"], state["active"])
            try:
                specter._clock.sleep(nap)
            finally:
                state["active"] -= 1

        svc = self.started(Service("overrun"))
        svc.interval(slow, period)
        clock.advance(5 * 2 * period)
        self.assertEqual(state["peak"], 1)
        # The tick due while the callback still runs (at 60, 120, ...) is
        # skipped: the next start is two periods later, not at 75 when it ends.
        self.assertEqual(starts, [30.0, 90.0, 150.0, 210.0, 270.0])

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
        clock = self.use_manual_clock()
        svc = self.started(Service("once"))
        rec = Recorder()
        timeout_id = svc.timeout(rec, 10)
        self.assertIsInstance(timeout_id, str)
        self.assertEqual(svc.health()["counts"]["timeouts"], 1)
        clock.advance(9.5)
        self.assertEqual(rec.count, 0)
        clock.advance(3600)
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
        clock = self.use_manual_clock()
        svc = self.started(Service("cancel"))
        tick, fire = Recorder(), Recorder()
        interval_id = svc.interval(tick, 10)
        timeout_id = svc.timeout(fire, 20)
        self.assertNotEqual(interval_id, timeout_id)
        self.assertTrue(svc.cancel_interval(interval_id))
        self.assertTrue(svc.cancel_timeout(timeout_id))
        clock.advance(3600)
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
        self.addCleanup(specter.bus.on("metrics:updated", rec))
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

    def test_adopt_owns_children_that_compare_equal_each_in_its_own_right(self):
        class Reader(Service):
            def __eq__(self, other):   # value semantics, as a dataclass has
                return isinstance(other, Reader)

            __hash__ = None

        parent = self.started(Service("parent"))
        first, second = Reader("reader"), Reader("reader")
        parent.adopt(first).adopt(second)
        self.assertTrue(first.running and second.running)
        self.assertEqual(parent.health()["counts"]["children"], 2)
        parent.stop()
        self.assertEqual((first.status, second.status), ("stopped", "stopped"))

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
        clock = self.use_manual_clock()
        log = []

        class SelfStopping(Service):
            def on_start(self):
                self.interval(self._tick, 10)

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
        clock.advance(10)
        self.assertEqual(svc.status, "stopped")
        self.assertEqual(log, ["tick", "on_stop", "after-stop:stopped"])
        self.assertEventually(lambda: not new_live_greenlets(before))
        clock.advance(100)
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
        clock = self.use_manual_clock()
        ticks = []

        class Ticker(Service):
            def on_start(self):
                self.interval(lambda: ticks.append(clock.now()), 10)
                self.listen("ping", lambda data: None)

        svc = self.started(Ticker())
        clock.advance(20)
        self.assertEqual(ticks, [10.0, 20.0])
        svc.stop()
        counts = svc.health()["counts"]
        self.assertEqual((counts["intervals"], counts["listeners"]), (0, 0))
        clock.advance(100)
        self.assertEqual(len(ticks), 2)
        svc.start()
        self.assertEqual(svc.status, "running")
        clock.advance(20)
        self.assertEqual(ticks, [10.0, 20.0, 130.0, 140.0])  # a fresh interval, from the restart
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
        clock = self.use_manual_clock()
        attempts = []

        class Supervised(Service):
            restart_backoff = 5.0
            restart_max_backoff = 10.0

            def on_start(self):
                self.runner = self.supervise(self._work, "arg", max_restarts=10, within=60.0)

            def _work(self, arg):
                attempts.append(clock.now())
                if len(attempts) <= 5:
                    raise RuntimeError("attempt %d failed" % len(attempts))
                return arg

        with self.assertLogs("specter", "ERROR"):
            svc = self.started(Supervised())
            self.assertIsInstance(svc.runner, gevent.Greenlet)
            clock.advance(3600)
        # backoff 5, 10, then capped at 10 (uncapped would reach 80); returning
        # normally ends supervision.
        self.assertEqual(attempts, [0.0, 5.0, 15.0, 25.0, 35.0, 45.0])
        self.assertEqual(svc.runner.value, "arg")
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
        self.addCleanup(specter.bus.on("service:failed", failures))

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
        clock = self.use_manual_clock()
        attempts = []

        class Sporadic(Service):
            restart_backoff = 30.0
            restart_max_backoff = 30.0

            def on_start(self):
                self.supervise(self._work, max_restarts=1, within=20.0)

            def _work(self):
                attempts.append(clock.now())
                raise RuntimeError("sporadic")

        with self.assertLogs("specter", "ERROR"):
            svc = self.started(Sporadic())
            clock.advance(90)
        # One failure every 30 s: never two within 20 s, so never more than max_restarts.
        self.assertEqual(attempts, [0.0, 30.0, 60.0, 90.0])
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

    def test_an_interrupted_stop_does_not_claim_its_greenlets_ignored_their_kill(self):
        ended = []

        class Flushing(Service):
            def on_start(self):
                self.uploader = self.spawn(self.upload, label="upload")

            def upload(self):
                try:
                    gevent.sleep(LONG)
                finally:
                    gevent.sleep(SHORT * 4)   # a flush that takes a moment
                    ended.append("flushed")

        svc = self.started(Flushing())
        gevent.sleep(0)
        with self.assertLogs("specter", "ERROR") as cm:
            with self.assertRaises(gevent.Timeout):
                with gevent.Timeout(SHORT):
                    svc.stop()
        # It was given SHORT, not stop_timeout, and it did not ignore GreenletExit.
        self.assertEqual(len(cm.output), 1, cm.output)
        self.assertIn("upload", cm.output[0])
        self.assertIn("interrupted", cm.output[0])
        self.assertNotIn("%s s" % Flushing.stop_timeout, cm.output[0])
        self.assertEqual(svc.health()["stuck"], ["upload"])   # alive after its kill, while it lives
        self.assertEventually(lambda: svc.uploader.dead)
        self.assertEqual(ended, ["flushed"])                  # its finally was not cut short
        self.assertEqual(svc.health()["stuck"], [])

    def test_a_stuck_greenlet_stays_reported_after_a_restart_while_it_lives(self):
        release = gevent.event.Event()
        svc = self.started(Stubborn(release))
        gevent.sleep(0)
        first = svc.clinger
        with self.assertLogs("specter", "ERROR"):
            svc.stop()
        self.assertEqual(svc.health()["stuck"], ["clinger"])
        svc.start()   # fresh resources, but the survivor is still alive
        self.assertFalse(first.dead)
        self.assertEqual(svc.health()["stuck"], ["clinger"])
        release.set()
        self.assertEventually(lambda: first.dead)
        self.assertEventually(lambda: svc.clinger.dead)
        self.assertEqual(svc.health()["stuck"], [])

    def test_an_interrupted_stop_still_runs_the_cleanups_it_had_not_run(self):
        log = []

        def slow_cleanup():
            log.append("slow:begun")
            gevent.sleep(LONG)
            log.append("slow:finished")

        svc = self.started(Service("slow-release"))
        specter.registry.provide("slow-release.key", "value", owner=svc)
        svc.add_cleanup(lambda: log.append("added-first"))   # runs last
        svc.add_cleanup(slow_cleanup)
        svc.add_cleanup(lambda: log.append("added-last"))    # runs first
        with self.assertRaises(gevent.Timeout):
            with gevent.Timeout(SHORT):
                svc.stop()
        self.assertEqual(log, ["added-last", "slow:begun", "added-first"])
        self.assertFalse(specter.registry.has("slow-release.key"))
        self.assertEqual(svc.status, "stopped")
        self.assertEqual(svc.health()["counts"]["cleanups"], 0)

    def test_an_interrupted_stop_still_runs_on_stop_and_releases_everything(self):
        log = []

        class Stalling(Service):
            def on_start(self):
                self.spawn(gevent.sleep, LONG, label="sleeper")
                self.interval(lambda: None, 1.0)
                self.listen("stalling:event", log.append)
                self.add_cleanup(lambda: log.append("cleanup"))

            def _lifecycle_stopping(self):
                gevent.sleep(LONG)   # a subclass step that is interrupted

            def on_stop(self):
                log.append("on_stop")

        svc = Stalling()
        before = live_greenlets()
        svc.start()
        self.addCleanup(svc.stop)
        with self.assertRaises(gevent.Timeout):
            with gevent.Timeout(SHORT):
                svc.stop()
        self.assertEqual(log, ["on_stop", "cleanup"])
        counts = svc.health()["counts"]
        self.assertEqual((counts["tasks"], counts["intervals"], counts["listeners"]), (0, 0, 0))
        self.assertEqual(svc.status, "stopped")
        self.assertNoNewGreenlets(before)

    def test_cancel_greenlet_reports_a_greenlet_that_refuses_to_die(self):
        release = gevent.event.Event()
        svc = self.started(Stubborn(release))
        gevent.sleep(0)
        with self.assertLogs("specter", "ERROR") as cm:
            svc.cancel_greenlet(svc.clinger)
        self.assertTrue(any("clinger" in line for line in cm.output), cm.output)
        health = svc.health()
        self.assertIn("clinger", health["stuck"])
        self.assertEqual(health["counts"]["tasks"], 1)   # still tracked while alive
        with self.assertLogs("specter", "ERROR") as cm:
            svc.stop()                                    # teardown tries again, and says so
        self.assertIn("clinger", svc.health()["stuck"])
        release.set()
        self.assertEventually(lambda: svc.clinger.dead)
        self.assertEqual(svc.health()["stuck"], [])

    def test_a_subclass_that_forgets_super_init_is_told_to_call_it(self):
        class Forgetful(Service):
            def __init__(self, interval):
                self.every = interval

        with self.assertRaisesRegex(TypeError, r"Forgetful\.__init__\(\) must call super\(\)\.__init__\(\)"):
            Forgetful(1.0)

        class Careful(Forgetful):
            def __init__(self, interval):
                Service.__init__(self, "careful")
                self.every = interval

        svc = Careful(2.0)   # the check sees the finished object, whoever initialised it
        self.assertEqual((svc.name, svc.every, svc.status), ("careful", 2.0, "created"))
        self.assertEqual(Careful.__init__.__name__, "__init__")
        self.assertEqual(list(inspect.signature(Careful).parameters), ["interval"])

    def test_a_skipped_super_init_is_caught_through_a_mixin_or_a_dataclass(self):
        class Plain:
            def __init__(self, *args, **kwargs):
                self.encoder = "json"              # forgets to call super().__init__()

        class Cooperative:
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.counters = {}

        class Broken(Plain, Service):             # Plain.__init__ shadows Service's
            pass

        with self.assertRaisesRegex(TypeError, r"Plain\.__init__\(\) must call super\(\)\.__init__\(\)"):
            Broken().start()

        class Fine(Cooperative, Service):
            pass

        svc = self.started(Fine("fine"))
        self.assertEqual((svc.name, svc.counters, svc.status), ("fine", {}, "running"))
        self.assertEqual(list(inspect.signature(Fine).parameters), ["args", "kwargs"])

        @dataclasses.dataclass(eq=False)
        class Forgot(Service):                     # the generated __init__ never calls Service's
            period: float = 1.0

        with self.assertRaisesRegex(TypeError, r"Forgot\.__init__\(\) must call super\(\)\.__init__\(\).*__post_init__"):
            Forgot().start()

        @dataclasses.dataclass(eq=False)
        class Remembered(Service):
            period: float = 1.0

            def __post_init__(self):
                super().__init__("remembered")

        svc = self.started(Remembered(period=2.0))
        self.assertEqual((svc.name, svc.period, svc.status), ("remembered", 2.0, "running"))

        @dataclasses.dataclass(eq=False)
        class Mixed(Cooperative, Service):        # @dataclass still generates its __init__
            period: float = 1.0

            def __post_init__(self):
                super().__init__("mixed")

        svc = self.started(Mixed(period=3.0))
        self.assertEqual((svc.name, svc.period, svc.counters), ("mixed", 3.0, {}))


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
        self.assertEqual(queue, {"size": 0, "workers": 2, "processed": 2, "failed": 1, "interrupted": 0})

    def test_counters_trail_a_backlog_by_at_most_16_items_per_worker_and_are_exact_when_idle(self):
        gaps = []

        class Counting(QueueService):
            def __init__(self):
                super().__init__("counting", worker_count=3)
                self.done = 0

            def handle_item(self, item):
                state = self.get_state()
                gaps.append(self.done - state["processed"] - state["failed"])
                self.done += 1
                if item % 7 == 0:
                    raise ValueError("bad item %d" % item)

        svc = self.started(Counting())
        with self.assertLogs("specter", "ERROR"):
            for item in range(300):
                self.assertTrue(svc.enqueue(item))
            self.assertTrue(svc.join(timeout=WAIT))
        self.assertLessEqual(max(gaps), 16 * 3)
        self.assertGreater(max(gaps), 0)   # they do count in bulk
        state = svc.get_state()
        self.assertEqual((state["processed"], state["failed"]), (300 - 43, 43))
        svc.enqueue(300)
        self.assertTrue(svc.join(timeout=WAIT))
        self.assertEqual(svc.health()["queue"]["processed"], 258)

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

    def test_stop_drains_items_queued_while_the_workers_waited_in_get(self):
        dropped = []

        class Quick(Sink):
            def on_dropped(self, items):
                dropped.extend(items)

        svc = self.started(Quick(worker_count=3))
        gevent.sleep(0.01)                      # every worker is idle in get()
        for item in range(6):
            self.assertTrue(svc.enqueue(item))  # no switch: the workers have not woken yet
        svc.stop()
        self.assertEqual(sorted(svc.handled), list(range(6)))
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

    def test_a_worker_that_stops_its_service_ends_with_it_among_several_workers(self):
        class Poison(QueueService):
            def handle_item(self, item):
                if item == "stop":
                    self.stop()
                else:
                    gevent.sleep(0.001)

        for workers, busy in itertools.product((2, 4), (0, 1, 3)):
            with self.subTest(workers=workers, busy=busy):
                svc = Poison("poison", worker_count=workers).start()
                self.addCleanup(svc.stop)
                before = set(svc._workers)
                for item in range(busy):      # the other workers are mid-item, then idle in get()
                    svc.enqueue(item)
                svc.enqueue("stop")
                self.assertTrue(wait_until(lambda: svc.status == "stopped"))
                self.assertEventually(lambda: all(worker.dead for worker in before),
                                      msg="a worker outlived the stop it called")
                self.assertEqual(svc.health()["counts"]["tasks"], 0)

    def test_a_blocked_enqueue_is_refused_once_stop_begins(self):
        for drain_timeout in (5.0, 0):
            with self.subTest(drain_timeout=drain_timeout):
                gate = gevent.event.Event()
                dropped = []

                class Gated(Sink):
                    def on_dropped(self, items):
                        dropped.extend(items)

                Gated.drain_timeout = drain_timeout
                svc = self.started(Gated(maxsize=1, gate=gate))
                self.assertTrue(svc.enqueue(1))
                self.assertEventually(lambda: svc.started_items == [1])
                self.assertTrue(svc.enqueue(2))                      # the queue is full now
                blocked = gevent.spawn(svc.enqueue, 3, block=True, timeout=WAIT)
                gevent.sleep(0.01)
                self.assertFalse(blocked.ready())                    # waiting for room
                stopper = gevent.spawn(svc.stop)
                gevent.sleep(0)
                self.assertEqual(svc.status, "stopping")
                gate.set()                                           # the drain frees the slot
                self.assertIs(blocked.get(timeout=WAIT), False)      # refused: the caller keeps it
                stopper.get(timeout=WAIT)
                self.assertNotIn(3, svc.started_items)
                self.assertNotIn(3, dropped)
                self.assertEqual(sorted(svc.handled + dropped), [1, 2])

    def test_a_rolled_back_start_hands_items_queued_by_on_start_to_on_dropped(self):
        dropped = []

        class Doomed(Sink):
            def on_start(self):
                for item in range(3):
                    self.enqueue(item)
                raise RuntimeError("config missing")

            def on_dropped(self, items):
                dropped.extend(items)

        svc = Doomed()
        with self.assertRaisesRegex(RuntimeError, "config missing"):
            svc.start()
        self.assertEqual(dropped, [0, 1, 2])
        self.assertEqual(svc.pending_count(), 0)
        self.assertFalse(svc.enqueue(3))

    def test_an_interrupted_drain_still_hands_queued_items_to_on_dropped_and_runs_on_stop(self):
        dropped, hooks = [], []

        class Slow(Sink):
            def on_dropped(self, items):
                dropped.extend(items)

            def on_stop(self):
                hooks.append("on_stop")

        svc = Slow(delay=SHORT)
        before = live_greenlets()
        svc.start()
        self.addCleanup(svc.stop)
        for item in range(20):
            self.assertTrue(svc.enqueue(item))
        gevent.sleep(0)
        with self.assertRaises(gevent.Timeout):
            with gevent.Timeout(SHORT / 2):
                svc.stop()
        self.assertEqual(hooks, ["on_stop"])
        self.assertEqual(svc.status, "stopped")
        # Every item not taken by a worker went to on_dropped, once.
        self.assertEqual(sorted(svc.started_items + dropped), list(range(20)))
        self.assertGreater(len(dropped), 15)
        self.assertEqual(svc.queue.unfinished_tasks, 0)
        self.assertNoNewGreenlets(before)

    def test_an_item_whose_handling_is_interrupted_is_reported_never_lost_silently(self):
        dropped = []

        class Slow(Sink):
            drain_timeout = stop_timeout = SHORT

            def on_dropped(self, items):
                dropped.extend(items)

        svc = Slow(worker_count=2, delay=LONG)
        svc.start()
        self.addCleanup(svc.stop)
        for n in range(6):
            self.assertTrue(svc.enqueue("job-%d" % n))
        gevent.sleep(0)
        self.assertEqual(svc.started_items, ["job-0", "job-1"])
        # An interrupted stop() kills the workers with their items in hand.
        with self.assertLogs("specter", "ERROR") as cm:
            with self.assertRaises(gevent.Timeout):
                with gevent.Timeout(SHORT / 2):
                    svc.stop()
        self.assertEqual(dropped, ["job-2", "job-3", "job-4", "job-5"])
        reported = [line for line in cm.output if "interrupted" in line]
        self.assertEqual(len(reported), 2, cm.output)
        self.assertTrue(any("'job-0'" in line for line in reported), reported)
        self.assertTrue(any("'job-1'" in line for line in reported), reported)
        queue = svc.health()["queue"]
        self.assertEqual((queue["processed"], queue["failed"], queue["interrupted"]), (0, 0, 2))
        # The same when stop_timeout runs out on an item that will not finish.
        svc.start()
        self.assertTrue(svc.enqueue("job-6"))
        gevent.sleep(0)
        with self.assertLogs("specter", "ERROR") as cm:
            svc.stop()
        self.assertTrue(any("interrupted" in line and "'job-6'" in line for line in cm.output), cm.output)
        self.assertEqual(svc.health()["queue"]["interrupted"], 3)
        self.assertEqual(svc.handled, [])

    def test_a_subclass_that_forgets_super_init_is_told_to_call_it(self):
        class Forgetful(QueueService):
            def __init__(self):
                self.seen = []

            def handle_item(self, item):
                self.seen.append(item)

        with self.assertRaisesRegex(TypeError, r"Forgetful\.__init__\(\) must call super\(\)\.__init__\(\)"):
            Forgetful()


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
        clock = self.use_manual_clock()
        opens = []

        def stream():
            opens.append(clock.now())
            yield len(opens)

        watcher = self.make(stream=stream, interval=50, retry=True)
        got = []
        watcher.subscribe(lambda value, w: got.append(value))
        watcher.start()
        clock.advance(100)
        self.assertEqual(opens, [0.0, 50.0, 100.0])
        self.assertEqual(got, [1, 2, 3])
        self.assertTrue(watcher.running)

    def test_stream_that_ends_is_not_reopened_without_retry(self):
        clock = self.use_manual_clock()
        opens = []

        def stream():
            opens.append(clock.now())
            yield "only"

        watcher = self.make(stream=stream, interval=10, retry=False)
        got = []
        watcher.subscribe(lambda value, w: got.append(value))
        watcher.start()
        clock.advance(0)
        self.assertFalse(watcher.running)
        clock.advance(3600)
        self.assertEqual(opens, [0.0])
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
        # 5 failures then success. Nominal delays with interval=20 and
        # max_backoff=60: 20, 40, 60, 60, 60, each times a jitter in
        # [0.5, 1.0). Uncapped, the 4th and 5th would be >= 80 and 160.
        clock = self.use_manual_clock()
        attempts = []

        def poll():
            attempts.append(clock.now())
            if len(attempts) <= 5:
                raise ValueError("attempt %d" % len(attempts))
            return "ok"

        watcher = self.make(poll=poll, interval=20, max_backoff=60)
        got = []
        watcher.subscribe(lambda value, w: got.append(value))
        with self.assertLogs("specter", "ERROR"):
            watcher.start()
            while not got and clock.now() < 20 + 40 + 60 * 3:
                clock.advance(1)
        self.assertEqual(got, ["ok"])
        self.assertEqual(len(attempts), 6)
        gaps = [b - a for a, b in zip(attempts, attempts[1:])]
        for gap, nominal in zip(gaps, [20, 40, 60, 60, 60]):
            self.assertTrue(nominal / 2 <= gap < nominal, gaps)
        self.assertEqual(watcher.health()["error_count"], 5)

    def test_backoff_has_jitter(self):
        # With max_backoff == interval every backoff is 40 x jitter, jitter in
        # [0.5, 1.0): on the manual clock each gap is exactly that.
        clock = self.use_manual_clock()
        attempts = []

        def poll():
            attempts.append(clock.now())
            raise ValueError("down")

        watcher = self.make(poll=poll, interval=40, max_backoff=40)
        with self.assertLogs("specter", "ERROR"):
            watcher.start()
            while len(attempts) < 8:
                clock.advance(5)
        watcher.stop()
        gaps = [b - a for a, b in zip(attempts, attempts[1:])]
        self.assertTrue(all(20 <= gap < 40 for gap in gaps), gaps)
        self.assertGreater(len(set(gaps)), 1, gaps)  # all 7 equal: about 1e-90 for a real jitter

    def test_backoff_resets_after_success(self):
        # 4 failures (nominal 20, 40, 80, 160 s), a success, then a failure:
        # after a reset its backoff is under 20; without one it would be
        # 320 x jitter >= 160.
        clock = self.use_manual_clock()
        attempts = []
        outcomes = ["fail", "fail", "fail", "fail", "ok", "fail", "ok"]

        def poll():
            attempts.append(clock.now())
            outcome = outcomes[min(len(attempts), len(outcomes)) - 1]
            if outcome == "fail":
                raise ValueError("attempt %d" % len(attempts))
            return len(attempts)

        watcher = self.make(poll=poll, interval=20, max_backoff=1000)
        with self.assertLogs("specter", "ERROR"):
            watcher.start()
            clock.advance(20 + 40 + 80 + 160 + 20 + 20)
        gaps = [b - a for a, b in zip(attempts, attempts[1:])]
        for gap, nominal in zip(gaps, [20, 40, 80, 160]):
            self.assertTrue(nominal / 2 <= gap < nominal, gaps)  # jitter in [0.5, 1)
        self.assertAlmostEqual(gaps[4], 20, places=9)  # after the success: the interval (times are jittered floats)
        self.assertTrue(10 <= gaps[5] < 20, gaps)  # the failure after the success starts over

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

    def test_an_interrupted_stop_keeps_the_loop_tracked_until_it_is_dead(self):
        loops, closed = [], []

        def poll():
            loops.append(gevent.getcurrent())
            try:
                gevent.sleep(LONG)
            finally:
                gevent.sleep(SHORT * 4)   # lets go slowly (closing a connection, say)
                closed.append(True)

        watcher = self.make(poll=poll, interval=0.01)
        watcher.start()
        self.assertTrue(wait_until(lambda: loops))
        with self.assertRaises(gevent.Timeout):
            with gevent.Timeout(SHORT):
                watcher.stop()
        self.assertFalse(loops[0].dead)
        self.assertTrue(watcher.running)           # it is still running, and says so
        watcher.start()                            # no second loop beside it
        gevent.sleep(0.01)
        self.assertEqual(len(set(loops)), 1)
        self.assertIs(watcher.stop(), watcher)     # stop() again waits for it to end
        self.assertTrue(loops[0].dead)
        self.assertEqual(closed, [True])           # not killed twice: its finally ran to the end
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

    def test_changes_behind_a_killed_round_are_delivered_without_another_write(self):
        # The round delivering 1.1 is killed inside a subscriber while 1.2 waits
        # behind it: the subscribers it had not reached get 1.1, then everyone
        # gets 1.2, in commit order, from another greenlet.
        store = create_store("s", {"v": 1.0})
        first, second = [], []
        gate = gevent.event.Event()

        def slow(snapshot, s):
            first.append(snapshot["v"])
            if snapshot["v"] == 1.1:
                gate.wait()
        store.subscribe(slow)
        store.subscribe(lambda snapshot, s: second.append(snapshot["v"]))
        writer = gevent.spawn(store.set, {"v": 1.1})
        gevent.sleep(0)
        store.set({"v": 1.2})  # committed, queued behind the round of 1.1
        writer.kill()
        self.assertEqual(store.get("v"), 1.2)
        self.assertEventually(lambda: second == [1.1, 1.2], timeout=1)
        self.assertEqual(first, [1.1, 1.2])
        gevent.sleep(0.01)
        self.assertEqual((first, second), ([1.1, 1.2], [1.1, 1.2]))

    def test_an_interrupted_round_does_not_resume_into_a_dropped_subscriber(self):
        store = create_store("s", {"v": 0})
        gate = gevent.event.Event()
        kept, dropped = Recorder(), Recorder()
        store.subscribe(lambda snapshot, s: gate.wait())
        store.subscribe(kept)
        unsubscribe = store.subscribe(dropped)
        writer = gevent.spawn(store.set, {"v": 1})
        gevent.sleep(0)
        unsubscribe()
        writer.kill()
        self.assertEventually(lambda: kept.count == 1, timeout=1)
        gevent.sleep(0.01)
        self.assertEqual((kept.firsts, dropped.count), ([{"v": 1}], 0))

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
        self.addCleanup(specter.bus.on("conn:changed", changed))
        store = create_store("conn", {"count": 0}, emit_events=True)
        store.set({"count": 1})
        self.assertEqual(changed.firsts, [{"count": 1}])
        quiet = create_store("quiet", {"count": 0})
        silent = Recorder()
        self.addCleanup(specter.bus.on("quiet:changed", silent))
        quiet.set({"count": 1})
        self.assertEqual(silent.count, 0)

    def test_change_event(self):
        custom = Recorder()
        self.addCleanup(specter.bus.on("conn:custom", custom))
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

    def test_writes_return_none(self):
        # A documented difference from 0.1.2 (which returned a deep copy): a copy
        # per write would cost the size of the state.
        model = create_model("m", {"a": {"b": 1}})
        writes = [lambda: model.set("a.b", 2), lambda: model.patch({"c": 1}),
                  lambda: model.update(lambda draft: draft.update(d=1)), lambda: model.delete("c"),
                  lambda: model.set("a.b", 2), lambda: model.clear()]
        self.assertEqual([write() for write in writes], [None] * len(writes))
        self.assertEqual(model.get(), {})

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

    def test_reads_and_selectors_resolve_paths_by_one_rule(self):
        # Paths go into dicts by key and into lists by index; a tuple, a string
        # or any other value ends the path. get(), select() and a selector agree.
        model = create_model("m", {"pos": (3, 4), "name": "ana", "items": [10, {"id": 7}],
                                   "d": {"0": "zero"}})
        self.assertIsNone(model.get(("pos", 0)))
        self.assertEqual(model.get("pos.0", "absent"), "absent")
        self.assertEqual(model.get(("name", 0), "absent"), "absent")
        self.assertEqual(model.get("name.0", "absent"), "absent")
        self.assertEqual(model.get(("items", 1, "id")), 7)
        self.assertEqual(model.get("items.1.id"), 7)
        self.assertEqual(model.get(("items", -2)), 10)
        self.assertEqual(model.get("d.0"), "zero")
        paths = [("pos", 0), "pos.0", ("name", 0), "name.0", ("items", 1, "id"), "items.1.id",
                 ("items", -2), "items.0", "d.0", "items.x", "items.9", "pos"]
        writes = [lambda m: m.set("pos", (5, 4)), lambda m: m.set("name", "bo"),
                  lambda m: m.set("items", [11, {"id": 8}]), lambda m: m.set("d.0", "nil")]
        recorders = {}
        for path in paths:
            recorders[path] = Recorder()
            model.subscribe(recorders[path], selector=path, immediate=True)
        for write in writes:
            before = {path: model.get(path) for path in paths}
            counts = {path: rec.count for path, rec in recorders.items()}
            write(model)
            for path in paths:
                with self.subTest(path=path):
                    after = model.get(path)
                    self.assertEqual(model.select(path), after)
                    fired = recorders[path].count - counts[path]
                    self.assertEqual(fired, int(after != before[path]))
                    self.assertEqual(recorders[path].firsts[-1], after)

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

    def test_each_subscriber_without_a_selector_gets_its_own_deep_copy(self):
        model = create_model("m", {"a": {"list": [1]}})
        first = Recorder(side_effect=lambda snap, m: snap["a"]["list"].append("edited"))
        second = Recorder()
        model.subscribe(first)
        model.subscribe(second)
        model.set("b", 1)
        self.assertEqual(second.firsts, [{"a": {"list": [1]}, "b": 1}])
        self.assertIsNot(first.firsts[0], second.firsts[0])
        self.assertEqual(model.get(), {"a": {"list": [1]}, "b": 1})

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

    def test_a_raising_selector_subscriber_is_logged_by_its_function_name(self):
        model = create_model("m", {"a": 0})
        rec = Recorder()

        def breaks_on_a(value, m):
            raise ValueError("selector subscriber broke on %r" % value)

        model.subscribe(breaks_on_a, "a", immediate=False)
        model.subscribe(rec, "a", immediate=False)
        with self.assertLogs("specter.state", "ERROR") as cm:
            model.set("a", 1)
        self.assertLoggedException(cm, "selector subscriber broke on 1")
        self.assertIn("m: subscriber %s raised" % breaks_on_a.__qualname__, cm.output[0])
        self.assertEqual(rec.calls, [(1, model)])

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
        self.addCleanup(specter.bus.on("tv:changed", changed))
        self.addCleanup(specter.bus.on("tv:custom", custom))
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

    def test_changes_behind_a_timed_out_round_are_delivered_in_order(self):
        # The writer's own gevent.Timeout interrupts the round in a subscriber:
        # the write stays committed and nobody misses it or what came after.
        model = create_model("m", {"n": 0})
        slow_seen, path_seen, whole_seen = [], [], []
        gate = gevent.event.Event()

        def slow(value, m):
            slow_seen.append(value)
            if value == 1:
                gate.wait()
        model.subscribe(slow, selector="n")
        model.subscribe(lambda value, m: path_seen.append(value), selector="n")
        model.subscribe(lambda snap, m: whole_seen.append(snap["n"]))

        def writer():
            with self.assertRaises(gevent.Timeout):
                with gevent.Timeout(SHORT):
                    model.set("n", 1)
        done = gevent.spawn(writer)
        gevent.sleep(0)
        model.set("n", 2)
        model.set("n", 3)
        done.get(timeout=1)
        self.assertEventually(lambda: whole_seen == [1, 2, 3], timeout=1)
        self.assertEqual((slow_seen, path_seen), ([1, 2, 3], [1, 2, 3]))

    def test_a_changed_type_inside_a_container_is_a_change(self):
        # 1 == 1.0 == True, also inside containers; a write that only changes a
        # type must still land and notify (set, patch and update alike).
        cases = [
            ("set", {"limit": 1}, lambda m: m.set("cfg", {"limit": True}), {"limit": True}),
            ("patch", {"limit": 1}, lambda m: m.patch({"cfg": {"limit": 1.0}}), {"limit": 1.0}),
            ("update", [0, 1], lambda m: m.update(lambda draft: {"cfg": [False, True]}), [False, True]),
            ("nested", {"a": [(1, 2)]}, lambda m: m.set("cfg", {"a": [(1, 2.0)]}), {"a": [(1, 2.0)]}),
        ]
        for how, before, write, after in cases:
            with self.subTest(how=how):
                model = create_model("m", {"cfg": before})
                whole, selected = Recorder(), Recorder()
                model.subscribe(whole)
                model.subscribe(selected, selector="cfg")
                write(model)
                self.assertEqual(repr(model.get("cfg")), repr(after))
                self.assertEqual([repr(v) for v in selected.firsts], [repr(after)])
                self.assertEqual(whole.count, 1)
                write(model)  # the same value, same types: no change
                self.assertEqual((whole.count, selected.count), (1, 1))

    def test_a_changed_type_inside_a_dict_or_list_subclass_is_a_change(self):
        # A model keeps an OrderedDict or a defaultdict as it is (its copies are
        # deep copies), so a type change inside one is a change like any other.
        from collections import OrderedDict as ordered, defaultdict as defaults

        class Row(list):
            pass
        cases = [
            ("OrderedDict", ordered(limit=1), ordered(limit=True)),
            ("defaultdict", defaults(int, limit=1), defaults(int, limit=1.0)),
            ("list subclass", Row([0, 1]), Row([False, True])),
            ("list in an OrderedDict", ordered(v=[0, 1]), ordered(v=[0, True])),
        ]
        for label, before, after in cases:
            with self.subTest(container=label):
                model = create_model("m", {"cfg": before})
                selected = Recorder()
                model.subscribe(selected, selector="cfg")
                model.set("cfg", after)
                self.assertEqual(repr(model.get("cfg")), repr(after))
                self.assertEqual([repr(v) for v in selected.firsts], [repr(after)])
                model.set("cfg", after)  # the same value, same types: no change
                self.assertEqual(selected.count, 1)

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
        self.addCleanup(a.destroy)
        b = create_cache("b", depends_on=["a:invalidated"])
        self.addCleanup(b.destroy)
        for cache in (a, b):
            cache.on_invalidate(lambda c=cache: (counts.__setitem__(c.name, counts[c.name] + 1), gevent.sleep(0)))
        gevent.joinall([gevent.spawn(a.invalidate), gevent.spawn(b.invalidate)], timeout=2)
        self.assertEqual(counts, {"a": 2, "b": 2})  # each cascade invalidates each cache once

    def test_concurrent_invalidations_from_two_greenlets_both_happen(self):
        cache = create_cache("c")
        calls = []

        def slow_callback():
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
        clock = self.use_manual_clock()
        cache = create_cache("c", ttl=0)
        cache.set("v")
        clock.advance(10 ** 9)
        self.assertTrue(cache.is_valid())
        self.assertEqual(cache.get(), "v")

    def test_set_and_get_or_compute_ttl_override(self):
        clock = self.use_manual_clock()
        for ttl in (0, 300):
            with self.subTest(cache_ttl=ttl):
                cache = create_cache("c", ttl=ttl)
                cache.set("v", ttl=5)
                clock.advance(4.5)
                self.assertTrue(cache.is_valid())
                clock.advance(0.5)
                self.assertFalse(cache.is_valid())
                cache.get_or_compute(lambda: "w", ttl=5)
                clock.advance(4.5)
                self.assertTrue(cache.is_valid())
                clock.advance(0.5)
                self.assertFalse(cache.is_valid())
        cache = create_cache("c", ttl=5)
        cache.set("v", ttl=0)
        clock.advance(10 ** 9)
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

    def test_a_callers_own_timeout_is_not_raised_in_other_waiting_callers(self):
        # The impatient caller runs the factory and its own Timeout fires inside
        # it: that caller gets its Timeout; the patient waiter computes instead.
        cache = create_cache("c")
        calls = []

        def factory():
            calls.append(gevent.getcurrent())
            if len(calls) == 1:
                gevent.sleep(LONG)  # the first computation hangs
            return "fresh"

        def impatient():
            with gevent.Timeout(SHORT):
                return cache.get_or_compute(factory)
        first = gevent.spawn(impatient)
        gevent.sleep(0)
        patient = gevent.spawn(cache.get_or_compute, factory)
        gevent.joinall([first, patient], timeout=WAIT)
        self.assertIsInstance(first.exception, gevent.Timeout)
        self.assertTrue(patient.successful(), "the patient caller raised %r" % (patient.exception,))
        self.assertEqual(patient.value, "fresh")
        self.assertEqual(calls, [first, patient])
        self.assertEqual(cache.get(), "fresh")

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
        self.addCleanup(specter.bus.on("drives:invalidated", events))
        callback = Recorder()
        unsubscribe = cache.on_invalidate(callback)
        cache.set("v")
        cache.invalidate()
        self.assertFalse(cache.is_valid())
        self.assertEqual(cache.get("dflt"), "dflt")
        self.assertEqual(callback.calls, [()])
        self.assertEqual(events.firsts, [{"name": "drives"}])
        unsubscribe()
        cache.set("w")
        cache.invalidate()
        self.assertEqual(callback.count, 1)

    def test_on_invalidate_callback_is_called_with_no_arguments(self):
        # As in 0.1.2: a zero-argument callback works, and is not logged as failing.
        cache = create_cache("c")
        calls = []
        cache.on_invalidate(lambda: calls.append("emptied"))
        cache.set(1)
        cache.invalidate()
        self.assertEqual(calls, ["emptied"])

    def test_on_invalidate_callback_that_raises_is_logged(self):
        cache = create_cache("c")
        after = Recorder()
        cache.on_invalidate(lambda: TestService._raise("invalidate hook broke"))
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
        self.addCleanup(b.destroy)
        c = create_cache("c", depends_on=["b:invalidated", "storage:mount_changed"])
        self.addCleanup(c.destroy)
        for cache in (a, b, c):
            cache.set(cache.name)
        a.invalidate()
        self.assertEqual([x.is_valid() for x in (a, b, c)], [False, False, False])
        c.set("c")
        specter.bus.emit("storage:mount_changed", {"path": "/mnt"})
        self.assertFalse(c.is_valid())

    def test_depends_on_cycle_terminates_with_one_invalidation_each(self):
        a = create_cache("a", depends_on=["c:invalidated"])
        self.addCleanup(a.destroy)
        b = create_cache("b", depends_on=["a:invalidated"])
        self.addCleanup(b.destroy)
        c = create_cache("c", depends_on=["b:invalidated"])
        self.addCleanup(c.destroy)
        counts = {"a": 0, "b": 0, "c": 0}
        for cache in (a, b, c):
            cache.on_invalidate(lambda x=cache: counts.__setitem__(x.name, counts[x.name] + 1))
            cache.set(1)
        a.invalidate()
        self.assertEqual(counts, {"a": 1, "b": 1, "c": 1})
        self.assertFalse(any(x.is_valid() for x in (a, b, c)))
        for cache in (a, b, c):
            cache.set(2)
        b.invalidate()  # a second, separate cascade
        self.assertEqual(counts, {"a": 2, "b": 2, "c": 2})

    def test_a_cache_reached_twice_in_one_cascade_invalidates_once(self):
        graphs = {
            # d depends on b and c, both on a
            "diamond": {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]},
            # a cycle a -> b -> c -> a, with a shortcut a -> c
            "cycle with a shortcut": {"a": ["c"], "b": ["a"], "c": ["b", "a"]},
        }
        for label, graph in graphs.items():
            with self.subTest(graph=label):
                specter.bus.clear()
                counts = dict.fromkeys(graph, 0)
                caches = {}
                for name, sources in graph.items():
                    cache = caches[name] = create_cache(name, depends_on=[s + ":invalidated" for s in sources])
                    self.addCleanup(cache.destroy)
                    cache.on_invalidate(lambda name=name: counts.__setitem__(name, counts[name] + 1))
                    cache.set(1)
                caches["a"].invalidate()
                self.assertEqual(counts, dict.fromkeys(graph, 1))
                self.assertFalse(any(cache.is_valid() for cache in caches.values()))
                caches["a"].invalidate()  # a second cascade: once more each
                self.assertEqual(counts, dict.fromkeys(graph, 2))

    def test_a_long_depends_on_chain_invalidates_entirely(self):
        # 400 hops: far deeper than the Python stack allows by recursion.
        chain = [create_cache("c0")]
        for index in range(1, 400):
            chain.append(create_cache("c%d" % index, depends_on=["c%d:invalidated" % (index - 1)]))
            self.addCleanup(chain[-1].destroy)
        notified = []
        for cache in chain:
            cache.set(cache.name)
            cache.on_invalidate(lambda name=cache.name: notified.append(name))
        last = Recorder()
        self.addCleanup(specter.bus.on("c399:invalidated", last))
        chain[0].invalidate()
        self.assertEqual([cache.name for cache in chain if cache.is_valid()], [])
        self.assertEqual(notified, [cache.name for cache in chain])
        self.assertEqual(last.firsts, [{"name": "c399"}])

    def test_a_callback_that_rebuilds_its_cache_reads_only_dependencies_the_cascade_emptied(self):
        # total depends on fast (one hop from source) and on slow (three hops):
        # source -> fast -> total, source -> parsed -> checked -> slow -> total.
        # total's callback rebuilds it; it must not read slow before the
        # cascade has reached slow, or total keeps a stale value for good.
        data = {"v": 1}
        source = create_cache("source", depends_on=["data:changed"])
        fast = create_cache("fast", depends_on=["source:invalidated"])
        parsed = create_cache("parsed", depends_on=["source:invalidated"])
        checked = create_cache("checked", depends_on=["parsed:invalidated"])
        slow = create_cache("slow", depends_on=["checked:invalidated"])
        total = create_cache("total", depends_on=["fast:invalidated", "slow:invalidated"])
        for cache in (source, fast, parsed, checked, slow, total):
            self.addCleanup(cache.destroy)

        def read_source():
            return source.get_or_compute(lambda: data["v"])

        def read_slow():
            parsed_value = parsed.get_or_compute(read_source)
            checked_value = checked.get_or_compute(lambda: parsed_value)
            return slow.get_or_compute(lambda: checked_value)

        def read_total():
            return total.get_or_compute(lambda: (fast.get_or_compute(read_source), read_slow()))

        self.assertEqual(read_total(), (1, 1))
        rebuilt = []
        total.on_invalidate(lambda: rebuilt.append(read_total()))
        data["v"] = 2
        specter.bus.emit("data:changed")
        self.assertEqual(rebuilt, [(2, 2)])
        self.assertEqual(total.get(), (2, 2))

    def test_a_cascade_whose_greenlet_is_killed_still_reaches_every_dependent(self):
        a = create_cache("a")
        b = create_cache("b", depends_on=["a:invalidated"])
        self.addCleanup(b.destroy)
        c = create_cache("c", depends_on=["b:invalidated"])
        self.addCleanup(c.destroy)
        calls = []
        gate = gevent.event.Event()
        a.on_invalidate(lambda: (calls.append("a1"), gate.wait()))
        a.on_invalidate(lambda: calls.append("a2"))
        b.on_invalidate(lambda: calls.append("b"))
        c.on_invalidate(lambda: calls.append("c"))
        for cache in (a, b, c):
            cache.set(1)
        invalidating = gevent.spawn(a.invalidate)
        gevent.sleep(0)
        invalidating.kill()  # inside a's first callback
        self.assertFalse(a.is_valid())
        self.assertEventually(lambda: calls == ["a1", "a2", "b", "c"], timeout=1)
        self.assertFalse(b.is_valid() or c.is_valid())

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

    def test_a_computation_in_flight_does_not_fill_a_destroyed_cache(self):
        cache = create_cache("late")
        gate = gevent.event.Event()

        def slow():
            gate.wait(WAIT)
            return "late"
        computing = gevent.spawn(cache.get_or_compute, slow)
        gevent.sleep(0)
        cache.destroy()
        gate.set()
        self.assertEqual(computing.get(timeout=WAIT), "late")  # its caller still gets its value
        self.assertFalse(cache.is_valid())
        self.assertIsNone(cache.get())

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

    def test_int_parses_integral_strings_exactly_or_refuses_them(self):
        for raw, expected in (("9007199254740993.0", 9007199254740993), ("1e23", 10 ** 23),
                              (" 1E+2 ", 100), ("-0.0", 0), ("12345678901234567890.000", 12345678901234567890),
                              (decimal.Decimal("1e23"), 10 ** 23)):
            with self.subTest(raw=raw):
                self.assertAccepts(Field(int), raw, expected)
        for raw in ("0.99999999999999999", "1.0000000000000000001", "1e-5", "NaN", "Infinity", "1e",
                    decimal.Decimal("0.99999999999999999"), decimal.Decimal("NaN")):
            with self.subTest(raw=raw):
                self.assertRefuses(Field(int), raw)
        started = time.monotonic()
        for raw in ("1e999999999", decimal.Decimal("1e999999999")):   # a billion digits: refused, not built
            with self.subTest(raw=raw):
                self.assertRefuses(Field(int), raw)
        self.assertLess(time.monotonic() - started, 1.0)

    def test_nested_schema_fields_apply_every_option(self):
        owner = Schema("owner", {"email": Field(str, required=True), "name": Field(str, default="anon")})
        seen = []

        def corporate(value):
            seen.append(value)
            return value["email"].endswith("@corp")

        cases = (
            (Field(owner, validator=corporate), {"email": "a@corp"}, {"email": "a@home"}),
            (Field(owner, choices=[{"email": "a@corp", "name": "anon"}]), {"email": "a@corp"}, {"email": "b@corp"}),
            (Field(owner, min_length=2), {"email": "a@corp"}, None),
            (Field(owner, max_length=1), None, {"email": "a@corp"}),
            (Field(owner, min_length=3), None, {"email": "a@corp"}),
        )
        for field, good, bad in cases:
            with self.subTest(field=field, good=good, bad=bad):
                schema = Schema("t", {"f": field})
                if good is not None:
                    self.assertEqual(schema.validate({"f": good}).value, {"f": {**good, "name": "anon"}})
                if bad is not None:
                    out = schema.validate({"f": bad})
                    self.assertFalse(out.ok)
                    self.assertEqual(list(out.meta["errors"]), ["f"])
        self.assertEqual(seen, [{"email": "a@corp", "name": "anon"}, {"email": "a@home", "name": "anon"}])
        # The same options on list items, with the item's path; an invalid object never reaches the validator.
        listed = Schema("t", {"owners": Field(list, items=Field(owner, validator=corporate))})
        out = listed.validate({"owners": [{"email": "a@corp"}, {"email": "b@home"}, {"name": "x"}]})
        self.assertEqual(set(out.meta["errors"]), {"owners[1]", "owners[2].email"})
        self.assertEqual(len(seen), 4)
        js = Schema("t", {"f": Field(owner, min_length=1, max_length=2)}).to_json_schema()
        self.assertEqual((js["properties"]["f"]["minProperties"], js["properties"]["f"]["maxProperties"]), (1, 2))

    def test_default_must_satisfy_its_own_field(self):
        for field, words in ((Field(str, default=5), "must be a string"),
                             (Field(int, default="5"), "must be an integer"),
                             (Field(int, default=True), "boolean"),
                             (Field(int, default=0, min=1), "at least 1"),
                             (Field(str, default="x", choices=["a", "b"]), "one of"),
                             (Field(list, default=[1, "x"], items=Field(int)), "items[1]"),
                             (Field(bool, default="yes"), "must be a boolean")):
            with self.subTest(field=field, default=field.default):
                with self.assertRaisesRegex(TypeError, "field 'items'.*%s" % re.escape(words)):
                    Schema("t", {"ok": Field(int, default=1), "items": field})
        schema = Schema("t", {"ratio": Field(float, default=0), "tags": Field(list, default=("a",)),
                              "parts": Field(lambda text: text.split(","), default=list)})
        value = schema.validate({}).value
        self.assertEqual(value, {"ratio": 0.0, "tags": ["a"], "parts": []})
        self.assertIs(type(value["ratio"]), float)
        # A factory's result is checked each time it is called; a bad one fails the field, logged.
        made = Schema("t", {"name": Field(str, default=lambda: 5)})
        with self.assertLogs("specter.schema", "ERROR") as logs:
            out = made.validate({})
        self.assertEqual(out.meta["errors"], {"name": "has no usable default"})
        self.assertIn("field 'name' must be a string", "".join(logs.output))


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

    def test_field_names_and_required_fields_compare_equal_to_sets(self):
        schema = self.create_schema()
        self.assertEqual(schema.field_names, {"name", "age", "active"})
        self.assertEqual(schema.required_fields, {"name"})
        self.assertTrue(schema.required_fields <= schema.field_names)
        self.assertEqual(schema.extend("more", {"x": Field(int, required=True)}).required_fields, {"name", "x"})

    def test_to_json_schema_accepts_unhashable_coercers(self):
        @dataclasses.dataclass
        class Scaled:
            factor: int

            def __call__(self, value):
                return int(value) * self.factor

        schema = Schema("t", {"n": Field(Scaled(10), required=True, min=0)})
        self.assertEqual(schema.validate({"n": "3"}).value, {"n": 30})
        js = schema.to_json_schema()
        self.assertEqual(js["properties"]["n"], {"minimum": 0})
        json.dumps(js)

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

    def test_field_names_patterns_and_messages_are_data_never_code(self):
        hostile = 'x"] = 1\nimport os; os._exit(3)  # \u2028'
        pattern = r'[\n"]+'
        schema = Schema("t\nevil = 1", {
            hostile: Field(int, required=True, min=0),
            "safe": Field(str, pattern=pattern, choices=['"); raise SystemExit #', '\n\n']),
            "inner": Field(Schema("inner", {hostile: Field(str, required=True)})),
        }, strict=True)
        self.assertEqual(schema.validate({hostile: "3", "safe": "\n\n"}).value,
                         {hostile: 3, "safe": "\n\n", "inner": None})
        out = schema.validate({hostile: -1, "safe": '"); raise SystemExit #', "inner": {}, hostile + "!": 1})
        self.assertEqual(set(out.meta["errors"]), {hostile, "safe", "inner." + hostile, hostile + "!"})
        source = schema.compiled_source()
        code, _, legend = source.partition("# Constants")
        compile(code, "<check>", "exec")
        for text in (hostile, "os._exit", "raise SystemExit", pattern, "evil", "inner"):
            self.assertNotIn(text, code)
        self.assertIn(ascii(hostile), legend)           # shown escaped, in the legend only
        self.assertNotIn("\u2028", source)
        self.assertTrue(all(line.startswith("#") for line in legend.splitlines()[1:]))

    def test_compiled_source_shows_the_generated_validator(self):
        owner = Schema("owner", {"email": Field(str, required=True)})
        schema = Schema("doc", {"n": Field(int, min=1), "owner": Field(owner), "tags": Field(list, items=Field(str))})
        source = schema.compiled_source()
        self.assertTrue(source.startswith("def validate(root, data):"))
        self.assertIn("# field 2 of 3: nested schema", source)
        self.assertIn("for index_1, item_1 in enumerate(v):", source)
        self.assertIn("def clean_object(data, path, errors, root, level):", owner.compiled_source())
        self.assertIsNotNone(compile(source.partition("# Constants")[0], "<check>", "exec"))

    def test_validate_never_raises_even_when_the_mapping_breaks(self):
        class Broken(dict):
            def get(self, key, default=None):
                raise RuntimeError("storage gone: password=hunter2")

        schema = Schema("t", {"a": Field(int)})
        with self.assertLogs("specter.schema", "WARNING") as logs:
            out = schema.validate(Broken(a=1))
        self.assertEqual((out.ok, out.status, dict(out.meta["errors"])), (False, 400, {"$": "is invalid"}))
        self.assertNotIn("hunter2", out.error)
        self.assertIn("hunter2", "".join(logs.output))

    def test_nested_lists_and_objects_report_each_element_path(self):
        point = Schema("point", {"x": Field(int, required=True)})
        schema = Schema("t", {"grid": Field(list, items=Field(list, items=Field(int, min=0))),
                              "paths": Field(list, items=Field(list, items=Field(point)))})
        out = schema.validate({"grid": [[1, 2], [3, -1, "x", None]], "paths": [[{"x": 1}], [{"x": "y"}, 5]]})
        self.assertEqual(set(out.meta["errors"]),
                         {"grid[1][1]", "grid[1][2]", "grid[1][3]", "paths[1][0].x", "paths[1][1]"})
        self.assertEqual(schema.validate({"grid": [[0], []], "paths": [[{"x": "2"}]]}).value,
                         {"grid": [[0], []], "paths": [[{"x": 2}]]})

    def test_list_elements_are_each_converted_and_checked(self):
        for kind, raw, clean, bad in ((int, [1, "2", 3], [1, 2, 3], [1, True, None, "x"]),
                                      (str, ["a", 1, 2.5], ["a", "1", "2.5"], ["a", ["b"], None, {}]),
                                      (bool, [True, "no", 1], [True, False, True], [True, 2, None, "maybe"])):
            with self.subTest(kind=kind):
                schema = Schema("t", {"xs": Field(list, items=Field(kind))})
                value = schema.validate({"xs": raw}).value["xs"]
                self.assertEqual(value, clean)
                self.assertEqual([type(x) for x in value], [kind] * 3)
                self.assertIsNot(schema.validate({"xs": clean}).value["xs"], clean)   # a new list
                out = schema.validate({"xs": bad})
                self.assertEqual(set(out.meta["errors"]), {"xs[1]", "xs[2]", "xs[3]"})
                self.assertEqual(out.meta["errors"]["xs[2]"], "is required")

    def test_limits_come_from_the_schema_validate_is_called_on(self):
        inner = Schema("inner", {"tags": Field(list, items=Field(str))})
        outer = Schema("outer", {"inner": Field(inner)})
        outer.max_items = 3
        out = outer.validate({"inner": {"tags": ["a", "b", "c", "d"]}})
        self.assertEqual(dict(out.meta["errors"]), {"inner.tags": "has more than 3 items"})
        self.assertTrue(inner.validate({"tags": ["a", "b", "c", "d"]}).ok)

    def test_a_subclass_override_of_validate_is_kept(self):
        class Audited(Schema):
            seen = []

            def validate(self, data):
                self.seen.append(data)
                return super().validate(data)

        schema = Audited("t", {"a": Field(int)})
        self.assertEqual(schema.validate({"a": "1"}).value, {"a": 1})
        self.assertEqual(schema.require({"a": "2"}), {"a": 2})
        self.assertEqual(Audited.seen, [{"a": "1"}, {"a": "2"}])

    def test_copies_and_pickles_validate_on_their_own(self):
        schema = Schema("t", {"a": Field(int, default=1), "b": Field(list, items=Field(int))})
        for twin in (copy.copy(schema), copy.deepcopy(schema), pickle.loads(pickle.dumps(schema))):
            with self.subTest(twin=twin):
                twin.max_items = 1
                self.assertEqual(twin.validate({"b": ["2"]}).value, {"a": 1, "b": [2]})
                self.assertFalse(twin.validate({"b": [1, 2]}).ok)
                self.assertTrue(schema.validate({"b": [1, 2]}).ok)

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


def settle_engineio(test, sio):
    """Make Engine.IO's ping greenlets end with a test that serves real clients.

    Each connection's ping timer sleeps a whole ping_interval (25 s by
    default) before it notices that the connection closed; the leak check
    would report it. (The server's service task ends with
    ServiceManager.shutdown.)
    """
    sio.server.eio.ping_interval = 0.05


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


class TokenController(EchoController):
    """EchoController whose connect check admits the token 's3cret', recording each one it sees."""

    def __init__(self, name=None):
        super().__init__(name)
        self.checked = []

    def build_events(self, handler):
        super().build_events(handler)
        handler.on("connect", self.check)

    def check(self, auth=None):
        token = (auth or {}).get("token")
        self.checked.append(token)
        return token == "s3cret"


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

    def test_json_endpoint_answers_an_absurdly_nested_get_json_body_400(self):
        seen = []

        @json_endpoint
        def view():
            seen.append(request.get_json(silent=True))
            return {"read": True}
        client = self.client_for(view)
        depth = 100000
        nested = "[" * depth + "]" * depth
        for encoding in ("utf-8", "utf-16"):
            with self.subTest(encoding=encoding):
                response = client.post("/v", data=nested.encode(encoding), content_type="application/json")
                self.assertEqual(self.assertJSON(response, 400), {"error": "Request body is nested too deeply"})
        self.assertEqual(seen, [])
        self.assertEqual(self.assertJSON(client.post("/v", json=[[1]]), 200), {"read": True})

    def test_json_endpoint_keeps_a_recursion_bug_of_its_own_a_500(self):
        @json_endpoint("Could not walk the tree")
        def view():
            def walk(node):
                return walk(node)
            return walk(1)
        with self.assertLogs("specter", "ERROR"):
            response = self.client_for(view).get("/v")
        self.assertEqual(self.assertJSON(response, 500), {"error": "Could not walk the tree"})

    def test_json_endpoint_abort_with_a_response_keeps_that_response(self):
        @json_endpoint
        def view():
            abort(flask.Response("brewing", status=418, headers={"X-Pot": "tea"}))
        response = self.client_for(view).get("/v")
        self.assertEqual((response.status_code, response.get_data(as_text=True)), (418, "brewing"))
        self.assertEqual(response.headers["X-Pot"], "tea")

        @json_endpoint
        def json_view():
            abort(flask.make_response(flask.jsonify(reason="quota"), 429))
        response = self.client_for(json_view).get("/v")
        self.assertEqual(self.assertJSON(response, 429), {"reason": "quota"})

    def test_http_error_whose_payload_json_cannot_encode_is_still_a_json_body(self):
        @json_endpoint
        def view():
            raise HTTPError("Tag conflict", 409, payload={"tags": {"a", "b"}})
        with self.assertLogs("specter", "ERROR") as logs:
            response = self.client_for(view).get("/v")
        self.assertEqual(self.assertJSON(response, 409), {"error": "Tag conflict"})
        self.assertIn("cannot be encoded as JSON", "\n".join(logs.output))

        app, sio = make_web_app()

        @app.route("/plain")
        def plain():
            raise HTTPError("Tag conflict", 409, payload={"tags": {"a"}})
        manager = ServiceManager(app, sio, signals=False)
        self.addCleanup(manager.shutdown)
        with self.assertLogs("specter", "ERROR"):
            response = app.test_client().get("/plain")
        self.assertEqual(self.assertJSON(response, 409), {"error": "Tag conflict"})

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
        self.assertEqual(body["error"], "The body is empty ({})")
        self.assertEqual(self.assertJSON(self.echo_client(allow_empty=True).post("/v", json={}), 200),
                         {"got": {}})

    def test_expect_json_messages_say_what_was_wrong_with_the_body(self):
        client = self.echo_client()
        cases = [
            ({}, "Request body is required"),
            ({"data": "{bad json", "content_type": "application/json"}, "The body is not valid JSON"),
            ({"data": "   ", "content_type": "application/json"}, "The body is empty"),
            ({"json": {}}, "The body is empty ({})"),
            ({"data": {"name": "a"}},
             "Send the body as JSON (Content-Type: application/json); "
             "it was sent as application/x-www-form-urlencoded"),
            ({"data": '{"name": "a"}', "content_type": "text/plain"},
             "Send the body as JSON (Content-Type: application/json); it was sent as text/plain"),
        ]
        for kwargs, message in cases:
            with self.subTest(message=message):
                self.assertEqual(self.assertJSON(client.post("/v", **kwargs), 400)["error"], message)
        custom = self.echo_client(error="Send a job")
        self.assertEqual(self.assertJSON(custom.post("/v"), 400)["error"], "Send a job")
        response = custom.post("/v", data="{bad", content_type="application/json")
        self.assertEqual(self.assertJSON(response, 400)["error"], "Send a job: the body is not valid JSON")
        self.assertEqual(self.assertJSON(custom.post("/v", json={}), 400)["error"],
                         "Send a job: the body is empty ({})")

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

    def test_class_defaults_are_name_router_and_an_empty_url_prefix(self):
        self.assertEqual((Router.name, Router.url_prefix), ("router", ""))
        router = Router()
        self.assertEqual((router.name, router.url_prefix), ("router", ""))

        class SensorRouter(Router):
            @route("/sensors")
            def sensors(self):
                return {"sensors": []}

        class LegacyRouter(SensorRouter):
            name = "legacy"

        class OldLegacyRouter(LegacyRouter):
            pass
        self.assertEqual(SensorRouter().name, "sensor_router")
        self.assertEqual(OldLegacyRouter().name, "legacy")
        _, client = self.served(SensorRouter())
        self.assertEqual(client.get("/sensors").get_json(), {"sensors": []})
        _, client = self.served(SensorRouter(url_prefix=""))
        self.assertEqual(client.get("/sensors").status_code, 200)
        with self.assertRaisesRegex(ValueError, "starting with '/'"):
            Router(url_prefix="api")

    def test_require_and_resolve_use_the_registry(self):
        db = object()
        specter.registry.provide("db", db)
        self.addCleanup(specter.registry.unregister, "db")
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
        self.addCleanup(specter.registry.unregister, "socket_ingress")
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
        self.addCleanup(specter.registry.unregister, "socket_ingress")
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
        self.addCleanup(specter.registry.unregister, "sessions")
        handler = ChatHandler()
        self.assertIs(handler.require("sessions"), store)
        self.assertIs(handler.resolve("sessions"), store)
        self.assertIsNone(handler.resolve("nothing"))
        with self.assertRaises(KeyError):
            handler.require("nothing")

    def test_class_defaults_are_unnamed_handler_and_no_events(self):
        self.assertEqual((Handler.name, Handler.events), ("unnamed_handler", {}))
        handler = Handler()
        self.assertEqual(handler.name, "unnamed_handler")
        self.assertEqual(handler.health()["events"], [])
        self.assertEqual(ChatHandler().name, "chat")

        class PresenceHandler(Handler):
            pass
        self.assertEqual(PresenceHandler().name, "presence_handler")

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

    def test_a_connect_handler_refusing_the_client_is_not_logged_as_a_failure(self):
        import flask_socketio
        app, sio, ingress = self.make()
        errors = []
        ingress.subscribe_error_default(errors.append)

        def authenticate(auth=None):
            if not auth:
                raise flask_socketio.ConnectionRefusedError("send a token")
            if auth.get("token") != "good":
                raise ConnectionRefusedError("bad token")
        ingress.subscribe("connect", authenticate)

        @sio.on("connect", namespace="/plain")
        def plain(auth=None):
            raise ConnectionRefusedError("plain says no")
        with captured_logs() as records:
            self.assertFalse(sio.test_client(app).is_connected())
            self.assertFalse(sio.test_client(app, auth={"token": "bad"}).is_connected())
            self.assertFalse(sio.test_client(app, namespace="/plain").is_connected("/plain"))
            self.assertTrue(sio.test_client(app, auth={"token": "good"}).is_connected())
        self.assertEqual([r.getMessage() for r in records if r.levelno >= logging.WARNING], [])
        self.assertEqual(errors, [])

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

    def test_an_attached_ingress_is_the_socketios_default_error_handler(self):
        app, sio, ingress = self.make()
        errors = []
        ingress.subscribe_error_default(lambda exc: errors.append(exc))
        failure = KeyError("no such room")

        @sio.on("plain")
        def plain(data):
            raise failure

        @sio.on("plain", namespace="/admin")
        def plain_admin(data):
            raise ValueError("admins only")
        client = sio.test_client(app)
        with self.assertLogs("specter", "ERROR") as logs:
            ack = client.emit("plain", 1, callback=True)
        self.assertEqual(errors, [failure])
        self.assertEqual(ack, {"ok": False, "status": 500, "error": "Internal server error", "value": None})
        self.assertLoggedException(logs, "no such room")
        client.connect(namespace="/admin")
        with self.assertLogs("specter", "ERROR"):
            client.emit("plain", 2, namespace="/admin", callback=True)
        self.assertEqual([type(exc) for exc in errors], [KeyError, ValueError])
        ingress.subscribe_error_default(lambda exc: {"ok": False, "error": "try again", "status": 503})
        with self.assertLogs("specter", "ERROR"):
            ack = client.emit("plain", 3, callback=True)
        self.assertEqual(ack, {"ok": False, "error": "try again", "status": 503})

    def test_a_booted_managers_ingress_gets_errors_of_plain_handlers(self):
        app, sio = make_web_app()
        seen = []

        @sio.on_error_default
        def apps_own(exc):
            seen.append(("app", str(exc)))
            return {"handled_by": "app"}

        @sio.on("plain")
        def plain(data):
            raise RuntimeError("plain failed")
        manager = boot(app, sio, signals=False)
        self.addCleanup(manager.shutdown)
        manager.socket_ingress.subscribe_error_default(lambda exc: seen.append(("ingress", str(exc))))
        with self.assertLogs("specter", "ERROR"):
            ack = sio.test_client(app).emit("plain", None, callback=True)
        self.assertEqual(seen, [("app", "plain failed"), ("ingress", "plain failed")])
        self.assertEqual(ack, {"handled_by": "app"})

    def test_a_plain_connect_handler_that_raises_refuses_the_client(self):
        app, sio, ingress = self.make()

        @sio.on("connect")
        def check(auth=None):
            raise KeyError("session store down")
        with self.assertLogs("specter", "ERROR"):
            self.assertFalse(sio.test_client(app).is_connected())

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

    def test_subscribers_changed_during_a_dispatch_take_effect_from_the_next_one(self):
        _, _, ingress = self.make()
        calls = []

        def late(data):
            calls.append(("late", data))

        def second(data):
            calls.append(("second", data))

        def first(data):
            calls.append(("first", data))
            if data == 1:
                ingress.subscribe("job", late, priority=5)
                ingress.unsubscribe("job", second)
        ingress.subscribe("job", first, priority=1)
        ingress.subscribe("job", second, priority=2)
        ingress.dispatch("job", 1)
        self.assertEqual(calls, [("first", 1), ("second", 1)])
        calls.clear()
        ingress.dispatch("job", 2)
        self.assertEqual(calls, [("first", 2), ("late", 2)])

    def test_order_holds_as_subscribers_come_and_go(self):
        _, _, ingress = self.make()
        order = []
        removers = {}
        for label, priority in (("a", 20), ("b", 10), ("c", 20), ("d", 10)):
            removers[label] = ingress.subscribe("job", lambda data, label=label: order.append(label),
                                                priority=priority)
        removers["d"]()
        ingress.subscribe("job", lambda data: order.append("e"), priority=10)   # after b, the older tie
        ingress.subscribe("job", lambda data: order.append("f"), priority=15)
        removers["a"]()
        ingress.dispatch("job", None)
        self.assertEqual(order, ["b", "e", "f", "c"])
        self.assertEqual(ingress.health()["events"], {"/ job": 4})

    def test_dispatch_fails_connect_closed_whatever_the_arguments(self):
        _, _, ingress = self.make()
        ran = []
        ingress.subscribe("connect", lambda *args, **kwargs: False, priority=1)
        ingress.subscribe("connect", lambda *args, **kwargs: ran.append(args), priority=2)
        for args, kwargs in (((), {}), (({"token": 1},), {}), (({"token": 1}, "extra"), {}), ((), {"flag": 1})):
            with self.subTest(args=args, kwargs=kwargs):
                self.assertIs(ingress.dispatch("connect", *args, **kwargs), False)
        ingress.clear()

        def crash(*args, **kwargs):
            raise KeyError("session store down")
        ingress.subscribe("connect", crash, priority=1)
        ingress.subscribe("connect", lambda *args, **kwargs: ran.append(args), priority=2)
        for args, kwargs in (((), {}), (({"token": 1},), {}), ((), {"flag": 1})):
            with self.subTest(args=args, kwargs=kwargs):
                with self.assertLogs("specter", "ERROR"):
                    self.assertIs(ingress.dispatch("connect", *args, **kwargs), False)
        self.assertEqual(ran, [])

    def test_dispatch_to_a_bad_namespace_is_a_value_error(self):
        _, _, ingress = self.make()
        ingress.subscribe("job", lambda data: "ok")
        for bad in ("job", "", None, ["/"]):
            with self.subTest(namespace=bad):
                with self.assertRaisesRegex(ValueError, "namespace must start with '/'"):
                    ingress.dispatch("job", 1, namespace=bad)

    def test_a_failing_subscriber_is_logged_under_its_own_name_with_a_schema_too(self):
        app, sio, ingress = self.make()
        schema = Schema("job", {"n": Field(int, required=True)})

        def count_jobs(data):
            raise LookupError("no queue for %d" % data["n"])
        ingress.subscribe("job", count_jobs, schema=schema)
        with self.assertLogs("specter", "ERROR") as logs:
            ack = sio.test_client(app).emit("job", {"n": "3"}, callback=True)
        self.assertEqual(ack, {"error": "Internal server error", "ok": False, "status": 500, "value": None})
        self.assertIn("count_jobs", logs.output[0])
        self.assertIn("LookupError: no queue for 3", logs.output[0])


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

    def test_create_handler_and_build_handler_build_once_and_return_the_same_handler(self):
        handlers = []

        class Jobs(EchoController):
            def build_events(self, handler):
                handlers.append(handler)
                super().build_events(handler)
        ctl = Jobs()
        self.addCleanup(ctl.stop)
        self.assertFalse(ctl.health()["has_handler"])
        handler = ctl.create_handler()
        self.assertIsInstance(handler, Handler)
        self.assertEqual(handler.name, "echo")
        self.assertIs(ctl.create_handler(), handler)
        self.assertTrue(ctl.health()["has_handler"])
        app, sio = make_web_app()
        self.assertIs(ctl.build_handler(sio), handler)
        self.assertTrue(handler.registered)
        self.assertIs(ctl.build_handler(), handler)
        self.assertIs(ctl.create_handler(), handler)
        self.assertEqual(handlers, [handler])
        self.assertIs(ctl.socketio, sio)
        ctl.start()
        self.assertEqual(sio.test_client(app).emit("echo", 9, callback=True), {"echo": 9})
        fresh = Jobs()
        self.addCleanup(fresh.stop)
        self.assertIs(fresh.build_handler(), fresh.create_handler())

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
        self.addCleanup(specter.registry.unregister, "db")
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

    def test_a_connect_check_refuses_every_client_while_its_controller_is_not_running(self):
        ctl = TokenController()
        self.addCleanup(ctl.stop)
        app, sio = make_web_app()
        ctl.build_handler(sio)

        def admits(token):
            return sio.test_client(app, auth={"token": token}).is_connected()
        self.assertFalse(admits("s3cret"))            # set up, not started yet
        ctl.start()
        self.assertEqual((admits("s3cret"), admits("guess")), (True, False))
        member = sio.test_client(app, auth={"token": "s3cret"})
        ctl.stop()
        self.assertFalse(admits("s3cret"))            # stopped: the check cannot run, so no one gets in
        self.assertIn(member.emit("echo", 1, callback=True), (None, []))   # other events: not delivered
        self.assertTrue(member.is_connected())
        ctl.start()
        self.assertEqual((admits("s3cret"), admits("guess")), (True, False))
        self.assertEqual(member.emit("echo", 2, callback=True), {"echo": 2})
        self.assertEqual(ctl.checked, ["s3cret", "guess", "s3cret", "s3cret", "guess"])   # none while stopped

    def test_a_stopped_controller_refuses_clients_through_the_manager(self):
        app, sio = make_web_app()
        ctl = TokenController()
        manager = ServiceManager(app, sio, signals=False)
        self.addCleanup(manager.shutdown)
        manager.register_controller(ctl)
        manager.boot()
        app_wide = []
        manager.socket_ingress.on("connect", lambda auth=None: app_wide.append(auth["token"]), priority=200)

        def admits(token):
            return sio.test_client(app, auth={"token": token}).is_connected()
        self.assertTrue(admits("s3cret"))
        for _ in range(2):                            # a restart replaces the guard, never adds one
            ctl.stop()
            self.assertFalse(admits("s3cret"))
            self.assertEqual(manager.socket_ingress.health()["events"]["/ connect"], 2)
            ctl.start()
            self.assertTrue(admits("s3cret"))
            self.assertEqual(manager.socket_ingress.health()["events"]["/ connect"], 2)
        self.assertEqual(app_wide, ["s3cret"] * 3)   # a refused client goes no further

    def test_a_handler_of_an_overridden_create_handler_is_gated_too(self):
        class Door(Handler):
            events = {"connect": "check"}

            def check(self, auth=None):
                return bool(auth)

        class Custom(Controller):
            name = "custom"

            def create_handler(self):
                return Door("door")
        ctl = Custom()
        self.addCleanup(ctl.stop)
        app, sio = make_web_app()
        ctl.build_handler(sio)
        self.assertFalse(sio.test_client(app, auth={"token": 1}).is_connected())
        ctl.start()
        self.assertTrue(sio.test_client(app, auth={"token": 1}).is_connected())
        self.assertFalse(sio.test_client(app).is_connected())

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
        self.assertEqual(manager.health()["services"]["items"]["name"], "items")
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

    def test_register_service_owns_services_that_compare_equal_each_in_its_own_right(self):
        class Same(Service):
            def __eq__(self, other):
                return isinstance(other, Same)

            __hash__ = Service.__hash__

        first, second = Same("a"), Same("b")
        manager = ServiceManager(signals=False)
        manager.register_service(first).register_service(second)
        manager.boot()
        self.assertTrue(first.running and second.running)
        manager.shutdown()
        self.assertFalse(first.running or second.running)

    def test_register_calls_return_the_manager_so_they_chain(self):
        log = []
        manager = self.manager()
        service, handler, ctl = RecordingService("a", log), RecordingHandler("h", log), EchoController()
        self.assertIs(manager.register_service(service), manager)
        self.assertIs(manager.register_handler(handler), manager)
        self.assertIs(manager.register_controller(ctl, url_prefix="/echo"), manager)
        chained = self.manager()
        returned = (chained.register_service(RecordingService("b", log))
                    .register_handler(RecordingHandler("h2", log))
                    .register_controller(EchoController(), url_prefix="/echo")
                    .boot())
        self.assertIs(returned, chained)
        self.assertEqual(log, ["start:b", "setup:h2"])
        self.assertEqual(chained.app.test_client().get("/echo/ping").get_json(), {"pong": True, "by": "echo"})
        self.assertIs(chained.register_service(service), chained)  # booted: starts at once
        self.assertTrue(service.running)

    def test_registry_holds_manager_and_ingress_until_shutdown(self):
        manager = self.manager()
        manager.boot()
        self.assertIs(specter.registry.require("service_manager"), manager)
        self.assertIs(specter.registry.require("socket_ingress"), manager.socket_ingress)
        self.assertIs(specter.registry.require("socketio"), manager.socketio)
        specter.registry.provide("extra", 1)
        manager.shutdown()
        for key in ("service_manager", "socket_ingress", "socketio", "extra"):
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
        slow = Slow()
        manager.register_service(slow)
        manager.boot()
        first = gevent.spawn(manager.shutdown)
        gevent.sleep(0.01)
        self.assertEqual(slow.status, "stopping")
        manager.shutdown()
        self.assertEqual((slow.status, manager.booted), ("stopped", False))
        first.join()

    def test_shutdown_during_boot_stops_the_boot_and_releases_what_it_started(self):
        log = []
        gate = gevent.event.Event()

        class Slow(RecordingService):
            def on_start(self):
                super().on_start()
                self.spawn(gevent.sleep, LONG)
                gate.wait(LONG)  # a start that takes its time (a database coming up, say)
        manager = self.manager()
        first, slow, last = RecordingService("first", log), Slow("slow", log), RecordingService("last", log)
        manager.register_service(first).register_service(slow).register_service(last)
        handler = RecordingHandler("h", log)
        manager.register_handler(handler)
        before = live_greenlets()
        booting = gevent.spawn(manager.boot)
        self.assertTrue(wait_until(lambda: slow.status == "starting"))
        started = time.monotonic()
        self.assertIs(manager.shutdown(), manager)
        self.assertLess(time.monotonic() - started, 1.0, "shutdown() waited for the slow start to finish")
        self.assertEqual(log, ["start:first", "start:slow", "stop:first"])
        self.assertEqual((first.status, slow.status, last.status), ("stopped", "stopped", "created"))
        self.assertFalse(handler.registered)
        self.assertFalse(manager.running or manager.booted)
        self.assertEqual(specter.registry.list(), [])
        self.assertIs(booting.get(timeout=WAIT), manager)
        gate.set()
        gevent.sleep(0)
        self.assertEqual(last.status, "created", "boot() went on starting services after shutdown()")
        self.assertNoNewGreenlets(before)

    def test_shutdown_from_an_on_start_cancels_the_rest_of_the_boot(self):
        log = []
        manager = self.manager()

        class Quitter(RecordingService):
            def on_start(self):
                super().on_start()
                manager.shutdown()  # e.g. a fatal configuration error found while starting
        first, quitter, last = RecordingService("first", log), Quitter("quitter", log), RecordingService("last", log)
        manager.register_service(first).register_service(quitter).register_service(last)
        self.assertIs(manager.boot(), manager)
        self.assertEqual(log, ["start:first", "start:quitter", "stop:first", "stop:quitter"])
        self.assertEqual((first.status, quitter.status, last.status), ("stopped", "stopped", "created"))
        self.assertFalse(manager.running or manager.booted)
        self.assertEqual(specter.registry.list(), [])

    def test_a_later_shutdown_is_not_a_no_op_while_work_remains(self):
        log = []
        manager = self.manager()
        worker = RecordingService("worker", log)
        manager.register_service(worker)
        manager.boot()
        manager.shutdown()
        worker.start()  # restarted by hand after the app was shut down
        manager.shutdown()
        self.assertEqual(log, ["start:worker", "stop:worker", "start:worker", "stop:worker"])
        self.assertFalse(worker.running)
        manager.shutdown()
        self.assertEqual(len(log), 4)

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
        fast = Service("fast")
        manager.register_service(fast).register_service(Slow())
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
        parent = health["services"]["parent"]
        self.assertEqual(parent["status"], "ok")
        self.assertEqual([c["name"] for c in parent["children"]], ["child"])
        self.assertEqual(parent["children"][0]["status"], "ok")
        self.assertIn("parent.model", [r.get("name") for r in parent["resources"]])
        self.assertEqual(list(health["handlers"]), ["h"])
        manager.shutdown()
        self.assertEqual(manager.health()["status"], "stopped")

    def test_health_keys_services_and_handlers_by_name(self):
        class Bare:
            """A handler with setup/teardown and nothing else."""
            registered = False

            def setup(self, socketio=None):
                self.registered = True

            def teardown(self):
                self.registered = False
        manager = self.manager()
        db, search = Service("db"), EchoController("search")
        manager.register_service(db).register_controller(search).register_handler(RecordingHandler("h", []))
        bare = Bare()
        manager.register_service(Service("db")).register_handler(bare)
        manager.boot()
        health = manager.health()
        self.assertIsInstance(health["services"], dict)
        self.assertEqual(list(health["services"]), ["db", "search", "db#2"])
        self.assertEqual(health["services"]["db"], db.health())
        self.assertEqual(health["services"]["search"]["has_handler"], True)
        self.assertIsInstance(health["handlers"], dict)
        self.assertEqual(list(health["handlers"]), ["search", "h", repr(bare)])
        self.assertTrue(all(h["registered"] is True for h in health["handlers"].values()))
        json.dumps(health)
        manager.shutdown()
        self.assertTrue(all(h["registered"] is False for h in manager.health()["handlers"].values()))

    def test_health_is_degraded_while_a_service_is_down(self):
        manager = self.manager()
        worker = Service("worker")
        manager.register_service(worker)
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


class TestAppFactory(SpecterTestCase):
    """ServiceManager(app=None) + init_app(app): the Flask app-factory pattern."""

    def test_init_app_binds_a_manager_made_before_the_app(self):
        manager = ServiceManager(signals=False)
        self.addCleanup(manager.shutdown)
        echo = EchoController()
        manager.register_controller(echo, url_prefix="/echo")
        app, sio = make_web_app()

        @app.route("/refuse")
        def refuse():
            raise HTTPError("no", 409)
        self.assertIs(manager.init_app(app, sio), manager)
        self.assertIs(app.extensions["specter"], manager)
        self.assertEqual((manager.app, manager.socketio), (app, sio))
        http = app.test_client()
        self.assertEqual(http.get("/echo/ping").status_code, 503)  # mounted, not running yet
        manager.boot()
        self.assertEqual(http.get("/echo/ping").get_json(), {"pong": True, "by": "echo"})
        self.assertEqual((http.get("/refuse").status_code, http.get("/refuse").get_json()), (409, {"error": "no"}))
        self.assertEqual(sio.test_client(app).emit("echo", 7, callback=True), {"echo": 7})
        self.assertEqual(echo.calls, [7])

    def test_init_app_finds_the_socketio_already_on_the_app(self):
        manager = ServiceManager(signals=False)
        app, sio = make_web_app()
        manager.init_app(app)
        self.assertIs(manager.socketio, sio)
        self.assertIs(manager.socket_ingress.socketio, sio)

    def test_init_app_before_socketio_init_app_still_delivers_socket_events(self):
        manager = ServiceManager(signals=False)
        self.addCleanup(manager.shutdown)
        manager.register_controller(EchoController())
        socketio_ext = SocketIO()
        app = Flask(__name__)
        manager.init_app(app)  # the factory binds SPECTER first ...
        socketio_ext.init_app(app, async_mode="gevent")  # ... and Flask-SocketIO after
        manager.boot()
        self.assertIs(manager.socketio, socketio_ext)
        self.assertIs(specter.registry.require("socketio"), socketio_ext)
        self.assertEqual(socketio_ext.test_client(app).emit("echo", 5, callback=True), {"echo": 5})

    def test_init_app_binds_one_app_only(self):
        manager = ServiceManager(signals=False)
        app, _ = make_web_app()
        manager.init_app(app)
        self.assertIs(manager.init_app(app), manager)  # the same app again: nothing to do
        with self.assertRaisesRegex(RuntimeError, "already bound to the app"):
            manager.init_app(make_web_app()[0])
        with self.assertRaisesRegex(TypeError, "init_app\\(\\) takes a Flask app, got str"):
            ServiceManager(signals=False).init_app("app")

    def test_a_manager_without_an_app_boots_and_warns_about_unmounted_routes(self):
        manager = ServiceManager(signals=False)
        self.addCleanup(manager.shutdown)
        echo = EchoController()
        manager.register_controller(echo)
        log = []
        manager.register_service(RecordingService("plain", log))
        with self.assertLogs("specter.web", "WARNING") as cm:
            manager.boot()
        self.assertEqual(len(cm.records), 1)
        self.assertIn("echo", cm.output[0])
        self.assertIn("manager.init_app(app)", cm.output[0])
        self.assertEqual((echo.status, log), ("running", ["start:plain"]))
        self.assertEqual(manager.socket_ingress.dispatch("echo", 3), {"echo": 3})  # events still work

    def test_no_warning_when_the_controller_routes_were_mounted_by_hand(self):
        manager = ServiceManager(signals=False)
        self.addCleanup(manager.shutdown)
        echo = EchoController()
        manager.register_controller(echo)
        app, _ = make_web_app()
        app.register_blueprint(echo.build_blueprint())
        with captured_logs("specter.web") as records:
            manager.boot()
        self.assertEqual([r for r in records if r.levelno >= logging.WARNING], [])


class TestFlaskCLI(SpecterTestCase):
    """`flask specter routes | schemas | run` on the bound app's cli."""

    def chat_app(self, **kwargs):
        """A manager with a controller, a router, a handler and plain views, bound by init_app."""
        manager = ServiceManager(signals=False, **kwargs)
        self.addCleanup(manager.shutdown)
        manager.register_controller(CliChat(), url_prefix="/chat")
        manager.register_handler(RecordingHandler("presence", []))
        app, sio = make_web_app()
        JobsRouter().register(app)

        @app.post("/feedback")
        @json_endpoint("Could not record the feedback")
        def feedback():
            return {}

        @app.get("/about")
        def about():
            return "about"
        manager.init_app(app, sio)
        return manager, app

    def rows(self, output, title):
        """The rows of the table under ``title`` in ``output``, each split into its cells."""
        lines = output.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith(title))
        table = []
        for line in lines[start + 2:]:
            if not line.strip():
                break
            table.append(re.split(r"\s{2,}", line.strip()))
        return table

    def test_routes_lists_every_http_route_and_socket_event(self):
        manager, app = self.chat_app(probes=True)
        manager.socket_ingress.subscribe("typing", ack_typing, priority=5)
        result = app.test_cli_runner().invoke(args=["specter", "routes"])
        self.assertEqual(result.exit_code, 0, result.output)
        self.assertEqual(self.rows(result.output, "HTTP routes"), [
            ["RULE", "METHODS", "OWNER", "ERRORS"],
            ["/about", "GET", "app", "html"],
            ["/chat/rooms/<room>/messages", "GET", "cli_chat (controller)", "json"],
            ["/chat/rooms/<room>/messages", "POST", "cli_chat (controller)", 'json "Could not post"'],
            ["/feedback", "POST", "app", 'json "Could not record the feedback"'],
            ["/jobs/all", "GET", "jobs (router)", "json"],
            ["/jobs/boom", "GET", "jobs (router)", 'json "Jobs are unavailable"'],
            ["/jobs/list", "GET", "jobs (router)", "json"],
            ["/jobs/list", "POST", "jobs (router)", "json"],
            ["/jobs/taken", "GET", "jobs (router)", "json"],
            ["/livez", "GET", "specter (probe)", "json"],
            ["/readyz", "GET", "specter (probe)", "json"],
            ["/static/<path:filename>", "GET", "flask (static files)", "html"],
        ])
        self.assertEqual(self.rows(result.output, "Socket events"), [
            ["NAMESPACE", "EVENT", "PRIORITY", "OWNER", "CALLBACK", "SCHEMA"],
            ["/", "ping", "100", "presence", "RecordingHandler.ping", "-"],
            ["/", "send_message", "10", "cli_chat", "CliChat.audit", "-"],
            ["/", "send_message", "50", "cli_chat", "CliChat.send", "message"],
            ["/", "typing", "5", "(ingress)", "ack_typing", "-"],
        ])
        self.assertIn("HTTP routes (12)", result.output)
        self.assertFalse(manager.booted, "listing routes boots nothing")

    def test_routes_reads_the_ingress_once_booted(self):
        manager, app = self.chat_app()
        manager.boot()
        result = app.test_cli_runner().invoke(args=["specter", "routes"])
        events = self.rows(result.output, "Socket events")
        self.assertIn(["/", "send_message", "50", "cli_chat", "CliChat.send", "message"], events)
        self.assertEqual(len(events), 4)  # the header and each subscriber once

    def test_schemas_prints_the_json_schema_of_every_schema_or_one(self):
        _, app = self.chat_app()
        runner = app.test_cli_runner()
        everything = runner.invoke(args=["specter", "schemas"])
        self.assertEqual(everything.exit_code, 0, everything.output)
        self.assertEqual(json.loads(everything.output), {
            "message": CliChat.schemas["message"].to_json_schema(),
            "typing": CliChat.schemas["typing"].to_json_schema(),
        })
        one = runner.invoke(args=["specter", "schemas", "typing"])
        self.assertEqual(json.loads(one.output), CliChat.schemas["typing"].to_json_schema())
        unknown = runner.invoke(args=["specter", "schemas", "nope"])
        self.assertEqual(unknown.exit_code, 2)
        self.assertIn("no schema named 'nope'; known: message, typing", unknown.output)

    def test_flask_specter_run_serves_until_sigterm(self):
        workdir = tempfile.mkdtemp(prefix="specter-cli-")
        self.addCleanup(shutil.rmtree, workdir, True)
        with open(os.path.join(workdir, "cliapp.py"), "w") as f:
            f.write(CLI_APP)
        port = free_port()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join((workdir, SPECTER_DIR)), FLASK_APP="cliapp:create_app")
        errors_path = os.path.join(workdir, "stderr.txt")
        with open(errors_path, "w") as errors:
            child = gevent.subprocess.Popen(
                [sys.executable, "-m", "flask", "specter", "run", "--port", str(port)], cwd=workdir, env=env,
                stdout=gevent.subprocess.PIPE, stderr=errors, universal_newlines=True, start_new_session=True)
        self.addCleanup(self.kill_group, child)

        def stderr():
            with open(errors_path) as f:
                return f.read()
        url = "http://127.0.0.1:%d" % port
        ready = wait_until(lambda: child.poll() is not None or http_status(url + "/readyz") == 200,
                           timeout=CLIENT_TIMEOUT, step=0.02)
        self.assertTrue(ready and child.poll() is None, "the app never became ready: %s" % stderr())
        self.assertEqual(http_status(url + "/work"), 200)
        worker_pid = int(http_body(url + "/work"))
        self.assertFalse(pid_gone(worker_pid))
        child.send_signal(signal.SIGTERM)
        try:
            code = child.wait(timeout=CLIENT_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
        self.assertEqual(code, 0, stderr())
        out = child.stdout.read()
        self.assertIn("serving on http://127.0.0.1:%d" % port, out)
        self.assertIn("stopped cleanly", out)
        self.assertNotIn("Traceback", stderr())
        self.assertTrue(wait_until(lambda: pid_gone(worker_pid), timeout=CLIENT_TIMEOUT))
        self.assertEqual(process_group_members(child.pid), [], "a process of the group outlived it")

    def kill_group(self, child):
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        for pid in process_group_members(child.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        child.stdout.close()


class CliChat(Controller):
    """A controller with routes, prioritised events and two schemas, for the CLI tests."""

    name = "cli_chat"
    schemas = {
        "message": Schema("message", {"text": Field(str, required=True)}),
        "typing": Schema("typing", {"author": Field(str, required=True)}),
    }

    def build_routes(self, router):
        @router.route("/rooms/<room>/messages", methods=["POST"], json_errors="Could not post")
        def post(room):
            return {}, 201

        @router.route("/rooms/<room>/messages")
        def listing(room):
            return []

    def build_events(self, handler):
        handler.on("send_message", self.audit, priority=10)
        handler.on("send_message", self.send, priority=50, schema=self.schema("message"))

    def audit(self, data):
        return None

    def send(self, data):
        return data


def ack_typing(data):
    return {"ok": True}


# A factory app for `flask specter run`: a module-level manager, a worker process.
CLI_APP = textwrap.dedent("""
    import flask
    from flask_socketio import SocketIO

    import specter

    manager = specter.ServiceManager(probes=True)


    class Worker(specter.Service):
        def on_start(self):
            self.proc = self.start_process(["sleep", "60"])

        def on_stop(self):
            print("stopped cleanly", flush=True)


    worker = Worker()
    manager.register_service(worker)


    def create_app():
        app = flask.Flask(__name__)
        SocketIO(app, async_mode="gevent")

        @app.route("/work")
        def work():
            return str(worker.proc.pid)
        manager.init_app(app)
        return app
""")


def http_status(url):
    """The status of GET ``url`` from a native thread (0 when nothing answers)."""
    def fetch():
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0
    return gevent.get_hub().threadpool.spawn(fetch).get()


def http_body(url):
    def fetch():
        with urllib.request.urlopen(url, timeout=CLIENT_TIMEOUT) as response:
            return response.read().decode()
    return gevent.get_hub().threadpool.spawn(fetch).get()


def process_group_members(pgid):
    """Live (non-zombie) processes whose process group is ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, "rb") as stat:
                fields = stat.read().rpartition(b")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(entry))
    return members


class TestProbes(SpecterTestCase):
    """boot(..., probes=True | '/prefix'): GET /livez and /readyz through a whole lifecycle."""

    def test_readyz_follows_the_lifecycle_and_livez_stays_up(self):
        app, sio = make_web_app()
        release = gevent.event.Event()

        class Flaky(Service):
            restart_backoff = 0.001

            def on_start(self):
                self.supervise(self.crash, max_restarts=2)

            def crash(self):
                release.wait(WAIT)
                raise RuntimeError("secret database password in this message")

        class SlowStop(Service):
            def on_stop(self):
                stopping.set()
                proceed.wait(WAIT)
        stopping, proceed = gevent.event.Event(), gevent.event.Event()
        manager = ServiceManager(app, sio, signals=False, probes=True)
        self.addCleanup(manager.shutdown)
        manager.register_service(SlowStop("slow"))
        flaky = Flaky("flaky")
        manager.register_service(flaky)
        http = app.test_client()

        def probe(path):
            response = http.get(path)
            self.assertEqual(response.headers["Cache-Control"], "no-store")
            return response.status_code, response.get_json()
        self.assertEqual(probe("/readyz"), (503, {"status": "starting",
                                                  "services": {"slow": "created", "flaky": "created"}}))
        self.assertEqual(probe("/livez"), (200, {"status": "ok"}))
        manager.boot()
        self.assertEqual(probe("/readyz"), (200, {"status": "ok",
                                                  "services": {"slow": "running", "flaky": "running"}}))
        with captured_logs():
            release.set()
            self.assertEventually(lambda: flaky.status == "failed")
        status, body = probe("/readyz")
        self.assertEqual((status, body["status"], body["services"]["flaky"]), (503, "failed", "failed"))
        self.assertNotIn("password", json.dumps(body))
        self.assertEqual(probe("/livez"), (200, {"status": "ok"}))
        shutting = gevent.spawn(manager.shutdown)
        self.assertTrue(stopping.wait(WAIT))
        self.assertEqual(probe("/readyz")[:1] + (probe("/readyz")[1]["status"],), (503, "stopping"))
        proceed.set()
        shutting.get(timeout=WAIT)
        self.assertEqual(probe("/readyz"), (503, {"status": "stopped",
                                                  "services": {"slow": "stopped", "flaky": "stopped"}}))

    def test_a_stopped_controller_makes_readyz_degraded(self):
        app, sio = make_web_app()
        echo = EchoController()
        manager = boot(app, sio, controllers=[echo], signals=False, probes=True)
        self.addCleanup(manager.shutdown)
        echo.stop()
        response = app.test_client().get("/readyz")
        self.assertEqual((response.status_code, response.get_json()["status"]), (503, "degraded"))

    def test_readyz_lists_services_of_one_name_as_health_does(self):
        app, sio = make_web_app()
        first, second = Service("worker"), Service("worker")
        manager = boot(app, sio, services=[first, second], signals=False, probes=True)
        self.addCleanup(manager.shutdown)
        first.stop()
        response = app.test_client().get("/readyz")
        self.assertEqual((response.status_code, response.get_json()),
                         (503, {"status": "degraded", "services": {"worker": "stopped", "worker#2": "running"}}))
        self.assertEqual(list(manager.health()["services"]), ["worker", "worker#2"])

    def test_readyz_says_stopping_while_a_failed_boot_rolls_back(self):
        app, sio = make_web_app()
        rolling_back, proceed = gevent.event.Event(), gevent.event.Event()

        class SlowStop(Service):
            def on_stop(self):
                rolling_back.set()
                proceed.wait(WAIT)

        class Broken(Service):
            def on_start(self):
                raise RuntimeError("no database")
        manager = ServiceManager(app, sio, signals=False, probes=True)
        self.addCleanup(manager.shutdown)
        manager.register_service(SlowStop("slow")).register_service(Broken("broken"))
        def boot_and_fail():
            with captured_logs(), self.assertRaisesRegex(RuntimeError, "no database"):
                manager.boot()
        booting = gevent.spawn(boot_and_fail)
        self.assertTrue(rolling_back.wait(WAIT))
        response = app.test_client().get("/readyz")
        self.assertEqual((response.status_code, response.get_json()["status"]), (503, "stopping"))
        proceed.set()
        booting.get(timeout=WAIT)
        self.assertEqual(app.test_client().get("/readyz").get_json()["status"], "stopped")

    def test_probes_answer_for_the_manager_bound_to_the_app_last(self):
        app, sio = make_web_app()
        boot(app, sio, signals=False, probes=True).shutdown()  # an earlier manager on the same app
        later = boot(app, sio, services=[Service("worker")], signals=False, probes=True)
        self.addCleanup(later.shutdown)
        response = app.test_client().get("/readyz")
        self.assertEqual((response.status_code, response.get_json()),
                         (200, {"status": "ok", "services": {"worker": "running"}}))

    def test_probes_under_a_prefix(self):
        app, sio = make_web_app()
        manager = boot(app, sio, signals=False, probes="/ops/")
        self.addCleanup(manager.shutdown)
        http = app.test_client()
        self.assertEqual(http.get("/ops/livez").status_code, 200)
        self.assertEqual(http.get("/ops/readyz").status_code, 200)
        self.assertEqual(http.get("/livez").status_code, 404)

    def test_probes_are_off_by_default_and_checked(self):
        app, sio = make_web_app()
        manager = boot(app, sio, signals=False)
        self.addCleanup(manager.shutdown)
        self.assertEqual(app.test_client().get("/livez").status_code, 404)
        with self.assertRaisesRegex(ValueError, "probes must be True, False or a path prefix starting with '/'"):
            ServiceManager(probes="ops")


# A view that blocks the whole process the way a forgotten blocking call does.
def blocking_view(started):
    started.set()
    time.sleep(0.4)  # the blocking call under test
    return "done"


class TestLoopMonitor(SpecterTestCase):
    """boot(..., block_threshold=s): gevent's monitor thread catches a real blocking call."""

    threshold = 0.1

    def test_a_blocking_call_is_logged_counted_announced_and_fails_livez(self):
        self.assertFalse(gevent.monkey.is_anything_patched(), "time.sleep must really block here")
        app, sio = make_web_app()
        started = threading.Event()  # set from the hub, waited on by a native thread
        app.add_url_rule("/block", "block", functools.partial(blocking_view, started))
        announced = Recorder()
        self.addCleanup(specter.bus.on("loop:blocked", announced))
        manager = boot(app, sio, signals=False, probes=True, block_threshold=self.threshold)
        self.addCleanup(manager.shutdown)
        self.assertEqual(manager.health()["loop"], {"monitor": True, "threshold": self.threshold, "blocked": 0,
                                                    "longest": 0.0, "last_stack": None})
        server = pywsgi.WSGIServer(("127.0.0.1", 0), app, log=None)
        server.start()
        self.addCleanup(server.stop, timeout=1)
        url = "http://127.0.0.1:%d" % server.server_port
        pool = gevent.get_hub().threadpool

        def livez_during_the_block():
            if not started.wait(CLIENT_TIMEOUT):
                return None
            return http_status_now(url + "/livez")
        with self.assertLogs("specter.loop", "WARNING") as cm:
            during = pool.spawn(livez_during_the_block)
            self.assertEqual(http_status(url + "/block"), 200)
            self.assertEqual(during.get(), 503)
        self.assertEqual(len(cm.records), 1, cm.output)
        self.assertIn("the event loop is blocked", cm.output[0])
        self.assertIn("time.sleep(0.4)  # the blocking call under test", cm.output[0])
        self.assertIn("in blocking_view", cm.output[0])
        self.assertTrue(wait_until(lambda: announced.count == 1))
        loop = manager.health()["loop"]
        self.assertEqual(loop["blocked"], 1)
        self.assertGreaterEqual(loop["longest"], 0.4)  # from the loop's last poll to its next
        self.assertLess(loop["longest"], 0.4 + 1.0)
        self.assertIn("time.sleep(0.4)", loop["last_stack"])
        event = announced.firsts[0]
        self.assertEqual((event["threshold"], event["stack"], event["seconds"]),
                         (self.threshold, loop["last_stack"], loop["longest"]))
        self.assertTrue(wait_until(lambda: http_status(url + "/livez") == 200, timeout=WAIT, step=0.02))

    def test_shutdown_turns_the_monitor_off(self):
        hub = gevent.get_hub()
        self.assertIsNone(hub.periodic_monitoring_thread)
        saved = (gevent.config.monitor_thread, gevent.config.max_blocking_time)
        app, sio = make_web_app()
        manager = boot(app, sio, signals=False, block_threshold=0.25)
        self.addCleanup(manager.shutdown)
        self.assertIsNotNone(hub.periodic_monitoring_thread)
        self.assertEqual(gevent.config.max_blocking_time, 0.25)
        manager.shutdown()
        self.assertIsNone(hub.periodic_monitoring_thread)
        self.assertEqual((gevent.config.monitor_thread, gevent.config.max_blocking_time), saved)
        self.assertFalse(manager.health()["loop"]["monitor"])

    def test_the_monitor_works_when_boot_comes_before_the_hub_ever_ran(self):
        # A fresh process whose boot() (with a blocking on_start) runs before anything switched to the hub.
        with tempfile.TemporaryDirectory(prefix="specter-loop-") as workdir:
            script = os.path.join(workdir, "fresh.py")
            with open(script, "w") as f:
                f.write(FRESH_MONITOR_APP)
            child = gevent.subprocess.Popen([sys.executable, "-u", script], stdout=gevent.subprocess.PIPE,
                                            stderr=gevent.subprocess.PIPE, env=dict(os.environ, PYTHONPATH=SPECTER_DIR),
                                            universal_newlines=True, start_new_session=True)
            try:
                out, errors = child.communicate(timeout=CLIENT_TIMEOUT)
            finally:
                if child.poll() is None:
                    os.killpg(child.pid, signal.SIGKILL)
                    child.wait()
        self.assertEqual(child.returncode, 0, errors)
        words = out.split()
        self.assertEqual(words[::2], ["blocked", "thread"], errors)
        self.assertGreaterEqual(int(words[1]), 1, "the block after boot went unseen")  # the start's own may count too
        self.assertEqual(words[3], "True", "gevent's monitor thread ended")
        self.assertIn("the event loop is blocked", errors)

    def test_managers_share_the_monitor_until_the_last_one_shuts_down(self):
        hub = gevent.get_hub()
        self.assertIsNone(hub.periodic_monitoring_thread)
        saved = (gevent.config.monitor_thread, gevent.config.max_blocking_time, gevent.config.print_blocking_reports)
        first = ServiceManager(signals=False, name="first", block_threshold=0.1)
        second = ServiceManager(signals=False, name="second", block_threshold=0.2)
        self.addCleanup(first.shutdown)
        self.addCleanup(second.shutdown)
        first.boot()
        second.boot()
        self.assertEqual(gevent.config.max_blocking_time, 0.1, "the smallest threshold applies")
        first.shutdown()
        thread = hub.periodic_monitoring_thread
        self.assertTrue(thread is not None and thread.should_run, "the first shutdown ended the second's monitor")
        self.assertEqual(gevent.config.max_blocking_time, 0.2)
        with self.assertLogs("specter.loop", "WARNING"):
            # A real block; gevent sees one for sure once it spans a whole round (up to twice the threshold).
            gevent.spawn(time.sleep, 0.5).join()
            self.assertEventually(lambda: second.health()["loop"]["blocked"] == 1)
        second.shutdown()
        self.assertIsNone(hub.periodic_monitoring_thread)
        self.assertFalse(thread.should_run)
        self.assertEqual((gevent.config.monitor_thread, gevent.config.max_blocking_time,
                          gevent.config.print_blocking_reports), saved)

    def test_a_late_report_of_a_counted_block_is_not_another_block(self):
        import gevent.events
        manager = ServiceManager(signals=False, block_threshold=0.1)
        self.addCleanup(manager.shutdown)
        manager.boot()
        announced = Recorder()
        self.addCleanup(specter.bus.on("loop:blocked", announced))
        with self.assertLogs("specter.loop", "WARNING"):
            gevent.spawn(time.sleep, 0.3).join()  # one real block
            self.assertEventually(lambda: announced.count == 1)
        # gevent's monitor thread may finish its report of that block after the loop ran again.
        late = gevent.events.EventLoopBlocked(gevent.getcurrent(), 0.1, ["Blocked Stack (late)", "  time.sleep"],
                                              hub=gevent.get_hub())
        with captured_logs("specter.loop"):
            gevent.events.notify(late)
            gevent.sleep(0.05)
        self.assertEqual((manager.health()["loop"]["blocked"], announced.count), (1, 1))
        self.assertNotIn("(late)", manager.health()["loop"]["last_stack"] or "")

    def test_block_threshold_is_checked(self):
        with self.assertRaisesRegex(ValueError, "block_threshold must be greater than 0 seconds, got 0"):
            ServiceManager(block_threshold=0)
        with self.assertRaisesRegex(TypeError, "block_threshold must be a number of seconds"):
            boot(*make_web_app(), block_threshold="1")


# A process whose first act is a boot with the loop monitor and a blocking on_start; then a block to catch.
FRESH_MONITOR_APP = textwrap.dedent("""
    import logging
    import time

    import gevent

    import specter

    logging.basicConfig()


    class SlowStart(specter.Service):
        def on_start(self):
            time.sleep(0.25)  # blocks before the hub ever ran, past gevent's first monitor round


    manager = specter.ServiceManager(signals=False, block_threshold=0.1)
    manager.register_service(SlowStart())
    manager.boot()
    gevent.spawn(time.sleep, 0.3).join()  # the block the monitor must catch
    gevent.sleep(0.05)  # the hub counts it once it runs again
    thread = gevent.get_hub().periodic_monitoring_thread
    print("blocked", manager.health()["loop"]["blocked"], "thread", thread.should_run)
    manager.shutdown()
""")


def http_status_now(url):
    """GET ``url`` from the calling native thread; its status (0 when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=CLIENT_TIMEOUT) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


class TestAppContext(SpecterTestCase):
    """Background work of app-bound services runs in a fresh app context, popped after each round."""

    def test_background_work_sees_current_app_and_tears_down_each_round(self):
        app, sio = make_web_app()
        app.config["NAME"] = "jobs-app"
        teardowns = []
        app.teardown_appcontext(lambda exc: teardowns.append(exc))
        seen = {}

        def note(where):
            seen.setdefault(where, []).append(flask.current_app.config["NAME"])

        class Child(Service):
            def on_start(self):
                self.interval(lambda: note("child tick"), 0.01)

        class Jobs(QueueService):
            def on_start(self):
                note("on_start")
                self.ticks = self.interval(lambda: note("tick"), 0.01)
                self.spawn(note, "spawned")
                self.spawn_later(0.01, note, "delayed")
                self.supervise(note, "supervised")
                self.adopt(Child("child"))

            def handle_item(self, item):
                note("item")

            def on_stop(self):
                note("on_stop")
        jobs = Jobs("jobs")
        manager = boot(app, sio, services=[jobs], signals=False)
        self.addCleanup(manager.shutdown)
        self.assertEventually(lambda: {"tick", "spawned", "delayed", "supervised", "child tick"} <= set(seen))
        jobs.cancel_interval(jobs.ticks)
        jobs.enqueue(1)
        jobs.enqueue(2)
        self.assertTrue(jobs.join(WAIT))
        manager.shutdown()
        for where in ("on_start", "tick", "spawned", "delayed", "supervised", "child tick", "item", "on_stop"):
            self.assertEqual(set(seen[where]), {"jobs-app"}, where)
        self.assertEqual(len(seen["item"]), 2)
        self.assertFalse(flask.has_app_context(), "nothing leaks into the caller")

    def test_teardown_appcontext_runs_once_per_tick_and_per_item(self):
        app, sio = make_web_app()
        teardowns = Recorder()
        app.teardown_appcontext(teardowns)
        rounds = []

        class Counter(QueueService):
            def on_start(self):
                rounds.append(("start", teardowns.count))
                self.ticker = self.interval(self.tick, 0.01)

            def tick(self):
                rounds.append(("tick", teardowns.count))

            def handle_item(self, item):
                rounds.append(("item", teardowns.count))
        counter = Counter("counter")
        manager = boot(app, sio, services=[counter], signals=False)
        self.addCleanup(manager.shutdown)
        self.assertEventually(lambda: len(rounds) >= 4)
        counter.cancel_interval(counter.ticker)
        for item in range(3):
            counter.enqueue(item)
        self.assertTrue(counter.join(WAIT))
        first = rounds[0][1]
        self.assertTrue(wait_until(lambda: teardowns.count == first + len(rounds)))
        # Each round saw one teardown per earlier round (on_start's included): one context each, popped after it.
        self.assertEqual([count for _, count in rounds], list(range(first, first + len(rounds))))
        self.assertEqual([kind for kind, _ in rounds].count("item"), 3)

    def test_a_supervised_callback_that_returned_is_not_run_again_when_a_teardown_raises(self):
        app, sio = make_web_app()

        @app.teardown_appcontext
        def close_session(exc):
            if flask.g.get("session") == "payments":
                raise RuntimeError("cannot close the session")
        payments = []

        class Payer(Service):
            def on_start(self):
                self.supervise(self.pay_once)

            def pay_once(self):
                flask.g.session = "payments"
                payments.append("paid")
        payer = Payer("payer")
        manager = boot(app, sio, services=[payer], signals=False)
        self.addCleanup(manager.shutdown)
        with captured_logs("specter.service") as records:
            self.assertEventually(lambda: payer.health()["errors"] == 1)
            gevent.sleep(payer.restart_backoff * 2)  # when a restart would have come
        self.assertEqual(payments, ["paid"], "the work of a callback that returned was done again")
        self.assertIn("cannot close the session", payer.health()["last_error"])
        self.assertEqual((payer.status, payer.health()["restarts"]), ("running", 0))
        self.assertTrue(any(r.exc_info and "cannot close the session" in str(r.exc_info[1]) for r in records))

    def test_a_watcher_started_in_the_app_context_polls_inside_a_fresh_one(self):
        app, sio = make_web_app()
        teardowns = Recorder()
        app.teardown_appcontext(teardowns)
        values = []

        class Sensors(Service):
            def on_start(self):
                watcher = self.own(specter.Watcher("temp", poll=lambda: flask.current_app.name, interval=0.01))
                watcher.subscribe(lambda value, _: values.append((value, teardowns.count)))
                watcher.start()
        manager = boot(app, sio, services=[Sensors()], signals=False)
        self.addCleanup(manager.shutdown)
        self.assertEventually(lambda: len(values) >= 2)
        self.assertEqual(values[0][0], app.name)
        self.assertGreater(values[1][1], values[0][1], "the first round's context was popped before the second")

    def test_start_called_inside_the_apps_context_keeps_that_context(self):
        app, sio = make_web_app()
        manager = boot(app, sio, signals=False)
        self.addCleanup(manager.shutdown)
        contexts = []

        class Late(Service):
            def on_start(self):
                contexts.append(flask.globals.app_ctx._get_current_object())
        with app.app_context() as outer:
            manager.register_service(Late("late"))
        self.assertEqual(contexts, [outer])

    def test_services_without_an_app_run_as_before(self):
        seen = []

        class Plain(Service):
            def on_start(self):
                seen.append(flask.has_app_context())
                self.spawn(lambda: seen.append(flask.has_app_context()))
        manager = ServiceManager(signals=False)
        self.addCleanup(manager.shutdown)
        manager.register_service(Plain())
        manager.boot()
        self.assertEventually(lambda: len(seen) == 2)
        self.assertEqual(seen, [False, False])


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
        settle_engineio(self, sio)
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

    def refused(self, url, **kwargs):
        """The ConnectionError of a client the server refuses (None if it got in)."""
        client = socketio.Client()

        def attempt():
            try:
                client.connect(url, wait_timeout=CLIENT_TIMEOUT, **kwargs)
            except socketio.exceptions.ConnectionError as exc:
                return exc
            client.disconnect()
            return None
        return self.blocking(attempt)

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

    def test_shutdown_ends_engineios_service_task_and_a_reboot_starts_it_again(self):
        app, sio = make_web_app()
        url, manager = self.serve(app, sio, handlers=[RecordingHandler("h", [])])
        client = self.connect(url)
        task = sio.server.eio.service_task_handle
        self.assertIsNotNone(task)  # started by the first request
        self.disconnect(client)
        manager.shutdown()
        self.assertTrue(task.dead)
        self.assertIsNone(sio.server.eio.service_task_handle)
        manager.boot()
        client = self.connect(url)
        self.assertIsNotNone(sio.server.eio.service_task_handle)
        self.assertIsNot(sio.server.eio.service_task_handle, task)

    def test_ack_through_a_controller_and_http(self):
        app, sio = make_web_app()
        ctl = EchoController()
        url, _ = self.serve(app, sio, controllers=[ctl])
        client = self.connect(url)
        self.assertEqual(self.call(client, "echo", [1, 2]), {"echo": [1, 2]})
        status, kind, body = self.http_get(url + "/ping")
        self.assertEqual((status, kind), (200, "application/json"))
        self.assertEqual(flask.json.loads(body), {"pong": True, "by": "echo"})

    def test_a_stopped_controller_admits_no_client(self):
        app, sio = make_web_app()
        ctl = TokenController()
        url, _ = self.serve(app, sio, controllers=[ctl])
        client = self.connect(url, auth={"token": "s3cret"})
        self.assertEqual(self.call(client, "echo", 1), {"echo": 1})
        self.assertIsInstance(self.refused(url, auth={"token": "guess"}), socketio.exceptions.ConnectionError)
        ctl.stop()
        self.assertIsInstance(self.refused(url, auth={"token": "s3cret"}), socketio.exceptions.ConnectionError)
        self.assertEqual(ctl.checked, ["s3cret", "guess"])   # refused without running the check
        ctl.start()
        self.assertTrue(self.connect(url, auth={"token": "s3cret"}).connected)

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

    def test_a_plain_service_reaches_socket_clients_through_the_registry(self):
        app, sio = make_web_app()

        class Metrics(Service):
            def on_start(self):
                self.socketio = self.require("socketio")
                self.ticks = 0
                self.interval(self.tick, 0.02)

            def tick(self):
                self.ticks += 1
                self.emit("metrics:tick", self.ticks)                    # the in-process bus
                self.socketio.emit("metrics", {"ticks": self.ticks})     # Socket.IO clients
        on_bus = []
        self.addCleanup(specter.bus.on("metrics:tick", on_bus.append))
        url, manager = self.serve(app, sio, services=[Metrics()])
        self.assertIs(specter.registry.require("socketio"), sio)
        got = []
        client = socketio.Client()
        client.on("metrics", got.append)
        self.connect(url, client)
        self.assertTrue(wait_until(lambda: len(got) >= 2, timeout=CLIENT_TIMEOUT))
        self.assertEqual(set(got[0]), {"ticks"})
        self.assertTrue(on_bus)
        manager.shutdown()
        self.assertNotIn("socketio", specter.registry)

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

    def test_a_failing_socket_handler_acks_a_json_error_instead_of_timing_out(self):
        app, sio = make_web_app()

        class Rooms(Handler):
            events = {"join": "join", "members": "members", "ping": "ping"}

            def join(self, data):
                raise KeyError("room table is gone")

            def members(self, data):
                return {"members": {"ann", "bob"}}  # a set: JSON cannot encode it

            def ping(self, data):
                return {"pong": data}, b"\x00\x01"  # two ack arguments, one binary: fine
        url, _ = self.serve(app, sio, handlers=[Rooms()])
        client = self.connect(url)
        error = {"ok": False, "status": 500, "error": "Internal server error", "value": None}
        with self.assertLogs("specter", "ERROR") as logs:
            started = time.monotonic()
            self.assertEqual(self.call(client, "join", {"room": "lobby"}), error)
            self.assertEqual(self.call(client, "members", "lobby"), error)
            self.assertLess(time.monotonic() - started, CLIENT_TIMEOUT / 2)
        self.assertLoggedException(logs, "room table is gone")
        self.assertIn("cannot be encoded", "\n".join(logs.output))
        self.assertTrue(all(record.name.startswith("specter") for record in logs.records))
        self.assertEqual(self.call(client, "ping", 1), ({"pong": 1}, b"\x00\x01"))
        self.assertTrue(client.connected)

    def test_shutdown_sends_the_services_final_emits_then_disconnects_clients_cleanly(self):
        app, sio = make_web_app()

        class Farewell(Service):
            def on_stop(self):
                sio.emit("bye", {"last": True})
        url, manager = self.serve(app, sio, services=[Farewell()])
        events = []
        clients = []
        for transports in (["websocket"], ["polling"]):
            client = socketio.Client()
            client.on("bye", lambda data, t=transports[0]: events.append((t, "bye", data)))
            client.on("disconnect", lambda reason=None, t=transports[0]: events.append((t, "disconnect", reason)))
            clients.append(self.connect(url, client, transports=transports))
        manager.shutdown()
        self.assertTrue(wait_until(lambda: len(events) == 4, timeout=CLIENT_TIMEOUT), events)
        for transport in ("websocket", "polling"):
            self.assertEqual([event[1:] for event in events if event[0] == transport],
                             [("bye", {"last": True}), ("disconnect", "server disconnect")])
        self.assertFalse(any(client.connected for client in clients))

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


# What the signal and socket apps share: an app with a /ready route, and a
# free port picked and printed for the test to read.
APP_PRELUDE = textwrap.dedent("""
    import socket
    import sys

    import gevent
    from flask import Flask
    from flask_socketio import SocketIO

    import specter

    app = Flask(__name__)
    sio = SocketIO(app, async_mode="gevent")


    @app.route("/ready")
    def ready():
        return "ok"


    def serve_port():
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        print("port", port, flush=True)
        return port
""")


SIGNAL_APP = APP_PRELUDE + textwrap.dedent("""
    marker = sys.argv[1]


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


    port = serve_port()
    if sys.argv[2] == "manager":
        manager = specter.ServiceManager(app, sio)
        manager.register_service(Worker())
        manager.run("127.0.0.1", port)
    else:  # boot() with signals on, then the usual Flask-SocketIO server
        manager = specter.boot(app, sio, services=[Worker()])
        sio.run(app, host="127.0.0.1", port=port)
    print("run returned", manager.booted, flush=True)
""")


SOCKET_APP = APP_PRELUDE + textwrap.dedent("""
    class Farewell(specter.Service):
        def on_stop(self):
            self.require("socketio").emit("bye", {"last": True})


    port = serve_port()
    if sys.argv[1] == "manager":
        specter.ServiceManager(app, sio).register_service(Farewell()).run("127.0.0.1", port)
    else:  # boot() with signals on, then the usual Flask-SocketIO server
        specter.boot(app, sio, services=[Farewell()])
        sio.run(app, host="127.0.0.1", port=port)
""")


BOOT_APP = textwrap.dedent("""
    import sys

    import gevent
    from flask import Flask
    from flask_socketio import SocketIO

    import specter

    marker = sys.argv[1]
    app = Flask(__name__)
    sio = SocketIO(app, async_mode="gevent")


    class Worker(specter.Service):
        def on_start(self):
            proc = self.start_process(["sleep", "60"])
            print("grandchild", proc.pid, flush=True)

        def on_stop(self):
            with open(marker, "w") as f:
                f.write("stopped")


    class Slow(specter.Service):
        def on_start(self):
            print("booting", flush=True)
            gevent.sleep(60)  # a start that takes its time: the SIGTERM comes meanwhile


    manager = specter.ServiceManager(app, sio)
    manager.register_service(Worker()).register_service(Slow())
    if sys.argv[2] == "manager":
        manager.run("127.0.0.1", 0)
    else:
        manager.boot()
        sio.run(app, host="127.0.0.1", port=0)
    print("served after a cancelled boot", flush=True)
""")


# An app one of whose services calls shutdown() in its on_start and lingers: a SIGTERM comes meanwhile.
QUITTER_APP = textwrap.dedent("""
    import os
    import signal

    import gevent

    import specter


    class Quitter(specter.Service):
        def on_start(self):
            proc = self.start_process(["sleep", "60"])
            print("grandchild", proc.pid, flush=True)
            manager.shutdown()  # a fatal problem found while starting
            os.kill(os.getpid(), signal.SIGTERM)  # and the platform stops the app meanwhile
            gevent.sleep(0.2)  # the rest of on_start


    manager = specter.ServiceManager()
    manager.register_service(Quitter())
    manager.boot()
    print("the program went on after boot()", flush=True)
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

    def test_sigterm_disconnects_socket_clients_cleanly_after_the_final_emits(self):
        workdir = tempfile.mkdtemp(prefix="specter-web-")
        self.addCleanup(shutil.rmtree, workdir, True)
        script = os.path.join(workdir, "sockapp.py")
        with open(script, "w") as f:
            f.write(SOCKET_APP)
        env = dict(os.environ, PYTHONPATH=SPECTER_DIR)
        for mode in ("manager", "socketio"):
            with self.subTest(mode=mode):
                child = gevent.subprocess.Popen([sys.executable, "-u", script, mode], stdout=gevent.subprocess.PIPE,
                                                stderr=gevent.subprocess.PIPE, env=env, cwd=workdir,
                                                universal_newlines=True, start_new_session=True)
                self.addCleanup(self.reap, child)
                with gevent.Timeout(CLIENT_TIMEOUT, AssertionError("the child never printed its port")):
                    port = int(child.stdout.readline().split()[1])
                url = "http://127.0.0.1:%d" % port
                self.assertTrue(wait_until(lambda: self.served(port), timeout=CLIENT_TIMEOUT, step=0.02))
                events = []
                for transport in ("websocket", "polling"):
                    client = socketio.Client()
                    client.on("bye", lambda data, t=transport: events.append((t, "bye", data)))
                    client.on("disconnect", lambda reason=None, t=transport: events.append((t, "disconnect", reason)))
                    self.blocking(client.connect, url, transports=[transport], wait_timeout=CLIENT_TIMEOUT)
                    self.addCleanup(lambda c=client: c.connected and self.blocking(c.disconnect))
                child.send_signal(signal.SIGTERM)
                try:
                    code = child.wait(timeout=CLIENT_TIMEOUT)
                except subprocess.TimeoutExpired:
                    code = None
                errors = child.stderr.read()
                self.assertEqual(code, 0, errors)
                self.assertNotIn("Traceback", errors)
                self.assertTrue(wait_until(lambda: len(events) == 4, timeout=CLIENT_TIMEOUT), events)
                for transport in ("websocket", "polling"):
                    self.assertEqual([event[1:] for event in events if event[0] == transport],
                                     [("bye", {"last": True}), ("disconnect", "server disconnect")])

    def test_sigterm_during_boot_rolls_back_and_exits_cleanly(self):
        workdir = tempfile.mkdtemp(prefix="specter-web-")
        self.addCleanup(shutil.rmtree, workdir, True)
        script = os.path.join(workdir, "bootapp.py")
        with open(script, "w") as f:
            f.write(BOOT_APP)
        env = dict(os.environ, PYTHONPATH=SPECTER_DIR)
        for mode in ("manager", "boot"):
            with self.subTest(mode=mode):
                marker = os.path.join(workdir, "stopped-" + mode)
                # stderr goes to a file: the grandchild inherits it, so a pipe would stay open while it lives.
                errors_path = os.path.join(workdir, "stderr-" + mode)
                with open(errors_path, "w") as errors:
                    child = gevent.subprocess.Popen([sys.executable, "-u", script, marker, mode],
                                                    stdout=gevent.subprocess.PIPE, stderr=errors, env=env,
                                                    cwd=workdir, universal_newlines=True, start_new_session=True)
                self.addCleanup(self.reap, child)

                def stderr():
                    with open(errors_path) as f:
                        return f.read()
                lines = {}
                with gevent.Timeout(CLIENT_TIMEOUT, AssertionError("the child never reached its slow start")):
                    while "booting" not in lines:
                        word, _, rest = child.stdout.readline().strip().partition(" ")
                        self.assertTrue(word, "the child ended early: %s" % stderr())
                        lines[word] = rest
                grandchild = int(lines["grandchild"])
                self.addCleanup(self.kill_stray, grandchild)
                self.assertFalse(pid_gone(grandchild))
                child.send_signal(signal.SIGTERM)
                try:
                    code = child.wait(timeout=CLIENT_TIMEOUT)
                except subprocess.TimeoutExpired:
                    code = None
                self.assertEqual(code, 0, stderr())
                self.assertNotIn("Traceback", stderr())
                self.assertEqual(child.stdout.read(), "", "the program went on after the interrupted boot")
                with open(marker) as f:
                    self.assertEqual(f.read(), "stopped")
                self.assertTrue(wait_until(lambda: pid_gone(grandchild), timeout=3.0, step=0.01))

    def test_sigterm_after_an_on_start_called_shutdown_still_ends_gracefully(self):
        workdir = tempfile.mkdtemp(prefix="specter-web-")
        self.addCleanup(shutil.rmtree, workdir, True)
        script = os.path.join(workdir, "quitter.py")
        with open(script, "w") as f:
            f.write(QUITTER_APP)
        errors_path = os.path.join(workdir, "stderr.txt")
        with open(errors_path, "w") as errors:
            child = gevent.subprocess.Popen([sys.executable, "-u", script], stdout=gevent.subprocess.PIPE,
                                            stderr=errors, env=dict(os.environ, PYTHONPATH=SPECTER_DIR), cwd=workdir,
                                            universal_newlines=True, start_new_session=True)
        self.addCleanup(self.reap, child)
        with gevent.Timeout(CLIENT_TIMEOUT, AssertionError("the child never started its process")):
            grandchild = int(child.stdout.readline().split()[1])
        self.addCleanup(self.kill_stray, grandchild)
        try:
            code = child.wait(timeout=CLIENT_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
        with open(errors_path) as f:
            errors = f.read()
        self.assertEqual(code, 0, "not a graceful exit (-15 is the default SIGTERM action): %s" % errors)
        self.assertEqual(child.stdout.read(), "", "the program went on after the interrupted boot")
        self.assertIn("already shutting down", errors)
        self.assertTrue(wait_until(lambda: pid_gone(grandchild), timeout=3.0, step=0.01),
                        "the starting service's process outlived the app")

    def reap(self, child):
        if child.poll() is None:
            child.kill()
            child.wait()
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()

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


def live_children():
    """Pids of this process's children that still run (zombies excluded), read from /proc.

    Read here rather than through specter._process_group_members on purpose:
    the oracle of the no-orphan tests must not be the code they check.

    A child forked but not yet exec'd counts too: it is the one a start
    interrupted at the wrong moment would leave behind.
    """
    me, found = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, "rb") as stat:
                data = stat.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2:].split()
        if fields[0] not in (b"Z", b"X") and int(fields[1]) == me:
            found.add(int(entry))
    return found


def kill_new_children(before):
    """SIGKILL, by pid, each child started since ``before`` that still runs (a test's strays)."""
    for pid in live_children() - before:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# An app whose only way to end its SIGTERM-ignoring child is the atexit shutdown.
ATEXIT_APP = textwrap.dedent("""
    import sys

    import specter

    STUBBORN = ("import signal, time\\n"
                "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
                "print('ready', flush=True)\\n"
                "time.sleep(30)\\n")


    class Owner(specter.Service):
        def on_start(self):
            self.proc = specter.ManagedProcess("stubborn", terminate_timeout=0.2, kill_timeout=2.0)
            self.proc.start([sys.executable, "-c", STUBBORN], owner=self,
                            stdout=specter.ManagedProcess.PIPE)
            self.proc.stdout.readline()  # SIGTERM is ignored from here on


    owner = Owner()
    manager = specter.ServiceManager(signals=False)
    manager.register_service(owner)
    manager.boot()
    print("grandchild", owner.proc.pid, flush=True)
    # The script ends here: only the atexit hook stops the service.
""")


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

    def test_an_interrupted_stop_still_ends_the_group_on_time_and_releases_everything(self):
        # The caller's own deadline (or a kill) ends its wait, not the teardown:
        # SIGKILL still follows the grace counted from the first SIGTERM, and the
        # readers, the pipes and the owner's entry are released after it.
        stubborn = ("import signal, time\n"
                    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                    "print('ready')\n"
                    "time.sleep(30)\n")
        for interruption in ("timeout", "kill"):
            with self.subTest(interruption=interruption):
                owner = self.started(Service("owner"))
                proc = self.make("stubborn", terminate_timeout=0.6)
                proc.start(child_args(stubborn), owner=owner, stdout=specter.ManagedProcess.PIPE)
                lines, reader = self.collect(proc, "stdout")
                self.assertTrue(wait_until(lambda: lines == [b"ready"], timeout=5))
                self.assertEqual(len(owner.health()["resources"]), 1)
                started = time.monotonic()
                with captured_logs():
                    if interruption == "timeout":
                        with self.assertRaises(gevent.Timeout):
                            with gevent.Timeout(0.4):
                                proc.stop()
                    else:
                        stopper = gevent.spawn(proc.stop)
                        gevent.sleep(0.4)
                        stopper.kill()
                    self.assertTrue(proc.running)  # SIGTERM ignored, grace not over yet
                    self.assertTrue(wait_until(lambda: not proc.running, timeout=2))
                    elapsed = time.monotonic() - started
                    self.assertEqual(proc.returncode, -signal.SIGKILL)
                    # SIGKILL 0.6 s after SIGTERM, not a new grace from the interruption (1.0 s)
                    self.assertLess(elapsed, 0.6 + 0.3)
                    self.assertTrue(wait_until(lambda: reader.dead and proc.stdout.closed))
                    self.assertEqual(owner.health()["resources"], [])

    def test_a_restart_right_after_an_interrupted_stop_keeps_running(self):
        # The teardown an interrupted stop() leaves behind finishes that run
        # only: a start() made meanwhile has already ended the old run, and
        # the new child is not the old teardown's to end.
        proc = self.piped("print('up')\nimport time\ntime.sleep(30)\n", make_kwargs={"terminate_timeout": 1.0})

        def slow_to_unwind(line):
            try:
                gevent.sleep(LONG)
            except greenlet.GreenletExit:
                gevent.sleep(0.3)  # the reader takes a while to die
                raise
        entered = []
        proc.watch_stream("stdout", lambda line: (entered.append(line), slow_to_unwind(line)))
        self.assertTrue(wait_until(lambda: entered, timeout=5))
        with self.assertRaises(gevent.Timeout):
            with gevent.Timeout(0.15):
                proc.stop()  # interrupted while the reader unwinds
        self.assertFalse(proc.running)
        proc.start(child_args("import time; time.sleep(30)"))
        new_pid = proc.pid
        gevent.sleep(0.5)  # the old teardown has finished by now
        self.assertTrue(proc.running)
        self.assertEqual(proc.pid, new_pid)
        self.assertFalse(pid_gone(new_pid))

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

    # Interrupted starts ---------------------------------------------------------

    def no_new_children(self):
        """Snapshot this process's children; strays are killed by pid when the test ends."""
        before = live_children()
        self.addCleanup(kill_new_children, before)
        return before

    def test_a_start_killed_by_its_owner_stopping_leaves_no_child(self):
        # The owner's stop() kills the greenlet starting the process at every
        # point of the launch: before it runs, between fork and exec, after.
        class Launcher(Service):
            def on_start(self):
                self.spawn(self.start_process, ["sleep", "30"])

        before = self.no_new_children()
        for cycle in range(12):
            service = Launcher("launcher").start()
            for _ in range(cycle % 4):
                gevent.sleep(0)
            service.stop()
            self.assertEqual(live_children() - before, set(), "cycle %d left a child" % cycle)

    def test_a_start_interrupted_by_a_kill_or_timeout_leaves_no_child(self):
        before = self.no_new_children()
        for exception in (greenlet.GreenletExit, gevent.Timeout):
            for yields in range(3):
                with self.subTest(exception=exception.__name__, yields=yields):
                    proc = self.make("interrupted")

                    def starting():
                        try:
                            return proc.start(["sleep", "30"])
                        except gevent.Timeout as exc:
                            return exc  # kept off the hub's error output

                    starter = gevent.spawn(starting)
                    for _ in range(yields + 1):
                        gevent.sleep(0)
                    starter.kill(exception, timeout=WAIT)
                    self.assertTrue(starter.dead)
                    if starter.value is not proc:  # the launch had finished already otherwise
                        self.assertIsInstance(starter.value, exception)
                        self.assertFalse(proc.running)
                    proc.stop()
                    self.assertEqual(live_children() - before, set())

    def test_stop_racing_start_ends_the_child(self):
        before = self.no_new_children()
        proc = self.make("raced")
        starter = gevent.spawn(proc.start, ["sleep", "30"])
        gevent.sleep(0)  # the starter is inside the launch now
        self.assertIs(proc.stop(), proc)
        self.assertEqual(live_children() - before, set())
        starter.join(timeout=WAIT)
        self.assertIs(starter.value, proc)  # the start completed; stop() ended what it launched
        self.assertEqual(proc.returncode, -signal.SIGTERM)

    def test_a_boot_rollback_ends_a_process_still_starting(self):
        class Helper(Service):
            def on_start(self):
                self.spawn(self.start_process, ["sleep", "30"])

        class Broken(Service):
            def on_start(self):
                gevent.sleep(0)  # the helper's launch is between fork and exec now
                raise RuntimeError("cannot start")

        before = self.no_new_children()
        for _ in range(3):
            manager = ServiceManager(signals=False)
            manager.register_service(Helper("helper"))
            manager.register_service(Broken("broken"))
            with self.assertRaises(RuntimeError), captured_logs():
                manager.boot()
            self.assertEqual(live_children() - before, set())

    def test_atexit_shutdown_kills_a_child_that_ignores_sigterm(self):
        workdir = tempfile.mkdtemp(prefix="specter-atexit-")
        self.addCleanup(shutil.rmtree, workdir, True)
        script = os.path.join(workdir, "atexit_app.py")
        with open(script, "w") as f:
            f.write(ATEXIT_APP)
        errors_path = os.path.join(workdir, "stderr.txt")

        def errors():
            with open(errors_path) as f:
                return f.read()
        with open(errors_path, "w") as stderr:
            app = gevent.subprocess.Popen([sys.executable, "-u", script], stdout=gevent.subprocess.PIPE,
                                          stderr=stderr, env=dict(os.environ, PYTHONPATH=SPECTER_DIR),
                                          cwd=workdir, start_new_session=True)
        self.addCleanup(app.stdout.close)
        self.addCleanup(lambda: app.poll() is None and os.killpg(app.pid, signal.SIGKILL))
        line = app.stdout.readline().split()
        self.assertEqual(line[:1], [b"grandchild"], errors())
        grandchild = int(line[1])
        self.addCleanup(lambda: pid_gone(grandchild) or os.kill(grandchild, signal.SIGKILL))
        self.assertEqual(app.wait(timeout=5), 0, errors())
        self.assertTrue(wait_until(lambda: pid_gone(grandchild)), "the child outlived the app")
        self.assertNotIn("Traceback", errors())

    # PID reuse ----------------------------------------------------------------

    def stranger(self):
        """A process in a group of its own that SPECTER must never signal."""
        stranger = gevent.subprocess.Popen(["sleep", "30"], start_new_session=True)
        self.addCleanup(lambda: stranger.poll() is None and (stranger.kill(), stranger.wait()))
        return stranger

    @contextlib.contextmanager
    def pgid_reused_by(self, old, stranger):
        """Simulate the kernel handing pgid ``old`` to ``stranger``'s group (real reuse cannot be forced)."""
        real_killpg, real_members = os.killpg, specter._process_group_members

        def killpg(pgid, signum):
            return real_killpg(stranger.pid if pgid == old else pgid, signum)

        def members(pgid):
            if pgid != old:
                return real_members(pgid)
            return [old if pid == stranger.pid else pid for pid in real_members(stranger.pid) or ()]

        with mock.patch.object(os, "killpg", killpg), \
                mock.patch.object(specter, "_process_group_members", members):
            yield

    def test_a_group_seen_gone_is_never_signalled_after_its_pgid_is_reused(self):
        # The child exits while its reader is busy in a handler, so stop()
        # kills the reaper before the reaper could record the group's end.
        proc = self.make("reused")
        proc.start(child_args("print('done')"), stdout=specter.ManagedProcess.PIPE)
        busy = gevent.event.Event()
        proc.watch_stream("stdout", lambda line: (busy.set(), gevent.sleep(LONG)))
        self.assertTrue(busy.wait(WAIT))
        self.assertEqual(proc.wait(timeout=5), 0)
        old = proc.pid
        self.assertTrue(wait_until(lambda: pid_gone(old)))
        proc.stop()
        # The kernel now hands the old number to a stranger's process group:
        # simulated by mapping the old pgid onto a real stranger's group.
        stranger = self.stranger()
        with self.pgid_reused_by(old, stranger):
            proc.stop()
            proc.start(child_args("pass"))
            self.assertEqual(proc.wait(timeout=5), 0)
            proc.stop()
        self.assertIsNone(stranger.poll(), "the stranger's group was signalled")

    def test_a_reaped_leader_whose_pid_runs_again_is_not_ours(self):
        # Reuse between the child's exit and stop(): a live process holds the
        # leader's pid although gevent reaped our leader, so the group is foreign.
        proc = self.make("reused")
        proc.start(child_args("print('done')"), stdout=specter.ManagedProcess.PIPE)
        busy = gevent.event.Event()
        proc.watch_stream("stdout", lambda line: (busy.set(), gevent.sleep(LONG)))  # holds the reaper
        self.assertTrue(busy.wait(WAIT))
        self.assertEqual(proc.wait(timeout=5), 0)
        old = proc.pid
        self.assertTrue(wait_until(lambda: pid_gone(old)))
        stranger = self.stranger()
        with self.pgid_reused_by(old, stranger):
            proc.stop()
            proc.start(child_args("pass"))
            self.assertEqual(proc.wait(timeout=5), 0)
        self.assertIsNone(stranger.poll(), "the stranger's group was signalled")

    # Text mode chunks ---------------------------------------------------------

    def test_text_mode_chunks_arrive_as_the_child_writes_them(self):
        proc = self.piped("import sys, time\nsys.stdout.write('first\\r\\n')\nsys.stdout.flush()\n"
                          "time.sleep(30)\n", text=True)
        chunks, reader = self.collect(proc, "stdout", chunk_size=4096)
        self.assertEqual(wait_until(lambda: "".join(chunks), timeout=WAIT), "first\n")
        self.assertTrue(all(isinstance(chunk, str) for chunk in chunks))
        self.assertTrue(proc.running)
        self.assertFalse(reader.dead)

    def test_text_mode_chunks_decode_characters_split_across_reads(self):
        proc = self.piped("import sys\nsys.stdout.write('\\u00e9t\\u00e9 ' * 50 + 'end\\r')\n", text=True)
        chunks, reader = self.collect(proc, "stdout", chunk_size=3)
        reader.join(timeout=WAIT)
        self.assertTrue(reader.dead)
        self.assertEqual("".join(chunks), "\u00e9t\u00e9 " * 50 + "end\n")
        self.assertTrue(all(0 < len(chunk.encode()) <= 4 for chunk in chunks), chunks)


# Testing ######################################################################


class Ticker(Service):
    """A service whose interval records the clock's time at each tick."""

    def __init__(self, name="ticker", *, period=60.0):
        super().__init__(name)
        self.period = period
        self.log = []

    def on_start(self):
        self.interval(lambda: self.log.append(("tick", specter._now())), self.period)


class TestTestingKit(SpecterTestCase):
    """ManualClock, isolated(), leak_check() and the public SpecterTestCase."""

    def test_interval_ticks_exactly_n_times_in_advance_of_n_periods(self):
        with specter.ManualClock() as clock:
            svc = self.started(Ticker(period=60.0))
            clock.advance(60 * 5)
            self.assertEqual(svc.log, [("tick", 60.0 * k) for k in range(1, 6)])
            clock.advance(59.5)
            self.assertEqual(len(svc.log), 5)
            clock.advance(0.5)
            self.assertEqual(svc.log[-1], ("tick", 360.0))
            clock.advance(60 * 1000)
            self.assertEqual(len(svc.log), 1006)
            self.assertEqual(clock.now(), 60.0 * 1006)
            svc.stop()

    def test_advance_runs_due_callbacks_in_due_time_order_in_the_callers_turn(self):
        seen = []
        with specter.ManualClock(start=100.0) as clock:
            svc = self.started(Service("order"))
            for delay in (30, 10, 20, 10):
                svc.timeout(functools.partial(lambda d: seen.append((d, clock.now())), delay), delay)
            svc.interval(lambda: seen.append(("iv", clock.now())), 15)
            self.assertEqual(clock.now(), 100.0)
            clock.advance(25)
            # Returned with every due callback run, without the test yielding.
            self.assertEqual(seen, [(10, 110.0), (10, 110.0), ("iv", 115.0), (20, 120.0)])
            self.assertEqual(clock.now(), 125.0)
            clock.advance(5)
            # A tie goes to the callback scheduled first: the timeout (at 100) before the re-armed tick (at 115).
            self.assertEqual(seen[4:], [(30, 130.0), ("iv", 130.0)])
            svc.stop()

    def test_advance_drives_callbacks_that_spawn_and_sleep_on_specter_timers(self):
        steps = []
        with specter.ManualClock() as clock:
            svc = self.started(Service("chain"))

            def second():
                steps.append(("second", clock.now()))
                svc.spawn(lambda: steps.append(("spawned", clock.now())))

            def first():
                steps.append(("first", clock.now()))
                svc.spawn_later(5, second)

            svc.timeout(first, 10)
            clock.advance(14)
            self.assertEqual(steps, [("first", 10.0)])
            clock.advance(1)
            self.assertEqual(steps, [("first", 10.0), ("second", 15.0), ("spawned", 15.0)])
            svc.stop()

    def test_spawn_later_follows_the_clock_and_stop_cancels_it(self):
        ran = Recorder()
        with specter.ManualClock() as clock:
            svc = self.started(Service("later"))
            svc.spawn_later(3600, ran, "late")
            dropped = svc.spawn_later(10, ran, "never")
            svc.cancel_greenlet(dropped)
            clock.advance(3599)
            self.assertEqual(ran.calls, [])
            clock.advance(1)
            self.assertEqual(ran.calls, [("late",)])
            svc.spawn_later(60, ran, "stopped first")
            svc.stop()
            clock.advance(120)
            self.assertEqual(ran.calls, [("late",)])
            self.assertEqual(clock._pending(), [])

    def test_supervision_backoff_follows_the_clock(self):
        attempts = []

        def flaky():
            attempts.append(clock.now())
            raise ValueError("down")

        with specter.ManualClock() as clock:
            svc = Service("supervised")
            svc.restart_backoff = 1.0
            svc.restart_max_backoff = 8.0
            self.started(svc)
            with self.assertLogs("specter", "ERROR"):
                svc.supervise(flaky, max_restarts=6, within=3600)
                clock.advance(0)
                self.assertEqual(attempts, [0.0])
                clock.advance(100)
            # Waits of 1, 2, 4, 8, 8, 8 s between attempts; the 7th failure marks it failed.
            self.assertEqual(attempts, [0.0, 1.0, 3.0, 7.0, 15.0, 23.0, 31.0])
            self.assertEqual(svc.status, "failed")
            svc.stop()

    def test_watcher_polls_and_backs_off_on_the_clock(self):
        results = iter([1, 2, specter.WatcherError("flaky"), specter.WatcherError("flaky"), 3])
        polls = []

        def poll():
            polls.append(clock.now())
            value = next(results, 4)
            if isinstance(value, Exception):
                raise value
            return value

        with specter.ManualClock() as clock:
            values = []
            watcher = specter.Watcher("w", poll=poll, interval=5.0, max_backoff=60.0)
            watcher.subscribe(lambda value, w: values.append(value))
            try:
                with self.assertLogs("specter.watcher", "WARNING"):
                    watcher.start()
                    clock.advance(10)
                    self.assertEqual(polls[:3], [0.0, 5.0, 10.0])
                    clock.advance(30)
                # Backoff after failure k waits interval * 2**(k-1) scaled by a jitter in [0.5, 1).
                gaps = [b - a for a, b in zip(polls[2:5], polls[3:6])]
                self.assertTrue(2.5 <= gaps[0] < 5.0, gaps)
                self.assertTrue(5.0 <= gaps[1] < 10.0, gaps)
                self.assertEqual(values[:3], [1, 2, 3])
                self.assertAlmostEqual(gaps[2], 5.0, places=9)  # a value resets the backoff
                self.assertGreater(watcher.health()["uptime_seconds"], 39.0)
            finally:
                watcher.stop()

    def test_cache_ttl_follows_the_clock(self):
        with specter.ManualClock() as clock:
            cache = create_cache("prices", ttl=300)
            computed = Recorder(result="fresh")
            self.assertEqual(cache.get_or_compute(computed), "fresh")
            clock.advance(299.5)
            self.assertTrue(cache.is_valid())
            self.assertEqual(cache.get_or_compute(computed), "fresh")
            self.assertEqual(computed.count, 1)
            clock.advance(0.5)
            self.assertFalse(cache.is_valid())
            self.assertIsNone(cache.get())
            cache.get_or_compute(computed)
            self.assertEqual(computed.count, 2)
            cache.destroy()

    def test_an_hour_of_every_timer_kind_passes_in_under_a_second_of_wall_time(self):
        """No SPECTER timer reads the real clock behind the ManualClock's back."""
        counts = collections.Counter()

        class Everything(Service):
            restart_backoff = 30.0
            restart_max_backoff = 30.0

            def on_start(self):
                self.interval(lambda: counts.update(["interval"]), 60)
                self.timeout(lambda: counts.update(["timeout"]), 1800)
                self.spawn_later(900, lambda: counts.update(["spawn_later"]))
                self.supervise(self.crash, max_restarts=1000, within=60)

            def crash(self):
                counts.update(["supervised"])
                raise ValueError("again")

        def poll():
            counts.update(["poll"])
            if counts["poll"] % 2:
                raise specter.WatcherError("odd poll")  # every other poll backs off
            return counts["poll"]

        started = time.monotonic()
        with specter.ManualClock() as clock, \
                mock.patch.object(specter._service_log, "exception"), \
                mock.patch.object(specter._watcher_log, "warning"):
            cache = create_cache("hourly", ttl=3600)
            cache.set("v")
            svc = self.started(Everything("everything"))
            watcher = specter.Watcher("poller", poll=poll, interval=10, max_backoff=40)
            self.addCleanup(watcher.stop)
            watcher.start()
            clock.advance(3599)
            self.assertTrue(cache.is_valid())
            clock.advance(1)
            self.assertFalse(cache.is_valid())
            svc.stop()
            watcher.stop()
        elapsed = time.monotonic() - started
        self.assertEqual(counts["interval"], 60)
        self.assertEqual(counts["timeout"], 1)
        self.assertEqual(counts["spawn_later"], 1)
        self.assertEqual(counts["supervised"], 121)  # at 0 and every 30 s until 3600
        # 10 s after a value, 5-10 s (jittered backoff) after a failure: 2 polls per 15-20 s.
        self.assertTrue(361 <= counts["poll"] <= 481, counts)
        self.assertLess(elapsed, 1.0)

    def test_outside_the_with_timers_run_on_real_time_again(self):
        with specter.ManualClock() as clock:
            self.assertEqual(specter._now(), clock.now())
        svc = self.started(Ticker(period=SHORT))
        self.assertEventually(lambda: len(svc.log) >= 2)
        self.assertGreater(svc.log[0][1], 1000.0)  # time.monotonic(), not a manual time
        self.assertIsInstance(specter._clock, specter._Clock)

    def test_manual_clock_rejects_bad_use_precisely(self):
        clock = specter.ManualClock()
        with self.assertRaisesRegex(ValueError, "seconds must be 0 or more seconds, got -1"):
            clock.advance(-1)
        with self.assertRaisesRegex(TypeError, "seconds must be a number of seconds, got str"):
            clock.advance("1")
        with self.assertRaisesRegex(ValueError, "start must be 0 or more"):
            specter.ManualClock(start=-5)
        with clock:
            with self.assertRaisesRegex(RuntimeError, "already in force"):
                clock.__enter__()
            svc = self.started(Service("reentrant"))
            errors = []

            def nested():
                try:
                    clock.advance(1)
                except RuntimeError as exc:
                    errors.append(str(exc))

            svc.timeout(nested, 1)
            clock.advance(1)
            self.assertEqual(len(errors), 1)
            self.assertIn("already running", errors[0])
            svc.stop()

    def test_isolated_sets_aside_bus_and_registry_contents_and_restores_them(self):
        from specter import bus, registry  # the names apps import keep working
        outer = Recorder()
        self.addCleanup(bus.on("ping", outer))
        registry.provide("db", "outer-db")
        self.addCleanup(registry.unregister, "db")
        self.addCleanup(registry.unregister, "late")
        waiter = gevent.spawn(outcome_of, registry.wait_for, "late", 5)
        gevent.sleep(0)
        with specter.isolated():
            self.assertIs(bus, specter.bus)
            self.assertFalse(bus.has_listeners("ping"))
            self.assertEqual(registry.list(), [])
            inner = Recorder()
            bus.on("ping", inner)
            bus.emit("ping", 1)
            registry.provide("db", "inner-db")
            registry.provide("late", "inner")  # the outer wait is not satisfied from inside
            stuck = gevent.spawn(outcome_of, registry.wait_for, "never")
            gevent.sleep(0)
        self.assertEqual((outer.calls, inner.calls), ([], [(1,)]))
        bus.emit("ping", 2)
        self.assertEqual((outer.calls, inner.calls), ([(2,)], [(1,)]))
        self.assertEqual(registry.list(), ["db"])
        self.assertEqual(registry.require("db"), "outer-db")
        self.assertIn("the isolated() block ended while waiting for 'never'", str(stuck.get(timeout=1)))
        self.assertFalse(waiter.ready())
        registry.provide("late", "outer")
        self.assertEqual(waiter.get(timeout=1), "outer")

    def test_isolated_works_as_a_decorator(self):
        specter.registry.provide("outer", 1)
        self.addCleanup(specter.registry.unregister, "outer")

        @specter.isolated()
        def inside():
            return specter.registry.list()

        self.assertEqual(inside(), [])
        self.assertEqual(specter.registry.list(), ["outer"])

    def test_leak_check_names_each_leftover_created_inside_the_block(self):
        before = gevent.spawn(gevent.sleep, LONG)  # alive before the block: not a leak
        self.addCleanup(specter.bus.on("old", print))
        self.addCleanup(before.kill)
        with self.assertRaises(AssertionError) as cm:
            with specter.leak_check(grace=0.05):
                svc = Service("leaky").start()
                svc.interval(print, 60)
                svc.listen("svc:event", print)
                specter.registry.provide("cfg", {"a": 1})
                loose = gevent.spawn(gevent.sleep, LONG)
                loose.name = "loose-sleeper"
                child = gevent.subprocess.Popen(["sleep", "30"], start_new_session=True)
        try:
            message = str(cm.exception)
            self.assertIn("leftover(s) created inside the block", message)
            self.assertIn("greenlet 'loose-sleeper'", message)
            self.assertIn("child process %d: sleep 30" % child.pid, message)
            self.assertIn("bus listener of 'svc:event'", message)
            self.assertIn("registry key 'cfg'", message)
            self.assertRegex(message, r"pending timer: interval-\d+ of service 'leaky' \(every 60 s\): print")
            self.assertIn("running service 'leaky' (running)", message)
            self.assertNotIn("old", message)
            self.assertNotIn(repr(before.name), message)
        finally:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            svc.stop()
            loose.kill()
            specter.registry.unregister("cfg")

    def test_leak_check_passes_a_block_that_cleans_up(self):
        with specter.leak_check():
            svc = Service("tidy").start()
            svc.interval(print, 60)
            svc.spawn(gevent.sleep, LONG)
            svc.listen("e", print)
            specter.registry.provide("k", 1, owner=svc)
            child = gevent.subprocess.Popen(["sleep", "30"], start_new_session=True)
            quick = gevent.spawn(gevent.sleep, 0)
            svc.stop()
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            # A greenlet killed without waiting still ends within the grace period.
            dying = gevent.spawn(self._slow_finally)
            gevent.sleep(0)
            dying.kill(block=False)
        self.assertTrue(quick.dead and dying.dead)

    @staticmethod
    def _slow_finally():
        try:
            gevent.sleep(LONG)
        finally:
            gevent.sleep(0.05)

    def test_leak_check_reports_pending_manual_timers_and_unstarted_greenlets(self):
        with self.assertRaises(AssertionError) as cm:
            with specter.leak_check(grace=0), specter.ManualClock():
                svc = Service("paused").start()
                svc.spawn_later(30, print)
                svc.timeout(print, 45)
        svc.stop()
        message = str(cm.exception)
        self.assertIn("greenlet 'print' of service 'paused' (not started yet)", message)
        self.assertIn("pending timer: start of greenlet 'print' (spawn_later)", message)
        self.assertRegex(message, r"pending timer: timeout-\d+ of service 'paused' \(after 45 s\)")

    def test_leak_check_works_under_and_over_other_greenlet_tracers(self):
        seen = []

        def chained(event, args):
            seen.append(event)
            if below is not None:
                below(event, args)

        below = greenlet.settrace(chained)  # over the test case's own check, as gevent's monitor would be
        self.addCleanup(greenlet.settrace, below)
        with self.assertRaisesRegex(AssertionError, "greenlet 'noted-through-the-chain'"):
            with specter.leak_check(grace=0):
                loose = gevent.spawn(gevent.sleep, LONG)
                loose.name = "noted-through-the-chain"
        loose.kill()
        self.assertIn("switch", seen)
        self.assertIs(greenlet.gettrace(), chained)  # the check left the tracer on top alone

    def test_leak_check_leaves_a_failing_block_to_its_own_exception(self):
        loose = gevent.spawn(gevent.sleep, LONG)
        self.addCleanup(loose.kill)
        with self.assertRaisesRegex(KeyError, "boom"):
            with specter.leak_check():
                other = gevent.spawn(gevent.sleep, LONG)
                self.addCleanup(other.kill)
                raise KeyError("boom")

    def test_specter_test_case_isolates_checks_leaks_and_gives_a_manual_clock(self):
        from specter import bus, registry
        self.addCleanup(bus.on("outer", print))
        registry.provide("outer", 1)
        self.addCleanup(registry.unregister, "outer")
        seen = {}

        class AppTests(specter.SpecterTestCase):
            manual_clock = True

            def test_clean(self):
                seen["bus"] = bus.listener_count()
                seen["keys"] = registry.list()
                seen["clock"] = self.clock
                svc = Ticker(period=60)
                self.addCleanup(svc.stop)
                svc.start()
                self.clock.advance(600)
                seen["ticks"] = len(svc.log)

            def test_leaky(self):
                Ticker("forgotten", period=60).start()
                registry.provide("forgotten", 2)

        class RealTime(specter.SpecterTestCase):
            def test_no_clock(self):
                seen["real"] = self.clock

        result = unittest.TestResult()
        suite = unittest.TestSuite([AppTests("test_clean"), AppTests("test_leaky"), RealTime("test_no_clock")])
        suite.run(result)
        self.assertEqual(result.errors, [])
        self.assertEqual(seen["bus"], 0)
        self.assertEqual(seen["keys"], [])
        self.assertIsInstance(seen["clock"], specter.ManualClock)
        self.assertEqual(seen["ticks"], 10)
        self.assertIsNone(seen["real"])
        self.assertEqual(len(result.failures), 1, result.failures)
        failed, trace = result.failures[0]
        self.assertEqual(failed.id().rsplit(".", 1)[-1], "test_leaky")
        self.assertIn("running service 'forgotten'", trace)
        self.assertIn("registry key 'forgotten'", trace)
        self.assertEqual(registry.list(), ["outer"])
        self.assertEqual(bus.listener_count(), 1)
        self.assertIsInstance(specter._clock, specter._Clock)
        for obj in gc.get_objects():
            if isinstance(obj, Ticker) and obj.name == "forgotten":
                obj.stop()



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
            # The one allowed skip: a user's machine without the system package.
            # .ci/run installs it, and under CI the line above fails instead.
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
        self.addCleanup(specter.bus.on("cluster:gap", gaps.append))
        cache = create_cache("prices", shared=True)
        self.addCleanup(cache.destroy)
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

    def test_a_reconnect_that_missed_nothing_is_no_gap_but_shared_caches_reload(self):
        cluster = self.join(share=["x:*"])
        gaps = Recorder()
        self.addCleanup(specter.bus.on("cluster:gap", gaps))
        cache = create_cache("prices", shared=True)
        self.addCleanup(cache.destroy)
        cache.set(1)
        heard = Recorder()
        self.addCleanup(specter.bus.on("x:event", heard))

        def another_node_emits(number):
            self.redis.xadd("specter:bus", {"n": "elsewhere", "s": self.redis.incr("specter:bus:seq"),
                                            "e": "x:event", "d": number})
            self.assertEventually(lambda: heard.count == number, timeout=3)
        another_node_emits(1)  # the reader now waits in XREAD on its connection
        with self.assertLogs("specter.cluster", "WARNING"):
            self.redis.client_kill_filter(_type="normal", skipme=True)  # this node's connections, not Redis
            self.assertEventually(lambda: cluster.health()["reconnects"] >= 1 and cluster.connected, timeout=3)
        another_node_emits(2)  # read on from the kept position
        self.assertEqual((gaps.count, cluster.health()["gaps"]), (0, 0))
        self.assertFalse(cache.is_valid())

    def test_emits_another_node_dropped_while_redis_was_down_are_a_gap_here(self):
        server = self.own_redis(appendonly=True)  # the stream survives: only the drops were missed
        self.join(server.url, share=["x:*"])
        ticks = Recorder()
        self.addCleanup(specter.bus.on("x:tick", ticks))
        node = self.node("node-b", """
            cluster.share("x:*")

            def emit_forever():
                for number in range(100000):
                    specter.bus.emit("x:tick", number)
                    gevent.sleep(0.02)
            gevent.spawn(emit_forever)
            serve()
        """, url=server.url)
        node.wait_for("ready")
        self.assertEventually(lambda: ticks.count, timeout=3)
        gaps = Recorder()
        self.addCleanup(specter.bus.on("cluster:gap", gaps))
        with self.assertLogs("specter.cluster", "WARNING"):
            server.kill()
            gevent.sleep(0.3)  # node-b drops its emits meanwhile
            server.start()
            self.assertEventually(lambda: gaps.count, timeout=5)
        [[gap]] = gaps.calls
        self.assertIn("node node-b dropped", gap["reason"])
        self.assertGreater(gap["missed"], 0)

    def test_a_cluster_restarted_after_a_fault_keeps_the_hub_running(self):
        code = textwrap.dedent('''
            import sys, time, gevent, redis, specter
            cluster = specter.Cluster(sys.argv[1], node_id="restarted").start()
            gevent.sleep(0.1)  # its reader now waits in XREAD
            client = redis.Redis.from_url(sys.argv[1])
            client.client_kill_filter(_type="normal", skipme=True)
            while cluster.connected:
                gevent.sleep(0.001)
            cluster.stop()  # before the monitor reconnected
            cluster.start()
            fired = gevent.event.Event()
            gevent.spawn_later(0.05, fired.set)
            print("timer fired" if fired.wait(2) else "timer late")
            cluster.stop()
        ''')
        result = subprocess.run([sys.executable, "-c", code, self.redis_server.url], capture_output=True,
                                text=True, timeout=NODE_TIMEOUT, env=dict(os.environ, PYTHONPATH=HERE),
                                start_new_session=True)
        self.assertEqual(result.stdout.strip(), "timer fired", result.stderr[-2000:])

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
        self.addCleanup(specter.bus.on("job:seq", seq.append))
        self.addCleanup(specter.bus.on("job:ping", local_pings.append, origin="local"))
        self.addCleanup(specter.bus.on("job:ping", remote_pings.append, origin="remote"))
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
        self.addCleanup(specter.bus.on("job:x", heard))
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
        self.addCleanup(specter.bus.on("x", local, origin="remote"))
        self.assertTrue(specter.bus.off("x", local))
        self.assertFalse(specter.bus.has_listeners("x"))

    def test_a_foreign_or_undecodable_entry_is_skipped_and_delivery_goes_on(self):
        self.join(share=["job:*"])
        heard = Recorder()
        self.addCleanup(specter.bus.on("job:x", heard))
        gaps = Recorder()
        self.addCleanup(specter.bus.on("cluster:gap", gaps))
        with self.assertLogs("specter.cluster", "ERROR") as logs:
            self.redis.xadd("specter:bus", {"n": "elsewhere", "s": 1, "e": "job:x", "d": b'"caf\xe9"'})
            self.redis.xadd("specter:bus", {"note": "another program's entry"})
            self.redis.xadd("specter:bus", {"n": "elsewhere", "s": 2, "e": "job:x", "d": "2"})
            self.assertEventually(lambda: heard.count, timeout=3)
        self.assertEqual(heard.firsts, [2])
        self.assertEqual(gaps.count, 0)
        self.assertEqual(len(logs.records), 2)
        self.assertIn("not UTF-8", "\n".join(logs.output))

    def test_a_trimmed_read_position_is_reported_as_a_gap(self):
        cluster = self.join(share=["job:*"])
        gaps = []
        self.addCleanup(specter.bus.on("cluster:gap", gaps.append))
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

    def test_each_item_of_an_app_bound_queue_gets_its_own_app_context(self):
        app = Flask(__name__)
        teardowns = Recorder()
        app.teardown_appcontext(teardowns)
        seen = []

        class Items(RecordingQueue):
            def handle_item(self, item):
                seen.append((flask.current_app.name, teardowns.count))
                super().handle_item(item)
        queue = Items(worker_count=1)
        manager = boot(app, None, services=[queue], cluster=self.redis_server.url, signals=False)
        self.addCleanup(manager.shutdown)
        for number in range(3):
            self.assertTrue(queue.enqueue(number))
        self.assertTrue(queue.join(timeout=5))
        self.assertEqual([name for name, _ in seen], [app.name] * 3)
        first = seen[0][1]
        self.assertEqual([count for _, count in seen], [first, first + 1, first + 2])  # popped after each item

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

    def test_a_node_paused_past_the_visibility_timeout_leaves_the_reclaimed_item_to_its_new_owner(self):
        self.join()
        paused = self.node("node-b", QUEUE_NODE, VT="0.6", WORKERS="1")
        paused.wait_for("ready")
        item = {"id": 1, "nap_on": "node-b", "nap": 0.3, "sleep": 1.5}  # 0.3 s there, 1.5 s here
        self.redis.xadd("specter:queue:jobs", {"d": json.dumps(item), "a": 0})
        paused.wait_for("start")
        paused.signal(signal.SIGSTOP)
        queue = self.started(RecordingQueue(visibility_timeout=0.6))
        self.assertEventually(lambda: queue.started_items, timeout=3)  # reclaimed here
        paused.signal(signal.SIGCONT)
        paused.wait_for("done")  # its handler ends late; its claim heartbeat runs again too
        gevent.sleep(0.4)
        pending = self.redis.xpending_range("specter:queue:jobs", "specter", "-", "+", 10)
        self.assertEqual([entry["consumer"] for entry in pending], ["test-node"],
                         "the paused node's late ack or heartbeat took the item from its new owner")
        self.assertTrue(queue.join(timeout=3))
        self.assertEqual(queue.handled, [item])
        self.assertEqual(queue.health()["cluster"]["lost_claims"], 0)
        self.assertIn("no longer this node's", "".join(paused.errors))

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

    def test_a_stop_interrupted_by_a_timeout_still_hands_the_items_back(self):
        self.join()
        gate = gevent.event.Event()
        self.addCleanup(gate.set)
        queue = self.started(RecordingQueue(worker_count=2, fail=lambda item, n: not gate.wait(10)))
        for number in range(3):
            queue.enqueue(number)
        self.assertEventually(lambda: len(queue.started_items) == 2)
        with gevent.Timeout(0.2, False):
            queue.stop()  # interrupted while it waits for the two handlers
        self.assertEqual(queue.status, "stopped")
        self.assertEqual(self.redis.xpending("specter:queue:jobs", "specter")["pending"], 0,
                         "items stayed claimed by a stopped node until visibility_timeout")
        self.assertEqual(self.redis.xlen("specter:queue:jobs"), 3)
        self.assertEqual(queue.handled, [])

    def test_stopping_the_cluster_first_still_hands_the_items_back(self):
        cluster = self.join()
        gate = gevent.event.Event()
        self.addCleanup(gate.set)
        queue = self.started(RecordingQueue(fail=lambda item, n: not gate.wait(10)))
        queue.drain_timeout = 0.1
        for number in range(2):
            queue.enqueue(number)
        self.assertEventually(lambda: queue.started_items)
        cluster.stop()  # Cluster(url).start() alone: its queues stop first, while Redis is reachable
        queue.stop()
        self.assertEqual(self.redis.xpending("specter:queue:jobs", "specter")["pending"], 0,
                         "items stayed claimed by a stopped node until visibility_timeout")
        self.assertEqual(self.redis.xlen("specter:queue:jobs"), 2)

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

    def test_shared_counts_raise_a_connection_error_naming_the_url_while_redis_is_down(self):
        server = self.own_redis()
        cluster = self.join(server.url)
        queue = self.started(RecordingQueue())
        self.assertEqual(queue.pending_count(), 0)
        with self.assertLogs("specter.cluster", "WARNING"):
            server.kill()
            for call in (queue.pending_count, queue.dead_letters, queue.requeue_dead):
                with self.assertRaises(ConnectionError) as caught:
                    call()
                self.assertNotIsInstance(caught.exception, redis.RedisError)
                self.assertIn("Redis at %s" % server.url, str(caught.exception))
                self.assertIn(call.__name__, str(caught.exception))
            server.start()
            self.assertEventually(lambda: cluster.connected, timeout=3)
        self.assertEqual((queue.pending_count(), queue.dead_letters(), queue.requeue_dead()), (0, [], 0))

    def test_an_entry_that_is_not_utf8_json_is_buried_at_once_and_the_queue_goes_on(self):
        self.join()
        queue = self.started(RecordingQueue(retry_backoff=60))
        self.redis.xadd("specter:queue:jobs", {"d": b'"caf\xe9"', "a": 0})  # written by another program
        self.redis.xadd("specter:queue:jobs", {"d": "{not json", "a": 0})
        self.assertTrue(queue.enqueue("fine"))
        self.assertTrue(queue.join(timeout=3), "a poison entry wedged the queue")
        self.assertEqual((queue.handled, queue.started_items), (["fine"], ["fine"]))
        self.assertEqual([(item, deliveries) for item, _, deliveries in queue.dead],
                         [('"caf\udce9"', 1), ("{not json", 1)])
        letters = queue.dead_letters()
        self.assertIn("not UTF-8 (byte 0xe9 at position 4)", letters[0]["error"])
        self.assertIn("not a JSON item", letters[1]["error"])
        self.assertEqual(queue.health()["last_error"], None)

    def test_queues_whose_names_extend_each_other_never_share_keys(self):
        self.join()
        jobs = self.started(RecordingQueue("jobs", max_deliveries=1, fail=lambda item, n: True))
        other = self.started(RecordingQueue("jobs:dead"))
        with self.assertLogs("specter", "ERROR"):
            jobs.enqueue("bad")
            self.assertEventually(lambda: jobs.dead)
        gevent.sleep(0.2)
        self.assertEqual(other.started_items, [], "a queue consumed another queue's dead letters")
        self.assertEqual([letter["item"] for letter in jobs.dead_letters()], ["bad"])

    def test_a_queue_restarted_under_a_new_cluster_uses_that_cluster(self):
        first = specter.Cluster(self.redis_server.url, node_id="first")
        first.start()
        queue = RecordingQueue()
        queue.start()
        queue.stop()
        first.stop()
        self.join()  # a new node in the same process: the same app booted again
        self.started(queue)
        self.assertTrue(queue.enqueue(1), "the queue still talks through the stopped cluster")
        self.assertTrue(queue.join(timeout=3))
        self.assertEqual(queue.handled, [1])

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

    def test_a_singleton_in_standby_is_ready(self):
        self.redis.set("specter:lease:service:Boss", "another node", px=60000)

        class Boss(Service):
            singleton = True
        app = Flask(__name__)
        boss = Boss("Boss")
        manager = boot(app, None, services=[boss], cluster=self.redis_server.url, probes=True, signals=False)
        self.addCleanup(manager.shutdown)
        gevent.sleep(0.1)
        response = app.test_client().get("/readyz")
        self.assertEqual((boss.status, response.status_code), ("standby", 200))
        self.assertEqual(manager.health()["status"], "ok")

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
        self.redis.set("specter:fence:report2", 41)
        later = cluster.lease("report", ttl=5)
        self.assertEventually(lambda: later.held)
        self.assertGreater(later.token, first)
        self.assertEventually(lambda: again.held)

    def test_a_manual_clock_drives_renewals_while_validity_stays_on_real_time(self):
        cluster = self.join()
        clock = self.use_manual_clock()
        lease = cluster.lease("clocked", ttl=0.6)
        self.assertEventually(lambda: lease.held)
        began = time.monotonic()
        while time.monotonic() - began < 1.2:  # twice the ttl of real time, renewed by the clock
            clock.advance(0.2)
            gevent.sleep(0.05)
        self.assertTrue(lease.held)
        self.assertEqual(self.redis.pttl("specter:lease:clocked") > 300, True)
        began = time.monotonic()
        clock.advance(3600)  # an hour of the clock's time costs no real time
        self.assertLess(time.monotonic() - began, 1.0)
        # The clock stands still now: nothing renews, so the lease runs out on real time, as in Redis.
        self.assertEventually(lambda: not lease.held, timeout=1.0)
        self.assertEventually(lambda: self.redis.get("specter:lease:clocked") is None, timeout=0.5)
        lease.release()

    def test_tokens_still_grow_after_redis_lost_its_data(self):
        server = self.own_redis()  # no persistence: a restart forgets the fence counter
        cluster = self.join(server.url)
        lease = cluster.lease("export", ttl=0.6)
        self.assertEventually(lambda: lease.held)
        first = lease.token
        lost, acquired = Recorder(), Recorder()
        lease.on_lost(lost)
        lease.on_acquired(acquired)
        with self.assertLogs("specter.cluster", "WARNING"):
            server.kill()
            server.start()
            self.assertEventually(lambda: acquired.count, timeout=4)
        self.assertGreater(lease.token, first, "a store that saw the old token would refuse every write")

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
        self.addCleanup(prices.destroy)
        unshared = create_cache("prices")  # same name, not shared: remote invalidations leave it alone
        self.addCleanup(unshared.destroy)
        heard = Recorder()
        self.addCleanup(specter.bus.on("prices:invalidated", heard))
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
        app, socketio_server, boot_board = import_demo()(dict(DEMO_CONFIG, **overrides))
        settle_engineio(self, socketio_server)
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

    def test_shutdown_pushes_the_cancelled_states_to_connected_clients(self):
        manager = self.start_board(JOBBOARD_WORKERS=1)
        _client, events = self.connect()
        running = self.submit(name="long", steps=50, delay=0.05)
        queued = self.submit(name="waiting", steps=2, delay=0.01)
        self.assertTrue(wait_until(lambda: "running" in self.statuses(events, running["id"])))

        manager.shutdown()
        # 'live' stops after the runner, so what the runner wrote while stopping went out.
        self.assertTrue(wait_until(lambda: self.statuses(events, running["id"])[-1:] == ["cancelled"]
                                   and self.statuses(events, queued["id"])[-1:] == ["cancelled"]))
        self.assertIn("cancelled: server shutting down", self.updates(events, running["id"])[-1]["output"])

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
        self.assertEqual(sorted(health["services"]),
                         ["host.monitor", "jobs", "jobs.housekeeper", "jobs.runner", "live"])
        self.assertTrue(all(s["status"] == "ok" for s in health["services"].values()))

        ids = [self.submit(name="quick %d" % n, steps=1, delay=0.01)["id"] for n in range(3)]
        removed = lambda: {data["id"] for name, data in events if name == "job:removed"}
        self.assertTrue(wait_until(lambda: len(removed()) == 2 and len(self.runner.jobs()) == 1))
        survivor = self.runner.jobs()[0]
        self.assertEqual(survivor["status"], "done")
        self.assertEqual(removed() | {survivor["id"]}, set(ids))
        self.assertEqual(self.call(client, "jobs:list")["count"], 1)
        self.assertEqual(self.http.get("/api/stats").get_json()["stats"]["total"], 1)

    def test_readme_http_answers_are_the_apps(self):
        """The jobboard README's curl examples get the answers shown under them.

        POST /api/jobs also answers with exactly the status codes the README's
        table row lists, a body that is not JSON included.
        """
        with open(os.path.join(EXAMPLES, "jobboard", "README.md"), encoding="utf-8") as source:
            readme = source.read()
        self.start_board(JOBBOARD_WORKERS=1)
        commands = re.findall(r"^(curl (?:[^\n]*\\\n)*[^\n]*\n)((?:#[^\n]*\n)*)", readme, re.M)
        self.assertGreaterEqual(len(commands), 3, "the README's curl examples were not found")
        for command, answer in commands:
            with self.subTest(command=command):
                path = re.search(r"localhost:5000(/\S+)", command).group(1)
                body = json.loads(re.search(r"-d '(.*?)'", command, re.S).group(1))
                response = self.http.post(path, json=body)
                if not answer:
                    self.assertEqual(response.status_code, 201)
                    self.assertEqual({k: response.get_json()[k] for k in body}, body)
                    continue
                expected = json.loads("".join(line[1:] for line in answer.splitlines()))
                self.assertEqual(response.status_code, 400)
                self.assertEqual(response.get_json(), expected)

        row = next(line for line in readme.splitlines() if line.startswith("| `POST /api/jobs` |"))
        answers = row.split("|")[3]
        self.assertEqual(sorted(set(re.findall(r"`(\d{3})\b", answers))), ["201", "400", "503"])
        for kwargs in ({"data": "name=x", "content_type": "text/plain"},
                       {"data": "{not json", "content_type": "application/json"}):
            with self.subTest(body=kwargs):
                response = self.http.post("/api/jobs", **kwargs)
                self.assertEqual(response.status_code, 400)
                self.assertEqual(list(response.get_json()), ["error"])
        self.manager.shutdown()
        self.assertEqual(self.http.post("/api/jobs", json={"name": "late"}).status_code, 503)


# The browser test needs Debian's chromium and chromium-driver, and selenium (the test extra).
try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeDriverService
except ImportError:  # reported by browser_missing()
    webdriver = None

BROWSER_INSTALL = "apt-get install -y chromium chromium-driver"
BROWSER_TIMEOUT = 10.0  # page load, and the bound of each wait in a browser
PAGE_STATE_JS = """
return {
  conn: document.getElementById("conn").dataset.state,
  transport: document.getElementById("conn").dataset.transport,
  banner: document.getElementById("banner").hidden ? "" : document.getElementById("banner").textContent,
  jobs: Array.from(document.querySelectorAll("#jobs > li")).map(function (li) {
    return {id: li.dataset.id, name: li.querySelector(".job-name").textContent,
            status: li.querySelector(".badge").textContent, progress: Number(li.dataset.progress),
            count: li.querySelector(".count").textContent};
  }),
};
"""


def browser_missing():
    """Why the browser test cannot run here (with what to install), or None."""
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    if missing:
        return "%s not found; install them with: %s" % (" and ".join(missing), BROWSER_INSTALL)
    if webdriver is None:
        return "selenium is not installed; install it with: python -m pip install -e '.[test]'"
    return None


def free_port():
    """A port that was free a moment ago on 127.0.0.1."""
    with contextlib.closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TestJobBoardBrowser(SpecterTestCase):
    """The demo as a person sees it: headless Chromium, driven by Selenium, against app.py in a child process.

    Selenium calls block this process's hub; nothing else needs it, since
    the server runs in its own process.
    """

    ceiling = 90

    def setUp(self):
        super().setUp()
        reason = browser_missing()
        if reason:
            if os.environ.get("CI"):
                self.fail("CI must run the browser test: " + reason)
            # The one allowed skip: a user's machine without chromium and its
            # driver (the reason names the apt-get line). .ci/run installs them,
            # and under CI the line above fails instead.
            self.skipTest(reason)
        self.drivers = []
        self.workdir = tempfile.mkdtemp(prefix="specter-browser-")
        self.addCleanup(shutil.rmtree, self.workdir, True)

    # Fixtures -----------------------------------------------------------------

    def start_server(self):
        """Run examples/jobboard/app.py on a free port in its own process group; its URL once it answers."""
        port = free_port()
        self.log_path = os.path.join(self.workdir, "server.log")
        with open(self.log_path, "w") as log:
            self.server = subprocess.Popen(
                [sys.executable, "-u", os.path.join(EXAMPLES, "jobboard", "app.py"), "--port", str(port)],
                cwd=self.workdir, env=dict(os.environ, PYTHONPATH=SPECTER_DIR),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.addCleanup(self.kill_server)
        self.url = "http://127.0.0.1:%d" % port
        if not wait_until(lambda: self.server.poll() is not None or self.answers("/api/health"),
                          timeout=BROWSER_TIMEOUT, step=0.05) or self.server.poll() is not None:
            self.fail("the job board did not start:\n" + self.server_log())
        return self.url

    def kill_server(self):
        if self.server.poll() is None:
            os.killpg(self.server.pid, signal.SIGKILL)
        self.server.wait()

    def server_log(self):
        with open(self.log_path) as log:
            return log.read()[-4000:]

    def answers(self, path):
        try:
            with urllib.request.urlopen(self.url + path, timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def api(self, path, payload=None):
        """GET, or POST ``payload`` as JSON, to the board's HTTP API; the decoded answer."""
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)

    def open_browser(self):
        """A headless Chromium at 1280x900 on the board, driven through the system chromedriver."""
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                         "--disable-background-networking", "--no-first-run", "--disable-extensions"):
            options.add_argument(argument)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        # An explicit driver path: Selenium never looks for, or downloads, a driver of its own.
        service = ChromeDriverService(executable_path=shutil.which("chromedriver"),
                                      log_output=os.path.join(self.workdir, "chromedriver.log"))
        driver = webdriver.Chrome(options=options, service=service)
        self.addCleanup(driver.quit)
        self.drivers.append(driver)
        driver.set_page_load_timeout(BROWSER_TIMEOUT)
        driver.set_script_timeout(BROWSER_TIMEOUT)
        driver.get(self.url + "/")
        return driver

    @contextlib.contextmanager
    def evidence(self):
        """On failure, save a screenshot of every browser and the server's log, and print where."""
        try:
            yield
        except BaseException:
            folder = tempfile.mkdtemp(prefix="specter-browser-failure-")
            for number, driver in enumerate(self.drivers, 1):
                try:
                    driver.save_screenshot(os.path.join(folder, "browser-%d.png" % number))
                except Exception as exc:  # a dead browser must not hide the real failure
                    print("no screenshot of browser %d: %s" % (number, exc), file=sys.stderr)
            if getattr(self, "server", None) is not None:
                shutil.copy(self.log_path, os.path.join(folder, "server.log"))
            print("\n%s failed; screenshots and the server log are in %s" % (self.id(), folder), file=sys.stderr)
            raise

    # Reading the page ---------------------------------------------------------

    @staticmethod
    def page(driver):
        """What the page shows: connection state, transport, banner, and every job row."""
        return driver.execute_script(PAGE_STATE_JS)

    def row(self, driver, name):
        """The row showing the job named ``name``, or None."""
        return next((job for job in self.page(driver)["jobs"] if job["name"] == name), None)

    def wait_for(self, predicate, what, timeout=BROWSER_TIMEOUT):
        value = wait_until(predicate, timeout=timeout, step=0.02)
        if not value:
            self.fail("%s: not seen within %.1f s" % (what, timeout))
        return value

    def wait_live(self, driver):
        """Wait until the page is connected over Socket.IO and upgraded to a websocket."""
        self.wait_for(lambda: self.page(driver)["conn"] == "live" and self.page(driver)["transport"] == "websocket",
                      "a live Socket.IO connection over websocket")

    def assert_clean_console_and_local_requests(self, driver):
        errors = [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        self.assertEqual(errors, [], "the page logged errors")
        urls = []
        for entry in driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                urls.append(message["params"]["request"]["url"])
            elif message["method"] == "Network.webSocketCreated":
                urls.append(message["params"]["url"])
        origin = urllib.parse.urlsplit(self.url).netloc
        self.assertTrue(any("/static/socket.io.min.js" in url for url in urls), urls)
        self.assertTrue(any(url.startswith("ws://%s/socket.io/" % origin) for url in urls), urls)
        foreign = [url for url in urls if not url.startswith("data:") and urllib.parse.urlsplit(url).netloc != origin]
        self.assertEqual(foreign, [], "the page contacted another host")

    # Tests --------------------------------------------------------------------

    def test_page_shows_jobs_live_in_every_browser_without_any_other_host(self):
        self.start_server()
        with self.evidence():
            first = self.open_browser()
            self.wait_live(first)
            second = self.open_browser()
            self.wait_live(second)

            name = "from the form"
            form = first.find_element("id", "job-form")
            form.find_element("name", "name").send_keys(name)
            for field, value in (("steps", "8"), ("delay", "0.15")):
                box = form.find_element("name", field)
                box.clear()
                box.send_keys(value)
            clicked = time.monotonic()
            form.find_element("css selector", "button[type=submit]").click()
            self.wait_for(lambda: self.row(first, name), "the submitted job in its page", timeout=2.0)
            self.assertLess(time.monotonic() - clicked, 2.0)

            # Both pages, watched side by side until the job is done in both.
            seen = {first: [], second: []}

            def both_done():
                for driver, log in seen.items():
                    row = self.row(driver, name)
                    if row is not None:
                        log.append((row["status"], row["progress"]))
                return all(log and log[-1][0] == "done" for log in seen.values())
            self.wait_for(both_done, "the job done in both browsers")
            for driver, log in seen.items():
                with self.subTest(browser=self.drivers.index(driver) + 1):
                    running = {progress for status, progress in log if status == "running"}
                    self.assertGreaterEqual(len(running - {0, 8}), 2, "progress moves while it runs: %s" % log)
                    progress = [progress for _status, progress in log]
                    self.assertEqual(progress, sorted(progress), "progress never goes backwards")
                    self.assertEqual(self.row(driver, name)["count"], "8/8")

            # A job from the JSON API shows up in both, with no reload.
            for driver in seen:
                driver.execute_script("window.notReloaded = true;")
            job = self.api("/api/jobs", {"name": "from the API", "steps": 2, "delay": 0.05})
            for driver in seen:
                self.wait_for(lambda: (self.row(driver, "from the API") or {}).get("status") == "done",
                              "the API job done in a browser")
                self.assertTrue(driver.execute_script("return window.notReloaded === true;"))
                self.assertEqual(self.row(driver, "from the API")["id"], job["id"])
                self.assertEqual([row["name"] for row in self.page(driver)["jobs"]], ["from the API", name],
                                 "newest first")
            for driver in seen:
                self.assert_clean_console_and_local_requests(driver)

    def test_server_stop_shows_disconnected_and_the_running_job_cancelled(self):
        self.start_server()
        with self.evidence():
            browser = self.open_browser()
            self.wait_live(browser)
            job = self.api("/api/jobs", {"name": "long", "steps": 50, "delay": 0.2})
            self.wait_for(lambda: (self.row(browser, "long") or {}).get("progress", 0) >= 1,
                          "the long job running")
            pid = self.api("/api/jobs/%s" % job["id"])["pid"]
            self.assertEqual(self.row(browser, "long")["status"], "running")

            os.kill(self.server.pid, signal.SIGTERM)
            self.assertTrue(wait_until(lambda: self.server.poll() is not None, timeout=BROWSER_TIMEOUT, step=0.02),
                            "the server did not exit after SIGTERM:\n" + self.server_log())
            self.assertEqual(self.server.returncode, 0, self.server_log())
            self.assertNotIn("Traceback", self.server_log())
            self.assertTrue(pid_gone(pid), "no job process outlives the server")

            self.wait_for(lambda: self.page(browser)["conn"] == "disconnected", "the page showing it is disconnected")
            page = self.page(browser)
            self.assertIn("Disconnected", page["banner"])
            long_job = self.row(browser, "long")
            self.assertEqual(long_job["status"], "cancelled",
                             "the state the server gave the job at shutdown, not a frozen 'running'")
            self.assertLess(long_job["progress"], 50)


# The board on several nodes: short timings, set through the app's FLASK_JOBBOARD_* variables.
BOARD_NODE_ENV = {
    "FLASK_JOBBOARD_VISIBILITY_TIMEOUT": "1.0",
    "FLASK_JOBBOARD_PUSH_INTERVAL": "0.01",
    "FLASK_JOBBOARD_HOST_INTERVAL": "0.1",
    "FLASK_JOBBOARD_PRUNE_INTERVAL": "0.05",
    "FLASK_JOBBOARD_STOP_GRACE": "1.0",
}


class TestJobBoardCluster(ClusterTestCase):
    """examples/jobboard/app.py --redis: real node processes sharing the test's redis-server."""

    def setUp(self):
        super().setUp()
        self.pool = gevent.get_hub().threadpool
        self.workdir = tempfile.mkdtemp(prefix="specter-board-")
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.nodes = {}

    # Fixtures -----------------------------------------------------------------

    def start_nodes(self, *names, **env):
        """Start one app.py node per name (one worker each) in its own process group; wait until all answer."""
        for name in names:
            port = free_port()
            log = open(os.path.join(self.workdir, name + ".log"), "w")
            self.addCleanup(log.close)
            process = gevent.subprocess.Popen(
                [sys.executable, "-u", os.path.join(EXAMPLES, "jobboard", "app.py"), "--redis",
                 self.redis_server.url, "--port", str(port), "--node", name, "--workers", "1"],
                cwd=self.workdir, env=dict(os.environ, PYTHONPATH=SPECTER_DIR, **dict(BOARD_NODE_ENV, **env)),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self.addCleanup(self.stop_node, process)
            self.nodes[name] = (process, "http://127.0.0.1:%d" % port)
        for name in names:
            process, _url = self.nodes[name]
            if not wait_until(lambda: process.poll() is not None or self.answers(name), timeout=NODE_TIMEOUT) \
                    or process.poll() is not None:
                self.fail("node %s did not start:\n%s" % (name, self.log(name)))

    def stop_node(self, process):
        """SIGTERM (its jobs' processes are stopped with it), SIGKILL to the group if it lingers."""
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except gevent.subprocess.TimeoutExpired:
                pass
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def log(self, name):
        with open(os.path.join(self.workdir, name + ".log")) as log:
            return log.read()[-4000:]

    def answers(self, name):
        try:
            return self.api(name, "/api/health") is not None
        except OSError:
            return False

    def api(self, name, path, payload=None):
        """GET, or POST ``payload`` as JSON, to a node's HTTP API; the decoded answer."""
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.nodes[name][1] + path, data, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)

    def job(self, name, job_id):
        return self.api(name, "/api/jobs/%s" % job_id)

    def connect(self, name):
        """A real Socket.IO client of one node, recording every pushed event as (name, data)."""
        client = socketio.Client(reconnection=False)
        events = []
        for event in ("job:update", "job:removed", "host:update"):
            client.on(event, functools.partial(lambda event, data: events.append((event, data)), event))
        self.pool.spawn(client.connect, self.nodes[name][1], wait_timeout=CLIENT_TIMEOUT).get()
        self.addCleanup(lambda: client.connected and self.pool.spawn(client.disconnect).get())
        return events

    @staticmethod
    def updates(events, job_id):
        return [data for event, data in events if event == "job:update" and data["id"] == job_id]

    # Tests --------------------------------------------------------------------

    def test_jobs_submitted_on_one_node_run_on_free_workers_and_show_live_on_every_node(self):
        self.start_nodes("a", "b")
        on_b = self.connect("b")
        first = self.api("a", "/api/jobs", {"name": "first", "steps": 4, "delay": 0.1})
        second = self.api("a", "/api/jobs", {"name": "second", "steps": 4, "delay": 0.1})
        ids = (first["id"], second["id"])
        self.assertTrue(wait_until(lambda: all(self.updates(on_b, job_id)[-1:] and
                                               self.updates(on_b, job_id)[-1]["status"] == "done"
                                               for job_id in ids), timeout=10), on_b)

        finals = [self.updates(on_b, job_id)[-1] for job_id in ids]
        self.assertEqual(sorted(job["node"] for job in finals), ["a", "b"],
                         "one worker per node: the second job went to the other node's free worker")
        for job_id, final in zip(ids, finals):
            with self.subTest(job=job_id):
                seen = self.updates(on_b, job_id)
                self.assertIn("running", [update["status"] for update in seen], "pushed live, not only at the end")
                revs = [update["rev"] for update in seen]
                self.assertEqual(len(revs), len(set(revs)), "each change pushed once, not once per node: %s" % revs)
                self.assertEqual((final["progress"], final["returncode"], final["attempt"]), (4, 0, 1))
                for node in ("a", "b"):
                    self.assertEqual(self.job(node, job_id), final, "every node's API has the same job")
        self.assertEqual(self.api("b", "/api/jobs")["count"], 2)
        hosts = {data.get("node") for event, data in on_b if event == "host:update"}
        self.assertEqual(hosts, {"b"}, "host samples go to the node's own browsers only")

    def test_cancel_on_one_node_stops_the_job_on_the_node_running_it(self):
        self.start_nodes("a", "b")
        job = self.api("a", "/api/jobs", {"name": "long", "steps": 50, "delay": 0.05})
        running = wait_until(lambda: (lambda j: j["progress"] >= 1 and j)(self.job("a", job["id"])), timeout=5)
        self.assertTrue(running, "the job did not start")
        other = "b" if running["node"] == "a" else "a"
        self.assertEqual(self.api(other, "/api/jobs/%s/cancel" % job["id"], {})["status"], "cancelled")
        self.assertTrue(wait_until(lambda: pid_gone(running["pid"]), timeout=5),
                        "the node running the job stopped its process")
        for name in ("a", "b"):
            final = wait_until(lambda: (lambda j: j["returncode"] is not None and j)(self.job(name, job["id"])),
                               timeout=5)
            self.assertTrue(final, self.job(name, job["id"]))
            self.assertEqual(final["status"], "cancelled")
            self.assertLess(final["returncode"], 0, "ended by a signal")
            self.assertLess(final["progress"], 50)

    def test_sigkill_of_the_node_running_a_job_lets_the_other_node_finish_it(self):
        self.start_nodes("a", "b")
        clients = {name: self.connect(name) for name in ("a", "b")}
        job = self.api("a", "/api/jobs", {"name": "long", "steps": 20, "delay": 0.05})
        running = wait_until(lambda: (lambda j: j["progress"] >= 2 and j)(self.job("a", job["id"])), timeout=5)
        self.assertTrue(running, "the job did not start")
        victim, survivor = running["node"], "b" if running["node"] == "a" else "a"
        process = self.nodes[victim][0]
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        # The job's own process is in a session of its own and outlives its node: end it too.
        with contextlib.suppress(ProcessLookupError):
            os.kill(running["pid"], signal.SIGKILL)
        killed = time.monotonic()

        final = wait_until(lambda: (lambda j: j["status"] == "done" and j)(self.job(survivor, job["id"])),
                           timeout=10)
        self.assertTrue(final, self.job(survivor, job["id"]))
        self.assertLess(time.monotonic() - killed, 1.0 * 1.5 + 20 * 0.05 + 3, "taken over after visibility_timeout")
        self.assertEqual((final["node"], final["attempt"], final["progress"], final["returncode"]),
                         (survivor, 2, 20, 0))
        outputs = [update["output"] for update in self.updates(clients[survivor], job["id"])]
        self.assertTrue(any("restarted on %s (attempt 2)" % survivor in output for output in outputs), outputs)

    def test_a_stopping_node_hands_its_running_job_to_another_at_once(self):
        self.start_nodes("a", "b", FLASK_JOBBOARD_VISIBILITY_TIMEOUT="30")  # no reclaim within this test
        job = self.api("a", "/api/jobs", {"name": "long", "steps": 20, "delay": 0.05})
        running = wait_until(lambda: (lambda j: j["progress"] >= 2 and j)(self.job("a", job["id"])), timeout=5)
        self.assertTrue(running, "the job did not start")
        leaving, staying = running["node"], "b" if running["node"] == "a" else "a"
        on_staying = self.connect(staying)
        process = self.nodes[leaving][0]
        os.kill(process.pid, signal.SIGTERM)
        self.assertEqual(process.wait(timeout=10), 0, self.log(leaving))
        self.assertTrue(pid_gone(running["pid"]), "the job's process stopped with its node")

        final = wait_until(lambda: (lambda j: j["status"] == "done" and j)(self.job(staying, job["id"])),
                           timeout=6)
        self.assertTrue(final, self.job(staying, job["id"]))
        self.assertEqual((final["node"], final["attempt"], final["progress"]), (staying, 2, 20))
        statuses = [(update["status"], update["node"]) for update in self.updates(on_staying, job["id"])]
        self.assertIn(("queued", leaving), statuses, "back in the queue, never cancelled: %s" % statuses)
        self.assertNotIn("cancelled", [status for status, _node in statuses])

    def test_housekeeping_runs_on_one_node_and_prunes_every_node(self):
        self.start_nodes("a", "b", FLASK_JOBBOARD_KEEP_FINISHED="1")
        lifecycles = {name: self.api(name, "/api/health")["services"]["jobs.housekeeper"]["lifecycle"]
                      for name in ("a", "b")}
        self.assertEqual(sorted(lifecycles.values()), ["running", "standby"])
        standby = next(name for name, state in lifecycles.items() if state == "standby")
        on_standby = self.connect(standby)
        ids = [self.api("a", "/api/jobs", {"name": "quick %d" % n, "steps": 1, "delay": 0.01})["id"]
               for n in range(3)]
        removed = lambda: [data["id"] for event, data in on_standby if event == "job:removed"]
        self.assertTrue(wait_until(lambda: len(removed()) == 2 and all(
            self.api(name, "/api/jobs")["count"] == 1 for name in ("a", "b")), timeout=10),
            (removed(), [self.api(name, "/api/jobs") for name in ("a", "b")]))
        self.assertEqual(len(set(removed())), 2, "each removal pushed once")
        [kept] = self.api(standby, "/api/jobs")["jobs"]
        self.assertEqual(set(removed()) | {kept["id"]}, set(ids))
        self.assertEqual(self.api(standby, "/api/health")["services"]["jobs.housekeeper"]["lifecycle"], "standby")


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
                         "graceful_shutdown.py", "registry_and_bus.py", "factory_app.py",
                         "cluster_demo.py"):
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

    def test_controller_app_presence_forgets_a_disconnected_client(self):
        """A client that disconnects without 'leave' no longer counts as a room member."""
        spec = importlib.util.spec_from_file_location(
            "controller_app_example", os.path.join(EXAMPLES, "controller_app.py"))
        example = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(example)
        app, socketio_server = example.create_app()
        quiet = open(os.devnull, "w")  # the example prints as it mounts and tears down
        self.addCleanup(quiet.close)
        with contextlib.redirect_stdout(quiet):
            manager, _chat = example.wire(app, socketio_server)

        def shut_down_quietly():
            with contextlib.redirect_stdout(quiet):
                manager.shutdown()
        self.addCleanup(shut_down_quietly)

        def join(client):
            return client.emit("join", {"room": "general"}, callback=True)["members"]

        alice, bob = socketio_server.test_client(app), socketio_server.test_client(app)
        self.assertEqual((join(alice), join(bob)), (1, 2))
        bob.disconnect()
        carol = socketio_server.test_client(app)
        self.assertEqual(join(carol), 2, "bob still counted after he disconnected")
        alice.disconnect()
        carol.disconnect()
        self.assertEqual(join(socketio_server.test_client(app)), 1)

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



# Docs #########################################################################


# The documents whose ```python blocks must run as written.
DOCS = ("specter.md", "README.md")

# Fence labels for what is not Python: shell commands, output, other languages.
NOT_PYTHON_FENCES = ("sh", "bash", "text", "html", "nginx")

BLOCK_TIMEOUT = 20  # one block's wall-clock limit

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)


class DocBlock:
    """One fenced block of a document: where it is, its info string and its text."""

    def __init__(self, doc, line, info, code):
        self.doc, self.line, self.info, self.code = doc, line, info.strip(), code
        words = self.info.split()
        self.language = words[0] if words else ""
        self.file = next((w[len("file="):] for w in words[1:] if w.startswith("file=")), None)

    def __repr__(self):
        return "%s:%d" % (self.doc, self.line)

    @property
    def monkey_patches(self):
        """Whether the block calls gevent's monkey patching, which must come before any import."""
        return any(isinstance(node, ast.Attribute) and node.attr.startswith("patch_")
                   and isinstance(node.value, ast.Name) and node.value.id == "monkey"
                   for node in ast.walk(ast.parse(self.code)))


def doc_blocks(doc):
    """Every fenced block of ``doc`` (a file beside this test file), in order."""
    with open(os.path.join(HERE, doc), encoding="utf-8") as source:
        text = source.read()
    return [DocBlock(doc, text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2))
            for m in FENCE.finditer(text)]


def python_fence_count(doc):
    """How many lines of ``doc`` look like the opening of a Python fence.

    Counted without the block parser and more loosely than it reads fences
    (indented, ``~~~``, ``py``, ``python3``, ``pycon``), so a block the
    runner would not see shows up as a difference.
    """
    with open(os.path.join(HERE, doc), encoding="utf-8") as source:
        return sum(1 for line in source if re.match(r"\s*(```|~~~)\s*py", line, re.I))


# Imported once by the block runner before it forks (about 0.4 s a block saved).
BLOCK_PRELOAD = "flask,flask_socketio,gevent,gevent.pywsgi,socketio,unittest,specter"

# Runs blocks in forked copies of one interpreter that has imported the
# modules named in argv[2] (none: a fresh interpreter), each child in its
# own process group with its own stdout/stderr files; prints one JSON line
# per block.
BLOCK_RUNNER = r"""
import atexit, importlib, json, os, runpy, signal, sys, time

timeout = float(sys.argv[1])
for module in filter(None, sys.argv[2].split(",")):
    importlib.import_module(module)
for path in sys.argv[3:]:
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        for fd, suffix in ((1, ".out"), (2, ".err")):
            os.dup2(os.open(path + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = [path]
        code = 0
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    deadline = started + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            returncode = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            returncode = "killed after %ss" % timeout
            break
        time.sleep(0.002)
    try:
        os.killpg(pid, signal.SIGKILL)  # anything the block left running in its group
    except ProcessLookupError:
        pass
    print(json.dumps({"path": path, "returncode": returncode,
                      "seconds": round(time.monotonic() - started, 3)}), flush=True)
"""


def run_blocks(directory, blocks):
    """Run every block; {block: (returncode, stdout, stderr, seconds)}.

    A block that monkey-patches runs in a fresh interpreter of its own (its
    patch_all must come before any import); the others run in forked copies
    of BLOCK_RUNNER's warmed interpreter.
    """
    paths = {}
    for block in blocks:
        name = "%s-L%d.py" % (block.doc.replace(".", "_"), block.line)
        paths[block] = os.path.join(directory, name)
        with open(paths[block], "w", encoding="utf-8") as script:
            script.write(block.code)
    env = dict(os.environ, PYTHONPATH=REPO)
    fresh = [b for b in blocks if b.monkey_patches]
    forked = [paths[b] for b in blocks if not b.monkey_patches]
    commands = [[sys.executable, "-c", BLOCK_RUNNER, str(BLOCK_TIMEOUT), BLOCK_PRELOAD] + forked]
    commands += [[sys.executable, "-c", BLOCK_RUNNER, str(BLOCK_TIMEOUT), "", paths[b]]
                 for b in fresh]
    processes = [gevent.subprocess.Popen(command, cwd=directory, env=env, start_new_session=True,
                                         stdout=gevent.subprocess.PIPE,
                                         stderr=gevent.subprocess.PIPE, universal_newlines=True)
                 for command in commands]
    reports = {}
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=BLOCK_TIMEOUT * (len(forked) + 1))
            if process.returncode != 0:
                raise AssertionError("the block runner failed:\n%s" % stderr)
            for line in stdout.splitlines():
                report = json.loads(line)
                reports[report["path"]] = report
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    results = {}
    for block, path in paths.items():
        report = reports.get(path, {"returncode": "not run", "seconds": 0})
        outputs = []
        for suffix in (".out", ".err"):
            if not os.path.exists(path + suffix):
                outputs.append("")
                continue
            with open(path + suffix, encoding="utf-8", errors="replace") as output:
                outputs.append(output.read())
        results[block] = (report["returncode"],) + tuple(outputs) + (report["seconds"],)
    return results


class TestGuide(SpecterTestCase):
    """Every ```python block of specter.md and README.md runs as written."""

    ceiling = 60

    def blocks(self):
        return [block for doc in DOCS for block in doc_blocks(doc)]

    def test_every_python_fence_is_parsed_as_a_block(self):
        for doc in DOCS:
            with self.subTest(doc=doc):
                python = [b for b in doc_blocks(doc) if b.language == "python"]
                self.assertGreater(len(python), 0)
                self.assertEqual(len(python), python_fence_count(doc))

    def test_python_is_not_hidden_in_other_fences(self):
        for block in self.blocks():
            if block.language == "python":
                continue
            with self.subTest(block=block):
                self.assertIn(block.language, NOT_PYTHON_FENCES + ("",))
                try:
                    tree = ast.parse(block.code)
                except SyntaxError:
                    continue
                statements = [type(n).__name__ for n in tree.body if not isinstance(n, ast.Expr)]
                self.assertEqual(statements, [], "%r is Python: fence it as python (python "
                                 "file=PATH for a file of a larger project)" % (block,))

    def test_blocks_with_a_socketio_client_say_what_to_install(self):
        """socketio.Client needs python-socketio's client extra, which Flask-SocketIO does not bring."""
        for doc in DOCS:
            with open(os.path.join(HERE, doc), encoding="utf-8") as source:
                lines = source.read().splitlines()
            for block in doc_blocks(doc):
                if block.language != "python" or not re.search(r"socketio\.(Simple)?Client\(", block.code):
                    continue
                with self.subTest(block=block):
                    heading, fenced = 0, False  # the block's section starts at the last heading
                    for number, line in enumerate(lines[:block.line - 1]):
                        if line.startswith("```"):
                            fenced = not fenced
                        elif not fenced and re.match(r"#{1,6} ", line):
                            heading = number
                    section = "\n".join(lines[heading:block.line])
                    self.assertIn('pip install "python-socketio[client]"', section)

    def test_install_commands_never_take_specter_runtime_from_the_index(self):
        """PyPI's specter-runtime is the older 0.1.x package: every install names this repository."""
        commands = 0
        for doc in DOCS + (os.path.join("examples", "jobboard", "README.md"),):
            with open(os.path.join(HERE, doc), encoding="utf-8") as source:
                lines = source.read().splitlines()
            for number, line in enumerate(lines, 1):
                for match in re.finditer(r"pip install ([^`#&|;]*)", line):
                    commands += 1
                    for argument in shlex.split(match.group(1)):
                        name = re.split(r"[^A-Za-z0-9._-]", argument, 1)[0]
                        if re.sub(r"[._]", "-", name.lower()) == "specter-runtime":
                            with self.subTest(doc=doc, line=number):
                                self.assertRegex(argument, r"^specter-runtime @ \S",
                                                 "an install by name from the package index")
        self.assertGreater(commands, 5)

    def test_vendoring_recipe_gives_an_importable_copy(self):
        """Section 9's shell recipe, run in an empty project, then its myapp/app.py imported."""
        blocks = doc_blocks("specter.md")
        recipe = next(b for b in blocks if b.language == "sh" and "cp specter.py" in b.code)
        app = next(b for b in blocks if b.file == "myapp/app.py")
        project = tempfile.mkdtemp(prefix="specter-vendor-")
        self.addCleanup(shutil.rmtree, project, ignore_errors=True)
        shutil.copy(specter.__file__, project)  # the checkout the recipe copies from
        steps = [line for line in recipe.code.splitlines() if not line.startswith("pip ")]
        subprocess.run(["bash", "-ec", "\n".join(steps)], cwd=project, check=True, timeout=30,
                       start_new_session=True)
        os.remove(os.path.join(project, "specter.py"))
        with open(os.path.join(project, "myapp", "app.py"), "w", encoding="utf-8") as source:
            source.write(app.code)
        script = ("import sys, myapp.app, myapp._vendor.specter as vendored\n"
                  "print(vendored.__version__, 'specter' in sys.modules, myapp.app.bus is vendored.bus)")
        env = dict(os.environ, PYTHONPATH=project)
        proc = subprocess.run([sys.executable, "-c", script], cwd=project, env=env,
                              capture_output=True, text=True, timeout=60, start_new_session=True)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(proc.stdout.split(), [specter.__version__, "False", "True"])

    def test_guide_shows_presence_with_connect_disconnect_sid_and_rooms(self):
        """Part I has a runnable block doing what every presence feature needs."""
        with open(os.path.join(HERE, "specter.md"), encoding="utf-8") as source:
            part_one_lines = source.read().split("\n# Part II")[0].count("\n") + 1
        needed = ('"connect"', '"disconnect"', "request.sid", "join_room(", "leave_room(", "to=room")
        presence = [b for b in doc_blocks("specter.md") if b.language == "python" and not b.file
                    and b.line < part_one_lines and all(word in b.code for word in needed)]
        self.assertTrue(presence, "no guide block subscribes to connect and disconnect, "
                                  "keys state by request.sid and uses rooms")

    def test_gunicorn_is_installed_with_its_gevent_extra(self):
        """gunicorn's gevent worker needs the extra (packaging, a recent gevent); plain gunicorn fails."""
        with open(os.path.join(HERE, "specter.md"), encoding="utf-8") as source:
            text = source.read()
        installs = [argument for match in re.finditer(r"pip install ([^`#&|;\n]*)", text)
                    for argument in shlex.split(match.group(1)) if argument.startswith("gunicorn")]
        self.assertTrue(installs, "the guide never says how to install gunicorn")
        for argument in installs:
            self.assertTrue(argument.startswith("gunicorn[gevent]"), argument)

    def test_guide_states_engineio_message_limit_where_sizes_are_discussed(self):
        with open(os.path.join(HERE, "specter.md"), encoding="utf-8") as source:
            text = source.read()
        default = SocketIO(Flask(__name__), async_mode="gevent").server.eio.max_http_buffer_size
        stated = re.findall(r"`max_http_buffer_size`\s*\(([\d,]+) bytes by default", text)
        self.assertTrue(stated)
        self.assertEqual({int(number.replace(",", "")) for number in stated}, {default})
        sections = re.split(r"\n(?=#{2,3} \d)", text.split("\n# Part II")[0])
        for title in ("### 7.2 Constraints", "### 13.1 "):
            with self.subTest(section=title):
                section = next(part for part in sections if part.startswith(title))
                self.assertIn("max_http_buffer_size", section)

    def test_guide_shows_json_errors_for_unknown_paths_under_a_prefix(self):
        """Flask answers a path no route matches with HTML; the guide shows the app-level fix, run."""
        blocks = [b for b in doc_blocks("specter.md") if b.language == "python" and not b.file
                  and "errorhandler(HTTPException)" in b.code and "url_prefix" in b.code]
        self.assertTrue(blocks, "no runnable block answers unknown API paths in JSON")

    def test_project_files_compile_and_import_only_public_names(self):
        files = [b for b in self.blocks() if b.language == "python" and b.file]
        self.assertTrue(files)
        for block in files:
            with self.subTest(block=block, file=block.file):
                self.assertTrue(block.code.startswith("# %s\n" % block.file),
                                "%r must start with a comment naming %s" % (block, block.file))
                tree = compile(block.code, block.file, "exec", ast.PyCF_ONLY_AST)
                for node in ast.walk(tree):
                    if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] == "specter":
                        for alias in node.names:
                            self.assertIn(alias.name, specter.__all__)

    def test_every_python_block_runs_as_written(self):
        runnable = [b for b in self.blocks() if b.language == "python" and not b.file]
        self.assertGreater(len(runnable), 50)
        directory = tempfile.mkdtemp(prefix="specter-docs-")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        results = run_blocks(directory, runnable)
        self.assertEqual(len(results), len(runnable))
        for block, (returncode, stdout, stderr, seconds) in results.items():
            with self.subTest(block=block):
                report = "%r (%.2f s)\n--- stdout\n%s\n--- stderr\n%s" % (
                    block, seconds, stdout[-2000:], stderr[-4000:])
                self.assertEqual(returncode, 0, report)
                # gevent's hub reports a greenlet that died of an exception this way.
                self.assertNotIn(" failed with ", stderr, report)


# Packaging ####################################################################


# What a source distribution must carry beyond the module: enough to run the
# test suite, read the guide and try the examples from the unpacked archive.
SDIST_FILES = ("specter.py", "test_specter.py", "specter.md", "README.md", "LICENSE",
               "pyproject.toml", "examples/jobboard/README.md", "examples/jobboard/app.py",
               "examples/jobboard/templates/index.html")

# Left out of the copy the packages are built from: VCS data, virtualenvs, build output.
BUILD_IGNORED = shutil.ignore_patterns(
    ".git", ".ci-venv", ".venv", ".bench", "build", "dist", "*.egg-info", "__pycache__", "*.pyc")


def build_hook(hook, source, outdir):
    """Call setuptools' PEP 517 ``hook`` in a fresh interpreter in ``source``; the file name it built.

    The same hooks ``python -m build --no-isolation`` and pip call, without
    their wrappers (and without the network: the build requirements are the
    ``test`` extra's).
    """
    script = "import sys\nfrom setuptools import build_meta\nprint(build_meta.%s(sys.argv[1]))\n" % hook
    proc = subprocess.run(
        [sys.executable, "-c", script, outdir], cwd=source, capture_output=True, text=True,
        timeout=60, start_new_session=True,
    )
    if proc.returncode != 0:
        raise AssertionError("%s failed in %s:\n%s\n%s" % (hook, source, proc.stdout, proc.stderr))
    return proc.stdout.strip().splitlines()[-1]


class TestPackaging(SpecterTestCase):
    """The sdist carries the module, its tests, docs and examples; the wheel the module alone."""

    ceiling = 60

    @classmethod
    def setUpClass(cls):
        """Build once: the sdist from a copy of the checkout, the wheel from the unpacked sdist."""
        cls.tmp = tempfile.mkdtemp(prefix="specter-build-")
        source = os.path.join(cls.tmp, "source")
        shutil.copytree(HERE, source, ignore=BUILD_IGNORED)
        dist = os.path.join(cls.tmp, "dist")
        os.mkdir(dist)
        cls.sdist = os.path.join(dist, build_hook("build_sdist", source, dist))
        with tarfile.open(cls.sdist) as archive:
            members = [m for m in archive.getmembers() if m.isfile()]
            root = os.path.commonpath([m.name for m in members])
            cls.sdist_files = sorted(os.path.relpath(m.name, root) for m in members)
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            archive.extractall(os.path.join(cls.tmp, "unpacked"), members=members, **safe)
        unpacked = os.path.join(cls.tmp, "unpacked", root)
        cls.wheel = os.path.join(dist, build_hook("build_wheel", unpacked, dist))
        with zipfile.ZipFile(cls.wheel) as archive:
            cls.wheel_files = sorted(archive.namelist())

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_sdist_carries_tests_docs_examples_and_licence(self):
        for name in SDIST_FILES:
            self.assertIn(name, self.sdist_files)
        examples = sorted(os.path.relpath(path, HERE)
                          for path in glob.glob(os.path.join(HERE, "examples", "*.py")))
        self.assertTrue(examples)
        self.assertEqual([name for name in examples if name not in self.sdist_files], [])
        self.assertFalse([name for name in self.sdist_files
                          if "__pycache__" in name or name.endswith(".pyc")])

    def test_wheel_carries_the_single_module(self):
        installed = [name for name in self.wheel_files if ".dist-info/" not in name]
        self.assertEqual(installed, ["specter.py"])
        self.assertTrue(os.path.basename(self.wheel).startswith(
            "specter_runtime-%s-py3-none-any" % specter.__version__), self.wheel)

    def test_test_extra_names_what_the_build_needs(self):
        with open(os.path.join(HERE, "pyproject.toml"), encoding="utf-8") as source:
            text = source.read()
        extra = re.search(r"^test = \[(.*?)^\]", text, re.S | re.M).group(1)
        for requirement in ("setuptools", "wheel", "python-socketio[client]"):
            self.assertIn('"%s' % requirement, extra)


if __name__ == "__main__":
    unittest.main()
