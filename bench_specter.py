"""Benchmarks for specter.py against the simplest raw code doing the same work.

Run it from the repository root with the project's interpreter::

    python bench_specter.py                  # full run (15-30 s)
    python bench_specter.py --quick          # smoke run, under 30 s
    python bench_specter.py --only model     # workloads named *model*
    python bench_specter.py --json out.json  # also write the rows as JSON
    python bench_specter.py --list           # workload names
    python bench_specter.py --profile --only queue   # cProfile specter side

How it measures. Each workload is a pair of batch functions, the specter one
and a raw baseline doing the same work (same callbacks, same data, same
loop). Both run in this one process, interleaved: A, B, A, B ... for R
repeats (the order flips every repeat so slow drift hits both sides alike),
each repeat timing one batch of N operations with ``time.perf_counter``.
``gc.collect()`` runs before every workload and the collector is disabled
inside timed batches (``--gc`` leaves it on). Micro operations are
calibrated: after a warm-up batch, each side's N is set so one batch takes
about 20 ms (10 ms with --quick), i.e. tens of thousands of calls for a
50 ns op, so the timer's own cost is negligible and a slow side cannot
stall the run (the JSON records each side's N). The lifecycle and queue
workloads use a fixed N (40 start/stop cycles, 20,000 items). Nothing is
monkey patched.

How to read the table. ``specter`` and ``baseline`` are the median time per
operation over the R repeats (ns, µs or ms; bytes for memory rows).
``ratio`` is median(specter) / median(baseline) and ``target`` the ceiling
from the issue; ``result`` is PASS, ``over`` (ratio above target) or
``info`` (context rows without a target). ``noise`` is the larger of the two
sides' interquartile range as a percentage of its median: when it is large
the machine was busy and the ratio is soft; rerun before drawing
conclusions. Ratios below 1.0 mean specter did the work faster than the
baseline (usually because it skips work the baseline does blindly).

Memory rows run in fresh child processes (one per side, per measure,
per repeat), so the RSS of one side is not hidden by pages the other side
freed: ``tracemalloc`` delta and ``/proc/self/statm`` RSS delta are measured
in separate children, because tracemalloc's own bookkeeping would inflate
RSS.

Adding a workload: write a function ``fn(cfg) -> list[Row]`` decorated with
``@workload("name")``. Inside, build the state, define two batch functions
``spec(n)`` and ``base(n)`` that each perform n operations, and return
``[compare("row name", spec, base, n=..., cfg=cfg, target=...)]``; use
``measure()`` directly when a row needs more than two sides.

Exit status is 0 unless ``--strict`` is given and a row is over target,
leaks, or errors.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import logging
import math
import os
import pstats
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import gevent
import gevent.queue
import greenlet

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

specter = None  # imported lazily so --help and --list work without it

log = logging.getLogger("bench_specter")

# ---------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------


@dataclass
class Config:
    quick: bool = False
    repeats: int = 15
    gc_off: bool = True
    batch_s: float = 0.02       # calibrated batches aim at this duration
    profile: bool = False

    def pick(self, full, quick):
        """The full-run value, or the quick one under --quick."""
        return quick if self.quick else full


@dataclass
class Row:
    name: str
    specter: Optional[float] = None    # per-op value (ns, or `unit`)
    baseline: Optional[float] = None
    ratio: Optional[float] = None
    target: Optional[float] = None     # ratio ceiling; None = context row
    unit: str = "ns"                   # ns | B | count | %
    noise: Optional[float] = None      # max IQR / median over both sides, %
    paired: Optional[float] = None     # median of per-round ratios (JSON)
    n: Optional[dict] = None           # ops per timed batch, per side
    repeats: Optional[int] = None
    note: str = ""
    status: str = ""                   # PASS | over | info | LEAK | ERROR
    workload: str = ""                 # the registered workload it came from

    def finish(self) -> "Row":
        if self.status:
            return self
        if self.ratio is None or self.target is None:
            self.status = "info"
        else:
            self.status = "PASS" if self.ratio <= self.target else "over"
        return self


@dataclass
class Stats:
    per_op_ns: List[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.per_op_ns)

    @property
    def iqr_pct(self) -> float:
        xs = sorted(self.per_op_ns)
        if len(xs) < 4:
            return 100.0 * (xs[-1] - xs[0]) / max(self.median, 1e-9)
        q = statistics.quantiles(xs, n=4)
        return 100.0 * (q[2] - q[0]) / max(self.median, 1e-9)


_WORKLOADS: List[tuple] = []   # (name, fn, docstring summary), run order


def workload(name: str):
    """Register ``fn(cfg) -> list[Row]`` as ``name`` (what --only matches)."""
    def deco(fn):
        summary = " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split())
        _WORKLOADS.append((name, fn, summary))
        return fn
    return deco


def _timed(fn: Callable[[int], object], n: int, gc_off: bool) -> float:
    if gc_off:
        gc.disable()
    try:
        t0 = time.perf_counter()
        fn(n)
        return time.perf_counter() - t0
    finally:
        if gc_off:
            gc.enable()


def measure(sides: Dict[str, Callable[[int], object]], n: int, cfg: Config,
            *, calibrate: bool = True, profile: tuple = ()) -> tuple:
    """Time every side's batch function interleaved.

    Returns ({side: Stats}, {side: ops per batch}). Each side first runs one
    untimed warm-up batch. Without ``calibrate`` every batch is n ops. With
    it the warm-up is n // 10 ops and sizes that side's batches (even,
    >= 2 ops) to take about cfg.batch_s, so fast ops are timed over many
    thousands of calls and a slow side cannot stall the run. Then
    cfg.repeats rounds; each round runs every side once, in an order
    reversed on odd rounds. Sides named in ``profile`` are run once more
    under cProfile when cfg.profile is set.
    """
    names = list(sides)
    ns = {}
    for name in names:
        if not calibrate:
            _timed(sides[name], n, cfg.gc_off)
            ns[name] = n
            continue
        warm = max(2, n // 10)
        per_op = _timed(sides[name], warm, cfg.gc_off) / warm
        side_n = int(cfg.batch_s / max(per_op, 1e-9))
        # even batches keep alternating-value workloads in phase
        ns[name] = max(2, min(side_n - side_n % 2, 2_000_000))
    stats = {name: Stats() for name in names}
    for r in range(cfg.repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            dt = _timed(sides[name], ns[name], cfg.gc_off)
            stats[name].per_op_ns.append(dt * 1e9 / ns[name])
    if cfg.profile:
        for name in profile:
            _profile(name, sides[name], ns[name])
    return stats, ns


def compare(name: str, spec: Callable[[int], object],
            base: Callable[[int], object], *, n: int, cfg: Config,
            target: Optional[float], note: str = "",
            calibrate: bool = True) -> Row:
    """One row: specter batch vs baseline batch, interleaved."""
    stats, ns = measure({"specter": spec, "baseline": base}, n, cfg,
                        calibrate=calibrate, profile=("specter",))
    s, b = stats["specter"], stats["baseline"]
    paired = statistics.median(
        x / y for x, y in zip(s.per_op_ns, b.per_op_ns))
    return Row(name, s.median, b.median, s.median / b.median, target,
               noise=max(s.iqr_pct, b.iqr_pct), paired=paired, n=ns,
               repeats=cfg.repeats, note=note)


def _profile(label: str, fn: Callable[[int], object], n: int) -> None:
    prof = cProfile.Profile()
    prof.enable()
    fn(n)
    prof.disable()
    out = io.StringIO()
    st = pstats.Stats(prof, stream=out)
    st.sort_stats("tottime").print_stats(14)
    print("\n--- cProfile: %s, %d ops (by tottime) ---" % (label, n))
    text = out.getvalue()
    start = text.find("   ncalls")
    print(text[start:] if start >= 0 else text)


# ---------------------------------------------------------------------------
# Shared fixtures
# ---------------------------------------------------------------------------

def _make_listeners(count: int) -> list:
    """``count`` distinct trivial callables (a bus keeps one registration per
    callable, so they must be distinct objects)."""
    def make(i):
        def listener(*args):
            return None
        listener.__name__ = "listener_%d" % i
        return listener
    return [make(i) for i in range(count)]


def _tree(leaves: int) -> dict:
    """A realistic nested state with ``leaves`` scalar leaves: 'a.b.c' plus
    the rest spread over about sqrt(leaves) groups, so the root stays narrow
    (two keys) and the written path is three dicts deep."""
    extra = leaves - 1
    groups = max(1, round(math.sqrt(extra)))
    tree = {"a": {"b": {"c": 1}}, "groups": {}}
    for i in range(extra):
        tree["groups"].setdefault("g%d" % (i % groups), {})["i%d" % i] = i
    return tree


def _count_leaves(node) -> int:
    if isinstance(node, dict):
        return sum(_count_leaves(v) for v in node.values())
    return 1


# ---------------------------------------------------------------------------
# Workloads (issue #2)
# ---------------------------------------------------------------------------

@workload("bus.emit")
def bench_bus_emit(cfg: Config) -> List[Row]:
    """emit to 10 listeners vs a loop calling them inside try/except."""
    bus = specter.EventBus()
    listeners = _make_listeners(10)
    for cb in listeners:
        bus.on("tick", cb)
    emit = bus.emit
    payload = {"seq": 1}

    def spec(n):
        for _ in range(n):
            emit("tick", payload)

    def base(n):
        for _ in range(n):
            for cb in listeners:
                try:
                    cb(payload)
                except Exception:
                    log.exception("listener failed")

    return [compare("bus.emit -> 10 listeners", spec, base,
                    n=cfg.pick(10000, 5000), cfg=cfg, target=1.3)]


@workload("bus.emit.empty")
def bench_bus_emit_empty(cfg: Config) -> List[Row]:
    """emit of an event nobody listens to vs the dict lookup that finds no
    listeners (issue #14: an idle event must cost next to nothing)."""
    bus = specter.EventBus()
    for cb in _make_listeners(10):
        bus.on("tick", cb)   # other events exist; this one has no listeners
    raw = {"tick": ()}
    emit, get = bus.emit, raw.get
    payload = {"seq": 1}

    def spec(n):
        for _ in range(n):
            emit("idle", payload)

    def base(n):
        for _ in range(n):
            get("idle")

    return [compare("bus.emit, no listeners", spec, base,
                    n=cfg.pick(20000, 10000), cfg=cfg, target=2.0,
                    note="baseline: dict.get of the event name")]


@workload("store.set")
def bench_store_set(cfg: Config) -> List[Row]:
    """Store.set of a 1-key partial, 10 keys, 10 subscribers vs dict.update
    + one shallow copy + 10 callbacks."""
    initial = {"k%d" % i: i for i in range(10)}
    store = specter.create_store("bench.store.set", dict(initial))
    subs = _make_listeners(10)
    for cb in subs:
        store.subscribe(cb)
    sset = store.set

    state = dict(initial)

    def spec(n):
        for i in range(n):
            sset({"k0": i})

    def base(n):
        for i in range(n):
            state.update({"k0": i})
            snap = dict(state)
            for cb in subs:
                try:
                    cb(snap, store)
                except Exception:
                    log.exception("subscriber failed")

    return [compare("Store.set 1 key, 10 subs", spec, base,
                    n=cfg.pick(10000, 4000), cfg=cfg, target=1.5)]


@workload("model.set")
def bench_model_set(cfg: Config) -> List[Row]:
    """Model.set('a.b.c') with one path-selector subscriber at 10 / 1k / 10k
    leaves; the target is the 10k/10 scaling."""
    sizes = (10, 1000, 10000)
    values = (0, 1)   # the tree starts at c=1; even batches stay in phase
    sides = {}
    sets = {}    # size -> [sets made, notifications received]
    for size in sizes:
        tree = _tree(size)
        assert _count_leaves(tree) == size
        m = specter.create_model("bench.model.%d" % size, tree)
        tally = sets[size] = [0, 0]

        def selected(value, model, tally=tally):
            tally[1] += 1
        m.subscribe(selected, selector="a.b.c")

        def spec(n, mset=m.set, tally=tally):
            for i in range(n):
                mset("a.b.c", values[i & 1])
            tally[0] += n
        sides[str(size)] = spec

    raw = _tree(10)
    raw_calls = [0]

    def raw_sub(value, model):
        raw_calls[0] += 1

    def base(n):
        for i in range(n):
            v = values[i & 1]
            raw["a"]["b"]["c"] = v
            raw_sub(v, None)
    sides["raw"] = base

    stats, ns = measure(sides, cfg.pick(4000, 2000), cfg,
                       profile=("10000",))
    raw_ns = stats["raw"].median
    rows = []
    for size in sizes:
        s = stats[str(size)]
        rows.append(Row("Model.set @ %s leaves (vs raw)" % format(size, ","),
                        s.median, raw_ns, s.median / raw_ns, None,
                        noise=max(s.iqr_pct, stats["raw"].iqr_pct),
                        n={"specter": ns[str(size)], "baseline": ns["raw"]},
                        repeats=cfg.repeats,
                        note="" if rows else "context rows; raw = "
                        "d['a']['b']['c'] = v plus the subscriber call"))
    missed = ["%d leaves: %d sets, %d notifications" % (size, *sets[size])
              for size in sizes if sets[size][0] != sets[size][1]]
    if missed:   # every set must be a real change seen by the subscriber
        rows[0].note += "; NOT EVERY SET NOTIFIED: " + ", ".join(missed)
        rows[0].status = "ERROR"
    big, small = stats["10000"], stats["10"]
    rows.append(Row("Model.set scaling 10k / 10 leaves", big.median,
                    small.median, big.median / small.median, 3.0,
                    noise=max(big.iqr_pct, small.iqr_pct),
                    n={"specter": ns["10000"], "baseline": ns["10"]},
                    repeats=cfg.repeats,
                    note="baseline column = the 10-leaf model"))
    return rows


# -- schema ----------------------------------------------------------------

_SCHEMA_PAYLOAD = {
    "id": "42",                # int from a string
    "price": 7,                # float from an int
    "active": "yes",           # bool from a word
    "name": "Widget",          # str, required, length bounds
    "role": "editor",          # str choices
    "qty": 17,                 # int with min/max
    "tags": ["a", "b", "c"],   # list of str
    "ratio": "0.25",           # float from a string with min/max
    "priority": "2",           # int from a string, then choices
    # "limit" absent: optional with a default
}

_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False,
               "on": True, "off": False, "1": True, "0": False}


