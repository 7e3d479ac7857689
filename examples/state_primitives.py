"""State primitives: a flat Store, a nested Model with selectors, and Caches that cascade.

The example shows:

* ``Store``: ``set``, ``update`` (edit a draft, or return a replacement),
  ``delete`` (no notification when nothing was removed), ``subscribe`` and
  ``emit_events`` (a ``'jobs:changed'`` bus event after every change).
  ``create_store``/``create_model``/``create_cache`` return plain ``Store``,
  ``Model`` and ``Cache`` instances; the classes can be constructed directly
  or subclassed to add domain methods (a ``Tally(Store)`` here).
* ``Model``: paths (``'a.b.c'`` or a tuple), path and callable selectors
  that fire only when the selected value changes, ``patch``, ``update``,
  ``delete``, copies in and out, and commit-order notifications: a write
  made by a subscriber is delivered after the round that caused it, so
  every subscriber sees the changes in the order they were committed.
* ``Cache``: a TTL, ``get_or_compute`` with one computation shared by five
  greenlets (single flight), ``invalidate`` with ``on_invalidate``, a
  ``depends_on`` cascade (readings -> stats -> report) and a dependency
  cycle that terminates.

Run:  python examples/state_primitives.py [--once]
      (the demo ends by itself in well under a second; --once is accepted so
      every example can be run the same way)
"""

import argparse
import logging
import sys

import gevent

from specter import Cache, Model, Store, bus, create_cache, create_model, create_store


class Tally(Store):
    """A Store subclass: a domain method on top of update(); subscribers work as usual."""

    def bump(self, key, by=1):
        return self.update(lambda draft: draft.update({key: draft.get(key, 0) + by}))


def store_demo():
    print("== Store: flat shared state")
    jobs = create_store("jobs", {"queued": 0, "running": 0}, emit_events=True)
    print("create_store(...) returned a %s: isinstance(jobs, Store) -> %s"
          % (type(jobs).__name__, isinstance(jobs, Store)))
    jobs.subscribe(lambda snapshot, store: print("  subscriber: %s" % snapshot))
    stop_listening = bus.on("jobs:changed", lambda snapshot: print("  bus 'jobs:changed': %s" % snapshot))

    print("set({'queued': 3})")
    jobs.set({"queued": 3})
    print("update(draft -> one job starts)")
    jobs.update(lambda draft: draft.update(queued=draft["queued"] - 1, running=draft["running"] + 1))
    print("update(returns a replacement dict)")
    jobs.update(lambda draft: {"queued": 0, "running": 0, "done": 3})
    print("delete('done')")
    jobs.delete("done")
    print("delete('missing') -> nothing removed, nobody notified; returns %s" % jobs.delete("missing"))
    print("get('queued') -> %r; access(len) -> %r (an atomic read of the live dict)"
          % (jobs.get("queued"), jobs.access(len)))
    stop_listening()
    jobs.destroy()

    print("Tally(Store) constructed directly, with a bump() method of its own")
    outcomes = Tally("outcomes", {"ok": 0})
    outcomes.subscribe(lambda snapshot, store: print("  subscriber: %s" % snapshot))
    outcomes.bump("ok")
    outcomes.bump("failed")
    outcomes.bump("ok", by=2)
    assert isinstance(outcomes, Store) and outcomes.get() == {"ok": 3, "failed": 1}
    outcomes.destroy()


