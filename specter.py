"""SPECTER: lifecycle-first service primitives for Flask, gevent and Flask-SocketIO.

Service Primitives for Event Control, Teardown, and Execution Runtime. Every
piece of background work has an owner, teardown is deterministic, and services
talk through clear boundaries: a bus, a registry and validated contracts. The
whole framework is this one module; copy it into a project or install it.

Guide and API reference: specter.md.
Licensed under the Apache License, Version 2.0 (see LICENSE).
"""

from __future__ import annotations

__version__ = "0.2.0"

__all__ = [
    # errors
    "SpecterError",
    # bus
    "EventBus", "bus",
    # registry
    "SPECTERRegistry", "Registry", "registry",
    # lifecycle
    "Service", "QueueService", "Watcher", "WatcherError",
    # state
    "Store", "create_store", "Model", "create_model", "Cache", "create_cache",
    # schema
    "Field", "Schema", "SchemaError", "Outcome", "Operation", "OperationError",
    # web
    "HTTPError", "json_endpoint", "expect_json", "require_fields", "Router", "route",
    "Handler", "SocketIngress", "Controller", "ServiceManager", "boot",
    # processes
    "ManagedProcess", "start_process",
    # cluster
    "Cluster", "ClusterQueue", "Lease",
    # testing
    "ManualClock", "isolated", "leak_check", "SpecterTestCase",
]

import atexit
import codecs
import collections
import collections.abc
import contextlib
import copy
import decimal
import fnmatch
import functools
import hashlib
import heapq
import inspect
import io
import itertools
import json
import logging
import math
import numbers
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import types
import unittest
import warnings
import weakref
from typing import Any, Callable, Deque, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union

import click
import flask
import flask.cli
import werkzeug.exceptions

import gevent
import gevent.event
import gevent.lock
import gevent.monkey
import gevent.queue
import gevent.socket
import gevent.ssl
import gevent.subprocess
from gevent import Greenlet, pywsgi
import greenlet
from greenlet import getcurrent

logger = logging.getLogger("specter")

_MISSING = object()
_monotonic = time.monotonic

_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])
_O = TypeVar("_O", bound="_Owner")
_S = TypeVar("_S", bound="Service")


def _check_callable(value, what):
    if not callable(value):
        raise TypeError("%s must be callable, got %s" % (what, _describe(value)))
    return value


def _check_name(value, what, *, strip=True, empty=ValueError):
    """Every name SPECTER takes is a non-empty string: one check, two rules.

    A name (of a service, store, process...) drops the whitespace around it
    (``strip``) and an empty one is a ValueError, a wrong value of the right
    type. Event names (``strip=False``: taken exactly as given, so a plain
    str) and registry keys raise TypeError for an empty one too (``empty``),
    as the reference's argument rules say.
    """
    if type(value) is not str and not (strip and isinstance(value, str)):
        raise TypeError("%s must be a non-empty string, got %s" % (what, _describe(value)))
    name = value.strip() if strip else value
    if not name:
        raise empty("%s must be a non-empty string, got %r" % (what, value))
    return name