def _raw_int(v):
    if isinstance(v, bool):
        raise TypeError("bool is not an integer")
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if v.is_integer():
            return int(v)
        raise ValueError("not integral")
    if isinstance(v, str):
        return int(v.strip())
    raise TypeError("not an integer")


def _raw_float(v):
    if isinstance(v, bool):
        raise TypeError("bool is not a number")
    if isinstance(v, (int, float)):
        f = float(v)
    elif isinstance(v, str):
        f = float(v.strip())
    else:
        raise TypeError("not a number")
    if not math.isfinite(f):
        raise ValueError("not finite")
    return f


def _raw_bool(v):
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str):
        word = _BOOL_WORDS.get(v.strip().lower())
        if word is not None:
            return word
    raise ValueError("not a boolean")


def _raw_str(v):
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    raise TypeError("not a string")


_COERCE_ERRORS = (ValueError, TypeError, OverflowError)


def _raw_validate(data):
    """Hand-written equivalent of the benchmark schema: returns
    (cleaned, errors)."""
    if not isinstance(data, dict):
        return None, {"": "must be an object"}
    out = {}
    errors = {}

    v = data.get("id")
    if v is None:
        errors["id"] = "is required"
    else:
        try:
            v = _raw_int(v)
        except _COERCE_ERRORS:
            errors["id"] = "must be an integer"
        else:
            if v < 1:
                errors["id"] = "must be >= 1"
            else:
                out["id"] = v

    v = data.get("price")
    if v is None:
        errors["price"] = "is required"
    else:
        try:
            v = _raw_float(v)
        except _COERCE_ERRORS:
            errors["price"] = "must be a number"
        else:
            if v < 0.0:
                errors["price"] = "must be >= 0"
            else:
                out["price"] = v

    v = data.get("active")
    if v is None:
        out["active"] = False
    else:
        try:
            out["active"] = _raw_bool(v)
        except _COERCE_ERRORS:
            errors["active"] = "must be a boolean"

    v = data.get("name")
    if v is None:
        errors["name"] = "is required"
    else:
        try:
            v = _raw_str(v)
        except _COERCE_ERRORS:
            errors["name"] = "must be a string"
        else:
            if not 1 <= len(v) <= 80:
                errors["name"] = "length must be 1..80"
            else:
                out["name"] = v

    v = data.get("role")
    if v is None:
        out["role"] = "viewer"
    else:
        try:
            v = _raw_str(v)
        except _COERCE_ERRORS:
            errors["role"] = "must be a string"
        else:
            if v not in ("admin", "editor", "viewer"):
                errors["role"] = "must be one of admin, editor, viewer"
            else:
                out["role"] = v

    v = data.get("qty")
    if v is None:
        out["qty"] = 0
    else:
        try:
            v = _raw_int(v)
        except _COERCE_ERRORS:
            errors["qty"] = "must be an integer"
        else:
            if not 0 <= v <= 1000:
                errors["qty"] = "must be 0..1000"
            else:
                out["qty"] = v

    v = data.get("tags")
    if v is None:
        out["tags"] = []
    elif not isinstance(v, list):
        errors["tags"] = "must be a list"
    else:
        tags = []
        for i, item in enumerate(v):
            try:
                tags.append(_raw_str(item))
            except _COERCE_ERRORS:
                errors["tags[%d]" % i] = "must be a string"
        out["tags"] = tags

    v = data.get("ratio")
    if v is None:
        errors["ratio"] = "is required"
    else:
        try:
            v = _raw_float(v)
        except _COERCE_ERRORS:
            errors["ratio"] = "must be a number"
        else:
            if not 0.0 <= v <= 1.0:
                errors["ratio"] = "must be 0..1"
            else:
                out["ratio"] = v

    v = data.get("priority")
    if v is None:
        out["priority"] = 2
    else:
        try:
            v = _raw_int(v)
        except _COERCE_ERRORS:
            errors["priority"] = "must be an integer"
        else:
            if v not in (1, 2, 3):
                errors["priority"] = "must be one of 1, 2, 3"
            else:
                out["priority"] = v

    v = data.get("limit")
    if v is None:
        out["limit"] = 20
    else:
        try:
            v = _raw_int(v)
        except _COERCE_ERRORS:
            errors["limit"] = "must be an integer"
        else:
            if not 1 <= v <= 100:
                errors["limit"] = "must be 1..100"
            else:
                out["limit"] = v

    return (None if errors else out), errors