def model_demo():
    print("\n== Model: nested state, paths and selectors")
    fleet = create_model("fleet", {
        "sensors": {
            "greenhouse": {"celsius": 21.0, "online": True},
            "cellar": {"celsius": 12.5, "online": True},
        },
        "alerts": [],
    })
    print("create_model(...) returned a %s: isinstance(fleet, Model) -> %s"
          % (type(fleet).__name__, isinstance(fleet, Model)))

    def online(state):
        return sorted(name for name, sensor in state["sensors"].items() if sensor.get("online"))

    fleet.subscribe(lambda value, model: print("  [path selector] greenhouse celsius -> %s" % value),
                    selector="sensors.greenhouse.celsius")
    fleet.subscribe(lambda value, model: print("  [callable selector] online sensors -> %s" % value),
                    selector=online)

    print("set('sensors.greenhouse.celsius', 23.5)")
    fleet.set("sensors.greenhouse.celsius", 23.5)
    print("set('sensors.cellar.celsius', 12.9)  (neither selector changes: no call)")
    fleet.set("sensors.cellar.celsius", 12.9)
    print("set(('sensors', 'attic', 'celsius'), 30.1)  (creates the missing dicts)")
    fleet.set(("sensors", "attic", "celsius"), 30.1)
    print("update(draft -> the cellar goes offline)")
    fleet.update(lambda draft: draft["sensors"]["cellar"].update(online=False))
    print("patch({'site': 'north'})  (a shallow merge at the root)")
    fleet.patch({"site": "north"})
    print("delete('sensors.attic')")
    fleet.delete("sensors.attic")
    print("get('sensors.greenhouse') -> %s" % fleet.get("sensors.greenhouse"))
    print("select(callable) -> %s sensors; get('site') -> %r"
          % (fleet.select(lambda state: len(state["sensors"])), fleet.get("site")))

    copy = fleet.get("sensors")
    copy["greenhouse"]["celsius"] = -273.0
    print("mutating what get() returned changes nothing: %s" % fleet.get("sensors.greenhouse.celsius"))

    print("\n== Model: commit-order notifications")
    seen = []

    def raise_alert(celsius, model):
        # A subscriber that writes: its change is queued behind the current round.
        if celsius > 25:
            model.update(lambda draft: draft["alerts"].append("greenhouse at %s C" % celsius))

    fleet.subscribe(raise_alert, selector="sensors.greenhouse.celsius")
    fleet.subscribe(lambda state, model: seen.append(
        (state["sensors"]["greenhouse"]["celsius"], len(state["alerts"]))))
    fleet.set("sensors.greenhouse.celsius", 26.0)
    for celsius, alerts in seen:
        print("  whole-state subscriber saw: celsius=%s alerts=%d" % (celsius, alerts))
    print("  (first the temperature, then the alert it caused: the order of the commits)")
    assert seen == [(26.0, 0), (26.0, 1)]
    fleet.destroy()


def cache_demo():
    print("\n== Cache: TTL and single flight")
    calls = []

    def compute_forecast():
        calls.append(gevent.getcurrent())
        gevent.sleep(0.05)  # a slow upstream call
        return {"high": 24, "computation": len(calls)}

    forecast = create_cache("forecast", ttl=0.2)
    readers = [gevent.spawn(forecast.get_or_compute, compute_forecast) for _ in range(5)]
    gevent.joinall(readers)
    print("5 greenlets called get_or_compute at once: the factory ran %d time(s); all 5 got the "
          "same object: %s" % (len(calls), all(r.value is readers[0].value for r in readers)))
    print("get() -> %s, is_valid() -> %s" % (forecast.get(), forecast.is_valid()))
    gevent.sleep(0.25)
    print("after the 0.2 s TTL: is_valid() -> %s, get('expired') -> %r"
          % (forecast.is_valid(), forecast.get("expired")))
    print("get_or_compute again -> %s" % forecast.get_or_compute(compute_forecast))
    forecast.on_invalidate(lambda: print("  on_invalidate: forecast emptied"))
    forecast.invalidate()
    print("after invalidate(): get() -> %r" % forecast.get())

    lookups = []
    nothing = create_cache("nothing")
    for _ in range(3):
        nothing.get_or_compute(lambda: lookups.append(1))  # append returns None
    print("None is a value too: 3 get_or_compute calls, factory ran %d time(s)" % len(lookups))
    assert len(calls) == 2 and len(lookups) == 1

    print("\n== Cache: depends_on cascades readings -> stats -> report")
    readings = Cache("readings")  # the class itself: create_cache(...) is the same call
    stats = Cache("stats", depends_on=["readings:invalidated"])
    report = create_cache("report", depends_on=["stats:invalidated"])
    print("Cache(...) and create_cache(...) make the same kind of object: %s"
          % all(type(cache) is Cache for cache in (forecast, readings, stats, report)))
    order = []
    for cache in (readings, stats, report):
        cache.set("%s v1" % cache.name)
        cache.on_invalidate(lambda c=cache: order.append(c.name))
    readings.invalidate()
    print("readings.invalidate() emptied, in order: %s; all empty now: %s"
          % (order, not any(c.is_valid() for c in (readings, stats, report))))

    print("\n== Cache: a dependency cycle ping <-> pong terminates")
    ping = create_cache("ping", depends_on=["pong:invalidated"])
    pong = create_cache("pong", depends_on=["ping:invalidated"])
    counts = {"ping": 0, "pong": 0}
    for cache in (ping, pong):
        cache.on_invalidate(lambda c=cache: counts.__setitem__(c.name, counts[c.name] + 1))
    ping.invalidate()
    print("ping.invalidate() returned; invalidations per cache: %s" % counts)
    assert counts == {"ping": 1, "pong": 1}

    for cache in (forecast, nothing, readings, stats, report, ping, pong):
        cache.destroy()  # also drops its depends_on bus subscriptions
    print("caches destroyed; bus listeners left: %d" % bus.listener_count())


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
    store_demo()
    model_demo()
    cache_demo()


if __name__ == "__main__":
    main()