def _check_seconds(value, what, *, allow_none=False, positive=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("%s must be a number of seconds, got %s" % (what, _describe(value)))
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "greater than 0" if positive else "0 or more"
        raise ValueError("%s must be %s seconds, got %r" % (what, bound, value))
    return float(value)


def _check_count(value, what, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("%s must be an integer, got %s" % (what, _describe(value)))
    if value < minimum:
        raise ValueError("%s must be %d or more, got %d" % (what, minimum, value))
    return value


def _check_owner(owner):
    """An owner is anything with a callable add_cleanup (Service, Router, Handler...)."""
    if owner is not None and not callable(getattr(owner, "add_cleanup", None)):
        raise TypeError(
            "owner must have a callable add_cleanup() (a Service, Router or Handler), got %s"
            % _describe(owner)
        )
    return owner


def _drop(obj, attr, item):
    """Remove ``item`` (by identity) from the tuple ``obj.<attr>``; True if it was there.

    Listener tuples are replaced, never mutated, so a loop already running
    over the old tuple is unaffected.
    """
    items = getattr(obj, attr)
    kept = tuple(entry for entry in items if entry is not item)
    setattr(obj, attr, kept)
    return len(kept) != len(items)


def _notify(subscribers, args, log, message, *context):
    """Call each of ``subscribers`` with ``args``; one that raises is logged and the rest still run.

    The log line is ``message % (*context, name of the subscriber)``, with
    the traceback. Returns the last non-None value a subscriber returned.
    ``subscribers`` may be an iterator: whoever holds it knows, if the
    calling greenlet is interrupted, whom the round had not reached yet.
    """
    result = None
    for fn in subscribers:
        try:
            value = fn(*args)
        except Exception:
            log.exception(message, *context, _callable_name(fn))
            continue
        if value is not None:
            result = value
    return result


def _drop_keyed(mapping, key, unwanted):
    """Remove the entries ``unwanted(entry)`` picks from the tuple ``mapping[key]``.

    The key goes when nothing is left. Returns the tuple kept (maybe
    empty), or None when nothing was removed. The tuple is replaced, never
    mutated, so a loop already walking the old one is unaffected.
    """
    current = mapping.get(key)
    if not current:
        return None
    kept = tuple(entry for entry in current if not unwanted(entry))
    if len(kept) == len(current):
        return None
    if kept:
        mapping[key] = kept
    else:
        del mapping[key]
    return kept


def _run_all(steps, on_error):
    """Run every step even when one fails: teardown must not stop halfway.

    An Exception goes to ``on_error(label)`` (which logs it); the first
    interruption (GreenletExit, a Timeout, KeyboardInterrupt) is re-raised
    once every step has run.
    """
    interrupted = None
    for step in steps:
        try:
            step()
        except Exception:
            on_error(_callable_name(step))
        except BaseException as exc:  # finish first, then let it through
            interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted


def _describe(value):
    return "%s %s" % (type(value).__name__, _clip(repr(value)))


def _clip(text, limit=60):
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _callable_name(fn):
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


# The clock behind every SPECTER timer. Timer code reads the time with _now()
# and waits through _clock (call_later, start_later, sleep), never through time
# or gevent directly, so that testing's ManualClock can take both over for a
# test. Deadlines of real waits (a queue drain, a process exit) keep
# _monotonic: they wait for real work, which a manual clock cannot hurry.
_now = time.monotonic


class _Clock:
    """Real time: hub timers and gevent.sleep. ManualClock has the same three methods."""

    __slots__ = ()

    def call_later(self, seconds, callback):
        """Run ``callback()`` in the hub after ``seconds``; ``close()`` on the handle cancels it.

        The handle is the hub's own timer watcher, so a timer costs what it
        did before there was a clock to swap.
        """
        timer = gevent.get_hub().loop.timer(seconds)
        timer.start(callback, update=True)
        if _testing_watches:
            _testing_note_timer(timer, callback)
        return timer

    def start_later(self, glet, seconds):
        """Start the (gevent) greenlet ``glet`` after ``seconds``; killing it cancels the start."""
        glet.start_later(seconds)
        if _testing_watches:
            _testing_note_greenlet(glet)

    def sleep(self, seconds):
        """Block the current greenlet for ``seconds``."""
        gevent.sleep(seconds)


_clock = _Clock()


###############################################################################
# Errors #######################################################################
###############################################################################

# Every exception class the module defines, in one place. Each keeps the
# built-in base it has always had, so existing ``except`` clauses still work.


class SpecterError(Exception):
    """The root of every exception SPECTER defines: ``except SpecterError`` catches them all."""


class WatcherError(SpecterError, RuntimeError):
    """Raised by a poll or stream function to report a failure without a traceback."""


class SchemaError(SpecterError, ValueError):
    """A contract was not met.

    Raised by coercers and validators to fail a field with their own
    message; ``field`` names the field and ``errors`` maps paths to messages.
    """

    def __init__(self, message, *, field=None, errors=None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.errors = dict(errors or {})


class OperationError(SpecterError):
    """Raised inside an Operation to fail it with ``status`` and ``meta``."""

    def __init__(self, message, *, status=400, meta=None):
        super().__init__(message)
        self.message = message
        self.status = _outcome_status(status)
        self.meta = dict(meta or {})


class HTTPError(SpecterError):
    """An error meant for an HTTP client: a message, a status and a JSON payload.

    ``json_endpoint`` turns it into a response whose body is ``payload``
    plus ``error``; ``log_message`` (if any) goes to the log at
    ``log_level``, never to the client.
    """

    def __init__(self, message, status_code=400, *, status=None, payload=None, log_message=None,
                 log_level=logging.WARNING):
        super().__init__(message)
        self.message = message
        self.status_code = _outcome_status(status if status is not None else status_code)
        if payload is not None and not isinstance(payload, dict):
            raise TypeError("payload must be a dict, got %s" % _describe(payload))
        self.payload = dict(payload or {})
        self.log_message = log_message
        self.log_level = log_level

    def to_response(self) -> flask.Response:
        """A Flask JSON response: payload plus ``error``, with ``status_code``.

        A payload JSON cannot encode is a bug on the server's side, not the
        client's: it is logged and left out, and the client still gets the
        message and the status as JSON rather than Flask's HTML 500.
        """
        body = dict(self.payload)
        body["error"] = self.message
        try:
            return _web_json(body, self.status_code)
        except Exception:
            _web_log.exception("HTTPError %d %r: its payload cannot be encoded as JSON; answering without it",
                               self.status_code, self.message)
        try:
            return _web_json({"error": self.message}, self.status_code)
        except Exception:  # the message itself is no JSON string
            return _web_json({"error": "Internal server error"}, 500)


###############################################################################
# Bus ##########################################################################
###############################################################################

_bus_log = logging.getLogger("specter.bus")


class EventBus:
    """Synchronous publish/subscribe inside one process.

    Listeners run in the emitting greenlet, in subscription order. A listener
    that raises is logged with its traceback and the others still run. Each
    event's listeners live in a tuple that is replaced, never mutated, so
    subscribing or unsubscribing during an emit takes effect from the next
    emit, and an emit with no listeners costs one dict lookup.
    """

    def __init__(self):
        self._listeners = {}
        self._outbound = None  # the cluster's link while it shares events (see Cluster)

    def on(self, event: str, callback: Callable[..., Any], *, origin: str = "any") -> Callable[[], bool]:
        """Subscribe ``callback(data)``; subscribing it twice keeps one registration.

        ``origin`` matters with a Cluster: 'local' hears only events emitted
        in this process, 'remote' only those from other nodes, 'any' both.
        """
        event = _bus_event(event)
        _check_callable(callback, "callback")
        if origin != "any":
            if origin not in ("local", "remote"):
                raise ValueError("origin must be 'any', 'local' or 'remote', got %r" % (origin,))
            callback = _BusOrigin(origin, callback)
        current = self._listeners.get(event, ())
        if callback not in current:
            self._listeners[event] = current + (callback,)
        if type(callback) is _BusOrigin:
            return functools.partial(self._remove, event, callback)
        return functools.partial(self.off, event, callback)

    def once(self, event: str, callback: Callable[..., Any]) -> Callable[[], bool]:
        """Subscribe ``callback`` for the next emit only."""
        event = _bus_event(event)
        _check_callable(callback, "callback")
        wrapper = _BusOnce(self, event, callback)
        self._listeners[event] = self._listeners.get(event, ()) + (wrapper,)
        return functools.partial(self._remove, event, wrapper)

    def off(self, event: str, callback: Callable[..., Any]) -> bool:
        """Remove ``callback`` (including a pending ``once``); unknown pairs are ignored."""
        def unwanted(fn):
            return fn == callback or (type(fn) in _BUS_WRAPPERS and fn.callback == callback)
        return _drop_keyed(self._listeners, _bus_event(event), unwanted) is not None

    def emit(self, event: str, data: Any = None) -> None:
        """Call every listener of ``event`` with ``data``, now, in this greenlet.

        A shared event (see Cluster.share) is then published to the other
        nodes; its payload is checked before any listener runs.
        """
        outbound = self._outbound
        shared = None if outbound is None else outbound.prepare(event, data)
        listeners = self._listeners.get(event)
        if listeners is None:
            if shared is None:
                # Only a miss can be a bad name: on() never stores one. The test
                # is _bus_event's, inline: calling it would cost more than the lookup.
                if type(event) is not str or not event:
                    _bus_event(event)
                return
            listeners = ()
        # _notify(listeners, (data,), ...), inline: bench_specter.py's bus.emit
        # row goes over its target through the extra frame and call(*args).
        for callback in listeners:
            try:
                callback(data)
            except Exception:
                _bus_log.exception("listener %s of %r raised", _callable_name(callback), event)
        if shared is not None:
            outbound.publish(shared)

    def clear(self, event: Optional[str] = None) -> None:
        """Drop the listeners of one event, or of every event."""
        if event is None:
            self._listeners.clear()
        else:
            self._listeners.pop(_bus_event(event), None)

    def has_listeners(self, event: str) -> bool:
        return bool(self._listeners.get(_bus_event(event)))

    def listener_count(self, event: Optional[str] = None) -> int:
        if event is None:
            return sum(len(fns) for fns in self._listeners.values())
        return len(self._listeners.get(_bus_event(event), ()))

    def _attach(self, outbound):
        """Route shared events through ``outbound`` (a cluster's link), or stop when None."""
        self._outbound = outbound

    def _deliver_remote(self, event, data):
        """Run the listeners of an event another node emitted; 'local'-only ones are skipped."""
        listeners = (fn.callback if type(fn) is _BusOrigin else fn for fn in self._listeners.get(event, ())
                     if not (type(fn) is _BusOrigin and fn.origin == "local"))
        _notify(listeners, (data,), _bus_log, "remote %r: listener %s raised", event)

    def _remove(self, event, wrapper):
        return _drop_keyed(self._listeners, event, lambda fn: fn is wrapper) is not None


class _BusOnce:
    __slots__ = ("bus", "event", "callback", "fired")

    def __init__(self, bus, event, callback):
        self.bus = bus
        self.event = event
        self.callback = callback
        self.fired = False

    def __call__(self, data):
        if self.fired:
            return None
        self.fired = True
        self.bus._remove(self.event, self)
        return self.callback(data)

    def __repr__(self):
        return "once(%s)" % _callable_name(self.callback)


class _BusOrigin:
    """A listener that hears events of one origin only; a local emit calls it directly."""

    __slots__ = ("origin", "callback")

    def __init__(self, origin, callback):
        self.origin = origin
        self.callback = callback

    def __call__(self, data):
        if self.origin == "local":
            return self.callback(data)
        return None  # 'remote': only EventBus._deliver_remote calls its callback

    def __eq__(self, other):
        return type(other) is _BusOrigin and other.origin == self.origin and other.callback == self.callback

    def __hash__(self):
        return hash((self.origin, self.callback))

    def __repr__(self):
        return "%s(%s)" % (self.origin, _callable_name(self.callback))


_BUS_WRAPPERS = (_BusOnce, _BusOrigin)


# Event names are taken as given; an empty one is a TypeError (R0, "Argument rules").
_bus_event = functools.partial(_check_name, what="event", strip=False, empty=TypeError)


###############################################################################
# Registry #####################################################################
###############################################################################

_registry_log = logging.getLogger("specter.registry")


class SPECTERRegistry:
    """The composition root's service locator.

    The app's wiring code provides values under string keys; features resolve
    them late, by key, instead of importing each other. A value provided with
    an ``owner`` disappears when that owner stops. ``wait_for`` lets a
    greenlet block cooperatively until a key shows up.
    """

    def __init__(self):
        self._entries = {}
        self._waiters = {}

    def provide(self, key: str, value: _T, owner: Any = None, replace: bool = False) -> _T:
        """Store ``value`` under ``key`` and wake every ``wait_for(key)``."""
        key = _registry_key(key)
        _check_owner(owner)
        if key in self._entries and not replace:
            raise KeyError("%r is already provided; pass replace=True to overwrite it" % key)
        self._entries[key] = value
        if owner is not None:
            owner.add_cleanup(functools.partial(self._release, key, value))
        waiter = self._waiters.pop(key, None)
        if waiter is not None:
            waiter.set(value)
        _registry_log.debug("provided %r", key)
        return value

    def unregister(self, key: str) -> bool:
        return self._entries.pop(_registry_key(key), _MISSING) is not _MISSING

    def resolve(self, key: str) -> Any:
        """The value under ``key``, or None."""
        try:
            return self._entries[key]
        except (KeyError, TypeError):
            return self._entries.get(_registry_key(key))

    def require(self, key: str) -> Any:
        """The value under ``key`` (even a falsy one); KeyError names the known keys."""
        try:
            return self._entries[key]
        except (KeyError, TypeError):
            pass
        key = _registry_key(key)
        try:
            return self._entries[key]
        except KeyError:
            known = ", ".join(repr(k) for k in self._entries) or "none"
            raise KeyError(
                "nothing is provided under %r (known keys: %s); provide it at boot or "
                "use resolve() for optional dependencies" % (key, known)
            ) from None

    def has(self, key: str) -> bool:
        return _registry_key(key) in self._entries

    def list(self) -> List[str]:
        return list(self._entries)

    def wait_for(self, key: str, timeout: Optional[float] = None) -> Any:
        """Return the value under ``key``, waiting cooperatively until it is provided.

        Raises TimeoutError when ``timeout`` seconds pass first, and
        RuntimeError when the registry is cleared while waiting.
        """
        key = _registry_key(key)
        timeout = _check_seconds(timeout, "timeout", allow_none=True)
        value = self._entries.get(key, _MISSING)
        if value is not _MISSING:
            return value
        waiter = self._waiters.get(key)
        if waiter is None:
            waiter = self._waiters[key] = gevent.event.AsyncResult()
        waiter.wait(timeout)
        if not waiter.ready():
            if not waiter.linkcount() and self._waiters.get(key) is waiter:
                del self._waiters[key]  # the last one waiting gave up
            raise TimeoutError("%r was not provided within %s seconds" % (key, timeout))
        return waiter.get(block=False)

    def clear(self) -> None:
        """Drop every entry; pending ``wait_for`` calls raise RuntimeError."""
        self._entries.clear()
        waiters, self._waiters = self._waiters, {}
        for key, waiter in waiters.items():
            waiter.set_exception(RuntimeError("the registry was cleared while waiting for %r" % key))

    def _release(self, key, value):
        # Someone may have replaced the value since; only remove our own.
        if self._entries.get(key, _MISSING) is value:
            del self._entries[key]

    def __contains__(self, key):
        return self.has(key)

    def __repr__(self):
        return "<SPECTERRegistry %s>" % self.list()


Registry = SPECTERRegistry


# Keys drop the whitespace around them; an empty one is a TypeError (R0, "Argument rules").
_registry_key = functools.partial(_check_name, what="registry key", empty=TypeError)


###############################################################################
# Lifecycle ####################################################################
###############################################################################

_service_log = logging.getLogger("specter.service")

# What a callback may raise and still be a callback failure (logged, counted,
# retried): a gevent.Timeout it started and let escape is one too. GreenletExit
# is not: that is the owner asking the greenlet to end.
_CALLBACK_ERRORS = (Exception, gevent.Timeout)

# Statuses in which a service may acquire timers, greenlets and listeners.
_ACTIVE = frozenset(("starting", "running", "failed"))
_STOP_METHODS = ("stop", "close", "disconnect", "destroy", "terminate", "kill")
_timer_ids = itertools.count(1)


def _life_per_round(loop):
    """Mark an owned loop that pushes an app context per round (attempt, item) itself.

    Its greenlet then runs outside one: a context held for the loop's whole
    life would swallow the per-round ones (see _life_task_context).
    """
    loop._life_per_round = True
    return loop


def _service_check_init(cls, init):
    """Wrap a Service subclass's own ``__init__`` so that skipping ``super().__init__()`` fails at once.

    The check runs once per construction, after the whole ``__init__``, so
    nothing else pays for it (a ``__getattr__`` hook or a class-level
    descriptor would slow every attribute access of every service). An
    ``__init__`` the class does not define itself (a mixin's ahead of
    Service, one @dataclass sets later) is left alone, since a wrapper in
    the class would stop @dataclass from generating one: start() catches
    those.
    """
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        # getattr, not vars(self): building the instance __dict__ would cost
        # the object CPython's inline attribute values (slower access for good).
        if getattr(self, "_status", None) is None:
            raise _service_uninitialised(cls)
    __init__._service_checked = True  # type: ignore[attr-defined]
    return __init__


def _service_uninitialised(cls):
    """The TypeError for a ``cls`` instance whose Service.__init__ never ran, naming the __init__ that skipped it."""
    owner = next((klass for klass in cls.__mro__ if "__init__" in klass.__dict__), cls)
    return TypeError(
        "%s.__init__() must call super().__init__() (the Service is not initialised; "
        "a dataclass calls it from __post_init__())" % owner.__name__
    )


class _Owner:
    """Cleanups and owned resources, released last-in-first-out.

    The one ownership mechanism behind Service, Router and Handler: anything
    with ``add_cleanup`` can own registry entries and subscriptions.
    """

    _cleanups: Optional[List[Tuple[Callable[..., Any], Any]]] = None

    def add_cleanup(self: _O, fn: Callable[..., Any]) -> _O:
        """Run ``fn()`` at teardown (last added runs first)."""
        _check_callable(fn, "cleanup")
        if self._cleanups is None:
            self._cleanups = []
        self._cleanups.append((fn, None))
        return self

    def own(self, resource: _T, stop_method: Union[str, Callable[..., Any], None] = None) -> _T:
        """Release ``resource`` at teardown and return it.

        The cleanup is ``stop_method`` (a method name or a callable) or else
        the first of stop, close, disconnect, destroy, terminate, kill.
        """
        if resource is None:
            return None  # type: ignore[return-value]  # _T is None here
        if stop_method is None:
            for name in _STOP_METHODS:
                fn = getattr(resource, name, None)
                if callable(fn):
                    break
            else:
                raise TypeError(
                    "cannot own %s: it has none of %s; pass stop_method="
                    % (_describe(resource), ", ".join(_STOP_METHODS))
                )
        elif isinstance(stop_method, str):
            fn = getattr(resource, stop_method, None)
            if not callable(fn):
                raise TypeError("%s has no callable %r" % (_describe(resource), stop_method))
        else:
            fn = _check_callable(stop_method, "stop_method")
        self._hold(fn, resource)
        return resource

    def _hold(self, fn, resource):
        if self._cleanups is None:
            self._cleanups = []
        elif any(held is resource for _, held in self._cleanups):
            return  # owned already: one release is enough
        self._cleanups.append((fn, resource))
        owners = getattr(resource, "_owners", None)
        if type(owners) is list and self not in owners:
            owners.append(self)  # so a resource released early can leave (see _disown)

    def _disown(self, resource):
        """Forget ``resource``: it was released on its own before this owner's teardown."""
        if self._cleanups:
            self._cleanups = [entry for entry in self._cleanups if entry[1] is not resource]

    def require(self, key: str) -> Any:
        """The registry value under ``key`` (KeyError naming the known keys)."""
        return registry.require(key)

    def resolve(self, key: str) -> Any:
        """The registry value under ``key``, or None."""
        return registry.resolve(key)

    def _run_cleanups(self):
        """Run and forget the cleanups, newest first; failures are logged.

        Every cleanup runs even if the releasing greenlet is interrupted
        (killed, or hit by a Timeout) during one of them: the interrupted
        cleanup is not run again, the others still run, and the
        interruption is re-raised at the end (see _run_all).
        """
        cleanups, self._cleanups = self._cleanups, None

        def steps():
            while cleanups:
                fn, resource = cleanups.pop()
                owners = getattr(resource, "_owners", None)
                if type(owners) is list and self in owners:
                    owners.remove(self)  # this owner is done with it for good
                yield fn

        _run_all(steps(), self._cleanup_failed)

    def _cleanup_failed(self, label):
        _service_log.exception("%s: cleanup %s raised", self, label)

    def _resource_health(self):
        report = []
        for _, resource in self._cleanups or ():
            health = getattr(resource, "health", None)
            if callable(health):
                try:
                    report.append(health())
                except Exception as exc:
                    report.append({"name": repr(resource), "status": "error", "error": repr(exc)})
        return report


class Service(_Owner):
    """A long-lived object that owns background work.

    Everything acquired through the service (greenlets, timers, bus
    listeners, child services, resources, cleanups) is released by
    ``stop()``, which returns only once every owned greenlet is dead. Override
    ``on_start`` and ``on_stop``; call the acquisition methods from
    ``on_start`` or while running.
    """

    name: Optional[str] = None
    stop_timeout = 5.0
    restart_backoff = 0.1
    restart_max_backoff = 5.0
    singleton = False  # with a Cluster: on_start runs only on the node holding lease 'service:<name>'
    singleton_ttl = 10.0  # ttl of that lease, and of singleton intervals
    # The Flask app whose application context the service's own work runs in
    # (set by the ServiceManager it is registered with, or inherited on adopt()).
    _specter_app: Optional[flask.Flask] = None

    def __init__(self, name=None, initial_state=None):
        if name is None:
            name = type(self).name or type(self).__name__
        self.name = _check_name(name, "service name")
        if initial_state is not None and not isinstance(initial_state, dict):
            raise TypeError("initial_state must be a dict, got %s" % _describe(initial_state))
        self.state = dict(initial_state or {})
        self._status = "created"
        self._tasks = set()
        self._timers = None
        self._listeners = None
        self._children = None
        self._state_subs = _Subscribers()
        self._transitioner = None
        self._settled = None
        self._stop_requested = False
        self._errors = 0
        self._last_error = None
        self._restarts = 0
        self._failure = None
        self._stuck = ()
        self._singleton = None

    def on_start(self) -> None:
        """Acquire timers, greenlets and listeners here."""

    def on_stop(self) -> None:
        """Runs first in stop(), while everything owned is still alive."""

    @property
    def status(self) -> str:
        """'created', 'starting', 'running', 'stopping', 'stopped', 'failed', or 'standby' (singleton)."""
        return self._status

    @property
    def running(self) -> bool:
        return self._status == "running" or self._status == "failed"

    def start(self: _S) -> _S:
        """Start the service; idempotent.

        If ``on_start`` raises, everything it acquired is released in reverse
        order, the service is left stopped and the exception propagates. A
        start() racing another greenlet's start() or stop() waits for it.
        """
        if getattr(self, "_status", None) is None:
            # An __init__ the construction check does not wrap (a mixin's
            # ahead of Service, a @dataclass's) skipped Service's: say so here.
            raise _service_uninitialised(type(self))
        self._await_transition()
        if self._status in _ACTIVE or self._status == "standby":
            return self
        if self._status == "stopping":
            raise RuntimeError("%s: cannot start() from inside its own stop()" % self.name)
        self._begin_transition("starting")
        if _testing_watches:
            _testing_note_service(self)
        self._failure = None
        # A survivor of an earlier stop() is still reported while it lives.
        self._stuck = tuple(task for task in self._stuck if not task.dead)
        self._stop_requested = False
        try:
            with _life_app_context(self._specter_app):
                self._lifecycle_started()
        except BaseException:
            _service_log.debug("%s: start failed, rolling back", self.name)
            self._status = "stopping"
            try:
                self._release()
            finally:
                self._status = "stopped"
                self._end_transition()
            raise
        if self._status == "starting":
            self._status = "running"
        self._end_transition()
        _service_log.debug("%s: started", self.name)
        if self._stop_requested:
            self.stop()
        return self

    def stop(self: _S) -> _S:
        """Stop the service; idempotent, and safe from the service's own callbacks.

        Order: on_stop(); cancel intervals and timeouts; kill owned greenlets
        (they get GreenletExit, so ``finally`` blocks run) and wait up to
        ``stop_timeout`` for them; drop bus listeners; stop adopted children in
        reverse adoption order; run cleanups last-in-first-out; drop state
        subscribers. The release runs even if the stopping greenlet is
        interrupted. A greenlet of the service that calls stop() is spared
        and ends when its callback returns; any other caller waits for a
        start or stop in progress to finish. Called while the service is
        starting, from on_start or a greenlet it spawned, stop() is deferred:
        start() stops the service as soon as on_start returns.
        """
        current = getcurrent()
        ours = self._transitioner is current or current in self._tasks
        if self._status == "stopping" and ours:
            return self  # re-entrant, or one of ours: the stop under way finishes without us
        if self._status == "starting" and ours:
            # From on_start or a greenlet it spawned: tearing down under a
            # running on_start would race it, so start() stops once it returns.
            self._stop_requested = True
            return self
        self._await_transition()
        if self._singleton is not None:
            _cluster_singleton_end(self)
            return self
        if self._status not in _ACTIVE:
            if self._cleanups or self._children or self._timers or self._tasks or self._listeners:
                self._release()
            return self
        self._begin_transition("stopping")
        try:
            # on_stop runs even when the step before it fails or is interrupted.
            with _life_app_context(self._specter_app):
                _run_all((self._lifecycle_stopping, self.on_stop), self._record_error)
        finally:
            try:
                self._release()
            finally:
                self._status = "stopped"
                self._end_transition()
        _service_log.debug("%s: stopped", self.name)
        return self

    def set_state(self: _S, partial: Dict[str, Any]) -> _S:
        """Shallow-merge ``partial`` into ``state``, then notify subscribers in commit order."""
        if not isinstance(partial, dict):
            raise TypeError("set_state() takes a dict, got %s" % _describe(partial))
        self.state.update(partial)
        if self._state_subs.entries:
            self._state_subs.publish(self._deliver_state, dict(self.state))
        return self

    def get_state(self) -> Dict[str, Any]:
        """A shallow copy of ``state`` (a snapshot, if a subclass replaced it with a Store or Model)."""
        state = self.state
        return state.snapshot() if isinstance(state, (Store, Model)) else dict(state)

    def subscribe(self, fn: Callable[..., Any], immediate: bool = False,
                  owner: Any = None) -> Callable[[], bool]:
        """Call ``fn(state_copy, service)`` after each ``set_state``; returns an unsubscribe."""
        _check_callable(fn, "subscriber")
        unsubscribe = self._state_subs.add(fn, owner)
        if immediate:
            fn(self.get_state(), self)
        return unsubscribe

    def watch(self, fn: Callable[..., Any], immediate: bool = True) -> Callable[[], bool]:
        """Like subscribe(), immediate by default; the subscription ends when the service stops."""
        return self.subscribe(fn, immediate=immediate)

    def spawn(self, callback: Callable[..., Any], *args: Any, label: Optional[str] = None,
              **kwargs: Any) -> Greenlet:
        """Run ``callback`` in a new owned greenlet; errors are logged and counted."""
        self._check_active("spawn")
        _check_callable(callback, "callback")
        task = self._new_task(callback, args, kwargs, label)
        task.start()
        return task

    def spawn_later(self, seconds: float, callback: Callable[..., Any], *args: Any,
                    label: Optional[str] = None, **kwargs: Any) -> Greenlet:
        """Like spawn(), after ``seconds``."""
        self._check_active("spawn_later")
        seconds = _check_seconds(seconds, "seconds")
        _check_callable(callback, "callback")
        task = self._new_task(callback, args, kwargs, label)
        _clock.start_later(task, seconds)
        return task

    def interval(self, callback: Callable[..., Any], seconds: float, *,
                 singleton: Union[bool, str] = False) -> str:
        """Call ``callback()`` every ``seconds`` at a fixed rate; returns an id.

        Tick k is due at t0 + k * seconds, so the schedule does not drift.
        Each tick runs in its own owned greenlet; a tick that comes due while
        the previous one is still running is skipped rather than queued. A
        callback that raises is logged and the interval goes on. With a
        Cluster every node ticks, unless ``singleton`` is True (or a lease
        name): then only the node holding that lease does.
        """
        self._check_active("interval")
        _check_callable(callback, "callback")
        seconds = _check_seconds(seconds, "interval seconds", positive=True)
        if singleton is not False:
            callback = _cluster_singleton_callback(self, callback, singleton)
        return self._add_timer("interval", callback, seconds, True)

    def timeout(self, callback: Callable[..., Any], seconds: float) -> str:
        """Call ``callback()`` once after ``seconds``; returns an id."""
        self._check_active("timeout")
        _check_callable(callback, "callback")
        seconds = _check_seconds(seconds, "timeout seconds")
        return self._add_timer("timeout", callback, seconds, False)

    def cancel_interval(self, interval_id: str) -> bool:
        """Stop future ticks; a tick already running finishes. True if it existed."""
        return self._cancel_timer(interval_id)

    def cancel_timeout(self, timeout_id: str) -> bool:
        return self._cancel_timer(timeout_id)

    def cancel_greenlet(self: _S, glet: Greenlet) -> _S:
        """Kill an owned greenlet; it is tracked until it is dead.

        Waits up to ``stop_timeout`` for it. One that refuses to die is
        logged and listed in health()['stuck'], as at teardown, and stop()
        tries again.
        """
        if not isinstance(glet, Greenlet):
            raise TypeError("cancel_greenlet() takes a gevent Greenlet, got %s" % _describe(glet))
        if glet.dead:
            return self
        if glet not in self._tasks:
            raise ValueError("%r is not a greenlet of %s; only its own can be cancelled" % (glet, self.name))
        if glet is getcurrent():
            glet.kill(block=False)  # ends at its next switch; _new_task's link forgets it then
        else:
            waited = None
            try:
                glet.kill(block=True, timeout=self.stop_timeout)
                waited = self.stop_timeout
            finally:
                self._report_stuck((glet,), waited)
        return self

    def supervise(self, callback: Callable[..., Any], *args: Any, max_restarts: int = 5,
                  within: float = 60.0, **kwargs: Any) -> Greenlet:
        """Run ``callback`` in an owned greenlet and restart it when it raises.

        Restarts wait ``restart_backoff`` seconds, doubling up to
        ``restart_max_backoff``. More than ``max_restarts`` failures within
        ``within`` seconds mark the service 'failed', record the failure in
        health() and emit 'service:failed' on the bus. A normal return ends
        supervision.
        """
        self._check_active("supervise")
        _check_callable(callback, "callback")
        _check_count(max_restarts, "max_restarts", 0)
        within = _check_seconds(within, "within", positive=True)
        label = _callable_name(callback)
        task = self._new_task(
            self._supervise, (callback, args, kwargs, max_restarts, within, label), {}, label
        )
        task.start()
        return task

    def listen(self: _S, event: str, handler: Callable[..., Any], *, origin: str = "any") -> _S:
        """Subscribe ``handler`` on the bus until the service stops (``origin`` as in EventBus.on)."""
        self._check_active("listen")
        _check_callable(handler, "handler")
        # A wrapper of our own: the bus keeps one registration per callable, and
        # another service listening with the same function must not lose it.
        listener = functools.partial(handler)
        bus.on(event, listener, origin=origin)
        if self._listeners is None:
            self._listeners = []
        self._listeners.append((event, listener))
        return self

    def emit(self: _S, event: str, data: Any = None) -> _S:
        bus.emit(event, data)
        return self

    def lease(self, name: str, ttl: float = 10.0) -> Lease:
        """A cluster Lease held by this service until it stops (held at once without a cluster)."""
        self._check_active("lease")
        return _cluster_service_lease(self, name, ttl)

    def adopt(self: _S, child: Optional[Service], start: bool = True) -> _S:
        """Tie ``child``'s lifecycle to this one: it is stopped when this service stops."""
        if child is None:
            return self
        if not isinstance(child, Service):
            raise TypeError("adopt() takes a Service, got %s" % _describe(child))
        if child is self:
            raise ValueError("%s cannot adopt itself" % self.name)
        self._check_active("adopt")
        if self._children is None:
            self._children = []
        # By identity: two children that compare equal (a dataclass, say) are both owned.
        if not any(known is child for known in self._children):
            self._children.append(child)
        if child._specter_app is None:
            child._specter_app = self._specter_app  # the parent's app context reaches its children
        if start:
            child.start()
        return self

    def start_process(self, args: Union[str, bytes, Sequence[Any]], *, name: Optional[str] = None,
                      **popen_kwargs: Any) -> ManagedProcess:
        """Start a ManagedProcess owned by this service (stopped with it)."""
        self._check_active("start_process")
        process = ManagedProcess(name or "%s.process" % self.name)
        return process.start(args, owner=self, **popen_kwargs)

    def health(self) -> Dict[str, Any]:
        """A dict describing the service, its children and its resources."""
        status = self._status
        timers = self._timers or {}
        intervals = sum(1 for t in timers.values() if t.repeat)
        return {
            "name": self.name,
            "status": "ok" if status in ("running", "standby") else ("failed" if status == "failed" else "stopped"),
            "lifecycle": status,
            "counts": {
                "tasks": sum(1 for t in self._tasks if not t.dead),
                "intervals": intervals,
                "timeouts": len(timers) - intervals,
                "listeners": len(self._listeners or ()),
                "children": len(self._children or ()),
                "cleanups": len(self._cleanups or ()),
            },
            "errors": self._errors,
            "last_error": self._last_error,
            "restarts": self._restarts,
            "failure": self._failure,
            "stuck": [task.name for task in self._stuck if not task.dead],
            "children": [child.health() for child in self._children or ()],
            "resources": self._resource_health(),
        }

    def __repr__(self):
        return "<%s %r %s>" % (type(self).__name__, self.name, getattr(self, "_status", "uninitialised"))

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not hasattr(init, "_service_checked"):
            cls.__init__ = _service_check_init(cls, init)  # type: ignore[misc]

    def _lifecycle_started(self):
        # Subclasses with machinery of their own (QueueService) extend this
        # rather than on_start, so overriding on_start cannot skip it.
        if self.singleton and _cluster_singleton_begin(self):
            return  # standby: on_start runs when this node holds the lease
        self.on_start()

    def _lifecycle_stopping(self):
        """Runs before on_stop() while everything is still alive."""

    def _begin_transition(self, status):
        self._status = status
        self._transitioner = getcurrent()
        self._settled = gevent.event.Event()

    def _end_transition(self):
        self._transitioner = None
        self._settled.set()

    def _await_transition(self):
        """Wait while another greenlet is starting or stopping this service."""
        while self._status in ("starting", "stopping") and self._transitioner is not getcurrent():
            self._settled.wait()

    def _check_active(self, what):
        if self._status not in _ACTIVE:
            raise RuntimeError(
                "%s: cannot %s() while %s; call it from on_start() or while running"
                % (self.name, what, self._status)
            )

    def _new_task(self, callback, args, kwargs, label):
        task = Greenlet(self._run_task, callback, args, kwargs)
        task.name = label or _callable_name(callback)
        self._tasks.add(task)
        task.rawlink(self._tasks.discard)
        return task

    def _run_task(self, callback, args, kwargs):
        try:
            with _life_task_context(self._specter_app, callback):
                return callback(*args, **kwargs)
        except _CALLBACK_ERRORS:
            self._record_error(getcurrent().name)
            return None

    def _record_error(self, label):
        """Log the exception being handled and remember it for health()."""
        exc = sys.exc_info()[1]
        self._errors += 1
        self._last_error = "%s: %r" % (label, exc)
        _service_log.exception("%s: %s raised", self.name, label)

    def _add_timer(self, kind, callback, seconds, repeat):
        timer_id = "%s-%d" % (kind, next(_timer_ids))
        if self._timers is None:
            self._timers = {}
        self._timers[timer_id] = _ServiceTimer(self, timer_id, callback, seconds, repeat)
        return timer_id

    def _cancel_timer(self, timer_id):
        timer = (self._timers or {}).pop(timer_id, None)
        if timer is None:
            return False
        timer.cancel()
        return True

    @_life_per_round
    def _supervise(self, callback, args, kwargs, max_restarts, within, label):
        failures = collections.deque()
        while True:
            returned = False
            try:
                with _life_app_context(self._specter_app):  # a fresh context per attempt
                    result = callback(*args, **kwargs)
                    returned = True
                return result
            except _CALLBACK_ERRORS as exc:
                if returned:
                    # The callback's work is done; only a teardown_appcontext
                    # handler raised. Logged, but running the work again would do it twice.
                    self._record_error(label)
                    return None
                now = _now()
                failures.append(now)
                while now - failures[0] > within:
                    failures.popleft()
                self._record_error(label)
                if len(failures) > max_restarts:
                    self._fail(label, exc)
                    return None
                self._restarts += 1
                _clock.sleep(_life_backoff(self.restart_backoff, len(failures), self.restart_max_backoff))

    def _fail(self, label, exc):
        self._failure = {"label": label, "error": repr(exc), "at": time.time()}
        if self._status in _ACTIVE:
            self._status = "failed"
        _service_log.error("%s: %s failed too often; the service is marked failed", self.name, label)
        bus.emit("service:failed", {"service": self.name, "label": label, "error": str(exc)})

    def _release(self):
        """Release everything owned, in stop()'s documented order.

        Every step runs even if the releasing greenlet is interrupted (a kill
        or a Timeout while it waits for greenlets to die); the interruption
        is re-raised once the release is complete.
        """
        _run_all((self._release_timers, self._release_tasks, self._release_listeners,
                  self._release_children, self._run_cleanups, self._state_subs.clear),
                 self._record_error)

    def _release_timers(self):
        timers, self._timers = self._timers, None
        for timer in (timers or {}).values():
            timer.cancel()

    def _release_tasks(self):
        current = getcurrent()
        others = [task for task in self._tasks if task is not current]
        waited = None
        try:
            _kill_greenlets(others, self.stop_timeout)
            waited = self.stop_timeout
        finally:
            self._report_stuck(others, waited)
            self._tasks.difference_update(others)

    def _report_stuck(self, killed, waited):
        """Log the greenlets of ``killed`` that outlived their kill; health() lists them while they live.

        ``waited`` is how long they were given, or None when the wait was
        interrupted (they may just be finishing their ``finally`` blocks).
        """
        stuck = [task for task in killed if not task.dead]
        if stuck:
            self._stuck = tuple(task for task in self._stuck if not task.dead and task not in stuck) + tuple(stuck)
            _service_log.error(
                "%s: %d greenlet(s) still alive %s after GreenletExit: %s",
                self.name, len(stuck),
                "when the wait for them was interrupted" if waited is None else "%s s" % waited,
                ", ".join(task.name for task in stuck),
            )

    def _release_listeners(self):
        listeners, self._listeners = self._listeners, None
        for event, handler in listeners or ():
            bus.off(event, handler)

    def _release_children(self):
        children, self._children = self._children, None
        _run_all([child.stop for child in reversed(children or ())], self._record_error)

    def _deliver_state(self, snapshot):
        _notify(self._state_subs.cursor, (snapshot, self), _service_log, "%s: state subscriber %s raised", self.name)


class QueueService(Service):
    """A pool of worker greenlets consuming ``queue``, a gevent JoinableQueue.

    Override ``handle_item``. Workers start after ``on_start`` and stop
    before ``on_stop`` whether or not a subclass calls super. ``stop()``
    drains the queue for up to ``drain_timeout`` seconds; whatever is still
    queued then goes to ``on_dropped(items)``, so nothing is lost silently.

    The queue accepts items only while the service is starting or running:
    stop() shuts it down (gevent's ``Queue.shutdown``) before anything else,
    which refuses new items and blocked ``enqueue(block=True)`` calls alike,
    lets the workers take what is queued, and ends each worker once the
    queue is empty, the one that called stop() included. Every start gets a
    fresh queue.
    """

    drain_timeout = 5.0

    def __init__(self, name=None, *, worker_count=1, maxsize=0, poll_interval=0.5, initial_state=None):
        super().__init__(name, initial_state)
        self.worker_count = _check_count(worker_count, "worker_count", 1)
        self.maxsize = _check_count(maxsize, "maxsize", 0)
        self.poll_interval = _check_seconds(poll_interval, "poll_interval", positive=True)
        self.queue = self._new_queue()
        self.queue.shutdown()  # closed until start(): enqueue() refuses
        self._workers = ()
        self._processed = 0
        self._failed = 0
        self._interrupted = 0
        self.state.update(queue_size=0, worker_count=worker_count, processed=0, failed=0)

    def handle_item(self, item: Any) -> None:
        raise NotImplementedError("%s must override handle_item(item)" % type(self).__name__)

    def on_workers_started(self) -> None:
        """Called once the workers run."""

    def on_workers_stopping(self) -> None:
        """Called at stop(), before the queue is drained."""

    def on_dropped(self, items: List[Any]) -> None:
        """Receives what was still queued when the drain timed out."""
        _service_log.warning("%s: dropped %d queued item(s) at stop", self.name, len(items))

    def enqueue(self, item: Any, block: bool = False, timeout: Optional[float] = None) -> bool:
        """Queue ``item``; False when full (or the timeout passed) or not running.

        A call blocked waiting for room returns False as soon as stop()
        begins: the item stays with the caller. Pass ``block`` and
        ``timeout`` by keyword.
        """
        # The hot path is one C call: the queue itself refuses items once
        # it is shut down (stopped) or full. block and timeout are not
        # keyword-only on purpose: CPython looks missing keyword-only
        # defaults up in a dict on every call (about 20 ns, 8% of an item).
        if block and timeout is not None:
            timeout = _check_seconds(timeout, "timeout")
        try:
            self.queue.put(item, block, timeout)
        except _QUEUE_REFUSED:
            return False
        return True

    def pending_count(self) -> int:
        return self.queue.qsize()

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait until every queued item has been handled; False on timeout."""
        timeout = _check_seconds(timeout, "timeout", allow_none=True)
        return bool(self.queue.join(timeout))

    def get_state(self) -> Dict[str, Any]:
        """A copy of ``state`` with the queue counters refreshed."""
        self._refresh_counters()
        return dict(self.state)

    def health(self) -> Dict[str, Any]:
        self._refresh_counters()
        report = super().health()
        report["queue"] = {
            "size": self.queue.qsize(),
            "workers": sum(1 for worker in self._workers if not worker.dead),
            "processed": self._processed,
            "failed": self._failed,
            "interrupted": self._interrupted,
        }
        return report

    def _new_queue(self):
        return gevent.queue.JoinableQueue(self.maxsize or None)

    def _lifecycle_started(self):
        if self.queue.is_shutdown:
            self.queue = self._new_queue()
        self.on_start()
        self._workers = tuple(
            self.spawn(self._work, label="%s.worker-%d" % (self.name, index))
            for index in range(self.worker_count)
        )
        self.on_workers_started()

    def _lifecycle_stopping(self):
        # First of all: no new item, and blocked enqueue() calls get False.
        self.queue.shutdown()
        in_hand = 1 if getcurrent() in self._workers else 0
        try:
            try:
                self.on_workers_stopping()
            except Exception:
                self._record_error("on_workers_stopping")
            self._wait_idle(self.drain_timeout, in_hand)
        finally:
            # Even when the drain was interrupted: what is queued is handed over.
            self._drop_queued()
        self._wait_idle(self.stop_timeout, in_hand)  # the items in hand finish
        self._refresh_counters()
        self._workers = ()

    def _release(self):
        # A start rolled back (or a stop whose drain step failed) must not
        # leave accepted items behind either.
        try:
            self._drop_queued()
        finally:
            super()._release()

    def _drop_queued(self):
        """Shut the queue down and hand whatever is still in it to on_dropped()."""
        queue = self.queue
        queue.shutdown()
        dropped = []
        while queue.qsize():
            dropped.append(queue.get_nowait())
            queue.task_done()
        if dropped:
            try:
                self.on_dropped(dropped)
            except Exception:
                self._record_error("on_dropped")

    def _item_interrupted(self, item):
        """Report an item whose handle_item() was interrupted: an ERROR log naming it, and a count in health()."""
        self._interrupted += 1
        _service_log.error(
            "%s: %s was interrupted by %s while handling %s; the item is neither finished nor handed back",
            self.name, getcurrent().name, type(sys.exc_info()[1]).__name__, _describe(item),
        )

    def _refresh_counters(self):
        # Workers publish their tallies in bulk (see _work); state mirrors them on demand.
        self.state.update(queue_size=self.queue.qsize(), processed=self._processed, failed=self._failed)

    def _wait_idle(self, timeout, in_hand):
        if not in_hand:
            self.queue.join(timeout)
            return
        # A worker is stopping the service: its own item can never finish
        # while it waits, so wait for the others only.
        current = getcurrent()
        deadline = _monotonic() + timeout
        while self.queue.unfinished_tasks > in_hand and _monotonic() < deadline:
            if not any(worker is not current and not worker.dead for worker in self._workers):
                return  # nobody else could finish what is left
            gevent.sleep(0.005)

    @_life_per_round
    def _work(self):
        # Counting in bulk: a worker tallies its items in locals and adds
        # them to the service's counters after every _QUEUE_BATCH items,
        # whenever the queue runs empty, and when it ends, so the hot loop
        # touches no attribute. get(False) never waits: an empty queue ends
        # the batch (Empty) and the worker publishes before it waits.
        queue = self.queue
        get, peek, done = queue.get, queue.peek, queue.task_done
        handle = self.handle_item
        if self._specter_app is not None:  # a fresh app context per item, popped after it
            handle = functools.partial(_life_in_app_context, self._specter_app, handle)
        batch = range(_QUEUE_BATCH)
        while True:
            finished = failed = 0
            try:
                for finished in batch:  # ``finished`` items are done when the next one is taken
                    item = get(False)
                    try:
                        handle(item)
                    except _CALLBACK_ERRORS:
                        self._record_error(getcurrent().name)
                        failed += 1
                    except BaseException:
                        # Killed mid-item (stop() interrupted or out of
                        # stop_timeout, cancel_greenlet): neither finished nor
                        # handed back, so it is reported before the worker ends.
                        self._item_interrupted(item)
                        raise
                    finally:
                        done()
                else:
                    finished = _QUEUE_BATCH
                    continue
            except gevent.queue.Empty:
                pass
            except gevent.queue.ShutDown:
                if not queue.qsize():
                    return  # stopped and nothing left to take
                continue
            finally:
                self._processed += finished - failed
                self._failed += failed
            try:
                peek()  # wait for the next item without taking it
            except gevent.queue.ShutDown:
                # gevent wakes every waiting get() or peek() with ShutDown,
                # even one an item had just been put for: end only when none is left.
                if not queue.qsize():
                    return


_QUEUE_BATCH = 16  # items a busy worker handles between two updates of the counters


# What a queue raises to refuse an item: full, or shut down (stopping or stopped).
_QUEUE_REFUSED = (gevent.queue.Full, gevent.queue.ShutDown)


_watcher_log = logging.getLogger("specter.watcher")


class Watcher:
    """An observation loop: sample ``poll()`` every ``interval`` or follow ``stream()``.

    Each value goes through ``transform`` (and ``dedupe``) and then to the
    subscribers, ``fn(value, watcher)``, in the loop's greenlet. When poll,
    stream or transform raises, the loop waits an exponential backoff with
    jitter (starting at ``interval``, capped at ``max_backoff``, reset by the
    next value) and tries again, or ends when ``retry`` is False. A stream
    that ends normally is reopened after ``interval`` (with ``retry``).
    ``stop()`` interrupts any wait at once.
    """

    stop_timeout = 5.0
    _app = None  # the app whose context was current at start(); each round runs in a fresh one
    _ending = None  # a loop an interrupted stop() killed: the next stop() only waits for it

    def __init__(self, name, *, poll=None, stream=None, interval=5.0, retry=True, max_backoff=30.0,
                 dedupe=False, transform=None):
        self.name = _check_name(name, "watcher name")
        if (poll is None) == (stream is None):
            raise ValueError("Watcher %r needs exactly one of poll= or stream=" % self.name)
        self._source = _check_callable(poll if poll is not None else stream,
                                       "poll" if poll is not None else "stream")
        self.mode = "poll" if poll is not None else "stream"
        self.interval = _check_seconds(interval, "interval", positive=True)
        self.max_backoff = _check_seconds(max_backoff, "max_backoff", positive=True)
        self.retry = bool(retry)
        self.dedupe = bool(dedupe)
        self.transform = None if transform is None else _check_callable(transform, "transform")
        self.last_value = None
        self._subs = ()
        self._loop = None
        self._started_at = None
        self._error_count = 0
        self._last_error = None
        self._last_value_at = None
        self._has_value = False

    @property
    def running(self) -> bool:
        return self._loop is not None and not self._loop.dead

    def start(self) -> Watcher:
        """Start the loop in its own greenlet; idempotent."""
        if not self.running:
            self._started_at = _now()
            self._app = _life_current_app()
            self._loop = gevent.spawn(self._run)
            self._loop.name = "watcher:%s" % self.name
        return self

    def stop(self) -> Watcher:
        """End the loop now, even mid-wait; returns once its greenlet is dead.

        Interrupted while it waits (a Timeout around it, a kill), it raises
        and keeps a loop that is still alive: ``running`` stays true and
        start() starts no second loop beside it; stop() again waits for it
        without killing it twice, which would cut its ``finally`` short.
        """
        loop, self._loop = self._loop, None
        if loop is None or loop.dead:
            return self
        if loop is getcurrent():
            loop.kill(block=False)  # a subscriber stopped us: end at the next switch
            return self
        try:
            if loop is self._ending:
                loop.join(self.stop_timeout)
            else:
                self._ending = loop
                loop.kill(block=True, timeout=self.stop_timeout)
        except BaseException:
            if self._loop is None and not loop.dead:
                self._loop = loop  # still ending: tracked until it is dead
            raise
        self._ending = None
        if not loop.dead:
            _watcher_log.error("watcher %s: loop ignored GreenletExit for %s s", self.name, self.stop_timeout)
        return self

    teardown = stop

    def subscribe(self, fn: Callable[..., Any]) -> Callable[[], bool]:
        """Call ``fn(value, watcher)`` for each delivered value; returns an unsubscribe."""
        _check_callable(fn, "subscriber")
        self._subs += (fn,)
        return functools.partial(_drop, self, "_subs", fn)

    def health(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "type": "watcher",
            "running": self.running,
            "mode": self.mode,
            "error_count": self._error_count,
            "last_error": self._last_error,
            "last_value_at": self._last_value_at,
            "uptime_seconds": (_now() - self._started_at) if self.running else 0.0,
            "subscribers": len(self._subs),
        }

    def __repr__(self):
        return "<Watcher %r %s %s>" % (self.name, self.mode, "running" if self.running else "stopped")

    def _run(self):
        failures = 0
        while True:
            try:
                if self.mode == "poll":
                    with _life_app_context(self._app):  # popped after each round
                        self._deliver(self._source())
                    failures = 0
                else:
                    with _life_app_context(self._app):  # one stream is one round
                        iterator = iter(self._source())
                        try:
                            for item in iterator:
                                self._deliver(item)
                                failures = 0
                        finally:
                            close = getattr(iterator, "close", None)
                            if close is not None:
                                close()
                    if not self.retry:
                        return
                delay = self.interval
            except _CALLBACK_ERRORS as exc:
                self._error_count += 1
                self._last_error = "%s: %s" % (type(exc).__name__, exc)
                if isinstance(exc, WatcherError):
                    _watcher_log.warning("watcher %s: %s", self.name, exc)
                else:
                    _watcher_log.exception("watcher %s: %s raised", self.name, self.mode)
                if not self.retry:
                    return
                failures += 1
                delay = _life_backoff(self.interval, failures, self.max_backoff, jitter=True)
            _clock.sleep(delay)

    def _deliver(self, value):
        if self.transform is not None:
            value = self.transform(value)
        if self.dedupe and self._has_value and value == self.last_value:
            return
        self.last_value = value
        self._has_value = True
        self._last_value_at = time.time()
        _notify(self._subs, (value, self), _watcher_log, "watcher %s: subscriber %s raised", self.name)


def _life_backoff(base, failures, cap, *, jitter=False):
    """Seconds to wait after the ``failures``-th failure in a row: ``base`` doubling, at most ``cap``.

    With ``jitter`` the wait is drawn from its upper half, so loops that
    failed together (one upstream down) do not retry in step.
    """
    delay = min(base * 2 ** (failures - 1), cap)
    if jitter:
        delay *= 0.5 + random.random() / 2
    return delay


def _kill_greenlets(greenlets, timeout):
    """Throw GreenletExit into every greenlet at once, then wait up to ``timeout`` for them all."""
    if greenlets:
        gevent.killall(greenlets, block=False)
        gevent.joinall(greenlets, timeout=timeout)


class _ServiceTimer:
    """One interval or timeout: a hub timer that runs each tick in an owned greenlet.

    The callback runs in the hub, so it only re-arms and spawns; it never
    blocks. Between ticks an interval costs a timer watcher, not a greenlet.
    """

    __slots__ = ("service", "id", "callback", "period", "repeat", "due", "watcher", "task")

    def __init__(self, service, timer_id, callback, seconds, repeat):
        self.service = service
        self.id = timer_id
        self.callback = callback
        self.period = seconds
        self.repeat = repeat
        self.due = _now() + seconds
        self.task = None
        self.watcher = None
        self._arm(seconds)

    def cancel(self):
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            watcher.stop()
            watcher.close()

    def _arm(self, delay):
        self.watcher = _clock.call_later(delay, self._fire)

    def _fire(self):
        if self.watcher is None:
            return
        self.watcher.close()
        now = _now()
        if now < self.due:
            self._arm(self.due - now)
            return
        service = self.service
        if self.repeat:
            period = self.period
            self.due += period
            if self.due <= now:
                self.due += period * (math.floor((now - self.due) / period) + 1)
            self._arm(self.due - now)
            if self.task is not None and not self.task.dead:
                return  # the previous tick overran: skip this one
        else:
            self.watcher = None
            if service._timers is not None:
                service._timers.pop(self.id, None)
        self.task = service._new_task(self.callback, (), {}, "%s:%s" % (self.id, _callable_name(self.callback)))
        self.task.start()


class _Subscribers:
    """Subscribers of one piece of state, notified in commit order.

    ``publish`` delivers at once when no round is running; a change
    committed during a round (by another greenlet, or by a subscriber
    itself) is queued and delivered after it, so every subscriber sees the
    changes in the order they were committed.

    A round's ``deliver(payload)`` walks ``cursor`` (an iterator over the
    entries), so an interrupted round knows whom it had not reached yet. If
    the greenlet delivering is killed or times out inside a subscriber, the
    rest of its round and every round queued behind it are handed to a new
    greenlet, in order: no change is stranded until the next write.
    """

    __slots__ = ("entries", "pending", "busy", "cursor")

    def __init__(self):
        self.entries = ()
        self.pending = None
        self.busy = False
        self.cursor = iter(())

    def add(self, entry, owner=None):
        _check_owner(owner)
        self.entries += (entry,)
        unsubscribe = functools.partial(self.remove, entry)
        if owner is not None:
            owner.add_cleanup(unsubscribe)
        return unsubscribe

    def remove(self, entry):
        return _drop(self, "entries", entry)

    def clear(self):
        self.entries = ()

    def publish(self, deliver, payload):
        if self.busy or self.pending:
            # Behind the running round, or behind rounds an interrupted one left.
            if self.pending is None:
                self.pending = collections.deque()
            self.pending.append((deliver, payload, None))
            if not self.busy:
                self._drain()
            return
        self.busy = True
        self.cursor = iter(self.entries)
        try:
            deliver(payload)
        except BaseException:
            self._interrupted(deliver, payload)
            raise
        finally:
            self.busy = False
        if self.pending:
            self._drain()

    def _drain(self):
        """Deliver the queued rounds in commit order, in this greenlet."""
        pending = self.pending
        self.busy = True
        try:
            while pending:
                deliver, payload, rest = pending.popleft()
                entries = self.entries
                if rest is not None:
                    # What an interrupted round had left, minus whoever unsubscribed since.
                    live = set(map(id, entries))
                    entries = [entry for entry in rest if id(entry) in live]
                self.cursor = iter(entries)
                try:
                    deliver(payload)
                except BaseException:
                    self._interrupted(deliver, payload)
                    raise
        finally:
            self.busy = False

    def _interrupted(self, deliver, payload):
        # Only an interruption gets here (deliver logs a subscriber's
        # Exception): the subscribers this round had not reached go first,
        # then the queued rounds, all from a new greenlet, since this one is
        # on its way out. It starts once this greenlet has let go of the round.
        if self.pending is None:
            self.pending = collections.deque()
        self.pending.appendleft((deliver, payload, tuple(self.cursor)))
        gevent.spawn(self._resume)

    def _resume(self):
        if not self.busy and self.pending:
            self._drain()


_LIFE_NO_CONTEXT = contextlib.nullcontext()


def _life_current_app():
    """The Flask app whose application context is current in this greenlet, or None."""
    return flask.current_app._get_current_object() if flask.has_app_context() else None


def _life_app_context(app):
    """A context manager running a piece of background work inside ``app``'s application context.

    A fresh context per callback, tick or item, popped when it returns, so
    ``teardown_appcontext`` handlers run after it as they do after a
    request. Work already inside ``app``'s context (``start()`` called from a
    view) keeps that one: popping a nested context there would tear down
    what the caller still uses. Without an app it costs nothing.
    """
    if app is None or (flask.has_app_context() and flask.current_app._get_current_object() is app):
        return _LIFE_NO_CONTEXT
    return app.app_context()


def _life_in_app_context(app, fn, *args):
    """Call ``fn(*args)`` inside ``app``'s application context (see _life_app_context)."""
    with _life_app_context(app):
        return fn(*args)


def _life_task_context(app, callback):
    """The context of an owned greenlet's callback; loops that push one per round run outside it."""
    if app is None or getattr(callback, "_life_per_round", False):
        return _LIFE_NO_CONTEXT
    return _life_app_context(app)


###############################################################################
# State ########################################################################
###############################################################################

_state_log = logging.getLogger("specter.state")


class Store:
    """Flat shared state: a dict with atomic writes and ordered notifications.

    Every write commits at once (no greenlet switch happens inside it) and
    returns the new snapshot, a shallow copy shared by that round's
    subscribers. Subscribers get ``fn(snapshot, store)`` in commit order,
    even with concurrent writers.
    """

    def __init__(self, name, initial_state=None, *, emit_events=False, change_event=None):
        self.name = _check_name(name, "store name")
        self._state = _state_initial(initial_state)
        self._subs = _Subscribers()
        self._event = _state_event(self.name, emit_events, change_event)
        self._version = 0

    def get(self, key: Any = None, default: Any = None) -> Any:
        """The value under ``key`` (as stored), or a shallow copy of the whole state."""
        if key is None:
            return dict(self._state)
        return self._state.get(key, default)

    def snapshot(self) -> Dict[str, Any]:
        return dict(self._state)

    def access(self, reader: Callable[..., _T]) -> _T:
        """Call ``reader(live_state)`` atomically and return its result; no notification."""
        _check_callable(reader, "reader")
        return reader(self._state)

    def set(self, partial: Dict[str, Any]) -> Dict[str, Any]:
        """Shallow-merge ``partial``."""
        if not isinstance(partial, dict):
            raise TypeError("Store.set() takes a dict, got %s" % _describe(partial))
        state = self._state
        state.update(partial)
        return self._commit(state)

    def replace(self, state: Dict[str, Any]) -> Dict[str, Any]:
        """Replace the whole state."""
        if not isinstance(state, dict):
            raise TypeError("Store.replace() takes a dict, got %s" % _describe(state))
        self._state = dict(state)
        return self._commit(self._state)

    def delete(self, *keys: Any) -> Dict[str, Any]:
        """Remove ``keys``; subscribers hear of it only if something was removed."""
        state = self._state
        removed = [key for key in keys if state.pop(key, _MISSING) is not _MISSING]
        if not removed:
            return dict(state)
        return self._commit(state)

    def clear(self) -> Dict[str, Any]:
        if not self._state:
            return {}
        self._state = {}
        return self._commit(self._state)

    def update(self, mutator: Callable[..., Any]) -> Dict[str, Any]:
        """Apply ``mutator(draft)`` atomically.

        The mutator edits ``draft`` (a copy) in place or returns a replacement
        dict. If it yields and another write lands meanwhile, it is run again
        on a fresh draft, so no write is ever lost.
        """
        result, draft = _state_mutate(self, self.snapshot, mutator)
        self._state = draft if result is draft else dict(result)
        return self._commit(self._state)

    def subscribe(self, fn: Callable[..., Any], immediate: bool = False,
                  owner: Any = None) -> Callable[[], bool]:
        """Call ``fn(snapshot, store)`` after every change; returns an unsubscribe."""
        _check_callable(fn, "subscriber")
        unsubscribe = self._subs.add(fn, owner)
        if immediate:
            fn(dict(self._state), self)
        return unsubscribe

    def watch(self, fn: Callable[..., Any], immediate: bool = True, owner: Any = None) -> Callable[[], bool]:
        return self.subscribe(fn, immediate=immediate, owner=owner)

    def destroy(self) -> None:
        """Drop every subscriber."""
        self._subs.clear()

    stop = destroy

    def health(self) -> Dict[str, Any]:
        return {"name": self.name, "type": "store", "keys": len(self._state),
                "subscribers": len(self._subs.entries)}

    def __repr__(self):
        return "<Store %r %d keys>" % (self.name, len(self._state))

    def _commit(self, state):
        self._version += 1
        snapshot = dict(state)
        if self._subs.entries or self._event:
            self._subs.publish(self._deliver, snapshot)
        return snapshot

    def _deliver(self, snapshot):
        # _notify(self._subs.cursor, (snapshot, self), ...), inline like bus.emit's
        # walk: bench_specter.py's store.set row goes over its target through
        # the extra frame and call(*args) (1.4x -> 1.7x against a goal of 1.5x).
        for fn in self._subs.cursor:
            try:
                fn(snapshot, self)
            except Exception:
                _state_log.exception("%s: subscriber %s raised", self.name, _callable_name(fn))
        if self._event:
            bus.emit(self._event, snapshot)


class Model:
    """Nested state addressed by paths, with selector subscriptions.

    The internal tree is never mutated: a write copies only the dicts along
    its path and shares every other subtree, so its cost follows the path
    depth, not the size of the state, and unchanged subtrees compare by
    identity. Everything that goes in or comes out is a deep copy.
    """

    def __init__(self, name, initial_state=None, *, emit_events=False, change_event=None):
        self.name = _check_name(name, "model name")
        self._root = _model_copy(_state_initial(initial_state))
        self._subs = _Subscribers()
        self._event = _state_event(self.name, emit_events, change_event)
        self._version = 0

    def get(self, path: Union[str, Sequence[Any], None] = None, default: Any = None) -> Any:
        """A deep copy of the value at ``path`` (or of everything), or ``default``."""
        try:
            # The fast path: a cached string path through plain dicts. Anything
            # else (no path, a key sequence, an uncached or missing path, a list
            # on the way) raises, and the general rule below answers.
            node = _model_getters[path](self._root)
        except (LookupError, TypeError):
            if path is None:
                return _model_copy(self._root)
            node = _model_lookup(self._root, _model_path(path), _MISSING)
            if node is _MISSING:
                return default
        if type(node) in _MODEL_ATOMS:
            return node
        return _model_copy(node)

    def snapshot(self) -> Dict[str, Any]:
        return _model_copy(self._root)

    def select(self, selector: Union[str, Sequence[Any], Callable[..., Any]], default: Any = None) -> Any:
        """The value picked by ``selector``: a path, or a callable given the state."""
        if callable(selector):
            return _model_copy(selector(self._root))
        return self.get(selector, default)

    def set(self, path: Union[str, Sequence[Any]], value: Any) -> None:
        """Set the value at ``path``, creating missing dicts; equal values change nothing."""
        keys = _model_path(path)
        root = self._root
        new_root = _model_assoc(root, keys, 0, _model_copy(value))
        if new_root is not root:
            self._commit(new_root)

    def patch(self, partial: Dict[str, Any]) -> None:
        """Shallow-merge ``partial`` at the root."""
        if not isinstance(partial, dict):
            raise TypeError("Model.patch() takes a dict, got %s" % _describe(partial))
        root = self._root
        new_root = None
        for key, value in partial.items():
            if _model_same(root.get(key, _MISSING), value):
                continue
            if new_root is None:
                new_root = dict(root)
            new_root[key] = _model_copy(value)
        if new_root is not None:
            self._commit(new_root)

    def update(self, mutator: Callable[..., Any]) -> None:
        """Apply ``mutator(draft)`` to a deep copy; it edits the draft or returns a dict.

        If it yields and another write lands meanwhile, it runs again on a
        fresh draft.
        """
        result, _ = _state_mutate(self, self.snapshot, mutator)
        result = _model_copy(result)  # the caller may still hold the draft
        if type(result) is not dict:
            result = dict(result)  # the root is always a plain dict (Model.get's fast path relies on it)
        if not _model_same(result, self._root):
            self._commit(result)

    def delete(self, path: Union[str, Sequence[Any]]) -> None:
        """Remove the value at ``path``; a missing path changes nothing."""
        keys = _model_path(path)
        root = self._root
        new_root = _model_dissoc(root, keys, 0)
        if new_root is not root:
            self._commit(new_root)

    def clear(self) -> None:
        if self._root:
            self._commit({})

    def subscribe(self, fn: Callable[..., Any],
                  selector: Union[str, Sequence[Any], Callable[..., Any], None] = None,
                  immediate: bool = False, owner: Any = None) -> Callable[[], bool]:
        """Call ``fn(value, model)`` on changes; returns an unsubscribe.

        Without a selector ``value`` is a deep copy of the whole state and
        every change is delivered. With one (a path, or a callable given the
        read-only state) ``fn`` runs only when the selected value changes.
        """
        _check_callable(fn, "subscriber")
        if selector is None:
            entry = _ModelSubscriber(fn, None)
        elif callable(selector):
            entry = _ModelSubscriber(fn, selector)
        else:
            entry = _ModelSubscriber(fn, _model_path(selector))
        entry.last = entry.select(self._root)
        unsubscribe = self._subs.add(entry, owner)
        if immediate:
            fn(_model_copy(self._root if selector is None else entry.last), self)
        return unsubscribe

    def watch(self, fn: Callable[..., Any],
              selector: Union[str, Sequence[Any], Callable[..., Any], None] = None,
              immediate: bool = True, owner: Any = None) -> Callable[[], bool]:
        return self.subscribe(fn, selector=selector, immediate=immediate, owner=owner)

    def destroy(self) -> None:
        self._subs.clear()

    stop = destroy

    def health(self) -> Dict[str, Any]:
        return {"name": self.name, "type": "model", "keys": len(self._root),
                "subscribers": len(self._subs.entries)}

    def __repr__(self):
        return "<Model %r>" % self.name

    def _commit(self, root):
        self._root = root
        self._version += 1
        if self._subs.entries or self._event:
            self._subs.publish(self._deliver, root)

    def _deliver(self, root):
        _notify(self._subs.cursor, (root, self), _state_log, "%s: subscriber %s raised", self.name)
        if self._event:
            bus.emit(self._event, _model_copy(root))


class Cache:
    """One computed value with a TTL, single-flight computation and invalidation.

    ``ttl=0`` never expires; expiry uses SPECTER's clock (monotonic time, or a
    test's ManualClock). ``None`` is a value like any other. ``depends_on``
    names bus events that invalidate the cache; since invalidation emits
    ``'{name}:invalidated'``, caches cascade, each invalidating once per cascade however often it is reached
    (a cycle, a diamond); see invalidate().
    """

    def __init__(self, name, ttl=0, depends_on=None, shared=False):
        self.name = _check_name(name, "cache name")
        self._ttl = _check_seconds(ttl, "ttl")
        self._value = None
        self._expires = -math.inf
        self._updated_at = None
        self._generation = 0
        self._flight = None
        self._flight_owner = None
        self._callbacks = ()
        self._event = "%s:invalidated" % self.name
        if depends_on is None:
            depends_on = ()
        elif isinstance(depends_on, str):
            depends_on = (depends_on,)
        elif not isinstance(depends_on, (list, tuple, set, frozenset)):
            raise TypeError("depends_on must be a list of event names, got %s" % _describe(depends_on))
        self._depends_on = tuple(_bus_event(event) for event in depends_on)
        for event in self._depends_on:
            bus.on(event, self._on_dependency)
        self._shared = bool(shared)  # with a Cluster, invalidate() reaches every node
        if self._shared:
            _cluster_cache_register(self)

    @property
    def ttl(self) -> float:
        return self._ttl

    @property
    def updated_at(self) -> Optional[float]:
        """Wall-clock time (epoch seconds) of the last store, or None."""
        return self._updated_at

    def get(self, default: Any = None) -> Any:
        """The cached value, or ``default`` when empty or expired; never waits."""
        if _now() < self._expires:
            return self._value
        return default

    def is_valid(self) -> bool:
        return _now() < self._expires

    def set(self, value: _T, ttl: Optional[float] = None) -> _T:
        """Store ``value`` (``ttl`` overrides the cache's for this value)."""
        ttl = self._ttl if ttl is None else _check_seconds(ttl, "ttl")
        self._generation += 1
        self._store(value, ttl)
        return value

    def get_or_compute(self, factory: Callable[..., _T], ttl: Optional[float] = None) -> _T:
        """The cached value, or ``factory()``'s, computed by one greenlet at a time.

        Concurrent callers wait for the running computation and share its
        result, or the exception it failed with (an ``Exception``). An
        interruption of the computing caller (its own ``gevent.Timeout``, a
        kill) is that caller's alone: it propagates there, and one of the
        waiters computes instead. A result that an invalidate() overtook is
        returned but not stored.
        """
        if _now() < self._expires:
            return self._value
        _check_callable(factory, "factory")
        ttl = self._ttl if ttl is None else _check_seconds(ttl, "ttl")
        while True:
            flight = self._flight
            if flight is None:
                break
            if self._flight_owner is getcurrent():
                raise RuntimeError("the factory of cache %s called get_or_compute() on the same cache; "
                                   "it would wait for itself forever" % self.name)
            flight.wait()
            if flight.successful() or isinstance(flight.exception, Exception):
                return flight.get(block=False)
            # The computing caller was interrupted (a kill, its own Timeout):
            # that is not the computation's failure, so compute here instead.
            if _now() < self._expires:
                return self._value
        flight = self._flight = gevent.event.AsyncResult()
        self._flight_owner = getcurrent()
        generation = self._generation
        try:
            value = factory()
        except BaseException as exc:
            if self._flight is flight:
                self._flight = None
            flight.set_exception(exc)
            raise
        if self._flight is flight:
            self._flight = None
        if generation == self._generation:
            self._store(value, ttl)
        flight.set(value)
        return value

    def invalidate(self) -> None:
        """Empty the cache, emit '{name}:invalidated', call on_invalidate callbacks.

        The emit may invalidate other caches (``depends_on``), which may
        invalidate more: one cascade. The first invalidate() in a greenlet
        runs it as a loop over queues rather than by recursion, so a chain of
        any length completes. Every cache it reaches is emptied at once,
        and every one is announced on the bus before any callback runs, so
        a callback that rebuilds its cache reads only dependencies the
        cascade has already emptied. Each cache is notified once per cascade
        (a diamond or a cycle reaches a cache twice), in the order reached.
        """
        cascade = _state_cascades.get(getcurrent())
        if cascade is None:
            self._clear()
            self._run_cascade(_StateCascade(self))
        elif self not in cascade.seen:
            cascade.seen.add(self)
            self._clear()
            cascade.unannounced.append(self)
        if self._shared:
            _cluster_cache_invalidated(self)

    def on_invalidate(self, callback: Callable[..., Any]) -> Callable[[], bool]:
        """Call ``callback()`` (no arguments, as in 0.1.2) on every invalidation; returns an unsubscribe."""
        _check_callable(callback, "callback")
        self._callbacks += (callback,)
        return functools.partial(_drop, self, "_callbacks", callback)

    def destroy(self) -> None:
        """Empty the cache and drop callbacks and ``depends_on`` subscriptions."""
        for event in self._depends_on:
            bus.off(event, self._on_dependency)
        self._depends_on = ()
        self._callbacks = ()
        self._clear()  # a computation still in flight must not fill a destroyed cache
        if self._shared:
            _cluster_cache_unregister(self)

    stop = destroy

    def health(self) -> Dict[str, Any]:
        return {"name": self.name, "type": "cache", "valid": self.is_valid(),
                "updated_at": self._updated_at}

    def __repr__(self):
        return "<Cache %r %s>" % (self.name, "valid" if self.is_valid() else "empty")

    def _clear(self):
        self._value = None
        self._expires = -math.inf
        self._updated_at = None
        self._generation += 1
        self._flight = None  # callers from now on must not join a computation this overtook

    @staticmethod
    def _run_cascade(cascade):
        """Run ``cascade`` in this greenlet until nothing is left: announce, then call back.

        An emit may reach more caches (a ``depends_on`` listener, or any
        listener calling invalidate()); they join ``cascade.unannounced``
        instead of recursing through ``bus.emit``, so a cascade is not
        bounded by the Python stack. Announcing goes first: a cache's
        callbacks run only when no reached cache is left unannounced, that
        is, when the cascade has emptied everything it reaches.
        """
        current = getcurrent()
        _state_cascades[current] = cascade
        unannounced, uncalled = cascade.unannounced, cascade.uncalled
        callbacks = None
        try:
            while unannounced or uncalled:
                if unannounced:
                    cache = unannounced[0]
                    bus.emit(cache._event, {"name": cache.name})
                    uncalled.append(unannounced.popleft())
                    continue
                cache = uncalled[0]
                rest, cascade.rest = cascade.rest, None
                if rest is None:
                    callbacks = iter(cache._callbacks)
                else:
                    # Resuming: what was left, minus callbacks dropped since.
                    live = set(map(id, cache._callbacks))
                    callbacks = iter([callback for callback in rest if id(callback) in live])
                _notify(callbacks, (), _state_log, "%s: on_invalidate callback %s raised", cache.name)
                uncalled.popleft()
                callbacks = None
        except BaseException:
            # Killed, or a Timeout, inside a listener or a callback. The caches
            # already emptied must still be announced and called back, or their
            # dependents stay valid: a new greenlet carries on from the callback
            # after the one interrupted (an interrupted emit is repeated whole).
            if unannounced or uncalled:
                cascade.rest = None if callbacks is None else tuple(callbacks)
                gevent.spawn(Cache._run_cascade, cascade)
            raise
        finally:
            del _state_cascades[current]

    def _store(self, value, ttl):
        self._value = value
        self._expires = _now() + ttl if ttl else math.inf
        self._updated_at = time.time()

    def _on_dependency(self, data):
        self.invalidate()


def create_store(name: str, initial_state: Optional[Dict[str, Any]] = None, **kwargs: Any) -> Store:
    """A new Store (``emit_events``, ``change_event`` keywords)."""
    return Store(name, initial_state, **kwargs)


def create_model(name: str, initial_state: Optional[Dict[str, Any]] = None, **kwargs: Any) -> Model:
    """A new Model (``emit_events``, ``change_event`` keywords)."""
    return Model(name, initial_state, **kwargs)


def create_cache(name: str, ttl: float = 0, depends_on: Union[str, Iterable[str], None] = None,
                 shared: bool = False) -> Cache:
    """A new Cache (``shared=True``: invalidations cross the cluster)."""
    return Cache(name, ttl, depends_on, shared)


class _StateCascade:
    """One invalidation cascade, run by ``Cache._run_cascade``: the caches reached, those still to notify."""

    __slots__ = ("seen", "unannounced", "uncalled", "rest")

    def __init__(self, cache):
        self.seen = {cache}
        self.unannounced = collections.deque((cache,))  # emptied, event not emitted yet
        self.uncalled = collections.deque()  # announced, callbacks not called yet
        self.rest = None  # after an interruption: the callbacks of uncalled[0] not called yet


# The greenlets running an invalidation cascade, each with its cascade.
_state_cascades: Dict[Any, _StateCascade] = {}


class _ModelSubscriber:
    __slots__ = ("fn", "selector", "last")

    def __init__(self, fn, selector):
        self.fn = fn
        self.selector = selector
        self.last = None

    def __call__(self, root, model):
        """Deliver a write to ``fn``: the whole root, or its selection if that changed."""
        selector = self.selector
        if selector is None:
            # Each its own copy: one subscriber's edit must not reach the next.
            self.fn(_model_copy(root), model)
            return
        value = self.select(root)
        last = self.last
        # _model_same(value, last), inlined: this runs for every selector on every write
        if value is last or (type(value) is type(last) and value == last
                             and (type(value) in _MODEL_ATOMS or _model_same_types(value, last))):
            return
        self.last = value
        self.fn(_model_copy(value), model)

    def __repr__(self):
        return _callable_name(self.fn)  # what a log line names: the subscriber's function

    def select(self, root):
        selector = self.selector
        if selector is None:
            return None
        if type(selector) is tuple:
            return _model_lookup(root, selector, None)
        return selector(root)


_model_paths: Dict[str, Tuple[Any, ...]] = {}
_model_getters: Dict[str, Callable[[Any], Any]] = {}
_MODEL_ATOMS = frozenset((str, int, float, bool, type(None), bytes, complex))


def _model_path(path):
    """Parse 'a.b.c' or a key sequence into a tuple of keys (string paths are cached)."""
    if isinstance(path, str):
        keys = _model_paths.get(path)
        if keys is not None:
            return keys
        keys = tuple(path.split("."))
        if not path or "" in keys:
            raise ValueError("path %r is empty or has an empty segment; use 'a.b.c'" % path)
        if len(_model_paths) < 4096:
            _model_paths[path] = keys
            _model_getters[path] = _model_getter(keys)
        return keys
    if isinstance(path, (tuple, list)):
        if not path:
            raise ValueError("path must name at least one key")
        return tuple(path)
    raise TypeError("path must be a string like 'a.b.c' or a sequence of keys, got %s"
                    % _describe(path))


def _model_getter(keys):
    """Model.get's fast path for a string path: plain subscripts through plain dicts.

    It raises LookupError (KeyError included) whenever it cannot answer: a
    missing key, or a value on the way that is not a plain dict (a list, a
    dict subclass, anything else). The caller then applies
    ``_model_lookup``, so reads and selectors follow one rule. The root is
    always a plain dict.
    """
    if len(keys) == 1:
        k0, = keys
        return lambda root: root[k0]
    if len(keys) == 2:
        k0, k1 = keys

        def get2(root):
            node = root[k0]
            if type(node) is not dict:
                raise LookupError
            return node[k1]
        return get2
    if len(keys) == 3:
        k0, k1, k2 = keys

        def get3(root):
            node = root[k0]
            if type(node) is not dict:
                raise LookupError
            node = node[k1]
            if type(node) is not dict:
                raise LookupError
            return node[k2]
        return get3

    def get(root):
        node = root
        for key in keys:
            if type(node) is not dict:
                raise LookupError
            node = node[key]
        return node
    return get


def _model_lookup(node, keys, default):
    """The value at ``keys``, or ``default``: the one rule for every path.

    A key goes into a dict (any dict, read with ``get``, so a defaultdict
    never grows) or, as an index, into a list; any other value (a tuple, a
    string, an object) ends the path, so a key past it finds nothing.
    """
    for key in keys:
        if isinstance(node, dict):
            node = node.get(key, _MISSING)
        elif isinstance(node, list):
            index = _model_index(key, node)
            node = node[index] if index is not None else _MISSING
        else:
            return default
        if node is _MISSING:
            return default
    return node


def _model_index(key, items):
    if isinstance(key, str) and key.isascii() and key.isdigit():
        key = int(key)
    if type(key) is int and -len(items) <= key < len(items):
        return key
    return None


def _model_assoc(node, keys, depth, value):
    """``node`` with ``value`` at ``keys[depth:]``, sharing every untouched subtree.

    Returns ``node`` itself when nothing changes.
    """
    key = keys[depth]
    last = depth == len(keys) - 1
    if isinstance(node, dict):
        old = node.get(key, _MISSING)
    elif isinstance(node, list):
        index = _model_index(key, node)
        if index is None:
            raise KeyError("list index %r is out of range at %s" % (key, ".".join(map(str, keys[:depth]))))
        key, old = index, node[index]
    else:
        raise TypeError(
            "cannot set %s: %s holds %s, not a dict"
            % (".".join(map(str, keys)), ".".join(map(str, keys[:depth])) or "the root", _describe(node))
        )
    if last:
        # _model_same(old, value), inlined for the hot path
        if old is value or (type(old) is type(value) and old == value
                            and (type(value) in _MODEL_ATOMS or _model_same_types(old, value))):
            return node
        new_child = value
    else:
        child = {} if old is _MISSING or old is None else old
        new_child = _model_assoc(child, keys, depth + 1, value)
        if new_child is old:
            return node
    new_node = node.copy()
    new_node[key] = new_child
    return new_node


def _model_dissoc(node, keys, depth):
    key = keys[depth]
    if isinstance(node, dict):
        old = node.get(key, _MISSING)
    elif isinstance(node, list):
        key = _model_index(key, node)
        old = _MISSING if key is None else node[key]
    else:
        return node
    if old is _MISSING:
        return node
    new_node = node.copy()
    if depth == len(keys) - 1:
        del new_node[key]
        return new_node
    new_child = _model_dissoc(old, keys, depth + 1)
    if new_child is old:
        return node
    new_node[key] = new_child
    return new_node


def _model_same(a, b):
    """Whether ``a`` and ``b`` are equal and of the same types all the way down.

    ``==`` alone holds ``1 == 1.0 == True``, also inside containers, so it
    would drop a write that only changes a type. One ``==`` (in C) decides
    every unequal pair; only equal containers are then walked for their
    types, and structural sharing makes unchanged subtrees the same object,
    which needs no walk at all.
    """
    if a is b:
        return True
    cls = type(a)
    if cls is not type(b) or a != b:
        return False
    return cls in _MODEL_ATOMS or _model_same_types(a, b)


def _model_same_types(a, b):
    """For ``a == b``: whether their dicts, lists and tuples hold values of the same types.

    Subclasses (an OrderedDict, a defaultdict, a namedtuple) are walked too:
    the model keeps them as they are.
    """
    if a is b:
        return True
    cls = type(a)
    if cls is not type(b):
        return False
    if cls in _MODEL_ATOMS:
        return True
    if isinstance(a, dict):
        return all(_model_same_types(item, b[key]) for key, item in a.items())
    if isinstance(a, (list, tuple)):
        return all(map(_model_same_types, a, b))
    return True


def _model_copy(value):
    """A deep copy that shares immutable leaves."""
    cls = type(value)
    if cls in _MODEL_ATOMS:
        return value
    if cls is dict:
        return {key: _model_copy(item) for key, item in value.items()}
    if cls is list:
        return [_model_copy(item) for item in value]
    if cls is tuple:
        return tuple(_model_copy(item) for item in value)
    return copy.deepcopy(value)


def _state_mutate(state, draft_of, mutator):
    """Run ``mutator`` on a fresh draft until no other write lands meanwhile.

    Returns (result, draft): the dict the mutator returned, or the draft it
    edited in place.
    """
    _check_callable(mutator, "mutator")
    while True:
        version = state._version
        draft = draft_of()
        result = mutator(draft)
        if result is None:
            result = draft
        elif not isinstance(result, dict):
            raise TypeError("update() mutators edit the draft or return a dict, got %s" % _describe(result))
        if version == state._version:
            return result, draft


def _state_initial(initial_state):
    if initial_state is None:
        return {}
    if not isinstance(initial_state, dict):
        raise TypeError("initial_state must be a dict, got %s" % _describe(initial_state))
    return dict(initial_state)


def _state_event(name, emit_events, change_event):
    if change_event is not None:
        return _bus_event(change_event)
    return "%s:changed" % name if emit_events else None

###############################################################################
# Schema #######################################################################
###############################################################################

_schema_log = logging.getLogger("specter.schema")


class Field:
    """One field of a Schema: a type (or coercer) plus constraints.

    ``type`` is int, float, str, bool, list, dict, a nested Schema or any
    callable that converts the raw value (raising to refuse it). Checks run
    after coercion: items (a Field applied to each list element), choices,
    min/max, min_length/max_length, pattern (the whole string must match),
    then ``validator(value)``, which fails the field by returning False or
    raising. A Field is a description; the Schema that holds it compiles it.
    """

    __slots__ = ("type", "required", "default", "choices", "validator", "label", "min", "max",
                 "min_length", "max_length", "pattern", "items")

    def __init__(self, type=str, *, required=False, default=None, choices=None, validator=None,
                 label=None, min=None, max=None, min_length=None, max_length=None, pattern=None,
                 items=None):
        # Built-in types are looked up by identity: hashing ``type`` would fail
        # for an unhashable callable coercer (a dataclass instance, say).
        if not (isinstance(type, Schema) or _schema_builtin(type) is not None or callable(type)):
            raise TypeError("Field type must be a type, a callable coercer or a Schema, got %s"
                            % _describe(type))
        if validator is not None:
            _check_callable(validator, "validator")
        if label is not None and not isinstance(label, str):
            raise TypeError("label must be a string, got %s" % _describe(label))
        if choices is not None:
            if isinstance(choices, (str, bytes)) or not isinstance(choices, collections.abc.Iterable):
                raise TypeError("choices must be a list of allowed values, got %s" % _describe(choices))
            choices = tuple(choices)
        for bound_name, bound in (("min", min), ("max", max)):
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, numbers.Real)):
                raise TypeError("%s must be a number, got %s" % (bound_name, _describe(bound)))
        for bound_name, bound in (("min_length", min_length), ("max_length", max_length)):
            if bound is not None:
                _check_count(bound, bound_name, 0)
        if pattern is not None:
            if isinstance(pattern, str):
                pattern = re.compile(pattern)
            elif not isinstance(pattern, re.Pattern):
                raise TypeError("pattern must be a regular expression string, got %s" % _describe(pattern))
        if items is not None and not isinstance(items, Field):
            raise TypeError("items must be a Field describing each element, got %s" % _describe(items))
        self.type = type
        self.required = bool(required)
        self.default = default
        self.choices = choices
        self.validator = validator
        self.label = label
        self.min = min
        self.max = max
        self.min_length = min_length
        self.max_length = max_length
        self.pattern = pattern
        self.items = items

    def make_default(self) -> Any:
        """The default for an absent field: a factory's result, or a copy of a list/dict.

        The raw default, as declared; a Schema validating the field checks it
        against the field and gives the cleaned value.
        """
        default = self.default
        if callable(default):
            return default()
        if isinstance(default, (list, dict)):
            return copy.deepcopy(default)
        return default

    def to_json_schema(self) -> Dict[str, Any]:
        """This field as a JSON Schema fragment."""
        kind = self.type
        if isinstance(kind, Schema):
            out = kind.to_json_schema(root=False)
        else:
            out = dict(_SCHEMA_JSON_TYPES.get(_schema_builtin(kind), {}))
        # Lengths count items for a list and keys for an object (a dict or a nested schema).
        unit = "Items" if kind is list else "Properties" if kind is dict or isinstance(kind, Schema) else "Length"
        if self.label:
            out["title"] = self.label
        if self.choices is not None:
            out["enum"] = [choice for choice in self.choices if _schema_jsonable(choice)]
        if self.min is not None:
            out["minimum"] = self.min
        if self.max is not None:
            out["maximum"] = self.max
        if self.min_length is not None:
            out["min" + unit] = self.min_length
        if self.max_length is not None:
            out["max" + unit] = self.max_length
        if self.pattern is not None:
            out["pattern"] = "^(?:%s)$" % self.pattern.pattern
        if self.items is not None:
            out["items"] = self.items.to_json_schema()
        if self.default is not None and not callable(self.default) and _schema_jsonable(self.default):
            out["default"] = self.default
        return out

    def __repr__(self):
        kind = self.type
        name = kind.name if isinstance(kind, Schema) else getattr(kind, "__name__", repr(kind))
        return "Field(%s%s)" % (name, ", required=True" if self.required else "")