def _pydantic_adapter():
    """pydantic 2's TypeAdapter for a TypedDict matching the bench schema,
    or None when pydantic 2 is not installed (it is context, not a
    dependency). Same constraints and defaults; ``priority`` in 1..3 stands
    for choices [1, 2, 3], since Literal[1, 2, 3] would refuse the string
    "2" that the payload sends."""
    try:
        import pydantic
        from typing import List as TList, Literal
        from typing_extensions import Annotated, NotRequired, TypedDict
    except ImportError:
        return None
    if not pydantic.VERSION.startswith("2."):
        return None
    P = pydantic.Field

    class Bench(TypedDict):
        id: Annotated[int, P(ge=1)]
        price: Annotated[float, P(ge=0.0)]
        active: NotRequired[Annotated[bool, P(default=False)]]
        name: Annotated[str, P(min_length=1, max_length=80)]
        role: NotRequired[Annotated[Literal["admin", "editor", "viewer"],
                                    P(default="viewer")]]
        qty: NotRequired[Annotated[int, P(ge=0, le=1000, default=0)]]
        tags: NotRequired[Annotated[TList[str], P(default_factory=list)]]
        ratio: Annotated[float, P(ge=0.0, le=1.0)]
        priority: NotRequired[Annotated[int, P(ge=1, le=3, default=2)]]
        limit: NotRequired[Annotated[int, P(ge=1, le=100, default=20)]]

    return pydantic.TypeAdapter(Bench), pydantic.VERSION


@workload("schema.validate")
def bench_schema(cfg: Config) -> List[Row]:
    """Schema.validate of a 10-field payload vs a hand-written coercion, and
    beside pydantic 2's TypeAdapter(TypedDict) when pydantic is installed."""
    F = specter.Field
    schema = specter.Schema("bench", {
        "id": F(int, required=True, min=1),
        "price": F(float, required=True, min=0.0),
        "active": F(bool, default=False),
        "name": F(str, required=True, min_length=1, max_length=80),
        "role": F(str, choices=["admin", "editor", "viewer"],
                  default="viewer"),
        "qty": F(int, min=0, max=1000, default=0),
        "tags": F(list, items=F(str), default=list),
        "ratio": F(float, required=True, min=0.0, max=1.0),
        "priority": F(int, choices=[1, 2, 3], default=2),
        "limit": F(int, min=1, max=100, default=20),
    })
    payload = _SCHEMA_PAYLOAD
    got = schema.validate(payload)
    want, _ = _raw_validate(payload)
    note = ""
    same = (got.ok and got.value == want
            and all(type(got.value[k]) is type(want[k]) for k in want))
    if not same:
        note = "cleaned dicts DIFFER: %r vs %r" % (
            got.value if got.ok else got.error, want)
    validate = schema.validate

    def spec(n):
        for _ in range(n):
            validate(payload)

    def base(n):
        for _ in range(n):
            _raw_validate(payload)

    sides = {"specter": spec, "baseline": base}
    adapter = _pydantic_adapter()
    if adapter is not None:
        adapter, version = adapter
        pyd_validate = adapter.validate_python
        pyd_note = "baseline column = pydantic %s" % version
        if pyd_validate(payload) != want:
            pyd_note += "; pydantic's result DIFFERS: %r" % (
                pyd_validate(payload),)

        def pyd(n):
            for _ in range(n):
                pyd_validate(payload)
        sides["pydantic"] = pyd
    stats, ns = measure(sides, cfg.pick(4000, 2000), cfg,
                        profile=("specter",))
    rows = []
    for other, label, target, row_note in (
            ("baseline", "Schema.validate 10 fields", 1.3, note),
            ("pydantic", "Schema.validate vs pydantic TypedDict", 2.0,
             adapter is not None and pyd_note)):
        if other not in stats:
            continue
        s, b = stats["specter"], stats[other]
        rows.append(Row(
            label, s.median, b.median, s.median / b.median, target,
            noise=max(s.iqr_pct, b.iqr_pct),
            paired=statistics.median(
                x / y for x, y in zip(s.per_op_ns, b.per_op_ns)),
            n={"specter": ns["specter"], "baseline": ns[other]},
            repeats=cfg.repeats, note=row_note or ""))
    return rows


