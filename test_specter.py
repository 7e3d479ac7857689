"""Tests for specter.py, in the module's section order.

Run with ``python -m unittest test_specter -v``. Standard-library unittest
only; nothing here monkey-patches. Waits are bounded: events, or
``gevent.sleep`` polling up to a deadline, never ``time.sleep``.
"""

import ast
import decimal
import gc
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import time
import unittest

import gevent
import gevent.event
import gevent.queue
import greenlet

import specter
from specter import (
    Cache,
    EventBus,
    Field,
    Model,
    Operation,
    OperationError,
    Outcome,
    QueueService,
    SPECTERRegistry,
    Schema,
    SchemaError,
    Service,
    Store,
    create_cache,
    create_model,
    create_store,
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
    """Clears the module singletons and arms a per-test time ceiling."""

    def setUp(self):
        specter.bus.clear()
        specter.registry.clear()
        timer = gevent.Timeout.start_new(
            TEST_CEILING, AssertionError("test exceeded %ds" % TEST_CEILING)
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


# State: Store #################################################################


class TestStore(SpecterTestCase):
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


if __name__ == "__main__":
    unittest.main()