class Schema:
    """A named contract for dict payloads, compiled once into a validator.

    ``validate`` never raises: it returns an Outcome whose value is the
    cleaned dict (declared fields only, defaults filled) or a 400 failure
    naming every bad field, with ``meta['errors']`` mapping paths such as
    ``'owner.email'`` or ``'tags[2]'`` to messages. Payloads nested deeper
    than ``max_depth`` or holding more than ``max_items`` values are refused.

    Building a schema generates one straight-line Python function for its
    fields (see ``compiled_source()``), so validating costs about what a
    hand-written function would. Field names, patterns, bounds and messages
    reach that code only as named constants, never as source text.
    """

    max_depth = 32
    max_items = 10000

    def __init__(self, name, fields, *, strict=False):
        self.name = _check_name(name, "schema name")
        if not isinstance(fields, dict):
            raise TypeError("fields must be a dict of name -> Field, got %s" % _describe(fields))
        for key, field in fields.items():
            if not isinstance(key, str) or not key:
                raise TypeError("field names must be non-empty strings, got %s" % _describe(key))
            if not isinstance(field, Field):
                raise TypeError("field %r must be a Field instance, got %s; wrap it: Field(%s)"
                                % (key, _describe(field), getattr(field, "__name__", "...")))
        self.fields = dict(fields)
        self.strict = bool(strict)
        self._required = {key: field for key, field in self.fields.items() if field.required}
        self._compile()

    @property
    def field_names(self) -> collections.abc.KeysView[str]:
        """The declared names in order; set-like, so it compares equal to a set."""
        return self.fields.keys()

    @property
    def required_fields(self) -> collections.abc.KeysView[str]:
        """The required names in order; set-like, so it compares equal to a set."""
        return self._required.keys()

    def validate(self, data: Any) -> Outcome:
        """Check and coerce ``data``; an Outcome, never an exception."""
        return self._validate(self, data)

    def require(self, data: Any) -> Dict[str, Any]:
        """The cleaned dict, or HTTPError(400) carrying the per-field errors."""
        outcome = self.validate(data)
        if outcome.ok:
            return outcome.value
        raise HTTPError(outcome.error, 400, payload={"errors": dict(outcome.meta["errors"])})

    def extend(self, name: str, extra_fields: Dict[str, Field], **kwargs: Any) -> Schema:
        """A new schema with this one's fields plus (or overridden by) ``extra_fields``."""
        if not isinstance(extra_fields, dict):
            raise TypeError("extra_fields must be a dict of name -> Field, got %s" % _describe(extra_fields))
        kwargs.setdefault("strict", self.strict)
        return Schema(name, {**self.fields, **extra_fields}, **kwargs)

    def to_json_schema(self, root: bool = True) -> Dict[str, Any]:
        """The contract as a JSON Schema (draft 2020-12) dict."""
        out: Dict[str, Any] = {}
        if root:
            out["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        out["title"] = self.name
        out["type"] = "object"
        out["properties"] = {key: field.to_json_schema() for key, field in self.fields.items()}
        required = list(self._required)
        if required:
            out["required"] = required
        out["additionalProperties"] = not self.strict
        return out

    def compiled_source(self) -> str:
        """The Python source this schema was compiled to, for reading and debugging.

        The code names its constants (``key_0``, ``match_3``...); a legend
        after it shows each constant's value, escaped with ``ascii()``; the
        legend is not part of the compiled code. Once the schema is used as a
        nested field type, the code for that use follows.
        """
        if self._nested is None:
            return self._source
        return self._source + "\n\n" + self._nested[1]

    def __repr__(self):
        return "<Schema %r %s>" % (self.name, list(self.fields))

    def __getstate__(self):
        # The compiled code is not copied or pickled: a copy compiles its own.
        state = dict(self.__dict__)
        for key in ("validate", "_validate", "_source", "_nested"):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._compile()

    def _compile(self):
        self._validate, self._source = _SchemaCompiler(self).build(nested=False)
        self._nested = None             # (function, source) once compiled for nesting
        if type(self).validate is Schema.validate:
            # The compiled function, bound: one call per validate instead of two.
            # A subclass that overrides validate keeps its override.
            self.validate = types.MethodType(self._validate, self)  # type: ignore[method-assign]

    def _object_cleaner(self):
        """The function cleaning this schema as a nested field, compiled on first use."""
        if self._nested is None:
            self._nested = _SchemaCompiler(self).build(nested=True)
        return self._nested[0]

    def _message(self, errors):
        parts = []
        for path, message in errors.items():
            field = self.fields.get(path)
            parts.append("%s %s" % (field.label if field is not None and field.label else path, message))
        return "Invalid %s: %s" % (self.name, "; ".join(parts))


class Outcome:
    """An immutable result: ``ok``, ``value``, ``error``, ``status`` and ``meta``.

    Build one with ``Outcome.success`` or ``Outcome.failure``. Truthy when ok.
    The fields are read-only properties and ``meta`` a read-only mapping.
    """

    __slots__ = ("_ok", "_value", "_error", "_status", "_meta")

    def __init__(self, ok, value=None, error=None, status=200, meta=None):
        self._ok = bool(ok)
        self._value = value
        self._error = error
        self._status = _outcome_status(status)
        self._meta = types.MappingProxyType(dict(meta)) if meta else _OUTCOME_NO_META

    @property
    def ok(self) -> bool:
        return self._ok

    @property
    def value(self) -> Any:
        return self._value

    @property
    def error(self) -> Optional[str]:
        return self._error

    @property
    def status(self) -> int:
        return self._status

    @property
    def meta(self) -> Mapping[str, Any]:
        return self._meta

    @classmethod
    def success(cls, value: Any = None, *, status: int = 200, **meta: Any) -> Outcome:
        return cls(True, value, None, status, meta)

    @classmethod
    def failure(cls, error: Any, *, status: int = 400, value: Any = None, **meta: Any) -> Outcome:
        if not isinstance(error, str):
            error = str(error)
        return cls(False, value, error, status, meta)

    def unwrap(self) -> Any:
        """The value, or RuntimeError carrying the error."""
        if not self._ok:
            raise RuntimeError(self._error)
        return self._value

    def to_dict(self) -> Dict[str, Any]:
        """``meta`` plus ok, status and value (and error when failed): ready for jsonify."""
        out = dict(self._meta)
        out["ok"] = self._ok
        out["status"] = self._status
        if not self._ok:
            out["error"] = self._error
        out["value"] = self._value
        return out

    def to_tuple(self) -> Tuple[bool, Any, Optional[str]]:
        return (self._ok, self._value, self._error)

    def __bool__(self):
        return self._ok

    def __eq__(self, other):
        if not isinstance(other, Outcome):
            return NotImplemented
        return self.to_tuple() == other.to_tuple() and self._status == other._status and self._meta == other._meta

    __hash__ = None  # type: ignore[assignment]  # equal by value, so not hashable

    def __repr__(self):
        if self._ok:
            return "Outcome.success(%r, status=%d)" % (self._value, self._status)
        return "Outcome.failure(%r, status=%d)" % (self._error, self._status)


class Operation:
    """A reusable action: override ``validate`` (raise OperationError) and ``perform``.

    ``run`` always returns an Outcome. An unexpected exception is logged and
    becomes a 500 failure with a generic message, so no internal detail
    reaches a client.
    """

    def validate(self, *args: Any, **kwargs: Any) -> Any:
        """Raise OperationError to refuse the arguments."""

    def perform(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("%s must override perform()" % type(self).__name__)

    def run(self, *args: Any, **kwargs: Any) -> Outcome:
        try:
            checked = self.validate(*args, **kwargs)
            if isinstance(checked, Outcome) and not checked.ok:
                return checked
            result = self.perform(*args, **kwargs)
        except OperationError as exc:
            return Outcome(False, None, exc.message, exc.status, exc.meta)
        except Exception:
            _schema_log.exception("operation %s raised", type(self).__name__)
            return Outcome(False, None, "Internal error", 500, None)
        if isinstance(result, Outcome):
            return result
        return Outcome(True, result, None, 200, None)

    def success(self, value: Any = None, *, status: int = 200, **meta: Any) -> Outcome:
        return Outcome.success(value, status=status, **meta)

    def failure(self, error: Any, *, status: int = 400, value: Any = None, **meta: Any) -> Outcome:
        return Outcome.failure(error, status=status, value=value, **meta)


def _schema_int(value):
    """An int from an int, an integral float or Decimal, or a string holding a whole number."""
    cls = type(value)
    if cls is str:
        # int() and Decimal() skip surrounding whitespace themselves. The length
        # bound keeps a hostile megabyte of digits away from them; "_" is
        # Python syntax ("1_000"), not a number a client sends.
        text = value if len(value) <= 64 else value.strip()
        if len(text) <= 64 and "_" not in text:
            try:
                return int(text)
            except ValueError:
                pass
            # "3.0" and "1e23" are integers written another way. Decimal reads
            # them exactly; a float would round ("1e23" to ...991611392) and
            # make "0.99999999999999999" a whole 1.
            try:
                number = decimal.Decimal(text)
            except (ArithmeticError, ValueError):
                pass
            else:
                whole = _schema_whole(number)
                if whole is not None:
                    return whole
        raise SchemaError("must be an integer, got %s" % _clip(repr(value)))
    if cls is int:
        return value
    if cls is float:
        if value.is_integer():
            return int(value)
        raise SchemaError("must be a whole number, got %s" % _clip(repr(value)))
    if cls is bool:
        raise SchemaError("must be an integer, got a boolean")
    if isinstance(value, decimal.Decimal):
        whole = _schema_whole(value)
        if whole is not None:
            return whole
        raise SchemaError("must be a whole number, got %s" % _clip(repr(value)))
    if isinstance(value, numbers.Integral):
        return int(value)
    raise SchemaError("must be an integer, got %s" % _schema_kind(value))


def _schema_whole(number):
    """The int a Decimal stands for exactly, or None when it is not a whole number.

    The exponent is bounded first: int(Decimal("1e999999999")) would build a
    billion-digit integer.
    """
    if (number.is_finite() and number.adjusted() < _SCHEMA_INT_DIGITS
            and number == number.to_integral_value()):
        return int(number)
    return None


# Whole numbers written with an exponent may have at most this many digits:
# the limit Python itself puts on int("...") (sys.int_info.default_max_str_digits).
_SCHEMA_INT_DIGITS = 4300


def _schema_float(value):
    """A finite float from an int, a float, a real number or a numeric string."""
    cls = type(value)
    if cls is str:
        text = value if len(value) <= 64 else value.strip()   # float() skips whitespace itself
        if len(text) > 64 or "_" in text:
            raise SchemaError("must be a number, got %s" % _clip(repr(value)))
        try:
            number = float(text)
        except ValueError:
            raise SchemaError("must be a number, got %s" % _clip(repr(value))) from None
    elif cls is int:
        number = float(value)
    elif cls is float:
        number = value
    elif cls is bool:
        raise SchemaError("must be a number, got a boolean")
    elif isinstance(value, numbers.Real):
        number = float(value)
    else:
        raise SchemaError("must be a number, got %s" % _schema_kind(value))
    if -_SCHEMA_INF < number < _SCHEMA_INF:    # False for NaN too
        return number
    raise SchemaError("must be a finite number, got %s" % _clip(repr(value)))


_SCHEMA_INF = math.inf


def _schema_str(value):
    cls = type(value)
    if cls is str:
        return value
    if cls is int or cls is float:
        return str(value)
    raise SchemaError("must be a string, got %s" % _schema_kind(value))


_SCHEMA_WORDS = {"true": True, "yes": True, "on": True, "1": True,
                 "false": False, "no": False, "off": False, "0": False}


def _schema_bool(value):
    """A bool from a bool, 0/1, or true/false, yes/no, on/off, 1/0 in any case."""
    cls = type(value)
    if cls is str and len(value) <= 16:
        word = _SCHEMA_WORDS.get(value)
        if word is None:
            word = _SCHEMA_WORDS.get(value.strip().lower())
        if word is not None:
            return word
    elif cls is bool:
        return value
    elif cls is int and (value == 0 or value == 1):
        return value == 1
    raise SchemaError("must be true or false (also yes/no, on/off, 1/0), got %s"
                      % _clip(repr(value)))


def _schema_list(value):
    if type(value) is list:
        return list(value)
    if type(value) is tuple:
        return list(value)
    raise SchemaError("must be a list, got %s" % _schema_kind(value))


def _schema_dict(value):
    if isinstance(value, dict):
        return dict(value)
    raise SchemaError("must be an object, got %s" % _schema_kind(value))


_SCHEMA_COERCERS = {int: _schema_int, float: _schema_float, str: _schema_str, bool: _schema_bool,
                    list: _schema_list, dict: _schema_dict}
# What a fixed default of each built-in type (dict also for a nested schema)
# may be, and how an error says it.
_SCHEMA_DEFAULT_TYPES = {int: (int, "an integer"), float: ((int, float), "a number"), str: (str, "a string"),
                         bool: (bool, "a boolean"), list: ((list, tuple), "a list"), dict: (dict, "an object")}


def _schema_builtin(kind):
    """The built-in type ``kind`` is (int, float, str, bool, list, dict), or None.

    Compared by identity: a coercer may be unhashable (a dataclass instance).
    """
    for builtin in _SCHEMA_COERCERS:
        if kind is builtin:
            return builtin
    return None

_SCHEMA_JSON_TYPES = {int: {"type": "integer"}, float: {"type": "number"}, str: {"type": "string"},
                      bool: {"type": "boolean"}, list: {"type": "array"}, dict: {"type": "object"}}


class _SchemaCompiler:
    """Writes a Schema's validator as Python source, then compiles it.

    The source holds only generated names, keywords and small integers.
    Everything that comes from the schema's author (field names, defaults,
    bounds, choices, patterns, coercers, validators, messages) is a value in
    the namespace the code runs in, under a generated name such as
    ``key_0`` or ``match_3``: data stays data, whatever characters it holds.

    The code is straight-line per field: a type test that takes the common
    case inline, a call to the coercer otherwise, then the field's checks,
    all inside one ``try`` whose handlers turn a refusal into a message at
    the field's path (a ``try`` costs nothing until something raises). List
    elements are checked by a loop written in place.

    Paths travel unformatted, as nested tuples ``(parent, key_or_index)``
    that ``_schema_path`` renders, so a path costs nothing until an error
    needs its text. ``root`` is the schema ``validate`` was called on: its
    ``max_depth`` and ``max_items`` bound the whole payload, nested objects
    included.
    """

    def __init__(self, schema):
        self.schema = schema
        self.namespace = dict(_SCHEMA_RUNTIME)
        self.names = {}                 # (stem, id of the value or of its owner) -> generated name
        self.legend = []                # the constants' names, in order
        self.functions = []             # one list of source lines per generated function
        self.serial = itertools.count()
        self.defaults = []              # (key, field, check, constant or None, default) to check

    def build(self, nested):
        """Compile ``validate(root, data)``, or with ``nested`` ``clean_object(data, path, errors, root, level)``.

        Returns (function, source). Fixed defaults are checked here, so a bad
        one raises TypeError naming its field while the schema is built.
        """
        if nested:
            self._object_function()
        else:
            self._validate_function()
        source = "\n\n\n".join("\n".join(lines) for lines in self.functions) + "\n"
        label = "<specter schema %s%s>" % (_clip(ascii(self.schema.name), 60), " nested" if nested else "")
        exec(compile(source, label, "exec"), self.namespace)
        for key, field, check, constant, default in self.defaults:
            if callable(default):           # list or dict: always an empty one
                default = default()
            clean = _schema_default(field, self.namespace[check], default, key, self.schema)
            if constant is not None:
                self.namespace[constant] = clean
        if self.legend:
            source += "\n# Constants (values, escaped, not compiled):\n" + "\n".join(
                "#   %s = %s" % (name, _clip(ascii(self.namespace[name]), 100)) for name in self.legend) + "\n"
        return self.namespace["clean_object" if nested else "validate"], source

    # -- names -----------------------------------------------------------------

    def const(self, stem, value, owner=None):
        """A generated global name bound to ``value`` (one name per value, or per ``owner``)."""
        memo = (stem, id(value) if owner is None else id(owner))
        name = self.names.get(memo)
        if name is None:
            name = self.names[memo] = "%s_%d" % (stem, next(self.serial))
            self.namespace[name] = value
            self.legend.append(name)
        return name

    def function(self, header, doc):
        lines = [header, '    """%s"""' % doc]
        self.functions.append(lines)
        return lines

    # -- functions -------------------------------------------------------------

    def _validate_function(self):
        out = self.function("def validate(root, data):",
                            "Schema.validate: the cleaned dict as an Outcome, or a 400 naming every bad field.")
        add = out.append
        add("    errors = {}")
        add("    try:")
        add("        if type(data) is not dict and not isinstance(data, dict):")
        add('            errors["$"] = "must be an object, got %s" % kind(data)')
        add("        elif len(data) > root.max_items:")
        add('            errors["$"] = "has more than %d keys" % root.max_items')
        add("        else:")
        self._members(out, 3, nested=False)
        add("    except RecursionError:")
        add('        errors = {"$": "is nested too deeply"}')
        add("    except Exception:   # outside any field: a dict subclass's get(), say")
        add('        errors = {"$": broken("$", root)}')
        add("    if errors:")
        add("        return failure(root, errors)")
        add("    result = new_outcome(Outcome)   # what _outcome() does, without the call")
        add("    result._ok = True")
        add("    result._value = out")
        add("    result._error = None")
        add("    result._status = 200")
        add("    result._meta = NO_META")
        add("    return result")

    def _object_function(self):
        out = self.function("def clean_object(data, path, errors, root, level):",
                            "The schema as a nested field: the cleaned dict, or MISSING once errors are recorded.")
        add = out.append
        add("    if type(data) is not dict and not isinstance(data, dict):")
        add('        errors[path_text(path)] = "must be an object, got %s" % kind(data)')
        add("        return MISSING")
        add("    if len(data) > root.max_items:")
        add('        errors[path_text(path)] = "has more than %d keys" % root.max_items')
        add("        return MISSING")
        add("    if level > root.max_depth:")
        add('        errors[path_text(path)] = "is nested more than %d levels deep" % root.max_depth')
        add("        return MISSING")
        add("    known = len(errors)")
        self._members(out, 1, nested=True)
        add("    return out if len(errors) == known else MISSING")

    def _members(self, out, depth, nested):
        """Each field in declaration order, then (strict) the keys nobody declared."""
        pad = "    " * depth
        add = out.append
        add(pad + "get = data.get")
        add(pad + "out = {}")
        fields = self.schema.fields
        for number, (key, field) in enumerate(fields.items(), 1):
            name = self.const("key", key)
            path = "(path, %s)" % name if nested else name
            text = "path_text(%s)" % path if nested else name
            add("")
            add(pad + "# field %d of %d: %s" % (number, len(fields), _schema_summary(field)))
            add(pad + "v = get(%s)" % name)
            add(pad + "if v is None:")
            self._absent(out, depth + 1, key, field, name, path, text)
            add(pad + "else:")
            self._value(out, depth + 1, field, "v", path, text, "level" if nested else "0", "out[%s] = v" % name, 0)
        if self.schema.strict:
            known = self.const("known", frozenset(fields))
            add("")
            add(pad + "# strict: keys the schema does not declare are refused")
            add(pad + "if not data.keys() <= %s:" % known)
            add(pad + "    unknown_keys(data, %s, %s, errors)" % (known, "path" if nested else '""'))

    def _absent(self, out, depth, key, field, name, path, text):
        """An absent or None value: 'is required', or the default, checked against the field."""
        pad = "    " * depth
        add = out.append
        default = field.default
        if field.required:
            add(pad + 'errors[%s] = "is required"' % text)
            return
        if default is None:
            add(pad + "out[%s] = None" % name)
            return
        check = self._default_check(field)
        if default is list or default is dict or (type(default) in (list, dict) and not default):
            # An empty container is written as a literal: a fresh one each time, nothing to copy.
            if check is not None:
                self.defaults.append((key, field, check, None, default))
            add(pad + "out[%s] = %s" % (name, "[]" if default is list or type(default) is list else "{}"))
        elif callable(default):
            # A factory's result is checked each time it is called.
            add(pad + "v = call_default(%s, %s, %s, %s, errors, root)"
                % (self.const("field", field), self.const("factory", default), check, path))
            add(pad + "if v is not MISSING:")
            add(pad + "    out[%s] = v" % name)
        else:
            # A fixed default was checked when the schema was built; the constant holds its cleaned value.
            constant = self.const("default", default)
            if check is not None:
                self.defaults.append((key, field, check, constant, default))
            template = "out[%s] = deepcopy(%s)" if isinstance(default, (list, tuple, dict)) else "out[%s] = %s"
            add(pad + template % (name, constant))

    def _default_check(self, field):
        """The name of a function cleaning a default of ``field``; None when it is not checked.

        Defaults of the built-in types and of nested schemas are checked; a
        coercer's are not (only the coercer knows what it produces).
        """
        if _schema_builtin(field.type) is None and not isinstance(field.type, Schema):
            return None
        name = "check_%d" % next(self.serial)
        out = self.function("def %s(v, path, errors, root):" % name,
                            "A default of one field, cleaned: the value, or MISSING once errors are recorded.")
        self._value(out, 1, field, "v", "path", "path_text(path)", "0", "return v", 0)
        out.append("    return MISSING")
        return name

    def _value(self, out, depth, field, var, path, text, level, store, nest):
        """Convert and check ``var`` for ``field``, then run ``store``.

        ``path`` is the expression of the value's path, ``text`` of its text
        (where a refusal is recorded), ``level`` of the object nesting level.
        """
        pad = "    " * depth
        add = out.append
        add(pad + "try:")
        depth += 1
        body = "    " * depth
        kind = _schema_builtin(field.type)
        if isinstance(field.type, Schema):
            cleaner = self.const("object", field.type._object_cleaner())
            deeper = "1" if level == "0" else level + " + 1"
            add(body + "%s = %s(%s, %s, errors, root, %s)" % (var, cleaner, var, path, deeper))
            add(body + "if %s is not MISSING:" % var)
            depth += 1
            body += "    "
        elif kind is float:
            add(body + "if type(%s) is int:" % var)
            add(body + "    %s = float(%s)" % (var, var))
            add(body + "elif type(%s) is not float or not -INF < %s < INF:   # to_float refuses NaN, infinities"
                % (var, var))
            add(body + "    %s = to_float(%s)" % (var, var))
        elif kind is int:
            add(body + "if type(%s) is not int:" % var)
            add(body + "    if type(%s) is str and len(%s) <= 64 and %s.isdecimal():   # plain digits: int() reads them"
                % (var, var, var))
            add(body + "        %s = int(%s)" % (var, var))
            add(body + "    else:")
            add(body + "        %s = to_int(%s)" % (var, var))
        elif kind in (str, bool) or (kind is list and field.items is not None):
            add(body + "if type(%s) is not %s:" % (var, kind.__name__))
            add(body + "    %s = to_%s(%s)" % (var, kind.__name__, var))
        elif kind is not None:
            add(body + "%s = to_%s(%s)   # a copy" % (var, kind.__name__, var))
        else:
            add(body + "%s = %s(%s)" % (var, self.const("coerce", field.type), var))
        if field.items is not None:
            depth = self._items(out, depth, field, var, path, level, nest + 1)
            body = "    " * depth
        elif kind is list or kind is dict:
            add(body + "measure(%s, root)" % var)
        elif kind is None and not isinstance(field.type, Schema):
            add(body + "if type(%s) is list or type(%s) is dict:" % (var, var))
            add(body + "    measure(%s, root)" % var)
        self._checks(out, depth, field, var)
        add(body + store)
        add(pad + "except SchemaError as exc:")
        add(pad + "    errors[%s] = exc.message" % text)
        add(pad + "except REFUSED:   # an ordinary refusal: its text stays out of the message")
        add(pad + '    errors[%s] = "is invalid"' % text)
        add(pad + "except Exception:")
        add(pad + "    errors[%s] = broken(%s, %s)" % (text, text, self.const("field", field)))

    def _items(self, out, depth, field, var, path, level, nest):
        """The loop cleaning each element of the list ``var``; returns the depth the code continues at."""
        pad = "    " * depth
        add = out.append
        item, index, items, append, before = ("%s_%d" % (stem, nest) for stem in ("item", "index", "items", "append", "before"))
        if _schema_builtin(field.type) is not list:
            add(pad + "if not isinstance(%s, list):" % var)
            add(pad + '    raise SchemaError("must be a list, got %%s" %% kind(%s))' % var)
        add(pad + "if len(%s) > root.max_items:" % var)
        add(pad + '    raise SchemaError("has more than %d items" % root.max_items)')
        add(pad + "%s = len(errors)" % before)
        element = field.items
        kind = _schema_builtin(element.type)
        loop = pad
        if kind in (int, str, bool) and not any(getattr(element, option) is not None for option in (
                "items", "choices", "min", "max", "min_length", "max_length", "pattern", "validator")):
            # Elements that already have the type and nothing more to check are
            # taken in one pass; the loop below runs only when one is not.
            add(pad + "%s = [%s for %s in %s if type(%s) is %s]   # all clean already?"
                % (items, item, item, var, item, kind.__name__))
            add(pad + "if len(%s) != len(%s):" % (items, var))
            loop += "    "
        add(loop + "%s = []" % items)
        add(loop + "%s = %s.append" % (append, items))
        add(loop + "for %s, %s in enumerate(%s):" % (index, item, var))
        add(loop + "    if %s is None:" % item)
        add(loop + '        errors[path_text((%s, %s))] = "is required"' % (path, index))
        add(loop + "        continue")
        self._value(out, len(loop) // 4 + 1, element, item, "(%s, %s)" % (path, index),
                    "path_text((%s, %s))" % (path, index), level, "%s(%s)" % (append, item), nest)
        add(pad + "if len(errors) == %s:" % before)
        add(pad + "    %s = %s" % (var, items))
        return depth + 1

    def _checks(self, out, depth, field, var):
        """The constraints, in the documented order, each raising SchemaError with its message."""
        pad = "    " * depth
        add = out.append
        if field.choices is not None:
            choices = self.const("choices", field.choices)
            add(pad + "if %s not in %s:" % (var, choices))
            add(pad + "    raise SchemaError(one_of(%s))" % choices)
        if field.min is not None:
            add(pad + "if %s < %s:" % (var, self.const("min", field.min)))
            add(pad + "    raise SchemaError(%s)"
                % self.const("at_least", "must be at least %s" % field.min, owner=field))
        if field.max is not None:
            add(pad + "if %s > %s:" % (var, self.const("max", field.max)))
            add(pad + "    raise SchemaError(%s)"
                % self.const("at_most", "must be at most %s" % field.max, owner=field))
        if field.min_length is not None:
            bound = self.const("min_length", field.min_length)
            add(pad + "if len(%s) < %s:" % (var, bound))
            add(pad + '    raise length_error(%s, "at least", %s)' % (var, bound))
        if field.max_length is not None:
            bound = self.const("max_length", field.max_length)
            add(pad + "if len(%s) > %s:" % (var, bound))
            add(pad + '    raise length_error(%s, "at most", %s)' % (var, bound))
        if field.pattern is not None:
            match = self.const("match", field.pattern.fullmatch, owner=field.pattern)
            if field.type is str:       # already a string
                add(pad + "if %s(%s) is None:" % (match, var))
            else:
                add(pad + "if type(%s) is not str or %s(%s) is None:" % (var, match, var))
            add(pad + "    raise SchemaError(%s)" % self.const(
                "mismatch", "must match the pattern %r" % field.pattern.pattern, owner=field.pattern))
        if field.validator is not None:
            add(pad + "if %s(%s) is False:" % (self.const("validator", field.validator), var))
            add(pad + '    raise SchemaError("is invalid")')


def _schema_default(field, check, value, name, root):
    """A default cleaned by its field (``check``), or TypeError naming the field ``name``.

    A default must already have the field's type (an int may stand for a
    float, a tuple for a list): it is a value, not input to convert. So
    ``Field(str, default=5)`` cannot put an int in the cleaned dict.
    """
    if check is None:
        return value
    expected, words = _SCHEMA_DEFAULT_TYPES[_schema_builtin(field.type) or dict]
    if not isinstance(value, expected):
        raise TypeError("the default of field %r must be %s, got %s" % (name, words, _describe(value)))
    errors = {}
    clean = check(value, name, errors, root)
    if errors:
        raise TypeError("the default of field %r fails the field: %s"
                        % (name, "; ".join("%s %s" % item for item in errors.items())))
    return clean


def _schema_call_default(field, factory, check, path, errors, root):
    """A default factory's result, checked; _MISSING after recording an error if either fails."""
    try:
        return _schema_default(field, check, factory(), _schema_path(path), root)
    except Exception:
        text = _schema_path(path)
        _schema_log.exception("field %s: the default factory failed", text)
        errors[text] = "has no usable default"
        return _MISSING


def _schema_broken(text, what):
    """Log the exception being handled and give the client's message.

    Its text may carry internals (a lookup's connection string), so it goes
    to the log, never into the error.
    """
    _schema_log.warning("field %s: %s raised", text, what, exc_info=True)
    return "is invalid"


def _schema_failure(schema, errors):
    return _outcome(False, None, schema._message(errors), 400, {"errors": errors})


def _schema_one_of(choices):
    return "must be one of %s" % ", ".join(map(repr, choices))


def _schema_length_error(value, words, bound):
    return SchemaError("must have %s %d %s" % (words, bound, _schema_unit(value, bound)))


def _schema_unknown(data, known, path, errors):
    """Record the keys of ``data`` a strict schema does not declare (the first ten by name)."""
    unknown = [key for key in data if key not in known]
    for key in unknown[:10]:
        errors[_schema_path((path, _clip(str(key))))] = "is not an allowed field"
    if len(unknown) > 10:
        errors[_schema_path((path, "..."))] = "%d more unknown fields" % (len(unknown) - 10)


def _schema_summary(field):
    """What a field is made of, for the comment above its code (no user text: names only)."""
    kind = field.type
    parts = ["nested schema" if isinstance(kind, Schema) else kind.__name__ if _schema_builtin(kind) else "coercer"]
    parts += [option for option in ("required", "default", "items", "choices", "min", "max", "min_length",
                                    "max_length", "pattern", "validator")
              if getattr(field, option) is not None and getattr(field, option) is not False]
    return ", ".join(parts)


def _schema_path(path):
    """A path as text: ``path`` is a string or a tuple ``(parent path, key or index)``."""
    if type(path) is str:
        return path
    parent, step = path
    head = _schema_path(parent)
    if type(step) is int:
        return "%s[%d]" % (head, step)
    return "%s.%s" % (head, step) if head else step


def _schema_measure(value, schema):
    """Refuse containers nested deeper than max_depth or holding more than max_items values."""
    budget = schema.max_items
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > schema.max_depth:
            raise SchemaError("is nested more than %d levels deep" % schema.max_depth)
        children = node.values() if type(node) is dict else node
        budget -= len(children)
        if budget < 0:
            raise SchemaError("holds more than %d values" % schema.max_items)
        for child in children:
            if type(child) is list or type(child) is dict:
                stack.append((child, depth + 1))


def _schema_kind(value):
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null", int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _schema_unit(value, count):
    unit = "character" if isinstance(value, str) else "item"
    return unit if count == 1 else unit + "s"


def _schema_jsonable(value):
    return isinstance(value, (str, int, float, bool, type(None), list, dict))


def _outcome(ok, value, error, status, meta):
    """An Outcome built from trusted parts, skipping the argument checks."""
    outcome = Outcome.__new__(Outcome)
    outcome._ok = ok
    outcome._value = value
    outcome._error = error
    outcome._status = status
    outcome._meta = types.MappingProxyType(meta) if meta else _OUTCOME_NO_META
    return outcome


_OUTCOME_NO_META: Mapping[str, Any] = types.MappingProxyType({})


def _outcome_status(status):
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        raise ValueError("status must be an HTTP status code between 100 and 599, got %r" % (status,))
    return status


# The names every compiled schema's code runs with (its constants are added per schema).
_SCHEMA_RUNTIME = {
    "MISSING": _MISSING, "SchemaError": SchemaError, "INF": math.inf,
    "REFUSED": (ValueError, TypeError, ArithmeticError, LookupError),
    "to_int": _schema_int, "to_float": _schema_float, "to_str": _schema_str, "to_bool": _schema_bool,
    "to_list": _schema_list, "to_dict": _schema_dict, "measure": _schema_measure, "deepcopy": copy.deepcopy,
    "kind": _schema_kind, "path_text": _schema_path, "one_of": _schema_one_of,
    "length_error": _schema_length_error, "unknown_keys": _schema_unknown, "call_default": _schema_call_default,
    "broken": _schema_broken, "failure": _schema_failure,
    "Outcome": Outcome, "new_outcome": Outcome.__new__, "NO_META": _OUTCOME_NO_META,
}


###############################################################################
# Web ##########################################################################
###############################################################################

_web_log = logging.getLogger("specter.web")


_JSON_LIMIT_DEFAULT = 8 * 1024 * 1024
_WEB_TOO_DEEP = "Request body is nested too deeply"
_WEB_BODY_REQUIRED = "Request body is required"  # expect_json's default error


def json_endpoint(error_message: Union[str, Callable[..., Any], None] = None, *,
                  logger: Optional[logging.Logger] = None, include_trace: bool = True) -> Callable[..., Any]:
    """Decorate a Flask view so that every outcome is a JSON response.

    Works bare (``@json_endpoint``) or called (``@json_endpoint('Could not
    save')``). Dicts, lists and Outcomes become JSON; ``(body, status[,
    headers])`` tuples keep their status and headers; HTTPError and
    Werkzeug HTTP exceptions (``abort(404)``) keep their status in a JSON
    envelope; anything else is logged (with its traceback when
    ``include_trace``) and answered 500 with ``error_message`` and no
    traceback.
    """
    if callable(error_message):
        return json_endpoint()(error_message)
    if error_message is not None and not isinstance(error_message, str):
        raise TypeError("error_message must be a string, got %s" % _describe(error_message))
    message = error_message or "Internal server error"
    log = logger or _web_log

    def decorator(view):
        _check_callable(view, "view")

        @functools.wraps(view)
        def endpoint(*args, **kwargs):
            try:
                return _web_response(view(*args, **kwargs))
            except Exception as exc:
                return _web_error_response(exc, message, log, include_trace)
        return endpoint
    return decorator


def expect_json(*, required: Union[str, Iterable[str], None] = None, error: str = "Request body is required",
                allow_empty: bool = False) -> Dict[str, Any]:
    """The current request's JSON object body, or an HTTPError the client can act on.

    No body is 400 with ``error``. A body that was sent but cannot be used
    is 400 saying what was wrong: not JSON, sent as a form or text, empty
    (``{}`` too, unless ``allow_empty``), not an object, nested too deep to
    parse. A body over the size limit is 413 (Flask's ``MAX_CONTENT_LENGTH``
    when set, else ``SPECTER_MAX_JSON_BYTES``, 8 MiB by default).
    ``required`` fields are checked with ``require_fields``.
    """
    request = flask.request
    config = flask.current_app.config
    limit = config.get("MAX_CONTENT_LENGTH") or config.get("SPECTER_MAX_JSON_BYTES", _JSON_LIMIT_DEFAULT)
    if request.content_length is not None and request.content_length > limit:
        raise HTTPError("Request body is too large (limit %d bytes)" % limit, 413)
    if request.mimetype and not request.is_json:
        raise HTTPError(_web_body_error(error, "send the body as JSON (Content-Type: application/json); "
                                               "it was sent as %s" % request.mimetype), 400)
    raw = request.get_data(cache=True) if request.content_length is not None \
        else request.stream.read(limit + 1)
    if len(raw) > limit:
        raise HTTPError("Request body is too large (limit %d bytes)" % limit, 413)
    if not raw.strip():
        if allow_empty:
            return {}
        raise HTTPError(_web_body_error(error, "the body is empty") if raw else error, 400)
    try:
        payload = flask.json.loads(raw, parse_constant=_web_refuse_constant)
    except RecursionError:
        raise HTTPError(_WEB_TOO_DEEP, 400) from None
    except ValueError:
        raise HTTPError(_web_body_error(error, "the body is not valid JSON"), 400) from None
    if not isinstance(payload, dict):
        raise HTTPError("Request body must be a JSON object, got %s" % _schema_kind(payload), 400)
    if not payload and not allow_empty:
        raise HTTPError(_web_body_error(error, "the body is empty ({})"), 400)
    if required:
        require_fields(payload, required)
    return payload


def require_fields(payload: Any, required: Union[str, Iterable[str]], *, error: Optional[str] = None,
                   blank_is_missing: bool = True) -> Dict[str, Any]:
    """Return ``payload`` if every ``required`` field is present, not None and not blank.

    Otherwise raise HTTPError(400) with ``payload={'missing': [...]}``.
    """
    if isinstance(required, str):
        required = (required,)
    elif not isinstance(required, (list, tuple, set, frozenset)):
        raise TypeError("required must be a list of field names, got %s" % _describe(required))
    if not isinstance(payload, dict):
        raise HTTPError("Request body must be a JSON object, got %s" % _schema_kind(payload), 400,
                        payload={"missing": list(required)})
    missing = []
    for name in required:
        value = payload.get(name)
        if value is None or (blank_is_missing and isinstance(value, str) and not value.strip()):
            missing.append(name)
    if missing:
        raise HTTPError(error or "Missing required field%s: %s" % ("s" if len(missing) > 1 else "",
                                                                   ", ".join(missing)),
                        400, payload={"missing": missing})
    return payload


def route(rule: str, *, methods: Optional[Iterable[str]] = None, endpoint: Optional[str] = None,
          json_errors: Optional[str] = None) -> Callable[[_F], _F]:
    """Mark a Router method as a view for ``rule`` (stackable; GET by default)."""
    spec = _web_route_spec(rule, methods, endpoint, json_errors)

    def decorator(fn):
        _check_callable(fn, "view")
        fn.__dict__.setdefault("_specter_routes", []).append(spec)
        return fn
    return decorator


class Router(_Owner):
    """A class-based Flask Blueprint.

    Methods marked with ``@route`` and views added with ``router.route``
    become the blueprint's routes, bound to the instance. A view may return
    an Outcome (sent as JSON with its status); ``json_errors='message'``
    wraps a view in ``json_endpoint('message')``. ``teardown()`` runs
    ``on_unmount`` and then the router's cleanups, newest first.
    """

    name: str = "router"
    url_prefix: Optional[str] = ""

    def __init__(self, name=None, *, url_prefix=None, import_name=None):
        self.name = _check_name(name or _web_default_name(self, Router), "router name")
        prefix = url_prefix if url_prefix is not None else type(self).url_prefix
        if prefix:
            _web_path(prefix, "url_prefix must be a path starting with '/'")
        self.url_prefix = prefix
        self.import_name = import_name or type(self).__module__
        self._views = []
        self._blueprint = None
        self._unmounted = False
        self._apps = []

    def on_mount(self) -> None:
        """Called once, after the blueprint is built."""

    def on_unmount(self) -> None:
        """Called by teardown(), before the cleanups."""

    def route(self, rule: str, *, methods: Optional[Iterable[str]] = None, endpoint: Optional[str] = None,
              json_errors: Optional[str] = None) -> Callable[[_F], _F]:
        """Decorator adding a view to this router instance (before it is mounted)."""
        spec = _web_route_spec(rule, methods, endpoint, json_errors)

        def decorator(fn):
            _check_callable(fn, "view")
            if self._blueprint is not None:
                raise RuntimeError("router %s is already mounted; add routes before mount() or register()"
                                   % self.name)
            self._views.append((fn, spec))
            return fn
        return decorator

    def mount(self) -> flask.Blueprint:
        """Build the Blueprint once and return it."""
        if self._blueprint is None:
            blueprint = flask.Blueprint(self.name.replace(".", "_"),  # type: ignore[union-attr]
                                        self.import_name, url_prefix=self.url_prefix)
            for fn, specs in self._class_views():
                _web_add_rules(blueprint, fn, specs)
            for fn, spec in self._views:
                _web_add_rules(blueprint, fn, [spec])
            blueprint.register_error_handler(HTTPError, _web_http_error)
            blueprint.register_error_handler(werkzeug.exceptions.InternalServerError, _web_server_error)
            self._blueprint = blueprint
            self.on_mount()
        return self._blueprint

    def blueprint(self) -> flask.Blueprint:
        return self.mount()

    def register(self, app: flask.Flask) -> Router:
        """Register the blueprint on ``app`` (once per app) under ``url_prefix``."""
        if not isinstance(app, flask.Flask):
            raise TypeError("register() takes a Flask app, got %s" % _describe(app))
        if app not in self._apps:
            app.register_blueprint(self.mount())
            self._apps.append(app)
        return self

    def teardown(self) -> Router:
        """Run on_unmount() (once per mount) and the cleanups; idempotent."""
        if self._blueprint is not None and not self._unmounted:
            self._unmounted = True
            try:
                self.on_unmount()
            except Exception:
                _web_log.exception("router %s: on_unmount raised", self.name)
        self._run_cleanups()
        return self

    def __repr__(self):
        return "<Router %r %s>" % (self.name, self.url_prefix or "/")

    def _class_views(self):
        views = {}
        for klass in reversed(type(self).__mro__):
            for attr, value in vars(klass).items():
                specs = getattr(value, "_specter_routes", None)
                if specs:
                    views[attr] = specs
                elif attr in views:
                    del views[attr]  # overridden without @route
        return [(getattr(self, attr), specs) for attr, specs in views.items()]


class Handler(_Owner):
    """A class-based set of Socket.IO event handlers with an idempotent lifecycle.

    ``events`` maps event names to method names; ``event_priorities`` orders
    them against other subscribers of the ingress; ``on()`` adds more at run
    time. The events go through the app-wide ingress when the registry
    holds ``'socket_ingress'``, else through one ingress shared by every
    Handler of that SocketIO; either way several handlers of an event
    coexist in priority order and teardown removes only this one's.
    """

    name: str = "unnamed_handler"
    namespace = "/"
    events: Dict[str, str] = {}
    event_priorities: Dict[str, int] = {}

    def __init__(self, name=None, *, namespace=None):
        self.name = _check_name(name or _web_default_name(self, Handler), "handler name")
        self.namespace = _web_namespace(namespace if namespace is not None else type(self).namespace)
        self._bindings = []
        self._socketio = None
        self._registered = False
        self._gate = None   # a Controller's "am I running?": see _guarded()
        self._fences = []   # unsubscribes of gated connect subscriptions, which outlive teardown
        if not isinstance(self.events, dict):
            raise TypeError("%s.events must be a dict of event -> method name" % type(self).__name__)
        for event, method_name in self.events.items():
            method = getattr(self, method_name, None) if isinstance(method_name, str) else None
            if not callable(method):
                raise TypeError("%s.events maps %r to %r, which is not a method of the handler"
                                % (type(self).__name__, event, method_name))
            self._bindings.append((_bus_event(event), method, self.event_priorities.get(event, 100),
                                   self.namespace, None))

    def on_setup(self) -> None:
        """Called after the events are bound."""

    def on_teardown(self) -> None:
        """Called before the events are unbound and cleanups run."""

    @property
    def registered(self) -> bool:
        return self._registered

    @property
    def socketio(self) -> Any:
        return self._socketio

    def on(self, event: str, callback: _F, priority: int = 100, *, namespace: Optional[str] = None,
           schema: Optional[Schema] = None) -> _F:
        """Handle ``event`` with ``callback`` (bound now if the handler is set up)."""
        binding = (_bus_event(event), _check_callable(callback, "callback"),
                   _web_priority(priority), _web_namespace(namespace or self.namespace),
                   _web_schema(schema))
        self._bindings.append(binding)
        if self._registered:
            self._bind(binding)
        return callback

    def setup(self, socketio: Any = None) -> Handler:
        """Bind every event; idempotent."""
        if self._registered:
            return self
        socketio = socketio or self._socketio
        ingress = registry.resolve("socket_ingress")
        if ingress is not None:
            if ingress.socketio is None and socketio is not None:
                ingress.attach(socketio)
            socketio = socketio or ingress.socketio
        self._socketio = socketio
        if socketio is None and ingress is None:
            raise RuntimeError("handler %s has nothing to bind to: pass a Flask-SocketIO instance to "
                               "setup() or boot an app that provides 'socket_ingress'" % self.name)
        self._registered = True
        try:
            fences, self._fences = self._fences, []
            for unsubscribe in fences:  # the bindings below take their place
                unsubscribe()
            for binding in self._bindings:
                self._bind(binding)
            self.on_setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def teardown(self) -> Handler:
        """Unbind every event and run cleanups; idempotent."""
        if not self._registered and not self._cleanups:
            return self
        if self._registered:
            try:
                self.on_teardown()
            except Exception:
                _web_log.exception("handler %s: on_teardown raised", self.name)
        self._registered = False
        self._run_cleanups()
        return self

    stop = teardown

    def health(self) -> Dict[str, Any]:
        return {"name": self.name, "type": "handler", "registered": self._registered,
                "namespace": self.namespace, "events": sorted({b[0] for b in self._bindings})}

    def __repr__(self):
        return "<%s %r %s>" % (type(self).__name__, self.name,
                               "registered" if self._registered else "idle")

    def _bind(self, binding):
        event, callback, priority, namespace, schema = binding
        ingress = registry.resolve("socket_ingress") or _web_direct_ingress(self._socketio)
        unsubscribe = ingress.subscribe(event, self._guarded(callback, event), priority=priority,
                                        namespace=namespace, schema=schema)
        if event == "connect" and self._gate is not None:
            # A gated connect check stays subscribed through teardown, refusing
            # clients (see _guarded): removing it would let everyone in.
            self._fences.append(unsubscribe)
        else:
            self.add_cleanup(unsubscribe)

    def _guarded(self, callback, event):
        """``callback`` behind the handler's state: only a set-up handler (with its gate open) runs it.

        Otherwise the event is not delivered, except that a gated handler's
        ``connect`` check refuses the client: a Controller that is not
        running cannot vouch for anyone, so it fails closed.
        """
        closed = False if event == "connect" else None

        def deliver(*args):
            gate = self._gate
            if gate is None:
                if not self._registered:
                    return None
            elif not self._registered or not gate():
                return closed
            return callback(*args)
        deliver.__qualname__ = "%s.%s" % (self.name, _callable_name(callback))
        deliver.__wrapped__ = callback  # so the ingress sees the real signature
        return deliver


class SocketIngress:
    """One real Flask-SocketIO handler per event, fanning out to many subscribers.

    Subscribers run in priority order (lower first; ties in subscription
    order) in the greenlet Flask-SocketIO gives the event. One that raises
    is logged, handed to the default-error subscribers, and the others still
    run; its result is what those subscribers return, else the generic 500
    error dict. The last non-None result is the handler's return value, i.e.
    the client's ack; one Socket.IO cannot encode is logged and replaced by
    that error dict, so the client's call() never waits in vain. With
    ``schema=`` a subscriber only sees payloads that validate (cleaned); an
    invalid one makes the ack the 400 error dict. Order, schemas and
    signatures are settled into each event's call plan when its
    subscribers change, so an event only walks that plan.

    Attached to a SocketIO, the ingress is also its default error handler:
    an exception from any event handler on it, a plain ``@socketio.on`` one
    included, is logged and reaches the default-error subscribers.
    """

    def __init__(self, socketio=None, *, name="socket_ingress"):
        self.name = _check_name(name, "ingress name")
        self._socketio = None
        self._subs = {}   # (namespace, event) -> its subscribers, sorted
        self._plans = {}  # (namespace, event) -> its call plan, see _set_subs()
        self._bound = set()
        self._error_subs = ()
        self._seq = itertools.count()
        if socketio is not None:
            self.attach(socketio)

    @property
    def socketio(self) -> Any:
        return self._socketio

    def attach(self, socketio: Any) -> SocketIngress:
        """Bind to a Flask-SocketIO instance, registering every pending event."""
        if socketio is None or not callable(getattr(socketio, "on_event", None)):
            raise TypeError("attach() takes a flask_socketio.SocketIO, got %s" % _describe(socketio))
        if self._socketio is not None and self._socketio is not socketio:
            raise RuntimeError("ingress %s is already attached to another SocketIO" % self.name)
        self._socketio = socketio
        self._install_error_handler(socketio)
        for namespace, event in list(self._subs):
            self._bind(namespace, event)
        return self

    def subscribe(self, event: str, callback: Callable[..., Any], *, owner: Any = None, priority: int = 100,
                  namespace: str = "/", schema: Optional[Schema] = None) -> Callable[[], bool]:
        """Add a subscriber; returns an unsubscribe."""
        event = _bus_event(event)
        _check_callable(callback, "callback")
        _check_owner(owner)
        key = (_web_namespace(namespace), event)
        # Flask-SocketIO passes connect handlers the auth data and disconnect
        # handlers a reason only if they take them; so do we.
        arity = _web_arity(callback) if event in ("connect", "disconnect") else None
        entry = _IngressSubscriber(callback, _web_priority(priority), next(self._seq), _web_schema(schema), arity)
        self._set_subs(key, self._subs.get(key, ()) + (entry,))
        self._bind(*key)
        unsubscribe = functools.partial(self._remove, key, entry)
        if owner is not None:
            owner.add_cleanup(unsubscribe)
        return unsubscribe

    def on(self, event: str, callback: Optional[Callable[..., Any]] = None, *, owner: Any = None,
           priority: int = 100, namespace: str = "/", schema: Optional[Schema] = None) -> Callable[..., Any]:
        """Subscribe ``callback``, or decorate a function when it is omitted."""
        if callback is None:
            def decorator(fn):
                self.subscribe(event, fn, owner=owner, priority=priority, namespace=namespace, schema=schema)
                return fn
            return decorator
        self.subscribe(event, callback, owner=owner, priority=priority, namespace=namespace, schema=schema)
        return callback

    def handler(self, event: str, *, owner: Any = None, priority: int = 100, namespace: str = "/",
                schema: Optional[Schema] = None) -> Callable[[_F], _F]:
        """Decorator form of subscribe()."""
        return self.on(event, owner=owner, priority=priority, namespace=namespace, schema=schema)

    def unsubscribe(self, event: str, callback: Callable[..., Any], *, namespace: str = "/") -> bool:
        """Remove ``callback`` from ``event``; True if it was subscribed."""
        key = (_web_namespace(namespace), event)
        for entry in self._subs.get(key, ()):
            if entry.callback == callback:
                return self._remove(key, entry)
        return False

    def on_error_default(self, callback: Optional[Callable[..., Any]] = None, *, owner: Any = None,
                         priority: int = 100) -> Callable[..., Any]:
        """Subscribe ``callback(exc)`` to subscriber failures (decorator when omitted)."""
        if callback is None:
            def decorator(fn):
                self.subscribe_error_default(fn, owner=owner, priority=priority)
                return fn
            return decorator
        self.subscribe_error_default(callback, owner=owner, priority=priority)
        return callback

    def subscribe_error_default(self, callback: Callable[..., Any], *, owner: Any = None,
                                priority: int = 100) -> Callable[[], bool]:
        _check_callable(callback, "callback")
        _check_owner(owner)
        entry = _IngressSubscriber(callback, _web_priority(priority), next(self._seq), None)
        self._error_subs = tuple(sorted(self._error_subs + (entry,), key=_IngressSubscriber.order))
        unsubscribe = functools.partial(_drop, self, "_error_subs", entry)
        if owner is not None:
            owner.add_cleanup(unsubscribe)
        return unsubscribe

    def unsubscribe_error_default(self, callback: Callable[..., Any]) -> bool:
        for entry in self._error_subs:
            if entry.callback == callback:
                return _drop(self, "_error_subs", entry)
        return False

    def dispatch(self, event: str, *args: Any, namespace: str = "/", **kwargs: Any) -> Any:
        """Run ``event``'s subscribers now, as a client event would; returns the ack value."""
        try:
            plan = self._plans.get((namespace, event))
        except TypeError:  # an unhashable namespace gets its precise error
            _web_namespace(namespace)
            raise
        if plan is None:
            _web_namespace(namespace)  # only a miss can be a bad namespace: none is ever stored
            return None
        if len(args) != 1 or kwargs:
            return self._run(plan, event, args, kwargs)
        # The usual event, one payload, walked here: CPython runs call(data)
        # in the same eval loop, call(*args, **kwargs) through a C call, and
        # the walk in place saves a frame (bench_specter.py socket.dispatch).
        data = args[0]
        result = None
        for call, callback in plan:
            try:
                value = call(data)
            except Exception as exc:
                value = self._failed(callback, event, exc)
            if value is not None:
                if value is False and event == "connect":
                    return False  # one refusal is final, whatever later subscribers say
                result = value
        if isinstance(result, Outcome):
            return result.to_dict()
        return result

    def dispatch_default_error(self, exc: BaseException, *args: Any, **kwargs: Any) -> Any:
        """Hand ``exc`` to the default-error subscribers; returns their last non-None result."""
        callbacks = (entry.callback for entry in self._error_subs)
        if kwargs:
            callbacks = (functools.partial(callback, **kwargs) for callback in callbacks)
        return _notify(callbacks, (exc,) + args, _web_log, "ingress %s: error subscriber %s raised", self.name)

    def clear(self) -> None:
        """Drop every subscriber; bound events then answer nothing."""
        self._subs.clear()
        self._plans.clear()
        self._error_subs = ()

    def health(self) -> Dict[str, Any]:
        return {"name": self.name, "type": "ingress", "attached": self._socketio is not None,
                "events": {"%s %s" % key: len(subs) for key, subs in self._subs.items()}}

    def __repr__(self):
        return "<SocketIngress %r %d events>" % (self.name, len(self._subs))

    def _bind(self, namespace, event):
        socketio = self._socketio
        if socketio is None or (namespace, event) in self._bound:
            return
        self._bound.add((namespace, event))
        socketio.on_event(event, functools.partial(self._handle, namespace, event), namespace=namespace)

    def _handle(self, namespace, event, *args):
        result = self.dispatch(event, *args, namespace=namespace)
        if result is None or result is False or event in ("connect", "disconnect"):
            return result
        return self._ackable(event, result)

    def _ackable(self, event, result):
        """``result`` if Socket.IO can send it as the ack, else the generic error (logged).

        Socket.IO encodes the ack after the handler has returned, out of
        anyone's reach: a set there would kill the sending greenlet and
        leave the client's call() to time out. Encoding once here, with the
        server's own packet class (binary parts and all), catches it.
        """
        packet_class = getattr(getattr(self._socketio, "server", None), "packet_class", None)
        if packet_class is None:
            return result
        try:
            packet_class(data=list(result) if isinstance(result, tuple) else [result]).encode()
        except Exception:
            _web_log.exception("ingress %s: the ack of %r cannot be encoded (%s); answering an error instead",
                               self.name, event, _describe(result))
            return _web_socket_error()
        return result

    def _install_error_handler(self, socketio):
        """Become ``socketio``'s default error handler (the last ingress attached wins).

        A default handler of the app's own, set before, is kept as the
        first default-error subscriber, so it still runs and may still
        answer the ack.
        """
        if not callable(getattr(socketio, "on_error_default", None)):
            return
        current = getattr(socketio, "default_exception_handler", None)
        if current is not None and not isinstance(getattr(current, "__self__", None), SocketIngress):
            self.subscribe_error_default(current, priority=-1)
        socketio.on_error_default(self._on_socket_error)

    def _on_socket_error(self, exc):
        """Flask-SocketIO's default error handler: log, tell the subscribers, answer the ack."""
        if _web_refusal(exc):
            raise  # not a failure: python-socketio refuses the client, as without this handler
        event = getattr(flask.request, "event", None) or {}
        name = event.get("message") if isinstance(event, dict) else None
        _web_log.exception("socket handler of %r raised", name)
        if name == "connect":
            return False  # fail closed, as the ingress's own connect subscribers do
        result = self.dispatch_default_error(exc)
        return _web_socket_error() if result is None else result

    def _run(self, plan, event, args, kwargs):
        """dispatch() for any arguments: the same walk, calling ``call(*args, **kwargs)``."""
        result = None
        for call, callback in plan:
            try:
                value = call(*args, **kwargs)
            except Exception as exc:
                value = self._failed(callback, event, exc)
            if value is not None:
                if value is False and event == "connect":
                    return False
                result = value
        if isinstance(result, Outcome):
            return result.to_dict()
        return result

    def _failed(self, callback, event, exc):
        """What a subscriber that raised ``exc`` contributes: logged, then the error subscribers' answer."""
        if _web_refusal(exc):
            raise  # a connect handler refusing the client: python-socketio answers it
        _web_log.exception("ingress %s: subscriber %s of %r raised", self.name, _callable_name(callback), event)
        if event == "connect":
            return False  # fail closed: a crashed check must not let the client in
        value = self.dispatch_default_error(exc)
        return _web_socket_error() if value is None else value

    def _set_subs(self, key, subs):
        """Store ``key``'s subscribers and precompute its call plan; no subscribers drops the key.

        The plan is what a dispatch walks: one ``(call, callback)`` pair per
        subscriber, in priority order, where ``call`` is the callback itself
        or, with a schema or a trimmed signature, its prebuilt wrapper. So
        sorting, schema and arity are settled here, when subscribers change,
        not on every event. Both dicts get new tuples, never mutated ones:
        a dispatch already running keeps the plan it started with.
        """
        if subs:
            subs = tuple(sorted(subs, key=_IngressSubscriber.order))
            self._subs[key] = subs
            self._plans[key] = tuple((entry.call, entry.callback) for entry in subs)
        else:
            self._subs.pop(key, None)
            self._plans.pop(key, None)

    def _remove(self, key, entry):
        kept = _drop_keyed(self._subs, key, lambda sub: sub is entry)
        if kept is None:
            return False
        self._set_subs(key, kept)  # its plan follows
        return True


class Controller(Service):
    """A feature's composition root: routes, socket events, schemas and state under one lifecycle.

    Override ``build_routes(router)`` and ``build_events(handler)``; declare
    ``schemas``. While the controller is not running its routes answer 503,
    its socket events are not delivered and its ``connect`` subscribers
    refuse every client (an auth check that cannot run must not let anyone
    in). ``stop()`` tears the handler down first, then stops like any
    Service (owned models and stores included).
    """

    schemas: Dict[str, Schema] = {}
    url_prefix: Optional[str] = None

    def __init__(self, name=None):
        super().__init__(name)
        if not isinstance(self.schemas, dict) or not all(isinstance(s, Schema) for s in self.schemas.values()):
            raise TypeError("%s.schemas must be a dict of name -> Schema" % type(self).__name__)
        self._blueprint = None
        self._handler = None

    def build_routes(self, router: Router) -> None:
        """Add HTTP routes with ``@router.route(...)``."""

    def build_events(self, handler: Handler) -> None:
        """Add socket events with ``handler.on(event, callback, priority=100)``."""

    def build_blueprint(self, url_prefix: Optional[str] = None) -> flask.Blueprint:
        """The controller's Blueprint, built once; routes are served under ``url_prefix``.

        Without the argument, the class attribute ``url_prefix`` applies.
        """
        if self._blueprint is None:
            prefix = url_prefix if url_prefix is not None else self.url_prefix
            router = Router(self.name, url_prefix=prefix, import_name=type(self).__module__)
            self.build_routes(router)
            blueprint = router.mount()
            blueprint.before_request(self._http_gate)
            self._blueprint = blueprint
        return self._blueprint

    def create_handler(self) -> Handler:
        """The controller's Handler, carrying the events added by build_events(); built once."""
        if self._handler is None:
            handler = Handler(self.name)
            handler._gate = self._serving
            self.build_events(handler)
            self._handler = handler
        return self._handler

    def build_handler(self, socketio: Any = None) -> Handler:
        """The controller's Handler, built once (and set up when ``socketio`` is given)."""
        if self._handler is None:
            handler = self.create_handler()  # a subclass's create_handler may build its own
            if isinstance(handler, Handler) and handler._gate is None:
                handler._gate = self._serving  # gated like the one create_handler() builds
            self._handler = handler
        if socketio is not None:
            self._handler.setup(socketio)
        return self._handler

    @property
    def socketio(self) -> Any:
        if self._handler is not None and self._handler.socketio is not None:
            return self._handler.socketio
        ingress = registry.resolve("socket_ingress")
        return ingress.socketio if ingress is not None else None

    def schema(self, name: str) -> Schema:
        try:
            return self.schemas[name]
        except KeyError:
            raise KeyError("%s has no schema %r (known: %s)"
                           % (self.name, name, ", ".join(map(repr, self.schemas)) or "none")) from None

    def create_model(self, name: str, initial_state: Optional[Dict[str, Any]] = None, **kwargs: Any) -> Model:
        """A Model owned by the controller (destroyed when it stops)."""
        return self.own(Model(name, initial_state, **kwargs))

    def create_store(self, name: str, initial_state: Optional[Dict[str, Any]] = None, **kwargs: Any) -> Store:
        """A Store owned by the controller (destroyed when it stops)."""
        return self.own(Store(name, initial_state, **kwargs))

    def service(self, key: str) -> Any:
        """The dependency provided under ``key`` (KeyError naming the known keys)."""
        return registry.require(key)

    def health(self) -> Dict[str, Any]:
        report = super().health()
        report["has_blueprint"] = self._blueprint is not None
        report["has_handler"] = self._handler is not None
        report["schemas"] = list(self.schemas)
        return report

    def _lifecycle_started(self):
        super()._lifecycle_started()
        if self._handler is not None and self._handler.socketio is not None:
            self._handler.setup()  # a restart after stop()

    def _lifecycle_stopping(self):
        if self._handler is not None:
            self._handler.teardown()
        super()._lifecycle_stopping()

    def _serving(self):
        """The gate of the controller's routes and socket events."""
        return self.running

    def _http_gate(self):
        if not self.running:
            return _web_json({"error": "%s is not running" % self.name}, 503)
        return None


class ServiceManager(Service):
    """The composition root: registers services, handlers and controllers, boots and shuts down.

    ``boot()`` installs SIGTERM/SIGINT handlers that shut down once, starts
    the manager, provides ``'service_manager'``, ``'socket_ingress'`` and
    ``'socketio'`` (plus any providers), starts services in registration
    order (rolling back on failure), sets up handlers, and installs an
    atexit hook. ``shutdown()`` tears handlers down and stops services in
    reverse, disconnects Socket.IO clients, clears the ingress and the
    registry, and stops the manager.
    """

    def __init__(self, app=None, socketio=None, *, signals=True, name="service_manager", probes=False,
                 block_threshold=None):
        super().__init__(name)
        self._app = None
        self._socketio = socketio
        self._signals = bool(signals)
        self._ingress = SocketIngress(socketio) if socketio is not None else SocketIngress()
        self._services = []
        self._handlers = []
        self._providers = []
        self._booted = False
        self._booting = None  # the greenlet running boot(), while it runs
        self._boot_phase = None  # 'starting', then 'rolling back' if it fails or is cancelled
        self._boot_cancelled = False
        self._boot_exit = False  # a signal came while boot() ran in the main greenlet: exit after it
        self._boot_done = None
        self._shutting_down = False
        self._shutdown_greenlet = None
        self._shutdown_done = None
        self._signal_watchers = []
        self._atexit = False
        self._server = None
        self._ops = _WebOperations(self, probes, block_threshold)
        if app is not None:
            self._ops.bind(app, socketio)

    @property
    def app(self) -> Optional[flask.Flask]:
        return self._app

    @property
    def socketio(self) -> Any:
        return self._socketio

    @property
    def socket_ingress(self) -> SocketIngress:
        return self._ingress

    @property
    def booted(self) -> bool:
        return self._booted

    @property
    def server(self) -> Optional[pywsgi.WSGIServer]:
        """The gevent WSGIServer while run() serves (its ``server_port`` is the bound port), else None."""
        return self._server

    def init_app(self, app: flask.Flask, socketio: Any = None) -> ServiceManager:
        """Bind the manager to ``app`` (and its Flask-SocketIO), as a Flask extension does.

        For the app-factory pattern: a manager made at import time binds to
        the app ``create_app()`` builds. The manager becomes
        ``app.extensions['specter']``; HTTPError raised in any view is
        answered as JSON; controllers registered so far get their routes
        mounted; the probes (if on) are added; ``flask specter`` joins
        ``app.cli``; registered services run their background work in the
        app's context. ``socketio`` defaults to the one already on the app,
        or on it by ``boot()`` (a factory may call ``socketio.init_app(app)``
        after this). Binding the same app again does nothing; one manager serves one app.
        """
        if not isinstance(app, flask.Flask):
            raise TypeError("init_app() takes a Flask app, got %s" % _describe(app))
        if socketio is None and self._socketio is None:
            socketio = app.extensions.get("socketio")  # where Flask-SocketIO records itself
        self._ops.bind(app, socketio)
        return self

    def register_service(self, service: Service) -> ServiceManager:
        """Add a service (started at boot, or at once if already booted); returns the manager."""
        if not isinstance(service, Service):
            raise TypeError("register_service() takes a Service, got %s" % _describe(service))
        self._ops.adopt_app(service)
        if not any(known is service for known in self._services):
            self._services.append(service)
            if self._booted:
                service.start()
        return self

    def register_handler(self, handler: Any) -> ServiceManager:
        """Add a handler (set up at boot, or at once if already booted); returns the manager."""
        if not callable(getattr(handler, "setup", None)) or not callable(getattr(handler, "teardown", None)):
            raise TypeError("register_handler() takes an object with setup() and teardown(), got %s"
                            % _describe(handler))
        if not any(known is handler for known in self._handlers):
            self._handlers.append(handler)
            if self._booted:
                handler.setup(self._socketio)
        return self

    def register_controller(self, controller: Controller, *, url_prefix: Optional[str] = None) -> ServiceManager:
        """Add a controller: its blueprint goes on the app, its handler is managed; returns the manager."""
        if not isinstance(controller, Controller):
            raise TypeError("register_controller() takes a Controller, got %s" % _describe(controller))
        if self._app is not None:
            _web_mount_controller(self._app, controller, url_prefix)
        else:
            self._ops.unmounted.append((controller, url_prefix))  # mounted by init_app()
        self.register_service(controller)
        return self.register_handler(controller.build_handler())

    def boot(self, providers: Optional[Dict[str, Any]] = None) -> ServiceManager:
        """Start everything; idempotent. A service that fails to start undoes the boot.

        Signal handlers go in first, so a SIGTERM at any point from here on
        rolls back or shuts down what was started. ``shutdown()`` called
        while boot() runs cancels it: boot() stops starting things, stops
        what it started and returns with ``booted`` False. A boot() from
        another greenlet while one runs waits for it.
        """
        if providers:
            self._add_providers(providers)
        if self._booted:
            return self
        if self._booting is not None:
            if self._booting is not getcurrent():
                self._boot_done.wait()
            return self
        if self._shutting_down:
            raise RuntimeError("%s: cannot boot() while shutdown() is under way" % self.name)
        self._booting = getcurrent()
        self._boot_phase = "starting"
        self._boot_cancelled = self._boot_exit = False
        self._boot_done = gevent.event.Event()
        started: List[Service] = []
        try:
            self._start_all(started)
        except _BootCancelled:
            self._roll_back(started)
            _web_log.info("boot cancelled by shutdown(); what it started is stopped")
            if self._boot_exit:
                raise SystemExit(0)  # a signal came meanwhile: the program ends, as it asked
            return self
        except BaseException:
            if self._boot_cancelled:
                _web_log.info("boot interrupted; stopping what was started")
            else:
                _web_log.error("boot failed; stopping what was started")
            self._roll_back(started)
            raise
        finally:
            self._booting = None
            self._boot_phase = None
            self._boot_done.set()
        if not self._atexit:
            atexit.register(self._at_exit)
            self._atexit = True
        _web_log.info("booted %d service(s) and %d handler(s)", len(self._services), len(self._handlers))
        return self

    def shutdown(self) -> ServiceManager:
        """Tear everything down in reverse; idempotent while nothing is left to stop.

        A call while another greenlet shuts down waits for it to finish. A
        call while boot() runs cancels the boot: from another greenlet it
        interrupts boot() where it is and waits until boot() has stopped
        what it started; from inside boot() (a service's on_start), boot()
        starts nothing more once that on_start returns.
        """
        current = getcurrent()
        if self._shutting_down:
            if self._shutdown_greenlet is not current:
                self._shutdown_done.wait()
            return self
        booting = self._booting
        if booting is None and not self._has_work():
            return self
        self._shutting_down = True
        self._shutdown_greenlet = current
        self._shutdown_done = gevent.event.Event()
        try:
            if booting is not None:
                self._cancel_boot(booting)
            steps = self._teardown_steps(self._services)
            steps += [self._disconnect_clients, self._end_socketio_tasks, self._ingress.clear, self.stop, registry.clear,
                      self._stop_server]
            _run_all(steps, self._record_error)
        finally:
            self._shutting_down = False
            # Signal handlers stay until the end, so a second Ctrl-C during a
            # slow teardown cannot kill the process halfway through it; called
            # inside boot() (from an on_start), they stay until boot() has
            # rolled back, which removes them last.
            if self._booting is None:
                self._remove_signals()
            if self._atexit:
                atexit.unregister(self._at_exit)
                self._atexit = False
            self._shutdown_done.set()
        _web_log.info("shut down")
        return self

    def run(self, host: str = "127.0.0.1", port: int = 5000, **kwargs: Any) -> ServiceManager:
        """Boot, serve the app on gevent (Socket.IO included) until shutdown, then return.

        SIGTERM or SIGINT (when signals are on) or ``shutdown()`` from any
        greenlet stops the server; ``log_output=True`` prints access logs;
        other keywords go to gevent's WSGIServer.
        """
        if self._app is None:
            raise RuntimeError("run() needs the Flask app: ServiceManager(app, socketio)")
        log_output = kwargs.pop("log_output", False)
        unknown = sorted(set(kwargs) - _WEB_SERVER_OPTIONS)
        if unknown:
            raise TypeError("run() got unexpected keyword argument(s) %s; it accepts log_output and "
                            "gevent WSGIServer options: %s" % (", ".join(unknown), ", ".join(sorted(_WEB_SERVER_OPTIONS))))
        self.boot()
        if not self._booted:
            return self  # shutdown() cancelled the boot: nothing to serve
        kwargs.setdefault("handler_class", _WebSocketClosingHandler)
        server = pywsgi.WSGIServer((host, port), self._app, log="default" if log_output else None, **kwargs)
        self._server = server
        if self._socketio is not None:
            self._socketio.wsgi_server = server  # so socketio.stop() works too
        try:
            server.serve_forever()
        finally:
            self.shutdown()
        return self

    def health(self) -> Dict[str, Any]:
        """The manager's health, with ``services`` and ``handlers`` keyed by name.

        Each service's value is its own health tree; each handler's has at
        least ``registered``. ``status`` is 'degraded' while the manager runs
        but a service does not.
        """
        report = super().health()
        report["booted"] = self._booted
        report["services"] = _web_by_name(service.health() for service in self._services)
        if report["status"] == "ok" and any(child["status"] != "ok" for child in report["services"].values()):
            report["status"] = "degraded"
        report["handlers"] = _web_by_name(_web_health(handler) for handler in self._handlers)
        report["ingress"] = self._ingress.health()
        report["loop"] = self._ops.loop_health()
        return report

    def _start_all(self, started):
        """boot()'s work: what it starts goes into ``started``, for a rollback."""
        if self._signals:
            self._install_signals()
        self.start()
        registry.provide("service_manager", self, owner=self, replace=True)
        registry.provide("socket_ingress", self._ingress, owner=self, replace=True)
        if self._socketio is not None:
            # How a plain Service reaches Socket.IO clients: Service.emit is the in-process bus.
            registry.provide("socketio", self._socketio, owner=self, replace=True)
        for key, value in self._providers:
            registry.provide(key, value, owner=self, replace=True)
        for service in self._services:  # the loop also sees services an on_start registers
            self._check_boot()
            service.start()
            started.append(service)
        self._check_boot()
        self._booted = True
        for handler in self._handlers:
            handler.setup(self._socketio)
        self._check_boot()

    def _check_boot(self):
        if self._boot_cancelled:
            raise _BootCancelled()

    def _cancel_boot(self, booting):
        """Make a running boot() stop and roll back; from another greenlet, wait for that."""
        self._boot_cancelled = True
        if booting is getcurrent():
            return  # inside boot(): it checks the flag as soon as the current step returns
        self._interrupt_boot(booting, _BootCancelled())
        self._boot_done.wait()

    def _interrupt_boot(self, booting, exc):
        """Soon raise ``exc`` in the booting greenlet where it waits, unless it is rolling back by then.

        The hub does it, as it delivers a gevent.Timeout: the check runs
        while that greenlet is suspended, so its phase cannot change under it.
        """
        def interrupt():
            if self._booting is booting and self._boot_phase == "starting" and not booting.dead:
                booting.throw(exc)
        gevent.get_hub().loop.run_callback(interrupt)

    def _roll_back(self, started):
        """Undo a boot: handlers torn down, started services stopped in reverse, the manager stopped."""
        self._boot_phase = "rolling back"
        self._booted = False
        steps = self._teardown_steps(started)
        steps += [self.stop, self._remove_signals]
        _run_all(steps, self._record_error)

    def _has_work(self):
        """Whether anything shutdown() releases is still up (so a repeat call is not a no-op then)."""
        return (self._booted or self._server is not None or self._status not in ("created", "stopped")
                or any(service.status not in ("created", "stopped") for service in self._services)
                or any(getattr(handler, "registered", False) for handler in self._handlers))

    def _add_providers(self, providers):
        if not isinstance(providers, dict):
            raise TypeError("providers must be a dict of key -> value, got %s" % _describe(providers))
        for key, value in providers.items():
            key = _registry_key(key)
            self._providers.append((key, value))
            if isinstance(value, Service) and not any(known is value for known in self._services):
                # Providers are dependencies: they start before everything registered so far.
                self._services.insert(sum(1 for _, v in self._providers[:-1] if isinstance(v, Service)), value)
            if self._booted:
                registry.provide(key, value, owner=self, replace=True)
                if isinstance(value, Service):
                    value.start()

    def _disconnect_clients(self):
        """Disconnect every Socket.IO client of this process, after the services' final emits.

        Each session gets Socket.IO's disconnect packet behind whatever it
        still has to receive, so clients see those messages and then a clean
        'server disconnect' (not a 'transport error' when the server or the
        program goes away); server-side 'disconnect' handlers run as for any
        disconnect. The wait, at most ``stop_timeout``, lasts until every
        client has taken its packets (or closed) and the loop has gone idle,
        i.e. the writers have put them on the wire.
        """
        server = getattr(self._socketio, "server", None)
        rooms = getattr(getattr(server, "manager", None), "rooms", None)
        if not rooms:
            return
        sockets = list(getattr(server.eio, "sockets", {}).values())
        count = 0
        for namespace in list(server.manager.get_namespaces()):
            for sid, _ in list(server.manager.get_participants(namespace, None)):
                # ignore_queue: these are this process's own clients; a message
                # queue must not carry the disconnect to other processes.
                server.disconnect(sid, namespace=namespace, ignore_queue=True)
                count += 1
        timer = gevent.Timeout.start_new(self.stop_timeout)
        try:
            while any(not sock.closed and not sock.queue.empty() for sock in sockets):
                gevent.sleep(_WEB_FLUSH_STEP)
            gevent.idle()
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            _web_log.warning("Socket.IO clients did not take their disconnect within %s s", self.stop_timeout)
        finally:
            timer.close()
        _web_log.debug("disconnected %d Socket.IO session(s)", count)

    def _teardown_steps(self, services):
        """Shutdown's and rollback's order: handlers torn down in reverse, then ``services`` stopped in reverse."""
        return ([handler.teardown for handler in reversed(self._handlers)]
                + [service.stop for service in reversed(services)])

    def _end_socketio_tasks(self):
        """End Engine.IO's service task, so no greenlet of the SocketIO outlives shutdown.

        Engine.IO starts it with the first request and keeps it until its
        server shuts down; it is re-armed so a later boot's first request
        starts it again.
        """
        server = getattr(self._socketio, "server", None)
        eio = getattr(server, "eio", None)
        if getattr(eio, "service_task_handle", None) is None:
            return
        server.shutdown()
        eio.start_service_task = True

    def _stop_server(self):
        self._booted = False
        server, self._server = self._server, None
        if server is not None:
            server.stop(timeout=self.stop_timeout)

    def _install_signals(self):
        if self._signal_watchers:
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                previous = signal.getsignal(signum)
                watcher = gevent.signal_handler(signum, self._on_signal, signum)
            except (ValueError, OSError) as exc:
                _web_log.debug("cannot handle signal %s here: %s", signum, exc)
                continue
            self._signal_watchers.append((signum, watcher, previous))

    def _remove_signals(self):
        """Cancel our handlers and give each signal back the handler it had before boot()."""
        watchers, self._signal_watchers = self._signal_watchers, []
        for signum, watcher, previous in watchers:
            watcher.cancel()
            if previous is not None:
                try:
                    signal.signal(signum, previous)
                except (ValueError, OSError, TypeError) as exc:
                    _web_log.debug("cannot restore the handler of signal %s: %s", signum, exc)

    def _on_signal(self, signum):
        name = signal.Signals(signum).name
        main = gevent.get_hub().parent
        if self._booting is main:
            # boot() runs in the main greenlet: end the program there, as
            # Ctrl-C would. boot() stops what it started (finishing a rollback
            # or a shutdown() already under way in it) and SystemExit(0) goes on up.
            if self._boot_exit or self._boot_cancelled or self._shutting_down:
                self._boot_exit = True
                _web_log.warning("signal %s: already shutting down", name)
                return
            _web_log.info("signal %s: shutting down", name)
            self._boot_exit = self._boot_cancelled = True
            self._interrupt_boot(main, SystemExit(0))
            return
        if self._shutting_down or self._boot_cancelled:
            _web_log.warning("signal %s: already shutting down", name)
            return
        _web_log.info("signal %s: shutting down", name)
        serving = self._server is not None
        self.shutdown()
        if not serving:
            # Nothing of ours is serving, so end the program the way Python
            # would: SystemExit in the main greenlet (raising it here would
            # only end this signal greenlet, whose watcher shutdown() closed).
            main.throw(SystemExit(0))

    def _at_exit(self):
        if self._has_work():
            try:
                self.shutdown()
            except Exception:
                _web_log.exception("shutdown at exit raised")

    def _lifecycle_started(self):
        # boot() starts the manager first: the loop monitor then also sees a
        # blocking on_start, and the warning about unmounted routes comes first.
        self._ops.starting()
        super()._lifecycle_started()

    def _lifecycle_stopping(self):
        super()._lifecycle_stopping()
        self._ops.stopping()


def boot(app: flask.Flask, socketio: Any, *, services: Optional[Iterable[Service]] = None,
         handlers: Optional[Iterable[Any]] = None, controllers: Optional[Iterable[Controller]] = None,
         providers: Optional[Dict[str, Any]] = None, signals: bool = True,
         probes: Union[bool, str] = False, block_threshold: Optional[float] = None,
         cluster: Union[Cluster, str, None] = None) -> ServiceManager:
    """Register everything on a new ServiceManager, boot it and return it.

    ``cluster`` (a Cluster or a Redis URL) starts before every service,
    stops after them all, and is provided as 'cluster'.
    """
    manager = ServiceManager(app, socketio, signals=signals, probes=probes, block_threshold=block_threshold)
    if cluster is not None:
        _cluster_boot(manager, cluster, socketio)
    if providers:
        manager._add_providers(providers)
    for service in services or ():
        manager.register_service(service)
    for controller in controllers or ():
        manager.register_controller(controller)
    for handler in handlers or ():
        manager.register_handler(handler)
    return manager.boot()


class _WebSocketClosingHandler(pywsgi.WSGIHandler):
    """Close a connection once its websocket session ends.

    Without gevent-websocket, pywsgi would keep the socket open and read the
    client's late close frame as a new HTTP request, logging garbage.
    """

    def handle_one_response(self):
        super().handle_one_response()
        if self.environ.get("HTTP_UPGRADE", "").lower() == "websocket":
            self.close_connection = True


class _BootCancelled(BaseException):
    """Raised inside boot() by shutdown(): a BaseException, so no ``except Exception`` in an on_start keeps it."""


class _IngressSubscriber:
    __slots__ = ("callback", "priority", "seq", "schema", "arity", "call")

    def __init__(self, callback, priority, seq, schema, arity=None):
        self.callback = callback
        self.priority = priority
        self.seq = seq
        self.schema = schema
        self.arity = arity
        self.call = callback if schema is None and arity is None else self._checked

    def order(self):
        return (self.priority, self.seq)

    def _checked(self, *args, **kwargs):
        """The callback behind its schema and signature: an invalid payload is answered, not delivered."""
        if self.schema is not None:
            outcome = self.schema.validate(args[0] if args else None)
            if not outcome.ok:
                return outcome.to_dict()
            args = (outcome.value,) + args[1:]
        if self.arity is not None:
            args = args[:self.arity]
        return self.callback(*args, **kwargs)


_WEB_FLUSH_STEP = 0.005  # how often shutdown looks whether clients took their disconnect (seconds)

_WEB_SERVER_OPTIONS = frozenset((
    "backlog", "spawn", "error_log", "handler_class", "environ", "keyfile", "certfile", "ca_certs",
    "cert_reqs", "ssl_version", "ciphers", "ssl_context", "server_side", "do_handshake_on_connect",
    "suppress_ragged_eofs",
))


def _web_direct_ingress(socketio):
    """The ingress Handlers share on ``socketio`` when no app-wide one is provided.

    Sharing it keeps several handlers of one event side by side, in priority
    order, instead of the last one replacing the others in Flask-SocketIO.
    """
    ingress = getattr(socketio, "_specter_ingress", None)
    if ingress is None:
        ingress = socketio._specter_ingress = SocketIngress(socketio, name="direct")
    return ingress


def _web_http_error(exc, log=_web_log):
    """Flask error handler: an HTTPError raised in any view becomes its JSON response."""
    if exc.log_message:
        log.log(exc.log_level, exc.log_message)
    return exc.to_response()


def _web_server_error(exc):
    """A blueprint's unhandled error, as JSON (Flask has logged it already)."""
    if _web_too_deep(getattr(exc, "original_exception", None)):
        return _web_json({"error": _WEB_TOO_DEEP}, 400)
    return _web_json({"error": "Internal server error"}, 500)


def _web_too_deep(exc):
    """True for the RecursionError of a JSON decoder given absurdly nested input.

    That is the client's fault (``request.get_json()`` on a hostile body),
    so it is a 400; a RecursionError anywhere else is the server's own bug.
    The innermost frame tells them apart: the decoder's module (``json.decoder``,
    or whichever JSON library the app's provider uses) has "json" in its name.
    """
    if not isinstance(exc, RecursionError):
        return False
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return "json" in (tb.tb_frame.f_globals.get("__name__") or "")


def _web_body_error(error, reason):
    """The message for a body that was sent but is unusable: what was wrong, first.

    The default ``error`` ("Request body is required") would be untrue
    once a body arrived, so the reason stands alone; an ``error`` of the
    caller's own leads, with the reason after a colon.
    """
    if error == _WEB_BODY_REQUIRED:
        return reason[0].upper() + reason[1:]
    return "%s: %s" % (error, reason)


def _web_refusal(exc):
    """Whether ``exc`` is a connect handler refusing the client.

    python-socketio takes Python's ConnectionRefusedError and its own (which
    Flask-SocketIO re-exports, and which is no subclass of Python's) as a
    refusal. Its module is looked up, not imported: if nothing loaded it,
    nothing can have raised its exception.
    """
    if isinstance(exc, ConnectionRefusedError):
        return True
    exceptions = sys.modules.get("socketio.exceptions")
    return exceptions is not None and isinstance(exc, exceptions.ConnectionRefusedError)


def _web_socket_error():
    """The ack of a socket event whose handling failed: no details, a status, JSON."""
    return Outcome.failure("Internal server error", status=500).to_dict()


def _web_refuse_constant(name):
    raise ValueError("%s is not valid JSON" % name)


def _web_json(body, status):
    response = flask.jsonify(body)
    response.status_code = status
    return response


def _web_response(result):
    """Turn a view's return value into a Flask response, serialising JSON bodies here.

    Serialising here (not later in Flask) keeps a body that cannot become
    JSON inside the caller's error handling.
    """
    if isinstance(result, Outcome):
        return _web_json(result.to_dict(), result.status)
    if isinstance(result, dict):
        return flask.jsonify(result)
    if result is None:
        raise TypeError("the view returned None; return a dict, a list, an Outcome or a response")
    if isinstance(result, tuple) and result and isinstance(result[0], (Outcome, dict, list)):
        body = result[0]
        if isinstance(body, Outcome):
            body = body.to_dict()
        return flask.make_response((flask.jsonify(body),) + result[1:])
    if isinstance(result, list):
        return flask.jsonify(result)
    return result


def _web_error_response(exc, message, log, include_trace):
    if isinstance(exc, HTTPError):
        return _web_http_error(exc, log)
    if isinstance(exc, werkzeug.exceptions.HTTPException) and exc.response is not None:
        return exc.get_response()  # abort(response): the view chose the response itself
    if _web_too_deep(exc):
        return _web_json({"error": _WEB_TOO_DEEP}, 400)
    if isinstance(exc, werkzeug.exceptions.HTTPException) and exc.code is not None:
        if exc.code < 400:
            return exc.get_response()  # redirects stay redirects
        response = _web_json({"error": exc.description or exc.name}, exc.code)
        for header, value in exc.get_headers():
            if header.lower() != "content-type":
                response.headers[header] = value
        return response
    if include_trace:
        log.exception("%s: %s", message, flask.request.path if flask.has_request_context() else "")
    else:
        log.error("%s: %s: %s", message, type(exc).__name__, exc)
    return _web_json({"error": message}, 500)


def _web_route_spec(rule, methods, endpoint, json_errors):
    _web_path(rule, "route rule must be a path starting with '/'")
    if methods is not None:
        if not isinstance(methods, (list, tuple, set, frozenset)) or not all(isinstance(m, str) for m in methods):
            raise TypeError("methods must be a list of HTTP method names, got %r" % (methods,))
        methods = [m.upper() for m in methods]
    if endpoint is not None:
        _check_name(endpoint, "endpoint")
    if json_errors is not None and not isinstance(json_errors, str):
        raise TypeError("json_errors must be the error message string, got %s" % _describe(json_errors))
    return (rule, methods, endpoint, json_errors)


def _web_add_rules(blueprint, fn, specs):
    # One wrapper per view, shared by all its rules, so stacked routes share an endpoint.
    views = {}
    for rule, methods, endpoint, json_errors in specs:
        view = views.get(json_errors)
        if view is None:
            view = views[json_errors] = _web_view(fn, json_errors)
        blueprint.add_url_rule(rule, endpoint or view.__name__, view, methods=methods or ["GET"])


def _web_view(fn, json_errors):
    if json_errors is not None:
        return json_endpoint(json_errors)(fn)

    @functools.wraps(fn)
    def view(*args, **kwargs):
        return _web_response(fn(*args, **kwargs))
    return view


def _web_path(value, message):
    """A rule, prefix or namespace: a string starting with '/', else ValueError (R0, "Argument rules")."""
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError("%s, got %r" % (message, value))
    return value


def _web_namespace(namespace):
    return _web_path(namespace, "namespace must start with '/'")


def _web_priority(priority):
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError("priority must be an integer, got %s" % _describe(priority))
    return priority


def _web_schema(schema):
    if schema is not None and not isinstance(schema, Schema):
        raise TypeError("schema must be a specter.Schema, got %s" % _describe(schema))
    return schema


def _web_health(obj):
    health = getattr(obj, "health", None)
    report = dict(health()) if callable(health) else {}
    report.setdefault("name", getattr(obj, "name", None) or repr(obj))
    report.setdefault("registered", getattr(obj, "registered", None))
    return report


def _web_by_name(reports):
    """Health reports keyed by their ``name``, in order; a repeated name gets '#2', '#3'..."""
    keyed: Dict[str, Any] = {}
    for report in reports:
        key, count = report["name"], 1
        while key in keyed:
            count += 1
            key = "%s#%d" % (report["name"], count)
        keyed[key] = report
    return keyed


def _web_arity(callback):
    """How many positional arguments ``callback`` accepts, or None for any number."""
    try:
        parameters = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):
        return None
    count = 0
    for parameter in parameters:
        if parameter.kind is parameter.VAR_POSITIONAL:
            return None
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            count += 1
    return count


def _web_default_name(obj, base):
    """The name of a Router or Handler built without one.

    A class that sets ``name`` gives it; a subclass that does not is named
    after itself in snake case (``JobsRouter`` -> ``'jobs_router'``), so two
    such classes do not share a name; ``base`` itself keeps its class
    default ('router', 'unnamed_handler').
    """
    for klass in type(obj).__mro__:
        if klass is base:
            break
        if vars(klass).get("name"):
            return vars(klass)["name"]
    return base.name if type(obj) is base else _web_snake(type(obj).__name__)


def _web_snake(name):
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _web_mount_controller(app, controller, url_prefix):
    """Register ``controller``'s blueprint on ``app`` once; another blueprint of that name is an error."""
    blueprint = controller.build_blueprint(url_prefix)
    registered = app.blueprints.get(blueprint.name)
    if registered is None:
        app.register_blueprint(blueprint)
    elif registered is not blueprint:
        raise ValueError(
            "the app already has a blueprint named %r (from another controller or router); "
            "give this controller another name" % blueprint.name)


_loop_log = logging.getLogger("specter.loop")


class _WebOperations:
    """What a manager adds for operators: the app binding, probes, the loop monitor and the CLI.

    Kept apart from ServiceManager so its boot and shutdown only call out
    here: ``bind`` when an app arrives, ``starting``/``stopping`` as the
    manager starts and stops.
    """

    def __init__(self, manager, probes, block_threshold):
        self.manager = manager
        self.probes = _web_probe_prefix(probes)
        self.threshold = _check_seconds(block_threshold, "block_threshold", allow_none=True, positive=True)
        self.unmounted = []  # (controller, url_prefix) registered before the manager had an app
        self.monitor = None

    def bind(self, app, socketio):
        """Bind the manager to ``app`` (and ``socketio``): see ServiceManager.init_app()."""
        manager = self.manager
        if manager._app is not None and manager._app is not app:
            raise RuntimeError("%s is already bound to the app %r; one manager serves one app, so make "
                               "another ServiceManager for %r" % (manager.name, manager._app.name, app.name))
        if socketio is not None and manager._socketio is not None and socketio is not manager._socketio:
            raise RuntimeError("%s already uses another SocketIO; pass the same one to init_app()" % manager.name)
        if socketio is not None:
            manager._socketio = socketio
            if manager._ingress.socketio is None:
                manager._ingress.attach(socketio)
        if manager._app is app:
            return
        manager._app = app
        # Like any Flask extension: findable on the app, and an HTTPError
        # raised in any of its views is answered as JSON.
        app.extensions["specter"] = manager
        if HTTPError not in app.error_handler_spec[None][None]:  # keep the app's own
            app.register_error_handler(HTTPError, _web_http_error)
        for service in [manager] + manager._services:
            self.adopt_app(service)
        unmounted, self.unmounted = self.unmounted, []
        for controller, url_prefix in unmounted:
            _web_mount_controller(app, controller, url_prefix)
        if self.probes is not None:
            _web_probes_mount(app, self.probes)
        app.cli.add_command(_web_cli_group(manager))

    def adopt_app(self, service):
        """Run ``service``'s background work in the manager's app context (unless it has an app)."""
        if service._specter_app is None:
            service._specter_app = self.manager._app

    def starting(self):
        manager = self.manager
        if manager._app is not None and manager._socketio is None:
            # A factory that calls init_app() before socketio.init_app(app):
            # the SocketIO is on the app by now, and the events need it.
            self.bind(manager._app, manager._app.extensions.get("socketio"))
        routed = [controller.name for controller, _ in self.unmounted
                  if type(controller).build_routes is not Controller.build_routes
                  and not controller.health()["has_blueprint"]]
        if routed:
            _web_log.warning("the HTTP routes of %s are not served: the manager has no Flask app. Call "
                             "manager.init_app(app) before boot() (app-factory pattern), or make the "
                             "manager with the app", ", ".join(routed))
        if self.threshold is not None and self.monitor is None:
            self.monitor = _WebLoopMonitor(self.manager, self.threshold)
            self.monitor.start()

    def stopping(self):
        monitor, self.monitor = self.monitor, None
        if monitor is not None:
            monitor.stop()

    def loop_health(self):
        if self.monitor is not None:
            return self.monitor.health()
        return {"monitor": False, "threshold": self.threshold, "blocked": 0, "longest": 0.0, "last_stack": None}

    def blocked(self):
        return self.monitor is not None and self.monitor.blocked_now()


class _WebLoopMonitor:
    """gevent's own loop monitor, reported through ``specter.loop``, health() and the bus.

    gevent's monitor thread checks every ``threshold`` seconds whether the
    hub switched greenlets; when it did not, it notifies an
    ``EventLoopBlocked`` with the stack of the greenlet that holds the
    loop. That notification arrives in the monitor thread, so this class
    only logs there (so a loop blocked for good is still reported) and
    records; the counters and the ``'loop:blocked'`` event are handled in
    the hub once the loop runs again, woken by a thread-safe async watcher.

    gevent's monitor (its thread and settings) is the process's, so the
    monitors of several managers share it: the first one on turns it on,
    the smallest threshold of those on applies, the last one off restores
    gevent's settings (and ends the thread, if the first one started it).
    """

    log_every = 60.0  # the same stack is logged at most once per this many seconds
    # Shared by every monitor, as gevent's monitor is.
    _active: List[_WebLoopMonitor] = []  # the monitors now on
    _saved = None  # gevent's settings before the first monitor turned it on
    _own_thread = False  # whether that one started gevent's monitor thread

    def __init__(self, manager, threshold):
        self.manager = manager
        self.threshold = threshold
        self.blocked = 0
        self.longest = 0.0
        self.last_stack = None
        self._reports = collections.deque()  # appended by the monitor thread, drained by the hub
        self._last_report = None
        self._in_block = False
        self._logged = {}
        self._hub = None
        self._wakeup = None

    def start(self):
        import gevent.events  # only when asked for: it loads zope.event
        hub = gevent.get_hub()
        if not hub:
            # The hub has never run (a boot first thing in the process):
            # gevent's monitor thread ends for good at its first round if
            # the hub is still not running then, so start it now.
            gevent.sleep(0)
        config, shared = gevent.config, _WebLoopMonitor
        if not shared._active:
            shared._saved = (config.monitor_thread, config.max_blocking_time, config.print_blocking_reports)
            config.print_blocking_reports = False  # reported through logging instead
            config.monitor_thread = True
        shared._active.append(self)
        config.max_blocking_time = min(monitor.threshold for monitor in shared._active)  # reread every round
        self._hub = hub
        self._wakeup = hub.loop.async_()
        self._wakeup.ref = False  # must not keep the loop alive on its own
        self._wakeup.start(self._drain)
        gevent.events.subscribers.append(self._on_blocked)
        if hub.periodic_monitoring_thread is None:
            with warnings.catch_warnings():
                # Memory monitoring (which wants psutil) is gevent's other job; not ours.
                warnings.filterwarnings("ignore", message="Unable to monitor memory usage")
                hub.start_periodic_monitoring_thread()
            shared._own_thread = True
        _loop_log.debug("loop monitor on, threshold %s s", config.max_blocking_time)
        return self

    def stop(self):
        import gevent.events
        if self._hub is None:
            return
        try:
            gevent.events.subscribers.remove(self._on_blocked)
        except ValueError:
            pass  # someone cleared gevent's subscriber list already
        hub, self._hub = self._hub, None
        config, shared = gevent.config, _WebLoopMonitor
        shared._active.remove(self)
        if shared._active:
            config.max_blocking_time = min(monitor.threshold for monitor in shared._active)
        else:
            if shared._own_thread and hub.periodic_monitoring_thread is not None:
                hub.periodic_monitoring_thread.kill()  # the thread ends when its current sleep does
                hub.periodic_monitoring_thread = None
            shared._own_thread = False
            config.monitor_thread, config.max_blocking_time, config.print_blocking_reports = shared._saved
        self._wakeup.stop()
        self._wakeup.close()
        self._drain()  # a block seen just before the stop still counts
        _loop_log.debug("loop monitor off")

    def health(self):
        return {"monitor": self._hub is not None, "threshold": self.threshold, "blocked": self.blocked,
                "longest": round(self.longest, 3), "last_stack": self.last_stack}

    def blocked_now(self):
        """True while gevent reports the loop blocked, and for one more threshold after its last report.

        The loop cannot answer while it is blocked; the extra threshold makes
        a probe that waited out the block answer 503, since the block ended
        at most one monitor round after the last report.
        """
        last = self._last_report
        return last is not None and _monotonic() - last < 2 * self.threshold

    def _on_blocked(self, event):
        """A gevent event subscriber: runs in gevent's monitor thread, never in the hub."""
        import gevent.events
        hub = self._hub
        if hub is None or not isinstance(event, gevent.events.EventLoopBlocked) \
                or getattr(event, "hub", hub) is not hub:
            return
        now = _monotonic()
        stack = _web_loop_stack(event.info)
        name = _web_loop_greenlet_name(event.greenlet)
        self._last_report = now
        # The loop's clock stands still while it is blocked: it says when the loop last polled.
        self._reports.append((hub.loop.now(), name, stack))
        if not self._in_block:  # one warning per block, not one per monitor round
            self._in_block = True
            logged = self._logged.get(stack)
            if logged is None or now - logged >= self.log_every:
                self._logged[stack] = now
                _loop_log.warning("the event loop is blocked (over %s s) by greenlet %s; its stack:\n%s",
                                  self.threshold, name, stack)
        wakeup = self._wakeup
        if wakeup is not None:
            wakeup.send()  # thread-safe; runs _drain in the hub once the loop is free

    def _drain(self):
        """In the hub, once the loop runs again: count the block and announce it."""
        self._in_block = False
        if not self._reports:
            return
        first = self._reports[0]
        self._reports.clear()
        loop = self._hub.loop if self._hub is not None else gevent.get_hub().loop
        loop.update_now()  # the loop's clock when it last polled, before the block, to now
        seconds = loop.now() - first[0]
        if seconds < self.threshold:
            # Not a block of ours: gevent's thread finished a report of the
            # block just counted after the loop ran again (or, with managers
            # sharing the monitor, the block was short of this threshold).
            return
        self.blocked += 1
        self.longest = max(self.longest, seconds)
        self.last_stack = first[2]
        data = {"seconds": round(seconds, 3), "threshold": self.threshold, "greenlet": first[1],
                "stack": first[2]}
        if self.manager.status in _ACTIVE:
            # A loop callback may not block, and listeners may: they get a greenlet.
            self.manager.spawn(bus.emit, "loop:blocked", data, label="loop:blocked")


def _web_loop_greenlet_name(glet):
    name = getattr(glet, "name", None)
    if name:
        return name
    return "main" if getattr(glet, "parent", False) is None else type(glet).__name__


def _web_loop_stack(info):
    """The blocked stack out of gevent's report lines (the block after 'Blocked Stack')."""
    for index, line in enumerate(info[:-1]):
        if isinstance(line, str) and line.startswith("Blocked Stack"):
            return info[index + 1].rstrip()
    return "\n".join(str(line) for line in info).strip()


def _web_probe_prefix(probes):
    """None (off), '' (on at the root) or '/prefix' from ``probes=``."""
    if probes is None or probes is False:
        return None
    if probes is True:
        return ""
    return _web_path(probes, "probes must be True, False or a path prefix starting with '/'").rstrip("/")


def _web_probes_mount(app, prefix):
    """Serve GET <prefix>/livez and <prefix>/readyz on ``app`` (once).

    They answer for the app's manager, ``app.extensions['specter']``, looked
    up per request: a later manager bound to the same app (a test suite
    sharing one app) is the one they describe, not the first.
    """
    if "specter_livez" in app.view_functions:
        return

    def livez():
        manager = flask.current_app.extensions["specter"]
        if manager._ops.blocked():
            return _web_probe_answer({"status": "blocked", "threshold": manager._ops.threshold}, 503)
        return _web_probe_answer({"status": "ok"}, 200)

    def readyz():
        manager = flask.current_app.extensions["specter"]
        status = _web_readiness(manager)
        # Keyed as health() keys them, so two services of one name both show.
        services = _web_by_name({"name": s.name, "status": s.status} for s in manager._services)
        return _web_probe_answer({"status": status, "services": {key: report["status"]
                                                                  for key, report in services.items()}},
                                 200 if status == "ok" else 503)

    app.add_url_rule(prefix + "/livez", "specter_livez", livez, methods=["GET"])
    app.add_url_rule(prefix + "/readyz", "specter_readyz", readyz, methods=["GET"])


def _web_readiness(manager):
    """'ok', or why the app should get no traffic: starting, stopping, stopped, failed, degraded."""
    if manager._shutting_down or manager._boot_phase == "rolling back":
        return "stopping"
    if not manager.booted:
        return "stopped" if manager.status == "stopped" else "starting"
    statuses = [manager.status] + [service.status for service in manager._services]
    if "failed" in statuses:
        return "failed"
    if any(status != "running" and status != "standby" for status in statuses):
        return "degraded"  # a singleton waiting for its lease on another node is ready, not degraded
    return "ok"


def _web_probe_answer(body, status):
    response = _web_json(body, status)
    response.headers["Cache-Control"] = "no-store"
    return response


def _web_cli_group(manager):
    """The ``flask specter`` command group of ``manager``'s app."""
    group = flask.cli.AppGroup("specter", help="Inspect and serve the SPECTER app.")

    @group.command("routes")
    def routes():
        """Every HTTP route and socket event, with what owns it."""
        http, events = _web_cli_http_rows(manager), _web_cli_event_rows(manager)
        click.echo("HTTP routes (%d)\n" % len(http))
        click.echo(_web_cli_table(("RULE", "METHODS", "OWNER", "ERRORS"), http))
        click.echo("\nSocket events (%d)\n" % len(events))
        click.echo(_web_cli_table(("NAMESPACE", "EVENT", "PRIORITY", "OWNER", "CALLBACK", "SCHEMA"), events))

    @group.command("schemas")
    @click.argument("name", required=False)
    def schemas(name):
        """The JSON Schema of every schema the controllers declare (or of NAME)."""
        known = _web_cli_schemas(manager)
        if name is None:
            out = {key: schema.to_json_schema() for key, schema in known.items()}
        elif name in known:
            out = known[name].to_json_schema()
        else:
            raise click.BadParameter("no schema named %r; known: %s" % (name, ", ".join(known) or "none"),
                                     param_hint="NAME")
        click.echo(json.dumps(out, indent=2))

    @group.command("run", with_appcontext=False)
    @click.option("--host", default="127.0.0.1", show_default=True, help="The interface to bind.")
    @click.option("--port", default=5000, show_default=True, type=int, help="The port to bind.")
    def run(host, port):
        """Boot the services and serve the app (Socket.IO included) until SIGTERM or SIGINT."""
        click.echo("serving on http://%s:%d (Ctrl-C to stop)" % (host, port))
        manager.run(host=host, port=port)

    return group


def _web_cli_table(headers, rows):
    """Rows as left-aligned columns under ``headers``; '-' for an empty cell."""
    rows = [tuple("-" if cell in (None, "") else str(cell) for cell in row) for row in rows]
    if not rows:
        rows = [("(none)",) + ("",) * (len(headers) - 1)]
    widths = [max(len(row[i]) for row in [headers] + rows) for i in range(len(headers))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [headers] + rows)


def _web_cli_http_rows(manager):
    app = manager.app
    controllers = {service.name.replace(".", "_"): service.name
                   for service in manager._services if isinstance(service, Controller)}
    rows = []
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: (r.rule, sorted(r.methods or ()))):
        endpoint = rule.endpoint
        blueprint = endpoint.rpartition(".")[0]
        view = app.view_functions.get(endpoint)
        if blueprint in controllers:
            owner = "%s (controller)" % controllers[blueprint]
        elif endpoint.startswith("specter_"):
            owner = "specter (probe)"
        elif endpoint == "static":
            owner = "flask (static files)"
        elif blueprint:
            bound = getattr(inspect.unwrap(view), "__self__", None) if view is not None else None
            owner = "%s (%s)" % (blueprint, "router" if isinstance(bound, Router) else "blueprint")
        else:
            owner = "app"
        methods = ", ".join(sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}))
        rows.append((rule.rule, methods, owner, _web_cli_errors(app, blueprint, endpoint, view)))
    return rows