# -- lifecycle -------------------------------------------------------------

def _noop(*args):
    return None


@workload("service.lifecycle")
def bench_service_lifecycle(cfg: Config) -> List[Row]:
    """start()+stop() of a Service with 10 intervals, 10 sleepers, 10
    listeners vs 20 raw greenlets + 10 bus.on/unsubscribe + killall."""
    events = ["bench.life.%d" % i for i in range(10)]

    class LifeService(specter.Service):
        def on_start(self):
            for _ in range(10):
                self.interval(_noop, 60.0)
            for _ in range(10):
                self.spawn(gevent.sleep, 60)
            for ev in events:
                self.listen(ev, _noop)

    svc = LifeService().start()
    counts = svc.health()["counts"]
    svc.stop()
    sanity = "" if (counts["tasks"], counts["intervals"],
                    counts["listeners"]) == (10, 10, 10) else \
        "; on_start did not acquire 10/10/10: %r" % counts
    the_bus = specter.bus
    base_events = ["bench.life.base.%d" % i for i in range(10)]

    def ticker():
        while True:
            gevent.sleep(60.0)
            _noop()

    def spec(n):
        for _ in range(n):
            svc.start()
            gevent.sleep(0)   # let the greenlets start and park
            svc.stop()

    def base(n):
        spawn = gevent.spawn
        for _ in range(n):
            glets = [spawn(ticker) for _ in range(10)]
            glets += [spawn(gevent.sleep, 60) for _ in range(10)]
            unsubs = [the_bus.on(ev, _noop) for ev in base_events]
            gevent.sleep(0)
            for unsub in unsubs:
                unsub()
            gevent.killall(glets, block=True)

    row = compare("Service start+stop (10 iv/10 gl/10 ls)", spec, base,
                  n=cfg.pick(40, 20), cfg=cfg, target=2.0, calibrate=False,
                  note="one sleep(0) between start and stop on both sides"
                       + sanity)
    if sanity:
        row.status = "ERROR"
    svc.stop()
    return [row]


@workload("queue.throughput")
def bench_queue(cfg: Config) -> List[Row]:
    """QueueService, 4 workers, 20,000 trivial items: enqueue all + join()
    vs a bare JoinableQueue with 4 get/handle/task_done greenlets."""
    items = 20000

    class CountQueue(specter.QueueService):
        count = 0

        def handle_item(self, item):
            self.count += 1

    svc = CountQueue("bench.queue", worker_count=4).start()
    enqueue, join = svc.enqueue, svc.join

    q = gevent.queue.JoinableQueue()
    counter = [0]

    def handle(item):
        counter[0] += 1

    def worker():
        while True:
            item = q.get()
            try:
                handle(item)
            except Exception:
                log.exception("item failed")
            finally:
                q.task_done()
    workers = [gevent.spawn(worker) for _ in range(4)]
    put, qjoin = q.put, q.join

    sent = {"specter": 0, "baseline": 0}

    def spec(n):
        for i in range(n):
            enqueue(i)
        join()
        sent["specter"] += n

    def base(n):
        for i in range(n):
            put(i)
        qjoin()
        sent["baseline"] += n

    try:
        row = compare("QueueService 4 workers, per item", spec, base,
                      n=items, cfg=cfg, target=1.25, calibrate=False,
                      note="%s items per batch; start/stop outside timing; what"
                           " remains is the enqueue() frame (bool result, refusal"
                           " when stopped) around the same C put()"
                           % format(items, ","))
        if svc.count != sent["specter"] or counter[0] != sent["baseline"]:
            row.note += "; ITEMS LOST: specter %d/%d, raw %d/%d" % (
                svc.count, sent["specter"], counter[0], sent["baseline"])
            row.status = "ERROR"
    finally:
        svc.stop()
        gevent.killall(workers, block=True)
    return [row]


# -- lookups ---------------------------------------------------------------

@workload("registry.resolve")
def bench_registry_resolve(cfg: Config) -> List[Row]:
    """registry.resolve(key) vs dict.get(key)."""
    reg = specter.SPECTERRegistry()
    raw = {}
    for i in range(20):
        reg.provide("svc%d" % i, i)
        raw["svc%d" % i] = i
    resolve, get = reg.resolve, raw.get

    def spec(n):
        for _ in range(n):
            resolve("svc7")

    def base(n):
        for _ in range(n):
            get("svc7")

    return [compare("registry.resolve", spec, base, n=cfg.pick(20000, 10000),
                    cfg=cfg, target=3.0)]


@workload("cache.get_or_compute")
def bench_cache_hit(cfg: Config) -> List[Row]:
    """Cache.get_or_compute hit (ttl 60 s) vs dict lookup + monotonic
    expiry check."""
    cache = specter.create_cache("bench.cache", ttl=60.0)

    def factory():
        return {"answer": 42}

    cache.get_or_compute(factory)
    goc = cache.get_or_compute
    monotonic = time.monotonic
    raw = {"bench.cache": (factory(), monotonic() + 60.0)}

    def spec(n):
        for _ in range(n):
            goc(factory)

    def base(n):
        for _ in range(n):
            entry = raw.get("bench.cache")
            if entry is not None and monotonic() < entry[1]:
                entry[0]
            else:
                raw["bench.cache"] = (factory(), monotonic() + 60.0)

    return [compare("Cache.get_or_compute hit", spec, base,
                    n=cfg.pick(20000, 10000), cfg=cfg, target=2.0)]


@workload("store.get")
def bench_store_get(cfg: Config) -> List[Row]:
    """Store.get(key) vs dict lookup."""
    initial = {"k%d" % i: i for i in range(10)}
    store = specter.create_store("bench.store.get", dict(initial))
    raw = dict(initial)
    sget, get = store.get, raw.get

    def spec(n):
        for _ in range(n):
            sget("k3")

    def base(n):
        for _ in range(n):
            get("k3")

    return [compare("Store.get(key)", spec, base, n=cfg.pick(20000, 10000),
                    cfg=cfg, target=3.0)]


@workload("model.get")
def bench_model_get(cfg: Config) -> List[Row]:
    """Model.get('a.b.c') of a scalar vs d['a']['b']['c']."""
    model = specter.create_model("bench.model.get", _tree(10))
    raw = _tree(10)
    mget = model.get

    def spec(n):
        for _ in range(n):
            mget("a.b.c")

    def base(n):
        for _ in range(n):
            raw["a"]["b"]["c"]

    return [compare("Model.get('a.b.c') scalar", spec, base,
                    n=cfg.pick(20000, 10000), cfg=cfg, target=5.0)]


# -- memory ----------------------------------------------------------------