def _web_cli_errors(app, blueprint, endpoint, view):
    """How a view answers errors: json "<message>" (json_endpoint), json, or html (Flask's pages)."""
    fn = view
    while fn is not None:
        if getattr(fn, "__code__", None) is _WEB_JSON_ENDPOINT_CODE:
            message = inspect.getclosurevars(fn).nonlocals.get("message")
            return 'json "%s"' % message if message else "json"
        fn = getattr(fn, "__wrapped__", None)
    if endpoint.startswith("specter_"):
        return "json"
    handlers = app.error_handler_spec.get(blueprint, {}) if blueprint else {}
    if _web_server_error in handlers.get(500, {}).values():
        return "json"  # a Router's blueprint answers its errors as JSON
    return "html"


def _web_cli_event_rows(manager):
    """Socket events: subscribed on the ingress, plus those of handlers not set up yet."""
    rows = []
    for (namespace, event), entries in manager.socket_ingress._subs.items():
        for entry in entries:
            owner, callback = _web_cli_owner(entry.callback)
            schema = entry.schema.name if entry.schema is not None else None
            rows.append(((namespace, event, entry.priority, entry.seq), owner, callback, schema))
    for handler in manager._handlers:
        if getattr(handler, "registered", False) or not isinstance(handler, Handler):
            continue
        for seq, (event, callback, priority, namespace, schema) in enumerate(handler._bindings):
            rows.append(((namespace, event, priority, seq), handler.name, _callable_name(callback),
                         schema.name if schema is not None else None))
    rows.sort(key=lambda row: row[0])
    return [(key[0], key[1], key[2], owner, callback, schema) for key, owner, callback, schema in rows]


def _web_cli_owner(callback):
    """(owner, callback name): a Handler's subscriber names its handler; others are the ingress's own."""
    inner = getattr(callback, "__wrapped__", None)
    if inner is not None:
        inner_name = _callable_name(inner)
        qualname = _callable_name(callback)
        if qualname.endswith("." + inner_name):
            return qualname[:-len(inner_name) - 1], inner_name
    return "(ingress)", _callable_name(callback)


def _web_cli_schemas(manager):
    """Every schema the manager's controllers declare, by name (controller-qualified on a clash)."""
    found = {}
    for service in manager._services:
        if not isinstance(service, Controller):
            continue
        for schema in service.schemas.values():
            key = schema.name
            if key in found and found[key] is not schema:
                key = "%s.%s" % (service.name, schema.name)
            found[key] = schema
    return found


# The code of json_endpoint's wrapper: how the CLI tells a json_endpoint view.
_WEB_JSON_ENDPOINT_CODE = json_endpoint(_check_callable).__code__


###############################################################################
# Processes ####################################################################
###############################################################################

_process_log = logging.getLogger("specter.process")


class ManagedProcess:
    """A child process with owned stream readers and a stop that leaves no orphans.

    The child runs in its own process group (a new session), so ``stop()``
    can end it together with everything it spawned: SIGTERM to the group,
    up to ``terminate_timeout`` seconds of grace, then SIGKILL. Waiting,
    reading and stopping go through gevent's subprocess support and never
    block the hub, whether or not the application monkey-patches.

    The launch runs in a greenlet the process owns, so no interruption of
    the caller can separate a child from its handle, and a teardown whose
    caller is interrupted is finished by one; a group is signalled only
    while it is verifiably the child's, never after its pgid may have been
    reused.
    """

    PIPE = subprocess.PIPE
    DEVNULL = subprocess.DEVNULL
    STDOUT = subprocess.STDOUT

    def __init__(self, name, *, terminate_timeout=5.0, kill_timeout=1.0):
        self.name = _check_name(name, "process name")
        self.terminate_timeout = _check_seconds(terminate_timeout, "terminate_timeout")
        self.kill_timeout = _check_seconds(kill_timeout, "kill_timeout")
        self.args = None
        self._popen = None
        self._pgid = None
        self._readers = []
        self._owners = []
        self._watched = set()
        self._group_gone = False
        self._reaper = None
        self._launcher = None
        self._stopping = gevent.lock.RLock()
        self._terminated_at = None  # when this run's group got SIGTERM (monotonic)

    def start(self, args: Union[str, bytes, Sequence[Any]], *, owner: Any = None,
              **popen_kwargs: Any) -> ManagedProcess:
        """Launch ``args`` (popen keywords pass through); RuntimeError if already running.

        If the caller is interrupted during the launch (a kill, a Timeout),
        start() stops the child before re-raising; a stop() from any
        greenlet during the launch waits for it and ends the child too.
        """
        self._check_idle()
        if isinstance(args, (str, bytes)):
            if not args.strip():
                raise ValueError("args must name a program, got an empty string")
        elif isinstance(args, (list, tuple)):
            if not args:
                raise ValueError("args must name a program, got an empty sequence")
        else:
            raise TypeError("args must be a list of strings or a string, got %s" % _describe(args))
        _check_owner(owner)
        if popen_kwargs.get("start_new_session") is False or "process_group" in popen_kwargs:
            raise ValueError("ManagedProcess runs each child in its own session so stop() can end "
                             "its whole process group; do not pass start_new_session or process_group")
        popen_kwargs["start_new_session"] = True
        if self._popen is not None:
            self.stop()  # the previous run's group, readers and pipes
            self._check_idle()  # another greenlet may have started it meanwhile
        self.args = args
        # Owners hold the process before the launch, so an owner stopping
        # during it ends the child too.
        if owner is not None:
            self.attach(owner)
        for holder in self._owners:
            holder._hold(self.stop, self)  # its owners own the new run too
        launcher = self._launcher = gevent.spawn(self._launch, args, popen_kwargs)
        launcher.name = "%s:launch" % self.name
        try:
            failure = launcher.get()
            if failure is not None:
                raise failure
        except BaseException:
            # Interrupted, or the launch failed: leave nothing running or held.
            self.stop()
            raise
        return self

    def attach(self, owner: Any) -> ManagedProcess:
        """Have ``owner`` stop this process when it stops.

        A process stopped earlier leaves its owner, so a service that runs
        many short-lived processes does not accumulate them.
        """
        _check_owner(owner)
        if callable(getattr(owner, "own", None)):
            owner.own(self)
        else:
            owner.add_cleanup(self.stop)
        return self

    def watch_stream(self, stream_name: str, handler: Callable[..., Any], *, chunk_size: Optional[int] = None,
                     strip: bool = True, label: Optional[str] = None,
                     close_on_exit: bool = False) -> Greenlet:
        """Read ``'stdout'`` or ``'stderr'`` in an owned greenlet, calling ``handler`` per line.

        With ``chunk_size`` the handler gets chunks instead, as soon as
        output arrives: up to that many bytes, decoded to ``str`` (newlines
        translated) when the process runs in text mode. A handler that
        raises is logged and reading goes on.
        """
        if stream_name not in ("stdout", "stderr"):
            raise ValueError("stream_name must be 'stdout' or 'stderr', got %r" % (stream_name,))
        _check_callable(handler, "handler")
        if chunk_size is not None:
            _check_count(chunk_size, "chunk_size", 1)
        if self._popen is None:
            raise ValueError("process %s is not started; call start() before watch_stream()" % self.name)
        stream = getattr(self._popen, stream_name, None)
        if stream is None:
            raise ValueError("%s of %s is not piped; start it with %s=ManagedProcess.PIPE"
                             % (stream_name, self.name, stream_name))
        if stream.closed:
            raise ValueError("%s of %s is closed: the process has ended and been released"
                             % (stream_name, self.name))
        label = label or stream_name
        self._watched.add(stream_name)
        reader = gevent.spawn(self._read, stream, handler, chunk_size, strip, label, close_on_exit)
        reader.name = "%s:%s" % (self.name, label)
        self._readers.append(reader)
        return reader

    def follow_output(self, *, stdout_handler: Optional[Callable[..., Any]] = None,
                      stderr_handler: Optional[Callable[..., Any]] = None, stdout_label: str = "stdout",
                      stderr_label: str = "stderr") -> List[Greenlet]:
        """Watch every piped stream; streams without a handler are logged at INFO."""
        readers = []
        for stream_name, handler, label in (("stdout", stdout_handler, stdout_label),
                                            ("stderr", stderr_handler, stderr_label)):
            if getattr(self._popen, stream_name, None) is None:
                continue
            if handler is None:
                handler = functools.partial(self._log_line, label)
            readers.append(self.watch_stream(stream_name, handler, label=label))
        return readers

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """The exit code, waiting cooperatively; None if still running after ``timeout``."""
        timeout = _check_seconds(timeout, "timeout", allow_none=True)
        if self._popen is None:
            return None
        try:
            return self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def poll(self) -> Optional[int]:
        return None if self._popen is None else self._popen.poll()

    def stop(self, timeout: Optional[float] = None) -> ManagedProcess:
        """End the process group: SIGTERM, wait, then SIGKILL; stop readers, close pipes.

        ``timeout`` overrides ``terminate_timeout``. Idempotent. A launch in
        progress is waited for and its child ended; a stop() under way in
        another greenlet is waited for. An interruption of the caller (its
        own Timeout, a kill) ends its wait, not the teardown: a greenlet of
        the process's own finishes it, and SIGKILL still comes ``timeout``
        seconds after the first SIGTERM.
        """
        grace = self.terminate_timeout if timeout is None else _check_seconds(timeout, "timeout")
        run = self._launcher  # the run this call ends (the latest launch)
        try:
            self._teardown(grace)
        except BaseException:
            # Every step of the teardown is idempotent: run it again to the end.
            finisher = gevent.spawn(self._teardown, grace, run)
            finisher.name = "%s:stop" % self.name
            raise
        return self

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return None if self._popen is None else self._popen.pid

    @property
    def stdin(self) -> Any:
        """The child's stdin pipe (a cooperative file object) when started with stdin=PIPE, else None."""
        return None if self._popen is None else self._popen.stdin

    @property
    def stdout(self) -> Any:
        return None if self._popen is None else self._popen.stdout

    @property
    def stderr(self) -> Any:
        return None if self._popen is None else self._popen.stderr

    @property
    def returncode(self) -> Optional[int]:
        return None if self._popen is None else self._popen.poll()

    def health(self) -> Dict[str, Any]:
        return {"name": self.name, "type": "process", "pid": self.pid, "running": self.running,
                "returncode": self.returncode, "readers": sum(1 for r in self._readers if not r.dead)}

    def __repr__(self):
        return "<ManagedProcess %r pid=%s %s>" % (self.name, self.pid,
                                                  "running" if self.running else "stopped")

    def _read(self, stream, handler, chunk_size, strip, label, close_on_exit):
        try:
            if chunk_size:
                # read1() returns what has arrived; a text stream's read(n) would
                # wait for n characters, so text is read as bytes and decoded here.
                decode = _process_text_decoder(stream)
                raw = stream if decode is None else stream.buffer
                read = raw.read1 if hasattr(raw, "read1") else raw.read
                while True:
                    chunk = read(chunk_size)
                    if not chunk:
                        break
                    if decode is not None:
                        chunk = decode(chunk)  # '' while a character is split across reads
                    if chunk:
                        self._handle(handler, chunk, label)
                tail = decode(b"", True) if decode is not None else None
                if tail:
                    self._handle(handler, tail, label)
            else:
                newline = b"\r\n" if not isinstance(getattr(stream, "encoding", None), str) else "\r\n"
                for line in stream:
                    self._handle(handler, line.rstrip(newline) if strip else line, label)
        except (OSError, ValueError):
            if not stream.closed:
                # Not stop() closing the pipe: undecodable output, say. Log it and
                # keep draining, or the child would block on a full pipe.
                _process_log.exception("%s: reading %s failed; discarding the rest", self.name, label)
                _process_drain(stream)
        finally:
            if close_on_exit:
                try:
                    stream.close()
                except OSError:
                    pass  # already closed

    def _handle(self, handler, data, label):
        _notify((handler,), (data,), _process_log, "%s: %s handler %s raised", self.name, label)

    def _log_line(self, label, line):
        _process_log.info("%s[%s] %s", self.name, label, line)

    def _launch(self, args, popen_kwargs):
        """Run Popen and adopt the child, in the greenlet start() waits for.

        gevent's Popen yields between fork and exec; adopting here rather
        than in start() means the handle reaches the process even when
        start() is interrupted there. A launch that fails returns its
        exception for start() to raise (a greenlet dying of it would also be
        reported by the hub).
        """
        try:
            popen = gevent.subprocess.Popen(args, **popen_kwargs)
        except Exception as exc:
            return exc
        self._popen = popen
        self._pgid = popen.pid  # a new session's leader leads its group
        self._watched = set()
        self._group_gone = False
        self._terminated_at = None
        self._reaper = gevent.spawn(self._reap, popen)
        self._reaper.name = "%s:reaper" % self.name
        _process_log.debug("%s: started pid %d", self.name, popen.pid)
        return None

    def _teardown(self, grace, run=None):
        """stop()'s work, one greenlet at a time; each step is idempotent.

        The SIGKILL deadline counts from this run's first SIGTERM, so a
        teardown finishing an interrupted one does not start a new grace.
        Given ``run`` (the launcher of the run to end), it does nothing once
        another run has started: that start() ended the old run already.
        """
        with self._stopping:
            launcher = self._launcher
            if run is not None and launcher is not run:
                return
            if launcher is not None and not launcher.dead:
                launcher.join()  # fork to exec: brief, and the child must not escape
            popen = self._popen
            if popen is not None:
                if self._group_alive():
                    if self._terminated_at is None:
                        _process_log.debug("%s: terminating process group %d", self.name, self._pgid)
                        self._signal_group(signal.SIGTERM)
                        self._terminated_at = _monotonic()
                    if self._wait_group(max(self._terminated_at + grace - _monotonic(), 0.0)):
                        _process_log.warning("%s: still running %.1f s after SIGTERM; killing",
                                             self.name, grace)
                        self._signal_group(signal.SIGKILL)
                        if self._wait_group(self.kill_timeout):
                            _process_log.error("%s: process group %d survived SIGKILL", self.name, self._pgid)
                self._stop_readers()
                _process_close(popen.stdin, popen.stdout, popen.stderr)
            self._leave_owners()

    def _check_idle(self):
        if self._launcher is not None and not self._launcher.dead:
            raise RuntimeError("process %s is being started by another greenlet; stop() it first" % self.name)
        if self.running:
            raise RuntimeError("process %s is already running (pid %d); stop() it first"
                               % (self.name, self._popen.pid))

    def _signal_group(self, signum):
        """Signal the group, verified as ours just before (no yield in between)."""
        if not self._group_alive():
            return
        try:
            if self._pgid != os.getpgrp():
                os.killpg(self._pgid, signum)
            else:
                self._popen.send_signal(signum)
        except ProcessLookupError:
            pass  # everyone in the group is already gone
        except PermissionError:
            self._popen.send_signal(signum)

    def _group_alive(self):
        """True while the group has a live member and is verifiably ours.

        Until gevent reaps our leader, its pid, and so the pgid, cannot be
        reused: the group is ours. After that only descendants keep the
        pgid in use. Once the group is seen empty, or a live process holds
        the reaped leader's pid (the kernel reused the number), the pgid is
        someone else's: that is recorded for good, and the group is never
        probed or signalled again.
        """
        if self._group_gone:
            return False
        if self._popen.returncode is None:
            return True
        try:
            os.killpg(self._pgid, 0)
        except ProcessLookupError:
            members = []
        except PermissionError:
            return False  # not ours to signal, and perhaps not ours at all
        else:
            # Something answers; only /proc can tell the living from zombies.
            members = _process_group_members(self._pgid)
            if members is None:
                return True  # no /proc: the kill(0) answer is all there is
        if members and self._pgid not in members:
            return True
        self._group_gone = True
        return False

    def _wait_group(self, timeout):
        """Wait for the child and then its group to be gone; True if something is left."""
        deadline = _monotonic() + timeout
        self.wait(timeout)
        pause = 0.005
        while self._group_alive():
            if _monotonic() >= deadline:
                return True
            gevent.sleep(min(pause, max(deadline - _monotonic(), 0)))
            pause = min(pause * 2, 0.1)
        return False

    def _reap(self, popen):
        """Once the child and its group are gone and its watched output is read, release it.

        So a long-running service can run many short processes without
        holding their pipes and owner entries. Descendants still alive leave
        the release to stop(); a pipe read by hand stays open for its reader.
        """
        popen.wait()
        while True:  # readers added late, while the others finished, count too
            readers = [reader for reader in self._readers if not reader.dead]
            if not readers:
                break
            gevent.joinall(readers)
        if self._popen is not popen or self._group_alive():
            return  # otherwise the group is gone for good (_group_alive recorded it)
        _process_close(popen.stdin, *(getattr(popen, name) for name in self._watched))
        self._leave_owners()

    def _leave_owners(self):
        """Drop out of the owners' teardown lists; they take the process back if it restarts."""
        for holder in self._owners:
            holder._disown(self)

    def _stop_readers(self):
        """Kill the stream readers and the reaper (unless one of them is calling)."""
        owned, self._readers = self._readers + [self._reaper], []
        self._reaper = None
        current = getcurrent()
        _kill_greenlets([g for g in owned if g is not None and g is not current], self.kill_timeout)