@workload("process.watch_stream")
def bench_watch_stream(cfg: Config) -> List[Row]:
    """Lines per second through ManagedProcess.watch_stream vs the same child
    read by a bare gevent.subprocess readline loop (both strip line endings
    and call the same handler)."""
    import gevent.subprocess as gsp
    lines = cfg.pick(200000, 50000)
    child = [sys.executable, "-c",
             "import sys\nw = sys.stdout.write\nfor i in range(%d): w('line %%d of output\\n' %% i)" % lines]
    seen = [0]

    def handler(line):
        seen[0] += 1

    def spec(n):
        proc = specter.ManagedProcess("bench.child")
        proc.start(child, stdout=specter.ManagedProcess.PIPE)
        reader = proc.watch_stream("stdout", handler)
        proc.wait()
        reader.join()
        proc.stop()

    def base(n):
        proc = gsp.Popen(child, stdout=gsp.PIPE)
        readline = proc.stdout.readline
        while True:
            line = readline()
            if not line:
                break
            handler(line.rstrip(b"\r\n"))
        proc.wait()
        proc.stdout.close()

    cfg_runs = Config(**{**asdict(cfg), "repeats": cfg.pick(7, 3)})
    row = compare("watch_stream, per line", spec, base, n=lines, cfg=cfg_runs, target=1.3,
                  calibrate=False, note="%s lines per child process" % format(lines, ","))
    expected = lines * (2 * cfg_runs.repeats + 2)
    if seen[0] != expected:
        row.note += "; LINES LOST: %d of %d" % (seen[0], expected)
        row.status = "ERROR"
    return [row]


def _web_apps():
    """A Flask app with a plain jsonify view, a json_endpoint view and a Router class route."""
    import flask

    app = flask.Flask("bench")

    @app.route("/plain")
    def plain():
        return flask.jsonify({"ok": True, "items": [1, 2, 3]})

    @app.route("/endpoint")
    @specter.json_endpoint
    def endpoint():
        return {"ok": True, "items": [1, 2, 3]}

    class Items(specter.Router):
        @specter.route("/router")
        def listing(self):
            return {"ok": True, "items": [1, 2, 3]}

    Items("items").register(app)
    return app


@workload("web.http")
def bench_web_http(cfg: Config) -> List[Row]:
    """GET through json_endpoint and through a Router class route vs a plain
    Flask view returning jsonify, all via Flask's test client."""
    app = _web_apps()
    client = app.test_client()
    for path in ("/plain", "/endpoint", "/router"):
        assert client.get(path).get_json() == {"ok": True, "items": [1, 2, 3]}, path

    def getter(path):
        def run(n):
            get = client.get
            for _ in range(n):
                get(path)
        return run

    n = cfg.pick(2000, 1000)
    stats, ns = measure({"plain": getter("/plain"), "endpoint": getter("/endpoint"),
                         "router": getter("/router")}, n, cfg)
    base = stats["plain"]
    rows = []
    for side, label in (("endpoint", "GET via json_endpoint"), ("router", "GET via Router route")):
        s = stats[side]
        rows.append(Row(label, s.median, base.median, s.median / base.median, 1.1,
                        noise=max(s.iqr_pct, base.iqr_pct), n={side: ns[side], "plain": ns["plain"]},
                        repeats=cfg.repeats, note="baseline: plain Flask view returning jsonify"))
    return rows


@workload("web.socket")
def bench_web_socket(cfg: Config) -> List[Row]:
    """One socket event through SocketIngress with 3 prioritised subscribers
    vs a plain @socketio.on handler making the same 3 calls, via
    Flask-SocketIO's test client (with an ack)."""
    import flask
    from flask_socketio import SocketIO

    calls = [0]

    def first(data):
        calls[0] += 1

    def second(data):
        calls[0] += 1

    def third(data):
        calls[0] += 1
        return {"ok": True}

    app = flask.Flask("bench.socket")
    socketio = SocketIO(app, async_mode="gevent")

    @socketio.on("plain")
    def plain(data):
        first(data)
        second(data)
        return third(data)

    ingress = specter.SocketIngress(socketio)
    ingress.subscribe("routed", third, priority=30)
    ingress.subscribe("routed", first, priority=10)
    ingress.subscribe("routed", second, priority=20)
    client = socketio.test_client(app)
    assert client.emit("plain", {"n": 1}, callback=True) == {"ok": True}
    assert client.emit("routed", {"n": 1}, callback=True) == {"ok": True}

    def emitter(event):
        def run(n):
            emit = client.emit
            for _ in range(n):
                emit(event, {"n": 1}, callback=True)
        return run

    try:
        return [compare("socket event via SocketIngress (3 subs)", emitter("routed"),
                        emitter("plain"), n=cfg.pick(2000, 1000), cfg=cfg, target=1.2,
                        note="baseline: plain @socketio.on handler doing the same 3 calls")]
    finally:
        client.disconnect()


@workload("socket.dispatch")
def bench_socket_dispatch(cfg: Config) -> List[Row]:
    """SocketIngress.dispatch of one event to 3 prioritised subscribers vs
    calling the same 3 callables in a loop, each in try/except, keeping the
    last non-None result (issue #14: no Socket.IO round trip on either
    side, so the row shows the ingress's own cost)."""
    def first(data):
        return None

    def second(data):
        return None

    def third(data):
        return data

    ingress = specter.SocketIngress()
    ingress.subscribe("routed", third, priority=30)
    ingress.subscribe("routed", first, priority=10)
    ingress.subscribe("routed", second, priority=20)
    dispatch = ingress.dispatch
    callables = (first, second, third)
    payload = {"n": 1}
    assert dispatch("routed", payload) is payload

    def spec(n):
        for _ in range(n):
            dispatch("routed", payload)

    def base(n):
        for _ in range(n):
            result = None
            for cb in callables:
                try:
                    value = cb(payload)
                except Exception:
                    log.exception("subscriber failed")
                    continue
                if value is not None:
                    result = value

    return [compare("SocketIngress.dispatch (3 subs)", spec, base,
                    n=cfg.pick(20000, 10000), cfg=cfg, target=3.0,
                    note="baseline: the 3 callables in a loop, try/except, last non-None kept")]