def start_process(name: str, args: Union[str, bytes, Sequence[Any]], *, owner: Any = None,
                  **popen_kwargs: Any) -> ManagedProcess:
    """Create and start a ManagedProcess (owned by ``owner`` if given)."""
    return ManagedProcess(name).start(args, owner=owner, **popen_kwargs)


def _process_close(*streams):
    for stream in streams:
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass  # already broken or closed: nothing left to release


def _process_drain(stream):
    raw = getattr(stream, "buffer", stream)
    read = getattr(raw, "read1", raw.read)
    try:
        while read(65536):
            pass
    except (OSError, ValueError):
        pass  # closed at last: nothing more to drain


def _process_text_decoder(stream):
    """A ``decode(data, final=False)`` matching text-mode ``stream``, or None for a binary one.

    Newlines are translated as the stream's own reads would (Popen's text
    mode uses universal newlines).
    """
    encoding = getattr(stream, "encoding", None)
    if not isinstance(encoding, str):
        return None
    decoder = codecs.getincrementaldecoder(encoding)(getattr(stream, "errors", None) or "strict")
    return io.IncrementalNewlineDecoder(decoder, translate=True).decode


def _process_group_members(pgid, parent=False):
    """Live pids of process group ``pgid`` read from /proc, or None without /proc.

    With ``parent=True``, the live children of process ``pgid`` instead
    (leak_check's census of child processes).

    Zombies do not count: they are dead, merely waiting for a parent (often
    an init that reaps slowly) to collect them, and no signal reaches them.
    The scan yields to the hub every few entries instead of running in a
    thread: gevent's threadpool cannot be created at interpreter exit, where
    the atexit shutdown may still have a group to kill.
    """
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    members = []
    for count, entry in enumerate(entries, 1):
        if count % 64 == 0:
            gevent.sleep(0)
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, "rb") as stat:
                data = stat.read()
        except OSError:
            continue  # the process ended while we looked
        fields = data[data.rfind(b")") + 2:].split()
        if len(fields) > 2 and int(fields[1 if parent else 2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(entry))
    return members


###############################################################################
# Cluster ######################################################################
###############################################################################

_cluster_log = logging.getLogger("specter.cluster")

# The Cluster started in this process, if any: one process is one node.
_cluster_active: Optional[Cluster] = None

# Shared caches by name; a remote invalidation of a name reaches each of them.
_cluster_caches: Dict[str, Any] = {}

# Fencing counters of leases taken without a cluster (a cluster of one).
_cluster_local_tokens: Dict[str, int] = collections.Counter()


class Cluster(Service):
    """One node of an app that runs on several processes sharing one Redis.

    Started first and stopped last by ``boot(..., cluster=...)`` (provided
    as ``'cluster'``), or on its own with ``Cluster(url).start()``. It holds
    the Redis connection pool, announces the node with a heartbeat, carries
    the shared bus events and shared cache invalidations, and reconnects
    with capped, jittered backoff when Redis goes away; until then local
    behaviour goes on and ``health()`` says 'degraded'. In a process that is
    not monkey-patched its sockets are gevent's and its parser is
    redis-py's pure-Python one, so waiting on Redis never blocks the hub.
    """

    heartbeat = 1.0  # seconds between node heartbeats, which also check the connection
    node_timeout = 3.0  # a node unseen for this long is not listed by nodes()
    block = 2.0  # longest blocking read, seconds: a finite wait notices a half-open socket
    socket_timeout = 5.0  # above block, so a blocking read is never cut short by it
    connect_timeout = 2.0
    max_backoff = 1.0  # reconnect attempts at most this far apart: 'ok' within 2 s of Redis coming back
    stream_maxlen = 10000  # shared events kept in Redis (approximate trim) for nodes that lag
    outbox_limit = 10000  # shared emits waiting to be sent; beyond it they are dropped and counted

    def __init__(self, url: Optional[str] = None, *, namespace: str = "specter",
                 node_id: Optional[str] = None, share: Iterable[str] = (),
                 redis_options: Optional[Dict[str, Any]] = None):
        super().__init__("cluster")
        self._url = _cluster_url(url)
        self.namespace = _check_name(namespace, "namespace")
        if node_id is None:
            node_id = "%s:%d:%s" % (socket.gethostname(), os.getpid(), os.urandom(3).hex())
        self.node_id = _check_name(node_id, "node_id")
        if redis_options is not None and not isinstance(redis_options, dict):
            raise TypeError("redis_options must be a dict of redis-py connection options, got %s"
                            % _describe(redis_options))
        self._options = dict(redis_options or {})
        self._patterns: Tuple[str, ...] = ()
        self._match: Optional[Callable[[str], Any]] = None
        if isinstance(share, str):
            share = (share,)
        self.share(*share)
        self._redis: Any = None  # a redis.Redis once started
        self._scripts: Any = None
        self._redis_errors: Tuple[Type[BaseException], ...] = ()
        self._connected = gevent.event.Event()
        self._lost = gevent.event.Event()
        self._reconnects = 0
        self._redis_error = None
        self._nodes: List[Dict[str, Any]] = []
        self._clock_offset = 0.0
        self._started_at: Optional[float] = None
        self._redis_now = 0.0
        self._response_error: Any = None
        self._outbox: Deque[Tuple[str, str]] = collections.deque()
        self._outbox_ready = gevent.event.Event()
        self._bus_last = "0-0"
        self._bus_seq = None
        self._sent = 0
        self._received = 0
        self._dropped = 0
        self._dropped_unreported = 0
        self._gaps = 0
        self._lag = 0.0
        self._applying = None
        self._queues: List[ClusterQueue] = []
        self._leases: List[Lease] = []
        self._sio_managers: List[Any] = []

    @property
    def url(self) -> str:
        """The Redis URL with any password masked."""
        return _cluster_mask(self._url)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def share(self, *patterns: str) -> Cluster:
        """Make the bus events matching these ``fnmatch`` patterns cross processes.

        Events named ``cluster:...`` stay local: they describe this node.
        """
        for pattern in patterns:
            _check_name(pattern, "share pattern")
        self._patterns += tuple(pattern.strip() for pattern in patterns)
        if self._patterns:
            self._match = re.compile("|".join(fnmatch.translate(p) for p in self._patterns)).match
        return self

    def on_start(self) -> None:
        global _cluster_active
        if _cluster_active is not None and _cluster_active is not self:
            raise RuntimeError("a Cluster is already running in this process (node %s); "
                               "one process is one node" % _cluster_active.node_id)
        redis = _cluster_import_redis()
        self._redis_errors = (redis.RedisError,)
        self._redis = _cluster_client(redis, self._url, self._options, self)
        self.add_cleanup(self._redis.connection_pool.disconnect)
        self._scripts = _ClusterScripts(self._redis, redis.exceptions.NoScriptError)
        self._started_at = time.time()
        try:
            self._heartbeat()
            self._bus_position()
        except redis.RedisError as exc:
            raise ConnectionError("cannot reach Redis at %s: %s" % (self.url, exc)) from None
        self._lost.clear()  # a fault seen before an earlier stop(): else the monitor would spin on it
        self._connected.set()
        _cluster_active = self
        self.add_cleanup(_cluster_detach)
        bus._attach(_ClusterBusLink(self))
        # Supervised: a loop that died on a surprise would silently cut this node off.
        for loop in (self._monitor, self._read_bus, self._send_bus):
            self.supervise(loop)
        _cluster_log.info("node %s joined %s (namespace %r)", self.node_id, self.url, self.namespace)

    def on_stop(self) -> None:
        bus._attach(None)
        for queue in list(self._queues):
            queue.stop()  # stopped after them by boot(); alone, first, so they hand their items back
        for lease in list(self._leases):
            lease.release()  # while Redis is still reachable, so the next holder need not wait
        if self._connected.is_set():
            self._flush_outbox()
            try:
                self._redis.pipeline(transaction=True).zrem(self._key("nodes"), self.node_id) \
                    .hdel(self._key("nodeinfo"), self.node_id).execute()
            except self._redis_errors as exc:
                _cluster_log.warning("could not remove node %s from Redis: %s", self.node_id, exc)
        self._connected.clear()

    def nodes(self) -> List[Dict[str, Any]]:
        """The live nodes (heartbeat seen within ``node_timeout``), this one included.

        Asks Redis when connected; otherwise the list seen at the last heartbeat.
        """
        if self._connected.is_set():
            try:
                self._nodes = self._live_nodes(register=False)
            except self._redis_errors as exc:
                self._fault(exc)
        return [dict(node) for node in self._nodes]

    def lease(self, name: str, ttl: float = 10.0) -> Lease:
        """A Lease owned by the cluster: acquired and renewed while the cluster runs."""
        self._check_active("lease")
        return _cluster_lease(self, self, name, ttl)

    def socketio_manager(self, channel: str = "socketio") -> Any:
        """A python-socketio client manager whose emits reach clients on every node.

        Pass it as ``SocketIO(app, client_manager=...)``. It publishes over
        this cluster's connection (so it works unpatched) and listens as
        soon as the cluster is connected, reconnecting with it.
        """
        manager = _cluster_socketio_manager_class()(self, _check_name(channel, "channel"))
        self._sio_managers.append(manager)
        return manager

    def health(self) -> Dict[str, Any]:
        report = super().health()
        connected = self._connected.is_set()
        if report["status"] == "ok" and not connected:
            report["status"] = "degraded"
        report.update(
            connected=connected, url=self.url, node_id=self.node_id, namespace=self.namespace,
            nodes=[node["node_id"] for node in self._nodes], reconnects=self._reconnects,
            last_error=self._redis_error or report["last_error"],
            bus={"shared": list(self._patterns), "sent": self._sent, "received": self._received,
                 "dropped": self._dropped, "lag": self._lag, "outbox": len(self._outbox)},
            lag=self._lag, gaps=self._gaps,
            leases=sorted(lease.name for lease in self._leases if lease.held),
            queues={queue.name: queue._cq_stats() for queue in self._queues},
            socketio=[manager.health() for manager in self._sio_managers],
        )
        return report

    def _key(self, *parts):
        return ":".join((self.namespace,) + parts)

    def _fault(self, exc):
        """A Redis call failed: mark the node disconnected and let the monitor reconnect."""
        self._redis_error = "%s: %s" % (type(exc).__name__, exc)
        if self._connected.is_set():
            self._connected.clear()
            _cluster_log.warning("lost Redis at %s: %s", self.url, exc)
        self._lost.set()

    def _await_connection(self, timeout=None):
        return self._connected.wait(timeout)

    def _heartbeat(self):
        sent = time.time()
        self._nodes = self._live_nodes(register=True)
        now = time.time()
        self._clock_offset = self._redis_now - (sent + now) / 2

    def _live_nodes(self, register):
        info = json.dumps({"node_id": self.node_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "started_at": self._started_at})
        now, infos = self._scripts.nodes(
            keys=[self._key("nodes"), self._key("nodeinfo")],
            args=[self.node_id, info, int(self.node_timeout * 1000), 1 if register else 0])
        self._redis_now = int(now) / 1000.0
        return sorted((json.loads(text) for text in infos if text), key=lambda node: node["node_id"])

    def _monitor(self):
        """Heartbeat while connected; after a fault, retry with capped jittered backoff.

        Real time even under a ManualClock: Redis counts node liveness in real time.
        """
        while True:
            if self._connected.is_set():
                if not self._lost.wait(self.heartbeat):
                    try:
                        self._heartbeat()
                    except self._redis_errors as exc:
                        self._fault(exc)
                continue
            failures = 0
            while True:
                failures += 1
                delay = min(self.max_backoff, 0.05 * 2 ** failures)
                gevent.sleep(delay * (0.5 + random.random() / 2))
                try:
                    self._heartbeat()
                    reason = self._restore_bus()
                    break
                except self._redis_errors as exc:
                    self._redis_error = "%s: %s" % (type(exc).__name__, exc)
            self._reconnects += 1
            self._lost.clear()
            self._connected.set()
            _cluster_log.info("Redis at %s is back after %d attempt(s)", self.url, failures)
            if reason:
                self._gap(reason, None)  # which invalidates the shared caches too
            else:
                # Nothing was missed (the read position held), but the contract has shared
                # caches reload after any reconnect: cheap, and never stale.
                self._invalidate_shared_caches()

    def _restore_bus(self):
        """After a reconnect: why shared events may have been missed, or None when none were.

        The read position survives a lost connection, so reading on from it
        misses nothing unless Redis lost the stream, or some node dropped
        emits while it could not reach Redis. This node reports its own
        drops here, and tells the others with a marker entry in the stream
        (each of them emits 'cluster:gap' when it reads it).
        """
        reasons = []
        seq = self._redis.get(self._key("bus", "seq"))
        if self._bus_seq is not None and (seq is None or int(seq) < self._bus_seq):
            reasons.append("redis lost the shared events (restarted without persistence?)")
            self._bus_seq = None
            self._bus_last = "0-0"
        if self._dropped_unreported:
            reasons.append("%d shared emit(s) of this node were dropped" % self._dropped_unreported)
            self._outbox.appendleft(("", json.dumps({"dropped": self._dropped_unreported})))
            self._outbox_ready.set()
            self._dropped_unreported = 0
        return "; ".join(reasons) or None

    def _gap(self, reason, missed):
        self._gaps += 1
        _cluster_log.warning("bus gap on node %s: %s", self.node_id, reason)
        self._invalidate_shared_caches()
        bus.emit("cluster:gap", {"reason": reason, "missed": missed, "node_id": self.node_id})

    def _bus_position(self):
        newest = self._redis.xrevrange(self._key("bus"), "+", "-", count=1)
        if newest:
            self._bus_last, fields = newest[0]
            self._bus_seq = int(fields.get("s", 0))
        else:
            self._bus_last, self._bus_seq = "0-0", None

    def _share_prepare(self, event, data):
        match = self._match
        if match is None or type(event) is not str or not match(event) or event.startswith("cluster:"):
            return None
        return event, _cluster_json(data, "the payload of shared event %r" % event)

    def _share_publish(self, entry):
        if not self._connected.is_set() or len(self._outbox) >= self.outbox_limit:
            self._dropped += 1
            self._dropped_unreported += 1
            return
        self._outbox.append(entry)
        self._outbox_ready.set()

    def _send_bus(self):
        while True:
            self._outbox_ready.wait()
            self._outbox_ready.clear()
            self._flush_outbox()

    def _flush_outbox(self):
        outbox = self._outbox
        while outbox:
            batch = [outbox.popleft() for _ in range(min(len(outbox), 500))]
            args = [self.stream_maxlen, self.node_id]
            for event, payload in batch:
                args += (event, payload)
            try:
                self._scripts.emit(keys=[self._key("bus"), self._key("bus", "seq")], args=args)
                self._sent += len(batch)
            except self._redis_errors as exc:
                self._dropped += len(batch)
                self._dropped_unreported += len(batch)
                self._fault(exc)

    def _read_bus(self):
        stream = self._key("bus")
        block = int(self.block * 1000)
        while True:
            if not self._connected.is_set():
                self._connected.wait()
            try:
                reply = self._redis.xread({stream: self._bus_last}, count=1000, block=block)
            except self._redis_errors as exc:
                self._fault(exc)
                continue
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    try:
                        self._bus_entry(entry_id, fields)
                    except (ValueError, TypeError, KeyError):
                        # Not ours (another program writing to the stream): skip it, loudly.
                        _cluster_log.exception("skipped malformed shared event %s: %r", entry_id, fields)

    def _bus_entry(self, entry_id, fields):
        self._bus_last = entry_id
        seq = int(fields["s"])  # an entry without one is not ours: skipped (loudly) before it can fake a gap
        if self._bus_seq is not None and seq != self._bus_seq + 1:
            if seq <= self._bus_seq:
                self._gap("redis lost the shared events (restarted without persistence?)", None)
            else:
                self._gap("%d shared event(s) were trimmed before this node read them"
                          % (seq - self._bus_seq - 1), seq - self._bus_seq - 1)
        self._bus_seq = seq
        if fields.get("n") == self.node_id:
            return  # our own: its listeners ran when it was emitted
        self._received += 1
        self._lag = max(0.0, time.time() + self._clock_offset - int(entry_id.partition("-")[0]) / 1000.0)
        event, data = fields.get("e"), _cluster_item(fields.get("d", "null"))
        if event:
            bus._deliver_remote(event, data)
        elif type(data) is dict:  # no event name and an object: another node's report of dropped emits
            dropped = int(data["dropped"])
            self._gap("node %s dropped %d shared emit(s) while it could not reach Redis"
                      % (fields.get("n"), dropped), dropped)
        else:
            self._apply_remote_invalidation(data)

    def _publish_invalidation(self, name):
        # An empty event name marks a cache invalidation (the cache's name, a string) or a
        # report of dropped emits (an object): no bus event can have an empty name.
        self._share_publish(("", json.dumps(name)))

    def _apply_remote_invalidation(self, name):
        self._applying = getcurrent()
        try:
            for cache in list(_cluster_caches.get(name, ())):
                cache.invalidate()
        finally:
            self._applying = None

    def _invalidate_shared_caches(self):
        self._applying = getcurrent()
        try:
            for caches in list(_cluster_caches.values()):
                for cache in list(caches):
                    cache.invalidate()
        finally:
            self._applying = None


class ClusterQueue(QueueService):
    """A QueueService whose items live in Redis, consumed by every node's queue of that name.

    Delivery is at least once: an item is acknowledged (and deleted) only
    after ``handle_item`` returns. One that raises comes back after
    ``retry_backoff[n]`` seconds (the last value repeating), and after
    ``max_deliveries`` it becomes a dead letter. An item whose node dies is
    reclaimed by another node once it has been idle ``visibility_timeout``
    seconds, while a long handler keeps its claim alive on its own. A read
    fetches only as many items as there are idle workers, so nothing is
    stranded on a busy node. ``stop()`` finishes the items being handled
    and hands the rest back to the shared backlog at once.
    """

    group = "specter"

    def __init__(self, name=None, *, worker_count=1, maxsize=0, visibility_timeout=30.0,
                 max_deliveries=5, retry_backoff=(1, 5, 30, 120), initial_state=None):
        super().__init__(name, worker_count=worker_count, maxsize=maxsize, initial_state=initial_state)
        self.visibility_timeout = _check_seconds(visibility_timeout, "visibility_timeout", positive=True)
        self.max_deliveries = _check_count(max_deliveries, "max_deliveries", 1)
        if isinstance(retry_backoff, (int, float)) and not isinstance(retry_backoff, bool):
            retry_backoff = (retry_backoff,)
        if not isinstance(retry_backoff, (list, tuple)) or not retry_backoff:
            raise TypeError("retry_backoff must be a non-empty list of seconds, got %s" % _describe(retry_backoff))
        self.retry_backoff = tuple(_check_seconds(s, "retry_backoff item") for s in retry_backoff)
        self._cluster = None
        self._reader = self._acker = None
        self._in_hand = {}  # entry id -> (item payload, failed attempts) fetched and not acknowledged
        self._acks = []
        self._ack_ready = gevent.event.Event()
        self._wake = gevent.event.Event()  # a worker became idle: the reader may fetch
        self._hk_wake = gevent.event.Event()  # a retry or delayed item was scheduled
        self._handling = {}  # worker greenlet -> id of the entry it handles
        self._idle = 0
        self._stats = {"backlog": None, "pending": None, "delayed": None, "dead": None}
        self._dead_count = 0
        self._lost_claims = 0  # items finished here after another node had reclaimed them

    def on_dead_letter(self, item: Any, error: str, deliveries: int) -> None:
        """Called on the node that buried ``item`` after its last failed delivery."""
        _cluster_log.warning("%s: item buried as a dead letter after %d deliveries: %s",
                             self.name, deliveries, error)

    def enqueue(self, item: Any, *, delay: float = 0) -> bool:  # type: ignore[override]  # the contract's signature
        """Add ``item`` (JSON) to the shared backlog, after ``delay`` seconds if given.

        False when the queue is stopped, the backlog is at ``maxsize`` or
        Redis is unreachable; never waits for a reconnect.
        """
        payload = _cluster_json(item, "a ClusterQueue item")
        delay = _check_seconds(delay, "delay")
        cluster = self._cluster
        if self._status not in _ACTIVE or cluster is None or not cluster._connected.is_set():
            return False
        try:
            added = cluster._scripts.enqueue(
                keys=[self._stream, self._delayed_key],
                args=[payload, self.maxsize, int(delay * 1000), os.urandom(8).hex()])
        except cluster._redis_errors as exc:
            cluster._fault(exc)
            return False
        if added and delay:
            self._hk_wake.set()
        return bool(added)

    def pending_count(self) -> int:
        """Items waiting in the shared backlog (delayed ones included), not yet taken by any node.

        ConnectionError (naming the URL) while Redis is unreachable: the
        shared backlog cannot be known, and a stale figure would mislead.
        """
        self._cq_ask("pending_count()", lambda cluster: self._cq_refresh())
        return self._stats["backlog"] + self._stats["delayed"]

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait until no item is waiting or being handled on any node; False on timeout."""
        timeout = _check_seconds(timeout, "timeout", allow_none=True)
        deadline = None if timeout is None else _monotonic() + timeout
        while True:
            try:
                self._cq_refresh()
                done = not self._in_hand and not self._acks and not (
                    self._stats["backlog"] + self._stats["pending"] + self._stats["delayed"])
            except self._require_cluster()._redis_errors:
                done = False
            if done:
                return True
            if deadline is not None and _monotonic() >= deadline:
                return False
            gevent.sleep(0.01)

    def dead_letters(self, limit: int = 100) -> List[Dict[str, Any]]:
        """The oldest ``limit`` dead letters: id, item, error, deliveries, node, at (epoch seconds)."""
        _check_count(limit, "limit", 1)
        entries = self._cq_ask("dead_letters()",
                               lambda cluster: cluster._redis.xrange(self._dead_key, "-", "+", count=limit))
        return [{"id": entry_id, "item": _cluster_item(fields.get("d", "null"), raw=True), "error": fields.get("error"),
                 "deliveries": int(fields.get("n", 0)), "node": fields.get("node"),
                 "at": int(entry_id.partition("-")[0]) / 1000.0} for entry_id, fields in entries]

    def requeue_dead(self, ids: Optional[Iterable[str]] = None) -> int:
        """Put dead letters (all, or those ``ids``) back in the backlog with fresh attempts."""
        if ids is not None:
            ids = [_check_name(entry_id, "dead letter id") for entry_id in ids]
            if not ids:
                return 0
        moved = self._cq_ask("requeue_dead()", lambda cluster: cluster._scripts.requeue(
            keys=[self._stream, self._dead_key], args=ids or []))
        self._wake.set()
        return int(moved)

    def health(self) -> Dict[str, Any]:
        report = super().health()
        report["queue"]["in_hand"] = len(self._in_hand)
        report["cluster"] = self._cq_stats()
        return report

    def _require_cluster(self):
        cluster = self._cluster or _cluster_active
        if cluster is None:
            raise RuntimeError("ClusterQueue %r needs a started Cluster: boot(..., cluster=...) "
                               "or Cluster(url).start() first" % self.name)
        if self._cluster is None:
            self._cq_keys(cluster)
        return cluster

    def _cq_ask(self, what, call):
        """``call(cluster)`` for a caller who waits for Redis's answer; ConnectionError when it cannot have one.

        Like an unreachable Redis at start(): the built-in ConnectionError,
        naming the queue, the call and the (masked) URL, never redis-py's
        own exception types, which the caller may not even import. It does
        not wait for a reconnect: the cluster keeps reconnecting by itself.
        """
        cluster = self._require_cluster()
        if cluster._connected.is_set():
            try:
                return call(cluster)
            except cluster._response_error:
                raise  # Redis answered: a bug or a foreign key, not a lost connection
            except cluster._redis_errors as exc:
                cluster._fault(exc)
        raise ConnectionError("ClusterQueue %r: %s needs Redis at %s, which cannot be reached now (%s); "
                              "the cluster reconnects by itself" % (self.name, what, cluster.url,
                                                                     cluster._redis_error))

    def _cq_keys(self, cluster):
        # One kind per key prefix: names may hold ':', so a suffix ('jobs' + ':dead') could
        # be another queue's name ('jobs:dead') and it would consume these dead letters.
        self._stream = cluster._key("queue", self.name)
        self._delayed_key = cluster._key("queue-delayed", self.name)
        self._dead_key = cluster._key("queue-dead", self.name)

    def _lifecycle_started(self):
        self._cluster = None  # restarted: the cluster running now, not the one of an earlier start
        cluster = self._require_cluster()
        self._cq_keys(cluster)
        try:
            self._cq_group(cluster)
        except cluster._redis_errors as exc:
            raise ConnectionError("ClusterQueue %r cannot reach Redis at %s: %s"
                                  % (self.name, cluster.url, exc)) from None
        self._cluster = cluster
        cluster._queues.append(self)
        self.add_cleanup(functools.partial(_cluster_drop, cluster._queues, self))
        self.on_start()
        # Fetched entries waiting for a worker: never more than the idle workers (plus
        # reclaimed ones), so unbounded; maxsize bounds the shared backlog instead.
        self.queue = gevent.queue.JoinableQueue()
        self._idle = self.worker_count
        self._workers = tuple(
            self.spawn(self._cq_work, label="%s.worker-%d" % (self.name, index))
            for index in range(self.worker_count))
        self._acker = self.supervise(self._cq_ack_loop)
        self._reader = self.supervise(self._cq_read)
        self.supervise(self._cq_housekeep)
        self.on_workers_started()

    def _lifecycle_stopping(self):
        try:
            self.on_workers_stopping()
        except Exception:
            self._record_error("on_workers_stopping")
        current = getcurrent()
        for task in (self._reader, self._acker):
            if task is not None and task is not current:
                self.cancel_greenlet(task)
        self._reader = self._acker = None
        while self.queue.qsize():
            self.queue.get_nowait()  # back to the backlog below, with the other unfinished ones
        own = self._handling.get(current)  # a worker stopping its own queue: its item is finished after
        deadline = _monotonic() + self.drain_timeout
        try:
            while any(worker is not current for worker in self._handling) and _monotonic() < deadline:
                gevent.sleep(0.005)
        finally:
            # Also when stop() itself is interrupted (a Timeout around it): what this node
            # holds goes back now, not after visibility_timeout on another node.
            for worker in self._workers:
                if worker is not current:
                    self.cancel_greenlet(worker)  # idle ones end at once; one past drain_timeout is interrupted
            self._cq_flush_acks()
            # Fetched but not started, or interrupted: back to the shared backlog at once, for the
            # other nodes; an interrupted attempt does not count against the item.
            self._cq_release([entry_id for entry_id in self._in_hand if entry_id != own])
            self._refresh_counters()
            self._workers = ()

    def _cq_group(self, cluster):
        try:
            cluster._redis.xgroup_create(self._stream, self.group, id="0", mkstream=True)
        except cluster._response_error as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    @_life_per_round
    def _cq_work(self):
        get, handle, handling = self.queue.get, self.handle_item, self._handling
        if self._specter_app is not None:  # a fresh app context per item, as QueueService does
            handle = functools.partial(_life_in_app_context, self._specter_app, handle)
        me = getcurrent()
        while True:
            entry_id, payload, deliveries = get()  # the worker ends when stop() kills it
            self._idle -= 1
            handling[me] = entry_id
            try:
                try:
                    item = _cluster_item(payload)
                except ValueError as exc:
                    # No node can ever handle it: buried at once, retrying cannot help.
                    self._cq_failed(entry_id, payload, deliveries, "not a JSON item: %s" % exc, retry=False)
                    continue
                handle(item)
            except _CALLBACK_ERRORS as exc:
                self._failed += 1
                self._record_error(me.name)
                self._cq_failed(entry_id, payload, deliveries, "%s: %s" % (type(exc).__name__, exc))
            else:
                self._processed += 1
                self._acks.append(entry_id)
                self._ack_ready.set()
                if self._status not in _ACTIVE:
                    self._cq_flush_acks()  # stopped by its own handler: nobody else will acknowledge it
            finally:
                handling.pop(me, None)
                self._idle += 1
                self._wake.set()

    def _cq_failed(self, entry_id, payload, deliveries, error, retry=True):
        if retry and deliveries < self.max_deliveries:
            delay = self.retry_backoff[min(deliveries, len(self.retry_backoff)) - 1]
            self._cq_settle(entry_id, payload, deliveries, error, int(delay * 1000))
            return
        self._cq_settle(entry_id, payload, deliveries, error, -1)
        try:
            self.on_dead_letter(_cluster_item(payload, raw=True), error, deliveries)
        except Exception:
            self._record_error("on_dead_letter")

    def _cq_settle(self, entry_id, payload, deliveries, error, delay):
        """Retry later (delay >= 0, milliseconds) or bury (delay < 0) one delivered entry."""
        cluster = self._cluster
        while True:
            try:
                settled = cluster._scripts.settle(
                    keys=[self._stream, self._delayed_key, self._dead_key],
                    args=[self.group, cluster.node_id, entry_id, payload, deliveries, error, delay])
                break
            except cluster._redis_errors as exc:
                cluster._fault(exc)
                if not cluster._await_connection(self.visibility_timeout):
                    return  # still down: the entry stays pending and is redelivered later
        self._in_hand.pop(entry_id, None)
        if not settled:
            self._cq_lost_claims([entry_id])
            return
        if delay < 0:
            self._dead_count += 1
        else:
            self._hk_wake.set()

    def _cq_read(self):
        cluster = self._cluster
        block = int(cluster.block * 1000)
        recover = True  # first our own pending entries: held before a reconnect or a restart
        while True:
            free = self._idle - self.queue.qsize()
            if free <= 0:
                self._wake.clear()
                self._wake.wait()
                continue
            if not cluster._connected.is_set():
                cluster._connected.wait()
                recover = True
                continue
            try:
                if recover:
                    self._cq_recover()
                    recover = False
                    continue
                reply = cluster._redis.xreadgroup(self.group, cluster.node_id, {self._stream: ">"},
                                                  count=free, block=block)
            except cluster._response_error as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._cq_group(cluster)  # Redis lost the queue (restarted without persistence): start over
                continue
            except cluster._redis_errors as exc:
                cluster._fault(exc)
                continue
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    self._cq_take(entry_id, fields, 1)

    def _cq_take(self, entry_id, fields, delivered):
        payload = (fields or {}).get("d")
        if payload is None:
            if fields:
                _cluster_log.error("%s: dropped entry %s, which has no item: %r", self.name, entry_id, fields)
            self._acks.append(entry_id)  # deleted while pending, or not an item: nothing to do
            self._ack_ready.set()
            return
        attempts = int(fields.get("a", 0)) if str(fields.get("a", "0")).isdigit() else 0
        self._in_hand[entry_id] = (payload, attempts)
        deliveries = attempts + delivered
        if deliveries > self.max_deliveries:
            self._cq_failed(entry_id, payload, deliveries - 1,
                            "delivered %d times without being acknowledged (its node died or stalled)"
                            % (deliveries - 1))
            return
        self.queue.put((entry_id, payload, deliveries))

    def _cq_recover(self):
        cluster = self._cluster
        start = "0"
        while True:
            reply = cluster._redis.xreadgroup(self.group, cluster.node_id, {self._stream: start}, count=100)
            entries = reply[0][1] if reply else []
            for entry_id, fields in entries:
                if entry_id not in self._in_hand:
                    self._cq_take(entry_id, fields, 1)
            if len(entries) < 100:
                return
            start = entries[-1][0]

    def _cq_ack_loop(self):
        while True:
            self._ack_ready.wait()
            self._ack_ready.clear()
            self._cq_flush_acks()

    def _cq_flush_acks(self):
        cluster = self._cluster
        while self._acks:
            ids, self._acks = self._acks, []
            try:
                stale = cluster._scripts.ack(keys=[self._stream], args=[self.group, cluster.node_id, *ids])
            except BaseException as exc:
                self._acks = ids + self._acks
                if not isinstance(exc, cluster._redis_errors):
                    raise  # killed mid-call: the ids wait for the next flush
                cluster._fault(exc)
                if self._status not in _ACTIVE or not cluster._await_connection(self.visibility_timeout):
                    return  # unacknowledged: redelivered later, which at-least-once allows
                continue
            for entry_id in ids:
                self._in_hand.pop(entry_id, None)
            if stale:
                self._cq_lost_claims(stale)

    def _cq_lost_claims(self, ids):
        """Items finished here after another node reclaimed them: say so, they may have run twice."""
        self._lost_claims += len(ids)
        _cluster_log.warning(
            "%s: %d item(s) finished here were no longer this node's: reclaimed by another node (this "
            "node was paused or stalled past visibility_timeout=%s s), so maybe handled twice, or lost "
            "by Redis; their owner, if any, settles them: %s",
            self.name, len(ids), self.visibility_timeout, ", ".join(ids[:10]))

    def _cq_release(self, ids):
        """Hand entries this node holds back to the shared backlog (their attempts unchanged)."""
        cluster = self._cluster
        args = [self.group, cluster.node_id]
        for entry_id in ids:
            payload, attempts = self._in_hand.pop(entry_id, (None, 0))
            if payload is not None:
                args += (entry_id, payload, attempts)
        if len(args) == 2 or not cluster._connected.is_set():
            return
        try:
            cluster._scripts.release(keys=[self._stream], args=args)
        except cluster._redis_errors as exc:
            cluster._fault(exc)  # they stay pending and are reclaimed after visibility_timeout

    def _cq_housekeep(self):
        """Move due retries into the stream, keep long claims alive, reclaim dead nodes' items."""
        cluster = self._cluster
        vt_ms = int(self.visibility_timeout * 1000)
        next_beat = _monotonic() + self.visibility_timeout / 3
        next_claim = _monotonic()
        next_stats = _monotonic()
        while True:
            wait = 0.25
            try:
                if cluster._connected.is_set():
                    due_in = cluster._scripts.promote(keys=[self._stream, self._delayed_key], args=[500])
                    if due_in is not None and int(due_in) >= 0:
                        wait = min(wait, int(due_in) / 1000.0)
                    now = _monotonic()
                    if now >= next_beat:
                        next_beat = now + self.visibility_timeout / 3
                        if self._in_hand:  # only those still ours: never take one back from its new owner
                            cluster._scripts.keep(keys=[self._stream],
                                                  args=[self.group, cluster.node_id, *self._in_hand])
                    if now >= next_claim:
                        next_claim = now + self.visibility_timeout / 2
                        self._cq_reclaim(vt_ms)
                    if now >= next_stats:
                        next_stats = now + 1.0
                        self._cq_refresh()
                else:
                    cluster._connected.wait()
                    continue
            except cluster._response_error as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._cq_group(cluster)
            except cluster._redis_errors as exc:
                cluster._fault(exc)
                continue
            self._hk_wake.clear()
            self._hk_wake.wait(max(wait, 0.001))

    def _cq_reclaim(self, vt_ms):
        cluster = self._cluster
        free = max(1, self._idle - self.queue.qsize())
        reply = cluster._redis.xautoclaim(self._stream, self.group, cluster.node_id, vt_ms, "0-0", count=free)
        claimed = [entry for entry in reply[1] if entry[1]] if reply else []
        if not claimed:
            return
        counts = {row["message_id"]: row["times_delivered"] for row in cluster._redis.xpending_range(
            self._stream, self.group, claimed[0][0], claimed[-1][0], len(claimed) + 100, cluster.node_id)}
        _cluster_log.info("%s: reclaimed %d item(s) idle for over %s s", self.name, len(claimed),
                          self.visibility_timeout)
        for entry_id, fields in claimed:
            self._cq_take(entry_id, fields, counts.get(entry_id, 2))

    def _cq_refresh(self):
        cluster = self._require_cluster()
        pipe = cluster._redis.pipeline(transaction=False)
        pipe.xlen(self._stream).xpending(self._stream, self.group).zcard(self._delayed_key).xlen(self._dead_key)
        length, pending, delayed, dead = pipe.execute(raise_on_error=False)
        for value in (length, delayed, dead):
            if isinstance(value, Exception):
                raise value
        pending = 0 if isinstance(pending, Exception) else pending["pending"]
        self._stats = {"backlog": max(0, length - pending), "pending": pending, "delayed": delayed, "dead": dead}

    def _cq_stats(self):
        return dict(self._stats, in_hand=len(self._in_hand), dead_here=self._dead_count,
                    lost_claims=self._lost_claims)


class Lease:
    """A cluster-wide lease: at most one holder at a time, with a fencing token.

    Acquired (``SET NX PX`` plus an ``INCR`` of the fencing counter, in one
    script) and renewed every ``ttl/3`` by its own greenlet. Validity is
    counted on this node's monotonic clock from the moment the acquire or
    renew was sent, minus a margin, so ``held`` turns False on time even
    when Redis cannot be reached or this process was paused. ``token`` grows
    every time anyone acquires the lease: pass it with side effects so a
    store can refuse a stale holder. Without a cluster the lease is held at
    once (one process is a cluster of one).
    """

    stop_timeout = 5.0

    def __init__(self, cluster: Optional[Cluster], name: str, ttl: float = 10.0):
        self.name = _check_name(name, "lease name")
        self.ttl = _check_seconds(ttl, "ttl", positive=True)
        if cluster is not None and not isinstance(cluster, Cluster):
            raise TypeError("cluster must be a Cluster or None, got %s" % _describe(cluster))
        self._cluster = cluster
        self._holder = "%s:%s" % (cluster.node_id if cluster else os.getpid(), os.urandom(6).hex())
        self._held = False
        self._token = None
        self._valid_until = -math.inf
        self._on_acquired: Tuple[Callable[..., Any], ...] = ()
        self._on_lost: Tuple[Callable[..., Any], ...] = ()
        self._loop: Optional[Greenlet] = None
        self._closed = False
        self._acquisitions = 0

    @property
    def held(self) -> bool:
        """True while this node holds the lease and its validity has not run out."""
        return self._held and _monotonic() < self._valid_until

    @property
    def token(self) -> Optional[int]:
        """The fencing token of the latest acquisition by this node, or None."""
        return self._token

    def remaining(self) -> float:
        """Seconds of validity left (0.0 when not held)."""
        return max(0.0, self._valid_until - _monotonic()) if self._held else 0.0

    def on_acquired(self, callback: Callable[..., Any]) -> Callable[[], bool]:
        """Call ``callback(lease)`` each time this node acquires the lease; returns an unsubscribe."""
        _check_callable(callback, "callback")
        self._on_acquired += (callback,)
        return functools.partial(_drop, self, "_on_acquired", callback)

    def on_lost(self, callback: Callable[..., Any]) -> Callable[[], bool]:
        """Call ``callback(lease)`` when a held lease is lost, expires or is released."""
        _check_callable(callback, "callback")
        self._on_lost += (callback,)
        return functools.partial(_drop, self, "_on_lost", callback)

    def start(self) -> Lease:
        """Begin acquiring and renewing; idempotent."""
        self._closed = False
        cluster = self._cluster
        if cluster is None:
            if not self._held:
                _cluster_local_tokens[self.name] += 1
                self._set_held(_cluster_local_tokens[self.name], math.inf)
            return self
        if self._loop is None or self._loop.dead:
            self._loop = gevent.spawn(self._run)
            self._loop.name = "lease:%s" % self.name
            if self not in cluster._leases:
                cluster._leases.append(self)
        return self

    def release(self) -> None:
        """Stop renewing and give the lease up now; on_lost runs if it was held."""
        self._closed = True
        loop, self._loop = self._loop, None
        if loop is not None and loop is not getcurrent():
            loop.kill(block=True, timeout=self.stop_timeout)
        cluster = self._cluster
        if cluster is not None:
            _cluster_drop(cluster._leases, self)
            if cluster._connected.is_set():
                try:
                    cluster._scripts.release_lease(keys=[cluster._key("lease", self.name)], args=[self._holder])
                except cluster._redis_errors as exc:
                    _cluster_log.warning("lease %s: release failed (it expires by itself): %s", self.name, exc)
        self._lose("released")

    stop = release

    def health(self) -> Dict[str, Any]:
        return {"name": self.name, "type": "lease", "held": self.held, "token": self._token,
                "remaining": self.remaining(), "acquisitions": self._acquisitions}

    def __repr__(self):
        return "<Lease %r %s>" % (self.name, "held" if self.held else "not held")

    def _run(self):
        cluster = self._cluster
        key, fence = cluster._key("lease", self.name), cluster._key("fence", self.name)  # never a lease's name
        ttl_ms = int(self.ttl * 1000)
        margin = self.ttl * 0.01 + 0.05
        while not self._closed:
            sent = _monotonic()
            try:
                if self._held:
                    if cluster._scripts.renew(keys=[key], args=[self._holder, ttl_ms]):
                        self._valid_until = sent + self.ttl - margin
                    else:
                        self._lose("taken over by another node")
                else:
                    token = cluster._scripts.acquire(keys=[key, fence], args=[self._holder, ttl_ms])
                    if token and not self._closed:
                        self._set_held(int(token), sent + self.ttl - margin)
            except cluster._redis_errors as exc:
                cluster._fault(exc)
            if self._held and _monotonic() >= self._valid_until:
                self._lose("expired while Redis could not be reached")
            # Renewals are scheduled on SPECTER's clock (a ManualClock drives them in a
            # test), but validity stays on the real monotonic clock: Redis expires the
            # key in real time, so a lease never claims more than Redis grants.
            _clock.sleep(self.ttl / 3)

    def _set_held(self, token, valid_until):
        self._token = token
        self._valid_until = valid_until
        self._held = True
        self._acquisitions += 1
        _cluster_log.debug("lease %s acquired (token %d)", self.name, token)
        for callback in self._on_acquired:
            try:
                callback(self)
            except Exception:
                _cluster_log.exception("lease %s: on_acquired callback %s raised", self.name, _callable_name(callback))

    def _lose(self, why):
        if not self._held:
            return
        self._held = False
        self._valid_until = -math.inf
        _cluster_log.debug("lease %s lost: %s", self.name, why)
        for callback in self._on_lost:
            try:
                callback(self)
            except Exception:
                _cluster_log.exception("lease %s: on_lost callback %s raised", self.name, _callable_name(callback))


class _ClusterBusLink:
    """What the bus calls for each emit while a cluster shares events."""

    __slots__ = ("prepare", "publish")

    def __init__(self, cluster):
        self.prepare = cluster._share_prepare
        self.publish = cluster._share_publish


class _ClusterScripts:
    """The Lua scripts of the cluster, registered once per connection pool.

    Each runs atomically in Redis; times come from Redis ``TIME``, never
    from a node's clock.
    """

    NOW = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) "

    NODES = NOW + """
    if ARGV[4] == '1' then
      redis.call('ZADD', KEYS[1], now, ARGV[1])
      redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
      local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - 10 * ARGV[3])
      for _, id in ipairs(gone) do redis.call('ZREM', KEYS[1], id) redis.call('HDEL', KEYS[2], id) end
    end
    local live = redis.call('ZRANGEBYSCORE', KEYS[1], now - ARGV[3], '+inf')
    local infos = {}
    if #live > 0 then infos = redis.call('HMGET', KEYS[2], unpack(live)) end
    return {tostring(now), infos}
    """

    EMIT = """
    for i = 3, #ARGV, 2 do
      local seq = redis.call('INCR', KEYS[2])
      redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'n', ARGV[2], 's', seq, 'e', ARGV[i], 'd', ARGV[i + 1])
    end
    return 1
    """

    ENQUEUE = """
    local limit = tonumber(ARGV[2])
    if limit > 0 and redis.call('XLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2]) >= limit then return 0 end
    if tonumber(ARGV[3]) > 0 then
    """ + NOW + """
      redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), cjson.encode({ARGV[4], 0, ARGV[1]}))
    else
      redis.call('XADD', KEYS[1], '*', 'd', ARGV[1], 'a', 0)
    end
    return 1
    """

    PROMOTE = NOW + """
    local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
    for _, member in ipairs(due) do
      local item = cjson.decode(member)
      redis.call('XADD', KEYS[1], '*', 'd', item[3], 'a', item[2])
      redis.call('ZREM', KEYS[2], member)
    end
    local nxt = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    if #nxt == 0 then return -1 end
    return math.max(0, tonumber(nxt[2]) - now)
    """

    # Whether the pending entry ``id`` is this node's (group ARGV[1], node ARGV[2]). A node
    # paused past visibility_timeout finds its item reclaimed by another: its late
    # acknowledgement, retry, hand-back or claim heartbeat must leave it to the new owner.
    OWNED = """
    local function owned(id)
      local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], id, id, 1)  -- an error: Redis lost the group
      return p.err == nil and #p > 0 and p[1][2] == ARGV[2]
    end
    """

    ACK = OWNED + """
    local stale = {}
    for i = 3, #ARGV do
      if owned(ARGV[i]) then
        redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
        redis.call('XDEL', KEYS[1], ARGV[i])
      else
        table.insert(stale, ARGV[i])
      end
    end
    return stale
    """

    KEEP = OWNED + """
    local stale = {}
    for i = 3, #ARGV do
      if owned(ARGV[i]) then redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
      else table.insert(stale, ARGV[i]) end
    end
    return stale
    """

    SETTLE = OWNED + """
    if not owned(ARGV[3]) then return 0 end
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
    redis.call('XDEL', KEYS[1], ARGV[3])
    if tonumber(ARGV[7]) < 0 then
      redis.call('XADD', KEYS[3], '*', 'd', ARGV[4], 'n', ARGV[5], 'error', ARGV[6], 'node', ARGV[2], 'id', ARGV[3])
    else
    """ + NOW + """
      redis.call('ZADD', KEYS[2], now + tonumber(ARGV[7]), cjson.encode({ARGV[3], tonumber(ARGV[5]), ARGV[4]}))
    end
    return 1
    """

    RELEASE = OWNED + """
    for i = 3, #ARGV, 3 do
      if owned(ARGV[i]) then
        redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
        redis.call('XDEL', KEYS[1], ARGV[i])
        redis.call('XADD', KEYS[1], '*', 'd', ARGV[i + 1], 'a', ARGV[i + 2])
      end
    end
    return 1
    """

    REQUEUE = """
    local entries
    if #ARGV == 0 then entries = redis.call('XRANGE', KEYS[2], '-', '+')
    else
      entries = {}
      for _, id in ipairs(ARGV) do
        local found = redis.call('XRANGE', KEYS[2], id, id)
        if #found > 0 then table.insert(entries, found[1]) end
      end
    end
    for _, entry in ipairs(entries) do
      local fields = entry[2]
      for i = 1, #fields, 2 do
        if fields[i] == 'd' then redis.call('XADD', KEYS[1], '*', 'd', fields[i + 1], 'a', 0) end
      end
      redis.call('XDEL', KEYS[2], entry[1])
    end
    return #entries
    """

    # A missing fence counter starts at Redis's time in microseconds (built as a string: Lua
    # would print so large a number in exponent form), not at 0: after Redis lost its data
    # the tokens still grow, and a store that saw an older holder's token refuses it still.
    ACQUIRE = """
    if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
      if redis.call('EXISTS', KEYS[2]) == 0 then
        local t = redis.call('TIME')
        redis.call('SET', KEYS[2], t[1] .. string.format('%06d', tonumber(t[2])))
      end
      return redis.call('INCR', KEYS[2])
    end
    return 0
    """

    RENEW = """
    if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
    return 0
    """

    RELEASE_LEASE = """
    if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
    return 0
    """

    def __init__(self, client, no_script):
        for name in ("nodes", "emit", "enqueue", "promote", "ack", "keep", "settle", "release", "requeue",
                     "acquire", "renew", "release_lease"):
            setattr(self, name, _ClusterScript(client, getattr(self, name.upper()), no_script))


class _ClusterScript:
    """One Lua script, called ``script(keys=[...], args=[...])``.

    A bare EVALSHA through the client: redis-py's Script wrapper costs a
    noticeable share of a lease renewal (an import, tuple copies and a type
    check per call). After a Redis restart forgot the script, it is loaded
    again once.
    """

    __slots__ = ("text", "sha", "execute", "no_script")

    def __init__(self, client, text, no_script):
        self.text = text
        self.sha = hashlib.sha1(text.encode("utf-8")).hexdigest()
        self.execute = client.execute_command
        self.no_script = no_script

    def __call__(self, keys, args):
        try:
            return self.execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except self.no_script:
            self.execute("SCRIPT LOAD", self.text)
            return self.execute("EVALSHA", self.sha, len(keys), *keys, *args)


def _cluster_import_redis():
    try:
        import redis
    except ImportError as exc:
        raise ImportError("the SPECTER cluster needs redis-py 5 or newer: "
                          'pip install "specter-runtime[redis]" (or pip install "redis>=5")') from exc
    return redis


def _cluster_client(redis, url, options, cluster):
    """A redis-py client whose connections never block the hub, patched or not."""
    kwargs = redis.connection.parse_url(url)
    base = kwargs.pop("connection_class", redis.connection.Connection)
    # 'surrogateescape': one entry that is not UTF-8 (written by another program) must not
    # make a whole reply undecodable, which would wedge the reader that fetched it for ever.
    kwargs.update(decode_responses=True, encoding_errors="surrogateescape", socket_timeout=cluster.socket_timeout,
                  socket_connect_timeout=cluster.connect_timeout, retry=None)
    kwargs.update(options)
    if not gevent.monkey.is_module_patched("select") and "parser_class" not in options:
        # hiredis's readiness check calls the real poll() and would freeze the hub.
        resp3 = str(kwargs.get("protocol", 2)) == "3"
        kwargs["parser_class"] = (getattr(redis.connection, "_RESP3Parser" if resp3 else "_RESP2Parser", None)
                                  or redis.connection.PythonParser)
    kwargs["connection_class"] = _cluster_connection_class(redis, base)
    pool = redis.ConnectionPool(**kwargs)
    client = redis.Redis(connection_pool=pool)
    cluster._response_error = redis.ResponseError
    return client