@workload("web.app_context")
def bench_app_context(cfg: Config) -> List[Row]:
    """The application context around background work: a QueueService item
    and a spawned task (an interval tick takes the same path) of a service
    registered with a manager that has an app, vs the raw loop pushing the
    context by hand, and vs the same services with no app."""
    import flask

    app = flask.Flask("bench.context")
    teardowns = [0]
    app.teardown_appcontext(lambda exc: teardowns.__setitem__(0, teardowns[0] + 1))

    class CountQueue(specter.QueueService):
        count = 0

        def handle_item(self, item):
            self.count += 1

    bound_queue, free_queue = CountQueue("bench.ctx.bound"), CountQueue("bench.ctx.free")
    bound_tasks, free_tasks = specter.Service("bench.ctx.tasks"), specter.Service("bench.ctx.free.tasks")
    manager = specter.ServiceManager(app, signals=False, name="bench.ctx.manager")
    manager.register_service(bound_queue)
    manager.register_service(bound_tasks)
    manager.boot()
    free_queue.start()
    free_tasks.start()

    q = gevent.queue.JoinableQueue()
    counter = [0]

    def worker():
        while True:
            item = q.get()
            try:
                with app.app_context():
                    counter[0] += 1
            finally:
                q.task_done()
    raw_worker = gevent.spawn(worker)

    def queue_side(svc):
        enqueue, join = svc.enqueue, svc.join

        def run(n):
            for i in range(n):
                enqueue(i)
            join()
        return run

    def raw_queue(n):
        for i in range(n):
            q.put(i)
        q.join()

    def in_context():
        with app.app_context():
            _noop()

    def task_side(svc):
        def run(n):
            spawn = svc.spawn
            gevent.joinall([spawn(_noop) for _ in range(n)])
        return run

    def raw_tasks(n):
        gevent.joinall([gevent.spawn(in_context) for _ in range(n)])

    items, tasks = cfg.pick(20000, 5000), cfg.pick(5000, 2000)
    rows = []
    try:
        for label, sides, n in (
                ("item", {"bound": queue_side(bound_queue), "free": queue_side(free_queue),
                          "raw": raw_queue}, items),
                ("task", {"bound": task_side(bound_tasks), "free": task_side(free_tasks),
                          "raw": raw_tasks}, tasks)):
            before = teardowns[0]
            stats, ns = measure(sides, n, cfg, calibrate=False)
            bound, free, raw = stats["bound"], stats["free"], stats["raw"]
            name = "QueueService item" if label == "item" else "Service task/tick"
            rows.append(Row("%s in app context" % name, bound.median, raw.median,
                            bound.median / raw.median, 1.25 if label == "item" else 1.5,
                            noise=max(bound.iqr_pct, raw.iqr_pct), n=ns, repeats=cfg.repeats,
                            note="baseline: raw loop with `with app.app_context()` per %s" % label))
            rows.append(Row("%s, app-bound vs no app" % name, bound.median, free.median,
                            bound.median / free.median, None,
                            noise=max(bound.iqr_pct, free.iqr_pct), n=ns, repeats=cfg.repeats,
                            note="context costs %.1f us per %s"
                                 % ((bound.median - free.median) / 1000, label)))
            expected = (cfg.repeats + 1) * n * 2  # bound and raw sides, warm-up included
            if teardowns[0] - before != expected:
                rows[-1].note += "; TEARDOWNS %d, expected %d" % (teardowns[0] - before, expected)
                rows[-1].status = "ERROR"
    finally:
        manager.shutdown()
        free_queue.stop()
        free_tasks.stop()
        raw_worker.kill()
    return rows


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_greenlets() -> list:
    return [o for o in gc.get_objects() if isinstance(o, greenlet.greenlet)]


def _memory_probe(kind: str, how: str, count: int) -> dict:
    """Runs in a child process: start ``count`` specter services (one 60 s
    interval each) or raw greenlets (``while True: sleep(60); fn()``) and
    report the memory they hold; then tear them down and report what
    survives."""
    import tracemalloc

    def ticker():
        while True:
            gevent.sleep(60.0)
            _noop()

    if kind == "specter":
        global specter
        import specter as _specter
        specter = _specter

        class IntervalService(specter.Service):
            def on_start(self):
                self.interval(_noop, 60.0)

        def make():
            return IntervalService().start()

        def teardown(objs):
            for svc in objs:
                svc.stop()
    else:
        def make():
            return gevent.spawn(ticker)

        def teardown(objs):
            gevent.killall(objs, block=True)

    # Warm up lazily built machinery (hub, loop, loggers, class caches).
    warm = [make() for _ in range(10)]
    gevent.sleep(0)
    teardown(warm)
    del warm
    gevent.sleep(0)

    if how == "trace":
        tracemalloc.start()
    gc.collect()
    before_glets = _live_greenlets()
    before_ids = {id(g) for g in before_glets}
    t0 = tracemalloc.get_traced_memory()[0] if how == "trace" else 0
    rss0 = _rss_bytes()

    objs = [make() for _ in range(count)]
    gevent.sleep(0)   # every greenlet runs up to its sleep and parks
    gc.collect()
    held = (tracemalloc.get_traced_memory()[0] - t0) if how == "trace" \
        else _rss_bytes() - rss0

    teardown(objs)
    gevent.sleep(0)
    gc.collect()
    after_stop = (tracemalloc.get_traced_memory()[0] - t0) \
        if how == "trace" else _rss_bytes() - rss0
    new = [g for g in _live_greenlets() if id(g) not in before_ids]
    alive = [g for g in new if not g.dead]
    new_count, alive_count = len(new), len(alive)
    del new, alive, objs
    gc.collect()
    after_release = (tracemalloc.get_traced_memory()[0] - t0) \
        if how == "trace" else _rss_bytes() - rss0
    return {"kind": kind, "how": how, "count": count, "held": held,
            "after_stop": after_stop, "after_release": after_release,
            "new_greenlets": new_count, "alive_greenlets": alive_count}