_cluster_classes: Dict[Any, Any] = {}


def _cluster_connection_class(redis, base):
    """``base`` with its socket made by gevent (``gevent.ssl`` for TLS), built once per class."""
    cls = _cluster_classes.get(base)
    if cls is not None:
        return cls
    connection = redis.connection

    class _GeventConnection(base):
        def _connect(self):
            if isinstance(self, connection.UnixDomainSocketConnection):
                sock = gevent.socket.socket(gevent.socket.AF_UNIX, gevent.socket.SOCK_STREAM)
                sock.settimeout(self.socket_connect_timeout)
                try:
                    sock.connect(self.path)
                except OSError:
                    sock.close()
                    raise
                sock.settimeout(self.socket_timeout)
                return sock
            sock = gevent.socket.create_connection((self.host, self.port), self.socket_connect_timeout)
            sock.setsockopt(gevent.socket.IPPROTO_TCP, gevent.socket.TCP_NODELAY, 1)
            if self.socket_keepalive:
                sock.setsockopt(gevent.socket.SOL_SOCKET, gevent.socket.SO_KEEPALIVE, 1)
            sock.settimeout(self.socket_timeout)
            if isinstance(self, connection.SSLConnection):
                try:
                    return _cluster_tls(self, sock)
                except OSError:
                    sock.close()
                    raise
            return sock

    _GeventConnection.__name__ = _GeventConnection.__qualname__ = "Gevent" + base.__name__
    _cluster_classes[base] = _GeventConnection
    return _GeventConnection


def _cluster_url(url):
    """The Redis URL given, or SPECTER_REDIS_URL's; checked, never logged unmasked."""
    if url is None:
        url = os.environ.get("SPECTER_REDIS_URL") or None
        if url is None:
            raise ValueError("Cluster needs a Redis URL: pass url='redis://host:6379/0' "
                             "or set the environment variable SPECTER_REDIS_URL")
    if not isinstance(url, str):
        raise TypeError("url must be a string like 'redis://host:6379/0', got %s" % _describe(url))
    url = url.strip()
    if url.partition("://")[0].lower() not in ("redis", "rediss", "unix") or "://" not in url:
        raise ValueError("url must start with redis://, rediss:// or unix://, got %r" % _cluster_mask(url))
    return url


def _cluster_tls(conn, sock):
    """``sock`` wrapped by ``gevent.ssl`` with the TLS settings of redis-py's SSLConnection ``conn``."""
    context = gevent.ssl.create_default_context()
    context.check_hostname = bool(conn.check_hostname)
    context.verify_mode = conn.cert_reqs
    if conn.certfile or conn.keyfile:
        context.load_cert_chain(certfile=conn.certfile, keyfile=conn.keyfile, password=conn.certificate_password)
    ca_data = getattr(conn, "ca_data", None)
    if conn.ca_certs is not None or conn.ca_path is not None or ca_data is not None:
        context.load_verify_locations(cafile=conn.ca_certs, capath=conn.ca_path, cadata=ca_data)
    if getattr(conn, "ssl_min_version", None) is not None:
        context.minimum_version = conn.ssl_min_version
    if getattr(conn, "ssl_ciphers", None):
        context.set_ciphers(conn.ssl_ciphers)
    return context.wrap_socket(sock, server_hostname=conn.host)


def _cluster_mask(url):
    """``url`` with the password (if any) replaced by ***."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def _cluster_json(value, what):
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError("%s must be JSON-serialisable (dicts, lists, strings, numbers, booleans, None): %s"
                        % (what, exc)) from None


def _cluster_item(payload, raw=False):
    """A queue item or shared event payload read from Redis; ValueError if it is not UTF-8 JSON.

    SPECTER writes ASCII JSON. Text another program wrote that was not
    UTF-8 arrives with surrogate escapes (see _cluster_client) and is
    refused here, like text that is not JSON. With ``raw``, such a payload
    is returned as its text instead (dead letters show what they hold).
    """
    try:
        if not payload.isascii():
            try:
                payload.encode("utf-8")
            except UnicodeEncodeError as exc:  # a surrogate escape stands for a byte that was not UTF-8
                raise ValueError("its bytes are not UTF-8 (byte 0x%02x at position %d)"
                                 % (ord(payload[exc.start]) - 0xDC00, exc.start)) from None
        return json.loads(payload)
    except ValueError:
        if raw:
            return payload
        raise


def _cluster_detach():
    global _cluster_active
    _cluster_active = None


def _cluster_drop(items, item):
    """Remove ``item`` (by identity) from the list ``items`` if present."""
    for index, entry in enumerate(items):
        if entry is item:
            del items[index]
            return True
    return False


def _cluster_lease(owner, cluster, name, ttl):
    """A started Lease owned by ``owner``; the owner's existing lease of that name if it has one."""
    name = _check_name(name, "lease name")
    for _, resource in owner._cleanups or ():
        if isinstance(resource, Lease) and resource.name == name and not resource._closed:
            return resource
    lease = Lease(cluster, name, ttl)
    owner.own(lease, "release")
    return lease.start()


def _cluster_service_lease(service, name, ttl):
    """Service.lease(): over the running cluster, or held at once without one."""
    return _cluster_lease(service, _cluster_active, name, ttl)


def _cluster_singleton_callback(service, callback, singleton):
    """Wrap an interval callback so only the node holding the lease ticks."""
    if isinstance(singleton, str):
        name = singleton
    elif singleton is True:
        name = "interval:%s:%s" % (service.name, _callable_name(callback))
    else:
        raise TypeError("singleton must be True, False or a lease name, got %s" % _describe(singleton))
    lease = _cluster_service_lease(service, name, service.singleton_ttl)

    @functools.wraps(callback)
    def tick():
        if lease.held:  # checked at each tick: a node paused past its lease does not tick again
            return callback()
        return None

    return tick


def _cluster_singleton_begin(service):
    """Service start of a singleton: True when it now waits in 'standby' for its lease."""
    cluster = _cluster_active
    if cluster is None:
        return False
    lease = Lease(cluster, "service:%s" % service.name, service.singleton_ttl)
    # In greenlets of their own, so a slow on_start or on_stop never delays a renewal.
    lease.on_acquired(lambda lease: gevent.spawn(_cluster_singleton_settle, service, lease))
    lease.on_lost(lambda lease: gevent.spawn(_cluster_singleton_settle, service, lease))
    service._singleton = lease
    service._status = "standby"
    lease.start()
    return True


def _cluster_singleton_settle(service, lease):
    """Bring a singleton service in line with its lease: run on_start when held, stop the work when not."""
    service._await_transition()
    while service._singleton is lease:
        if service._status == "standby" and lease.held:
            _cluster_singleton_promote(service, lease)
        elif service._status in ("running", "failed") and not lease.held:
            _cluster_singleton_demote(service, lease)
        else:
            return


def _cluster_singleton_promote(service, lease):
    """The lease is ours: run on_start, as start() would."""
    service._begin_transition("starting")
    service._stop_requested = False
    try:
        service.on_start()
    except BaseException:
        service._record_error("on_start")
        service._status = "stopping"
        try:
            service._release()
        finally:
            service._status = "standby"
            service._end_transition()
        lease.release()  # let another node try; this one tries again after its ttl
        lease.start()
        return
    if service._status == "starting":
        service._status = "running"
    service._end_transition()
    _service_log.info("%s: holds lease %s (token %s), running", service.name, lease.name, lease.token)
    if service._stop_requested:
        service.stop()


def _cluster_singleton_demote(service, lease):
    """The lease is gone: stop the work (on_stop, then release what it owns) and wait in standby."""
    service._begin_transition("stopping")
    try:
        try:
            service.on_stop()
        except Exception:
            service._record_error("on_stop")
    finally:
        try:
            service._release()
        finally:
            service._status = "standby"
            service._end_transition()
    _service_log.info("%s: lost lease %s, back to standby", service.name, lease.name)


def _cluster_singleton_end(service):
    """Service.stop() of a singleton: stop the work if it runs here, then give the lease up."""
    lease, service._singleton = service._singleton, None
    lease._closed = True  # no promotion or demotion may race this stop
    lease._on_acquired = lease._on_lost = ()
    if service._status == "standby":
        service._status = "stopped"
    else:
        service.stop()
    lease.release()


def _cluster_cache_register(cache):
    _cluster_caches.setdefault(cache.name, weakref.WeakSet()).add(cache)


def _cluster_cache_unregister(cache):
    caches = _cluster_caches.get(cache.name)
    if caches is not None:
        caches.discard(cache)
        if not caches:
            del _cluster_caches[cache.name]


def _cluster_cache_invalidated(cache):
    """A shared cache was invalidated here: tell the other nodes, unless this came from them."""
    cluster = _cluster_active
    if cluster is not None and cluster._applying is not getcurrent():
        cluster._publish_invalidation(cache.name)


def _cluster_boot(manager, cluster, socketio):
    """boot(cluster=...): the cluster is the first provider, so it starts first and stops last."""
    if isinstance(cluster, str):
        cluster = Cluster(cluster)
    elif not isinstance(cluster, Cluster):
        raise TypeError("cluster must be a Cluster or a Redis URL, got %s" % _describe(cluster))
    manager._add_providers({"cluster": cluster})
    client_manager = getattr(getattr(socketio, "server", None), "manager", None)
    if client_manager is not None and not callable(getattr(client_manager, "_publish", None)):
        # Only pub/sub managers (RedisManager, ours...) carry emits to the other nodes.
        _cluster_log.warning(
            "a cluster is configured but this SocketIO's client manager (%s) does not share emits "
            "between nodes; create it with SocketIO(app, client_manager=cluster.socketio_manager())",
            type(client_manager).__name__)
    return cluster


_cluster_sio_class = None


def _cluster_sio_listen(manager):
    """Messages of the manager's channel, for ever: resubscribes whenever the cluster reconnects."""
    cluster = manager.cluster
    while True:
        cluster._connected.wait()
        pubsub = cluster._redis.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(manager.channel)
            manager.listening = True
            while True:
                message = pubsub.get_message(timeout=cluster.block)
                if message is not None and message["type"] == "message":
                    manager.received += 1
                    yield message["data"]
        except cluster._redis_errors as exc:
            cluster._fault(exc)
        finally:
            manager.listening = False
            pubsub.close()


def _cluster_socketio_manager_class():
    global _cluster_sio_class
    if _cluster_sio_class is not None:
        return _cluster_sio_class
    import socketio

    class _ClusterSocketIOManager(socketio.PubSubManager):
        """Socket.IO emits published on a Redis channel over the cluster's own connections."""

        name = "specter-cluster"

        def __init__(self, cluster, channel):
            super().__init__(channel="%s:%s" % (cluster.namespace, channel))
            self.cluster = cluster
            self.published = 0
            self.received = 0
            self.dropped = 0
            self.listening = False

        def _publish(self, data):
            cluster = self.cluster
            if not cluster._connected.is_set():
                self.dropped += 1
                return
            try:
                cluster._redis.publish(self.channel, getattr(self, "json", json).dumps(data))
                self.published += 1
            except cluster._redis_errors as exc:
                self.dropped += 1
                cluster._fault(exc)

        def _listen(self):
            return _cluster_sio_listen(self)

        def health(self):
            return {"channel": self.channel, "listening": self.listening, "published": self.published,
                    "received": self.received, "dropped": self.dropped}

    _cluster_sio_class = _ClusterSocketIOManager
    return _cluster_sio_class


###############################################################################
# Testing ######################################################################
###############################################################################

# The leak checks in force, innermost last. Empty outside a leak_check(), so
# the real clock's call-outs cost one truth test of a global.
_testing_watches = ()
_testing_tracing = None  # (our tracer, the one it chains to) while checks run
_TESTING_MORTAL = ("greenlet", "process")  # leftovers that may still end on their own
_TESTING_SHOWN = 40  # leftovers listed in full; a count stands for the rest


class ManualClock:
    """A clock a test drives: inside ``with ManualClock() as clock:`` every SPECTER timer uses it.

    Intervals, timeouts, ``spawn_later``, supervision backoff, Watcher polls
    and backoff, Cache TTLs and lease renewals read ``now()`` and wait on this clock, whose
    time moves only when ``advance(seconds)`` moves it. ``advance`` runs the
    callbacks that fall due in due-time order (ties in the order they were
    scheduled), in the calling greenlet's turn; after each one it lets every
    greenlet that became ready run until it blocks again, so a tick that
    spawns, or sleeps on a SPECTER timer, is driven too, and a sleep that
    ends inside the advanced span wakes inside it. Real waits (sockets,
    child processes, a bare ``gevent.sleep``) are not driven. Time starts at
    ``start``; outside the ``with``, SPECTER is back on real time, and
    timers still pending on this clock stay with it (stop what the block
    started; ``leak_check`` reports what it left).
    """

    def __init__(self, start: float = 0.0):
        self._time = _check_seconds(start, "start")
        self._queue = []  # a heap of _TestingTimer; cancelled ones are skipped when popped
        self._order = itertools.count()
        self._saved = None
        self._advancing = False

    def now(self) -> float:
        """The clock's time in seconds: what SPECTER timers read instead of time.monotonic()."""
        return self._time

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, running what falls due on the way (see the class).

        Raises RuntimeError when called from the hub, or from a greenlet this
        advance() is driving.
        """
        seconds = _check_seconds(seconds, "seconds")
        if self._advancing:
            raise RuntimeError("ManualClock.advance() is already running; call it from the test, "
                               "not from a callback or greenlet it drives")
        if getcurrent() is gevent.get_hub():
            raise RuntimeError("ManualClock.advance() cannot run in the hub; call it from a greenlet")
        target = self._time + seconds
        queue = self._queue
        self._advancing = True
        try:
            gevent.idle()  # what is ready now (a service just started) runs before time moves
            while queue and queue[0].due <= target:
                timer = heapq.heappop(queue)
                callback = timer.callback
                if callback is None:
                    continue  # cancelled
                timer.callback = None
                self._time = timer.due
                callback()
                gevent.idle()
            self._time = target
        finally:
            self._advancing = False

    def call_later(self, seconds: float, callback: Callable[[], Any]) -> Any:
        """Run ``callback()`` when the clock reaches now + ``seconds``; ``close()`` on the result cancels it."""
        _check_callable(callback, "callback")
        timer = _TestingTimer(self._time + _check_seconds(seconds, "seconds"), next(self._order), callback)
        heapq.heappush(self._queue, timer)
        if _testing_watches:
            _testing_note_timer(timer, callback)
        return timer

    def start_later(self, glet: Greenlet, seconds: float) -> None:
        """Start the gevent greenlet ``glet`` after ``seconds`` of this clock; killing it cancels the start."""
        timer = self.call_later(seconds, glet.start)
        glet.rawlink(timer._cancel_for)
        if _testing_watches:
            _testing_note_greenlet(glet)

    def sleep(self, seconds: float) -> None:
        """Block the current greenlet until the clock has advanced ``seconds``."""
        if seconds <= 0:
            gevent.sleep(0)  # like gevent.sleep(0): a turn for the others, no time passes
            return
        woken = gevent.event.Event()
        timer = self.call_later(seconds, woken.set)
        try:
            woken.wait()
        finally:
            timer.close()  # killed while asleep: the wake-up must not stay pending

    def __enter__(self) -> ManualClock:
        global _clock, _now
        if self._saved is not None:
            raise RuntimeError("this ManualClock is already in force; enter a clock once at a time")
        self._saved = (_clock, _now)
        _clock, _now = self, self.now
        return self

    def __exit__(self, *exc_info: Any) -> None:
        global _clock, _now
        if self._saved is not None:
            _clock, _now = self._saved
            self._saved = None

    def __repr__(self):
        return "<ManualClock t=%r, %d pending>" % (self._time, len(self._pending()))

    def _pending(self):
        return sorted(timer for timer in self._queue if timer.callback is not None)


def isolated() -> contextlib.AbstractContextManager[None]:
    """Set aside the global ``bus`` listeners and ``registry`` entries for a block.

    The block starts with an empty bus and registry; when it ends, whatever
    it subscribed or provided is dropped and the originals are put back
    (a ``wait_for`` still pending inside gets RuntimeError). The contents
    move, not the objects: ``from specter import bus`` keeps working.
    Usable as ``with isolated():`` and as a decorator.
    """
    return _TestingIsolation()


def leak_check(grace: float = 1.0) -> contextlib.AbstractContextManager[None]:
    """A context manager that fails if the block leaves work behind.

    When the block ends it looks for what was created inside and is still
    there: live greenlets (started or scheduled), live child processes, bus
    listeners, registry keys, pending SPECTER timers and running services.
    Greenlets and processes get up to ``grace`` seconds of real time to end
    on their own (a greenlet that was killed may still be running its
    ``finally``); then AssertionError names each leftover. A block that
    raises is not checked: its own exception says more.
    """
    return _TestingWatch(_check_seconds(grace, "grace"))


class SpecterTestCase(unittest.TestCase):
    """A TestCase whose every test runs ``isolated()`` under ``leak_check()``.

    With the class attribute ``manual_clock = True``, ``self.clock`` is a
    ManualClock in force for the test. setUp enters them; they are left
    after tearDown and after every cleanup the test added, so a test that
    stops what it started in a cleanup passes, and a leak fails the test
    that made it. A subclass overriding setUp calls ``super().setUp()``
    first.
    """

    manual_clock = False
    clock: Optional[ManualClock] = None

    def setUp(self) -> None:
        super().setUp()
        stack = contextlib.ExitStack()
        self.addCleanup(stack.close)  # added first, so it runs after every other cleanup
        stack.enter_context(isolated())
        stack.enter_context(leak_check())
        if self.manual_clock:
            self.clock = stack.enter_context(ManualClock())


class _TestingTimer:
    """One callback scheduled on a ManualClock; ordered by due time, then by scheduling order."""

    __slots__ = ("due", "order", "callback")

    def __init__(self, due, order, callback):
        self.due = due
        self.order = order
        self.callback = callback

    @property
    def active(self):
        return self.callback is not None

    def close(self):
        self.callback = None

    stop = close  # the two names the hub's timer watchers answer to

    def _cancel_for(self, glet):
        self.close()

    def __lt__(self, other):
        return (self.due, self.order) < (other.due, other.order)

    def __repr__(self):
        return "<timer at %r: %s>" % (self.due, _testing_describe_timer(self.callback))


class _TestingIsolation(contextlib.ContextDecorator):
    def __enter__(self):
        self._listeners = dict(bus._listeners)
        self._entries = dict(registry._entries)
        self._waiters = dict(registry._waiters)
        bus._listeners.clear()
        registry._entries.clear()
        registry._waiters.clear()
        return None

    def __exit__(self, *exc_info):
        bus._listeners.clear()
        bus._listeners.update(self._listeners)
        registry._entries.clear()
        registry._entries.update(self._entries)
        waiters = dict(registry._waiters)
        registry._waiters.clear()
        registry._waiters.update(self._waiters)
        for key, waiter in waiters.items():
            waiter.set_exception(RuntimeError("the isolated() block ended while waiting for %r" % key))
        self._listeners = self._entries = self._waiters = None
        return False


class _TestingWatch:
    """One leak_check(): what existed when it began, and what was born while it ran."""

    def __init__(self, grace):
        self.grace = grace
        self.greenlets = []
        self.timers = []
        self.services = {}  # id -> service, in start order

    def __enter__(self):
        global _testing_watches, _testing_tracing
        # Greenlets are noted at their first switch: let those spawned before
        # the block take it now, outside.
        gevent.idle()
        self.listeners = {event: set(map(id, fns)) for event, fns in bus._listeners.items()}
        self.entries = dict(registry._entries)
        self.children = _testing_children()
        if not _testing_watches:
            previous = greenlet.gettrace()
            tracer = _testing_tracer(previous)
            greenlet.settrace(tracer)
            _testing_tracing = (tracer, previous)
        _testing_watches += (self,)
        return self

    def __exit__(self, exc_type, exc, tb):
        global _testing_watches, _testing_tracing
        try:
            if exc_type is None:
                gevent.idle()  # greenlets spawned at the very end get their first switch
                deadline = _monotonic() + self.grace
                leftovers = self.leftovers()
                # Only greenlets and processes end on their own; the rest may go with them.
                while any(kind in _TESTING_MORTAL for kind, _ in leftovers) and _monotonic() < deadline:
                    gevent.sleep(0.01)
                    leftovers = self.leftovers()
                if leftovers:
                    lines = [line for _, line in leftovers[:_TESTING_SHOWN]]
                    if len(leftovers) > _TESTING_SHOWN:
                        lines.append("... and %d more" % (len(leftovers) - _TESTING_SHOWN))
                    raise AssertionError("leak_check: %d leftover(s) created inside the block:\n  %s"
                                         % (len(leftovers), "\n  ".join(lines)))
        finally:
            _testing_watches = tuple(watch for watch in _testing_watches if watch is not self)
            if not _testing_watches and _testing_tracing is not None:
                tracer, previous = _testing_tracing
                _testing_tracing = None
                # A tracer set on top of ours since (gevent's monitor thread)
                # still calls ours: leave it, ours just passes events on.
                if greenlet.gettrace() is tracer:
                    greenlet.settrace(previous)
        return False

    def leftovers(self):
        """``(kind, line)`` per leftover, grouped by kind."""
        found = []
        hub = gevent.get_hub()
        found.extend(("greenlet", "greenlet %s" % _testing_describe_greenlet(glet))
                     for glet in {id(glet): glet for glet in self.greenlets}.values()
                     if glet is not hub and not glet.dead and glet is not getcurrent())
        found.extend(("process", "child process %d: %s" % (pid, _testing_command(pid)))
                     for pid in _testing_children() if pid not in self.children)
        for event, fns in bus._listeners.items():
            before = self.listeners.get(event, ())
            found.extend(("listener", "bus listener of %r: %s" % (event, _testing_describe_callable(fn)))
                         for fn in fns if id(fn) not in before)
        found.extend(("key", "registry key %r: %s" % (key, _describe(value)))
                     for key, value in registry._entries.items() if self.entries.get(key, _MISSING) is not value)
        found.extend(("timer", "pending timer: %s" % _testing_describe_timer(callback))
                     for handle, callback in self.timers if handle.active)
        found.extend(("service", "running service %r (%s)" % (service.name, service.status))
                     for service in self.services.values() if service.status not in ("created", "stopped"))
        return found


def _testing_tracer(previous):
    """A greenlet tracer noting each greenlet at its first switch, then calling ``previous``."""

    def trace(event, args):
        # Tracers run in the greenlet being switched to: one that has just
        # started has no Python frame below the tracers' own, one that
        # resumes has the frame it paused in.
        if event == "switch" and _testing_watches:
            below = sys._getframe().f_back
            if below is None or (greenlet.gettrace() is not trace and _testing_only_tracers(below)):
                _testing_note_greenlet(args[1])
        if previous is not None:
            previous(event, args)

    return trace


def _testing_only_tracers(frame):
    """True if ``frame`` and those below it belong to the tracer set over ours (it chains to ours)."""
    top = greenlet.gettrace()
    code = getattr(top, "__code__", None) or getattr(getattr(top, "__call__", None), "__code__", None)
    while frame.f_back is not None:
        frame = frame.f_back
    return frame.f_code is code


# greenlet's own answer: gevent's Greenlet redefines truth for its scheduling.
_greenlet_active = greenlet.greenlet.__bool__


def _testing_note_timer(handle, callback):
    for watch in _testing_watches:
        timers = watch.timers
        timers.append((handle, callback))
        if len(timers) % 256 == 0:
            timers[:] = [entry for entry in timers if entry[0].active]  # an interval re-arms every tick


def _testing_note_greenlet(glet):
    for watch in _testing_watches:
        greenlets = watch.greenlets
        greenlets.append(glet)
        if len(greenlets) % 256 == 0:
            greenlets[:] = [glet for glet in greenlets if not glet.dead]  # a server spawns one per request


def _testing_note_service(service):
    for watch in _testing_watches:
        watch.services.setdefault(id(service), service)


def _testing_describe_greenlet(glet):
    state = "not started yet" if not _greenlet_active(glet) else "running"
    run = getattr(glet, "_run", None)  # what a gevent Greenlet runs
    owner = getattr(run, "__self__", None)
    if isinstance(owner, Service):
        what = "of service %r" % owner.name  # the name is the label the service gave it
    elif run is not None:
        what = "running %s" % _testing_describe_callable(run)
    else:
        what = _describe(glet)
    name = getattr(glet, "name", None)
    return "%r %s (%s)" % (name, what, state) if name else "%s (%s)" % (what, state)


def _testing_describe_callable(fn):
    owner = getattr(fn, "__self__", None)
    if owner is None or inspect.ismodule(owner):
        return _callable_name(fn)
    return "%s of %s" % (_callable_name(fn), _clip(repr(owner), 60))


def _testing_describe_timer(callback):
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, _ServiceTimer):
        kind = "every %g s" % owner.period if owner.repeat else "after %g s" % owner.period
        return "%s of service %r (%s): %s" % (owner.id, owner.service.name, kind,
                                            _callable_name(owner.callback))
    if isinstance(owner, Greenlet):
        return "start of greenlet %r (spawn_later)" % owner.name
    if isinstance(owner, gevent.event.Event):
        return "the end of a sleep"
    return _callable_name(callback)


def _testing_children():
    """The pids of this process's live children (a set; empty without /proc)."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return set()  # no child at all: one system call instead of a /proc scan
    except (AttributeError, OSError):
        pass  # no waitid here: scan
    return set(_process_group_members(os.getpid(), parent=True) or ())


def _testing_command(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip() or "?"
    except OSError:
        return "(ended)"


###############################################################################
# Singletons ###################################################################
###############################################################################

bus = EventBus()
registry = SPECTERRegistry()