def _run_probe(kind: str, how: str, count: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_probe",
           "%s:%s:%d" % (kind, how, count)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError("memory probe %s/%s failed:\n%s"
                           % (kind, how, res.stderr[-2000:]))
    return json.loads(res.stdout.strip().splitlines()[-1])


@workload("memory.services")
def bench_memory(cfg: Config) -> List[Row]:
    """Bytes per started service (one 60 s interval) vs per raw greenlet
    loop; after stop() no greenlet they created is alive and the memory
    comes back."""
    count = cfg.pick(10000, 2000)
    reps = cfg.pick(3, 1)
    per = {"specter": count, "baseline": count}
    results = {(k, h): []
               for k in ("specter", "raw") for h in ("trace", "rss")}
    for r in range(reps):
        order = ("specter", "raw") if r % 2 == 0 else ("raw", "specter")
        for how in ("trace", "rss"):
            for kind in order:
                results[(kind, how)].append(_run_probe(kind, how, count))

    def med(kind, how, key):
        return statistics.median(p[key] for p in results[(kind, how)]) / count

    rows = []
    for how, label in (("trace", "tracemalloc"), ("rss", "RSS")):
        s, b = med("specter", how, "held"), med("raw", how, "held")
        rows.append(Row("memory/service, %s" % label, s, b,
                        s / b if b > 0 else None, 1.3, unit="B", n=per,
                        repeats=reps,
                        note="%s started services (1 interval each) vs "
                             "greenlet loops" % format(count, ",")))

    probes = results[("specter", "trace")] + results[("specter", "rss")]
    raw_probes = results[("raw", "trace")] + results[("raw", "rss")]
    alive = max(p["alive_greenlets"] for p in probes)
    leak = Row("greenlets alive after stop()", alive,
               max(p["alive_greenlets"] for p in raw_probes), None, None,
               unit="count", n=per, repeats=reps,
               note="greenlet objects created by the services and still "
                    "referenced (dead or not): %d"
                    % max(p["new_greenlets"] for p in probes))
    leak.status = "PASS" if alive == 0 else "LEAK"
    rows.append(leak)

    s_held, s_stop = med("specter", "trace", "held"), \
        med("specter", "trace", "after_stop")
    b_held, b_stop = med("raw", "trace", "held"), \
        med("raw", "trace", "after_stop")
    rows.append(Row(
        "memory kept after stop(), tracemalloc", s_stop, b_stop, None, None,
        unit="B", n=per, repeats=reps,
        note="objects still referenced by the caller's list; stop() "
             "returned %.0f%% of what was held (raw killall: %.0f%%); after "
             "dropping the references %.0f B/svc remain (raw %.0f B)"
             % (100 * (1 - s_stop / s_held) if s_held else 0,
                100 * (1 - b_stop / b_held) if b_held else 0,
                med("specter", "trace", "after_release"),
                med("raw", "trace", "after_release"))))
    return rows


# -- cluster (a redis-server of its own) -------------------------------------

_LATENCY_EMITTER = r'''
import json, sys, time, gevent, specter
cluster = specter.Cluster(sys.argv[1], share=["lat:*"]).start()
raw = cluster._redis
sys.stdin.readline()
rate, seconds = float(sys.argv[2]), float(sys.argv[3])
for side in ("specter", "raw"):
    start = time.monotonic()
    for k in range(int(rate * seconds)):
        due = start + k / rate
        gevent.sleep(max(0.0, due - time.monotonic()))
        if side == "specter":
            specter.bus.emit("lat:x", {"t": time.monotonic()})
        else:
            raw.xadd("raw:lat", {"d": json.dumps({"t": time.monotonic()})})
    gevent.sleep(0.5)
cluster.stop()
'''


def _redis_server():
    """A throwaway redis-server on a free 127.0.0.1 port and a temp dir, or None."""
    import shutil
    import socket
    import tempfile
    binary = shutil.which("redis-server")
    if binary is None:
        return None, None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    folder = tempfile.mkdtemp(prefix="bench-redis-")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", folder],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return proc, "redis://127.0.0.1:%d/0" % port


def _goal_row(name, spec_ns, base_ns, goal_ns, note):
    """A row judged against an absolute goal (per-op time at most ``goal_ns``)."""
    row = Row(name, spec_ns, base_ns, spec_ns / base_ns if base_ns else None, None, note=note)
    row.status = "PASS" if spec_ns <= goal_ns else "over"
    return row


def _percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


@workload("cluster")
def bench_cluster(cfg: Config) -> List[Row]:
    """Cluster over a real redis-server, beside raw redis-py on the same
    connection class: shared emits, remote delivery latency (another
    process, 1,000/s), ClusterQueue with 1 and 8 workers, enqueue, leases."""
    proc, url = _redis_server()
    if proc is None:
        return [Row("cluster (redis-server missing: apt-get install -y redis-server)", status="info")]
    cluster = None
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                cluster = specter.Cluster(url, node_id="bench", share=["b:*", "lat:*"]).start()
                break
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
                gevent.sleep(0.02)
        return (_bench_cluster_bus(cfg, cluster, url) + _bench_cluster_queue(cfg, cluster)
                + _bench_cluster_lease(cfg, cluster))
    finally:
        if cluster is not None:
            cluster.stop()
        proc.kill()
        proc.wait()


def _bench_cluster_bus(cfg, cluster, url):
    raw = cluster._redis
    n = cfg.pick(5000, 2000)  # below Cluster.outbox_limit: a burst beyond it is dropped, by design
    payload = {"id": 1, "text": "x" * 180}

    def spec(count):
        emit = specter.bus.emit
        target = cluster._sent + count
        dropped = cluster._dropped
        for _ in range(count):
            emit("b:x", payload)
        with gevent.Timeout(60):
            while cluster._sent < target:
                if cluster._dropped != dropped:
                    raise RuntimeError("shared emits were dropped: %s" % cluster.health()["bus"])
                gevent.sleep(0.0005)

    def base(count):
        body = json.dumps(payload)
        for start in range(0, count, 500):
            pipe = raw.pipeline(transaction=False)
            for _ in range(min(500, count - start)):
                pipe.xadd("raw:bus", {"n": "bench", "e": "b:x", "d": body}, maxlen=10000, approximate=True)
            pipe.execute()

    stats, _ = measure({"specter": spec, "baseline": base}, n, cfg, calibrate=False)
    rows = [_goal_row("cluster: shared emit from one node, per emit", stats["specter"].median,
                      stats["baseline"].median, 1e9 / 5000,
                      "goal >= 5,000/s; baseline: raw XADD pipelined x500; %s emits per batch"
                      % format(n, ","))]
    # Remote delivery: another process emits at 1,000/s; this one timestamps arrival.
    rate, seconds = 1000.0, cfg.pick(3.0, 1.5)
    lat = {"specter": [], "raw": []}
    specter.bus.on("lat:x", lambda data: lat["specter"].append(time.monotonic() - data["t"]))

    def raw_reader():
        last = "$"
        while True:
            reply = raw.xread({"raw:lat": last}, block=2000, count=100)
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    last = entry_id
                    lat["raw"].append(time.monotonic() - json.loads(fields["d"])["t"])
    reader = gevent.spawn(raw_reader)
    child = gevent.subprocess.Popen([sys.executable, "-c", _LATENCY_EMITTER, url, str(rate), str(seconds)],
                                    stdin=gevent.subprocess.PIPE, env=dict(os.environ, PYTHONPATH=HERE))
    try:
        gevent.sleep(1.0)
        child.stdin.write(b"go\n")
        child.stdin.flush()
        child.wait(timeout=seconds * 2 + 30)
    finally:
        reader.kill()
        if child.poll() is None:
            child.kill()
    expected = int(rate * seconds)
    for q, goal in ((0.5, 1e6), (0.99, 5e6)):
        spec_ns = _percentile(lat["specter"], q) * 1e9 if lat["specter"] else float("inf")
        base_ns = _percentile(lat["raw"], q) * 1e9 if lat["raw"] else float("nan")
        rows.append(_goal_row("cluster: remote delivery p%d at 1,000/s" % int(q * 100), spec_ns, base_ns, goal,
                              "goal <= %d ms; baseline raw XADD -> XREAD BLOCK; received %d/%d (raw %d/%d)"
                              % (goal / 1e6, len(lat["specter"]), expected, len(lat["raw"]), expected)))
    return rows


def _bench_cluster_queue(cfg, cluster):
    raw = cluster._redis
    rows = []
    for workers, goal in ((1, 3000), (8, 20000)):
        n = cfg.pick(20000, 5000) if workers == 8 else cfg.pick(6000, 2000)
        name = "bq%d" % workers
        stream = "specter:queue:%s" % name
        body = json.dumps({"id": 1, "text": "x" * 180})

        def fill(key, count):
            for start in range(0, count, 1000):
                pipe = raw.pipeline(transaction=False)
                for _ in range(min(1000, count - start)):
                    pipe.xadd(key, {"d": body, "a": 0})
                pipe.execute()

        class Count(specter.ClusterQueue):
            handled = 0

            def handle_item(self, item):
                self.handled += 1
        queue = Count(name, worker_count=workers).start()
        raw.xgroup_create("raw:q", "g", id="0", mkstream=True)

        def spec(count):
            target = queue.handled + count
            fill(stream, count)
            started = time.perf_counter()
            with gevent.Timeout(60):
                while queue.handled < target:
                    gevent.sleep(0.0002)
            return time.perf_counter() - started

        def base(count):
            fill("raw:q", count)
            started = time.perf_counter()
            done = 0
            while done < count:
                reply = raw.xreadgroup("g", "c", {"raw:q": ">"}, count=workers, block=1000)
                ids = [entry_id for _, entries in reply or () for entry_id, fields in entries
                       if json.loads(fields["d"])]
                raw.pipeline(transaction=True).xack("raw:q", "g", *ids).xdel("raw:q", *ids).execute()
                done += len(ids)
            return time.perf_counter() - started

        # Filling the stream (pipelined XADD) is left out of the timing on both sides.
        times = {"specter": [], "baseline": []}
        try:
            for side, fn in (("specter", spec), ("baseline", base)):
                fn(max(100, n // 10))  # warm-up
            for r in range(cfg.repeats):
                for side, fn in ((("specter", spec), ("baseline", base)) if r % 2 == 0
                                 else (("baseline", base), ("specter", spec))):
                    times[side].append(fn(n) * 1e9 / n)
        finally:
            queue.stop()
            raw.delete("raw:q")
        spec_ns, base_ns = statistics.median(times["specter"]), statistics.median(times["baseline"])
        rows.append(_goal_row("cluster: ClusterQueue %d worker%s, per item" % (workers, "s" if workers > 1 else ""),
                              spec_ns, base_ns, 1e9 / goal,
                              "goal >= %s items/s (%.0f/s); baseline: raw XREADGROUP COUNT %d + XACK/XDEL per read"
                              % (format(goal, ","), 1e9 / spec_ns, workers)))
    queue = specter.ClusterQueue("benq").start()
    try:
        enqueue = queue.enqueue

        def spec(count):
            for i in range(count):
                enqueue(i)

        def base(count):
            for i in range(count):
                raw.xadd("raw:enq", {"d": json.dumps(i), "a": 0})
        queue.cancel_greenlet(queue._reader)  # measure enqueue alone: nothing consumes
        stats, _ = measure({"specter": spec, "baseline": base}, cfg.pick(3000, 1000), cfg, calibrate=False)
    finally:
        queue.stop()
    rows.append(Row("cluster: ClusterQueue.enqueue, per item", stats["specter"].median, stats["baseline"].median,
                    stats["specter"].median / stats["baseline"].median, None,
                    note="one round trip each (Lua: maxsize check + XADD) vs raw XADD").finish())
    return rows


def _bench_cluster_lease(cfg, cluster):
    raw, scripts = cluster._redis, cluster._scripts

    def spec(count):
        for _ in range(count):
            scripts.acquire(keys=["specter:lease:b", "specter:fence:b"], args=["me", 10000])
            scripts.release_lease(keys=["specter:lease:b"], args=["me"])

    def base(count):
        for _ in range(count):
            raw.set("raw:lease", "me", nx=True, px=10000)
            raw.delete("raw:lease")

    def spec_renew(count):
        for _ in range(count):
            scripts.renew(keys=["specter:lease:b"], args=["me", 10000])

    def base_renew(count):
        for _ in range(count):
            raw.pexpire("raw:lease", 10000)
    n = cfg.pick(2000, 500)
    rows = []
    for label, s, b, note in (
            ("acquire + release", spec, base, "Lua SET NX PX + INCR fence, compare-and-DEL vs raw SET NX PX + DEL"),
            ("renew", spec_renew, base_renew, "Lua compare token + PEXPIRE vs raw PEXPIRE")):
        stats, _ = measure({"specter": s, "baseline": b}, n, cfg, calibrate=False)
        rows.append(Row("cluster: lease %s" % label, stats["specter"].median, stats["baseline"].median,
                        stats["specter"].median / stats["baseline"].median, 1.5, note=note))
    return rows


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def _fmt_value(v: Optional[float], unit: str) -> str:
    if v is None:
        return "-"
    if unit == "ns":
        if v < 1e3:
            return "%.0f ns" % v
        if v < 1e6:
            return "%.2f µs" % (v / 1e3)
        if v < 1e9:
            return "%.2f ms" % (v / 1e6)
        return "%.2f s" % (v / 1e9)
    if unit == "B":
        return "{:,.0f} B".format(v)
    if unit == "%":
        return "%.1f%%" % v
    return "%g" % v


def _print_table(rows: List[Row]) -> None:
    head = ("workload", "specter", "baseline", "ratio", "target", "result",
            "noise")
    body = []
    for r in rows:
        body.append((
            r.name,
            _fmt_value(r.specter, r.unit),
            _fmt_value(r.baseline, r.unit),
            "-" if r.ratio is None else "%.2fx" % r.ratio,
            "-" if r.target is None else "<= %gx" % r.target,
            r.status,
            "-" if r.noise is None else "%.0f%%" % r.noise,
        ))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(head)]
    left = {0, 5}

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    print(line(head))
    print("  ".join("-" * w for w in widths))
    for b in body:
        print(line(b))
    notes = [(r.name, r.note) for r in rows if r.note]
    if notes:
        print()
        for name, note in notes:
            print("  %s: %s" % (name, note))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Benchmark specter.py against raw baselines "
                    "(see the module docstring for how to read the table).")
    ap.add_argument("--quick", action="store_true",
                    help="fewer repeats and smaller batches (< 30 s)")
    ap.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                    help="run workloads whose name contains SUBSTRING "
                         "(repeatable, case-insensitive)")
    ap.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    ap.add_argument("--repeats", type=int, help="override the repeat count")
    ap.add_argument("--gc", action="store_true",
                    help="leave the garbage collector on during timed batches")
    ap.add_argument("--profile", action="store_true",
                    help="cProfile the specter side of each selected workload")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 when a row is over target, leaks or errors")
    ap.add_argument("--list", action="store_true", help="list workloads")
    ap.add_argument("--_probe", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._probe:
        kind, how, count = args._probe.split(":")
        print(json.dumps(_memory_probe(kind, how, int(count))))
        return 0

    selected = [w for w in _WORKLOADS
                if not args.only
                or any(s.lower() in w[0].lower() for s in args.only)]
    if args.list:
        for name, _, doc in _WORKLOADS:
            print("%-22s %s" % (name, doc))
        return 0
    if not selected:
        print("no workload matches %r; try --list" % args.only,
              file=sys.stderr)
        return 2

    global specter
    import specter as _specter
    specter = _specter
    logging.getLogger("specter").addHandler(logging.NullHandler())

    cfg = Config(quick=args.quick, gc_off=not args.gc, profile=args.profile,
                 repeats=args.repeats or (7 if args.quick else 15),
                 batch_s=0.01 if args.quick else 0.02)
    import gevent as _g
    print("specter %s | Python %s | gevent %s | greenlet %s | %s | "
          "repeats %d | gc %s in batches | cpus %s | load %.2f"
          % (getattr(specter, "__version__", "?"), sys.version.split()[0],
             _g.__version__, greenlet.__version__,
             "quick" if cfg.quick else "full", cfg.repeats,
             "off" if cfg.gc_off else "on", os.cpu_count(),
             os.getloadavg()[0]))

    started = time.perf_counter()
    rows: List[Row] = []
    for name, fn, _ in selected:
        gc.collect()
        t0 = time.perf_counter()
        try:
            got = fn(cfg)
        except Exception as exc:
            sys.stdout.flush()
            traceback.print_exc()
            sys.stderr.flush()
            got = [Row(name, status="ERROR",
                       note="%s: %s" % (type(exc).__name__, exc))]
        for row in got:
            row.workload = name
            rows.append(row.finish())
        print("  %-22s %5.1f s" % (name, time.perf_counter() - t0),
              flush=True)
    total = time.perf_counter() - started

    print()
    _print_table(rows)
    print("\ntotal %.1f s" % total)

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mode": "quick" if cfg.quick else "full",
                       "repeats": cfg.repeats, "gc_off": cfg.gc_off,
                       "python": sys.version.split()[0],
                       "seconds": round(total, 2),
                       "rows": [asdict(r) for r in rows]}, f, indent=2)
    bad = [r for r in rows if r.status in ("over", "LEAK", "ERROR")]
    return 1 if (args.strict and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
