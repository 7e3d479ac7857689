"""Job board: a small real-time job runner built with SPECTER.

Users submit jobs over HTTP or Socket.IO; a worker pool runs each job as a
real child process, parses its output line by line, and every connected
browser watches the progress live. Host load is sampled alongside, summary
statistics are cached until a job event invalidates them, and a supervised
housekeeper prunes old jobs. Ctrl-C or SIGTERM shuts it all down with no job
process left behind.

Run from the repository root (after ``pip install .``, or from a checkout):

    python examples/jobboard/app.py [--host 127.0.0.1] [--port 5000] [--workers 2]

With ``--redis URL`` [``--node NAME``] the process is one node of a board
shared by every node on that Redis: any node's free workers take the next
job, every browser sees every job, one node does the housekeeping, and the
jobs of a node that dies are run again by another (at least once).

Tests boot it in-process: ``app, socketio, boot_board = create_app(config)``
then ``manager = boot_board(signals=False)``. See README.md beside this file.
"""

import argparse
import functools
import logging
import os
import re
import secrets
import socket
import sys
import time

import gevent
from flask import Config, Flask, render_template
from flask_socketio import SocketIO, emit, join_room

try:
    import specter
except ImportError:  # a checkout without `pip install .`: use the specter.py two levels up
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
    import specter

from specter import (Cluster, ClusterQueue, Controller, Field, HTTPError, ManagedProcess, QueueService, Schema,
                     SchemaError, Service, Watcher, create_cache, create_model, create_store, expect_json)

logger = logging.getLogger("jobboard")

DEFAULTS = {
    "JOBBOARD_WORKERS": 2,            # jobs that run at once
    "JOBBOARD_MAX_QUEUE": 100,        # queued jobs beyond this are refused with 503
    "JOBBOARD_DRAIN_TIMEOUT": 0.0,    # seconds queued jobs may still start at shutdown
    "JOBBOARD_STOP_GRACE": 2.0,       # seconds a job gets between SIGTERM and SIGKILL
    "JOBBOARD_HOST_INTERVAL": 1.0,    # host load sampling period
    "JOBBOARD_PUSH_INTERVAL": 0.05,   # job updates to browsers are coalesced over this window
    "JOBBOARD_PRUNE_INTERVAL": 10.0,  # housekeeping period
    "JOBBOARD_KEEP_SECONDS": 600.0,   # finished jobs older than this are pruned...
    "JOBBOARD_KEEP_FINISHED": 50,     # ...and only this many finished jobs are kept
    # A cluster: with a Redis URL this process is one node of the board.
    "JOBBOARD_REDIS_URL": None,
    "JOBBOARD_NODE": None,            # this node's name (None: host, pid and a random part; main(): host:port)
    "JOBBOARD_VISIBILITY_TIMEOUT": 5.0,  # a job whose node died is restarted elsewhere after this
}

STATUSES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = frozenset(("done", "failed", "cancelled"))
OUTPUT_TAIL = 5

# The job itself: a child Python that reports progress on stdout. Its
# parameters come in as argv (never pasted into the code), so a job name or
# number cannot inject anything.
JOB_SCRIPT = """\
import sys, time
steps, delay, fail_at = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
for step in range(1, steps + 1):
    time.sleep(delay)
    if step == fail_at:
        print("error: simulated failure at step %d" % step)
        sys.exit(3)
    print("progress %d/%d" % (step, steps))
print("done")
"""

_PROGRESS_LINE = re.compile(r"progress (\d+)/(\d+)")


def _count_statuses(jobs):
    counts = dict.fromkeys(STATUSES, 0)
    for job in jobs:
        counts[job["status"]] += 1
    return counts


def _not_blank(value):
    if not value.strip():
        raise SchemaError("must not be blank")
    return True


JOB_SCHEMA = Schema("job", {
    "name": Field(str, required=True, min_length=1, max_length=60, validator=_not_blank),
    "steps": Field(int, default=5, min=1, max=50),
    "delay": Field(float, default=0.2, min=0.01, max=2.0),
    "fail_at": Field(int, min=1, max=50),
}, strict=True)


###############################################################################
# Services
###############################################################################


class JobWork:
    """What a job runner does, on one process or on several; mixed into a queue class below.

    The model holds ``jobs.<id>``; every write of a job bumps its ``rev`` and
    is announced as ``jobs:changed``. The bus also hears ``jobs:submitted``,
    ``jobs:started`` and ``jobs:finished``. Stopping the runner cancels the
    running jobs (their processes are stopped) and the queued ones.

    On a cluster each node's model is a mirror: the ``jobs:*`` events are
    shared, and a node applies a remote ``jobs:changed`` only when it is
    newer than what it has (``_version``), so every mirror ends on the same
    record whatever order the events arrive in. A node that joins asks the
    others for their jobs (``jobs:sync``), and asks again after a
    ``cluster:gap``.
    """

    name = "jobs.runner"
    node = None  # this node's id on a cluster; None on one process

    def __init__(self, model, *, worker_count=2, maxsize=100, drain_timeout=0.0, stop_grace=2.0, **options):
        super().__init__(worker_count=worker_count, maxsize=maxsize, **options)
        self.model = model
        self.drain_timeout = drain_timeout
        self.stop_grace = stop_grace
        self._processes = {}
        self._closing = False

    # Hooks ------------------------------------------------------------------

    def on_start(self):
        self._closing = False
        if self.node is not None:
            self.listen("jobs:changed", self._on_remote_change, origin="remote")
            self.listen("jobs:pruned", self._on_remote_prune, origin="remote")
            self.listen("jobs:sync", self._on_sync, origin="remote")
            self.listen("jobs:snapshot", self._on_snapshot, origin="remote")
            self.listen("cluster:gap", lambda _gap: self.emit("jobs:sync", {"node": self.node}))
            self.emit("jobs:sync", {"node": self.node})  # what the others ran before this node joined

    def on_workers_stopping(self):
        # Runs before the queue is drained: from here on no new job starts,
        # and the running ones end now instead of running to completion.
        self._closing = True
        for job_id in list(self._processes):
            self.cancel(job_id, reason="server shutting down")

    def on_dropped(self, items):
        for item in items:
            self._finish(item["id"], "cancelled", note="cancelled: server shutting down")

    def handle_item(self, item):
        job_id = item["id"]
        job = self.get(job_id)
        if job is None or job["status"] in FINISHED:
            return  # cancelled (or pruned) while it waited
        if self._closing:
            self._finish(job_id, "cancelled", note="cancelled: server shutting down")
            return
        args = [sys.executable, "-u", "-c", JOB_SCRIPT,
                str(job["steps"]), repr(job["delay"]), str(job["fail_at"] or 0)]
        process = ManagedProcess("job-%s" % job_id, terminate_timeout=self.stop_grace)
        self._processes[job_id] = process
        try:
            try:
                process.start(args, stdin=ManagedProcess.DEVNULL, stdout=ManagedProcess.PIPE,
                              stderr=ManagedProcess.STDOUT, text=True, errors="replace")
            except OSError as exc:
                self._finish(job_id, "failed", note="error: could not start the job: %s" % exc)
                return
            attempt = job.get("attempt", 0) + 1
            fields = dict(status="running", started_at=time.time(), pid=process.pid, attempt=attempt)
            if self.node is not None:
                fields.update(node=self.node, progress=0)
                if attempt > 1:  # its node died or stopped while it ran: at least once, so from the start
                    note = "restarted on %s (attempt %d)" % (self.node, attempt)
                    fields["output"] = (job["output"] + [note])[-OUTPUT_TAIL:]
            if not self._patch(job_id, **fields):
                return  # cancelled while it was starting
            self.emit("jobs:started", self.get(job_id))
            reader = process.watch_stream("stdout", functools.partial(self._on_line, job_id))
            returncode = process.wait()
            reader.join(timeout=1.0)  # the last lines are parsed before the final status
        finally:
            # Also runs when the worker is killed: the process never outlives it.
            process.stop(timeout=self.stop_grace)
            self._processes.pop(job_id, None)
        self._finish(job_id, "done" if returncode == 0 else "failed", returncode=returncode)

    # Control ----------------------------------------------------------------

    def submit(self, spec):
        """Record and queue a validated job spec; the job, or None if the queue refused it."""
        job_id = secrets.token_hex(4)
        job = {
            "id": job_id, "name": spec["name"].strip(), "status": "queued",
            "progress": 0, "steps": spec["steps"], "delay": spec["delay"], "fail_at": spec["fail_at"],
            "output": [], "pid": None, "returncode": None,
            "created_at": time.time(), "started_at": None, "finished_at": None,
            "node": None, "attempt": 0, "rev": 1,
        }
        self.model.set(("jobs", job_id), job)
        if not self.enqueue({"id": job_id, "job": job}):
            self.model.delete(("jobs", job_id))
            return None
        self.emit("jobs:changed", job)
        self.emit("jobs:submitted", job)
        return job

    def cancel(self, job_id, *, reason="requested by user"):
        """Cancel a queued or running job (its process is stopped); the job, or None if unknown.

        On a cluster the node running it hears the final state and stops its process.
        """
        job = self._finish(job_id, "cancelled", note="cancelled: %s" % reason)
        process = self._processes.get(job_id)
        if process is not None:
            process.stop(timeout=self.stop_grace)
        return job

    def get(self, job_id):
        return self.model.get(("jobs", job_id))

    def jobs(self):
        """Every job, oldest first."""
        return sorted(self.model.get("jobs", {}).values(), key=lambda job: job["created_at"])

    def counts(self):
        """Jobs per status, read in place (no copy of the jobs is made)."""
        return self.model.select(lambda root: _count_statuses(root.get("jobs", {}).values()))

    # Helpers ----------------------------------------------------------------

    def _write(self, job):
        """Store a new version of a job and announce it (to every node, on a cluster)."""
        job["rev"] = job.get("rev", 0) + 1
        self.model.set(("jobs", job["id"]), job)
        self.emit("jobs:changed", job)

    def _patch(self, job_id, **fields):
        """Update a queued or running job; False if it is gone or already finished."""
        job = self.get(job_id)
        if job is None or job["status"] in FINISHED:
            return False
        job.update(fields)
        self._write(job)
        return True

    def _on_line(self, job_id, line):
        job = self.get(job_id)
        if job is None or job["status"] == "queued" or job.get("node") != self.node:
            return  # handed back to the queue, or to another node: that run writes the job now
        match = _PROGRESS_LINE.fullmatch(line.strip())
        if match and job["status"] not in FINISHED:
            job["progress"] = int(match.group(1))
        job["output"] = (job["output"] + [line])[-OUTPUT_TAIL:]
        self._write(job)

    def _finish(self, job_id, status, *, returncode=None, note=None):
        """Move a job to a final status once; later calls only fill in the return code."""
        job = self.get(job_id)
        if job is None:
            return None
        if returncode is not None:
            job["returncode"] = returncode
        first = job["status"] not in FINISHED
        if first:
            job.update(status=status, finished_at=time.time())
            if note:
                job["output"] = (job["output"] + [note])[-OUTPUT_TAIL:]
        self._write(job)
        if first:
            self.emit("jobs:finished", job)
        return job

    # Cluster ----------------------------------------------------------------

    def _merge(self, job):
        """Keep ``job`` if it is newer than this node's copy; True if it was kept."""
        current = self.get(job["id"])
        if current is not None and _version(job) <= _version(current):
            return False
        self.model.set(("jobs", job["id"]), job)
        return True

    def _on_remote_change(self, job):
        if self._merge(job) and job["status"] in FINISHED and job["id"] in self._processes:
            # Cancelled on another node while it runs here. Stopped in a greenlet of its
            # own: this listener runs in the cluster's bus reader, which must not wait.
            self.spawn(self._processes[job["id"]].stop, timeout=self.stop_grace)

    def _on_remote_prune(self, pruned):
        gone = set(pruned["ids"])
        jobs = self.model.get("jobs", {})
        self.model.set("jobs", {key: job for key, job in jobs.items() if key not in gone})

    def _on_sync(self, _request):
        self.emit("jobs:snapshot", {"jobs": self.jobs()})

    def _on_snapshot(self, snapshot):
        for job in snapshot["jobs"]:
            self._merge(job)


def _version(job):
    """Orders the versions of one job: a final state is never undone, then ``rev`` decides.

    The status breaks a tie (two nodes wrote the same rev at once), so every
    node picks the same winner.
    """
    return job["status"] in FINISHED, job["rev"], STATUSES.index(job["status"])


class JobRunner(JobWork, QueueService):
    """Runs queued jobs on this process's workers, one child process per job."""


class ClusterJobRunner(JobWork, ClusterQueue):
    """Runs jobs from the cluster's shared queue: whichever node has a free worker takes the next one.

    At least once: when a node dies mid-job, another node takes the job over
    after ``visibility_timeout`` and runs it again from the start (the job
    says 'restarted on <node> (attempt 2)'). When a node stops, its running
    jobs go back to the queue at once, marked queued, instead of being
    cancelled.
    """

    def __init__(self, model, *, node, **options):
        super().__init__(model, **options)
        self.node = node

    def on_workers_stopping(self):
        # ClusterQueue stops the workers next and hands their jobs back to the shared
        # queue; the job's process ends with its worker (handle_item's finally). No
        # _closing here: a job is never cancelled because one node stops.
        for job_id in list(self._processes):
            note = "%s stopped: back in the queue" % self.node
            job = self.get(job_id)
            if job is not None and job["status"] == "running":
                self._patch(job_id, status="queued", pid=None,
                            output=(job["output"] + [note])[-OUTPUT_TAIL:])

    def handle_item(self, item):
        # The job may reach this node's queue before its 'jobs:changed' event does.
        self._merge(item["job"])
        super().handle_item(item)


class HostMonitor(Service):
    """Samples host load and job counts into the 'host' store with a Watcher."""

    name = "host.monitor"

    def __init__(self, store, runner, *, interval=1.0):
        super().__init__()
        self.store = store
        self.node = runner.node
        self.runner = runner
        self.sample_interval = interval

    def on_start(self):
        watcher = self.own(Watcher("host.load", poll=self.sample, interval=self.sample_interval,
                                   dedupe=True))
        watcher.subscribe(lambda value, _watcher: self.store.set(value))
        watcher.start()

    def sample(self):
        load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
        counts = self.runner.counts()
        sample = {
            "load": [round(value, 2) for value in load],
            "cpus": os.cpu_count() or 1,
            "running": counts["running"],
            "queued": counts["queued"],
        }
        if self.node is not None:
            sample["node"] = self.node  # the page shows which node it is connected to
        return sample


class LiveUpdates(Service):
    """Pushes job and host changes to every connected browser over Socket.IO.

    It relays this process's ``jobs:changed`` and ``jobs:pruned`` events
    (``origin='local'``): job changes are coalesced over ``push_interval``
    seconds, then each job that changed is sent once as 'job:update', and
    pruned ones as 'job:removed'. On a cluster the SocketIO's client
    manager is the cluster's, so the node that changed a job pushes it to
    the browsers of every node; relaying the remote copies too would send
    each update once per node. Host samples go out as 'host:update', on a
    cluster only to the browsers of this node (its room ``room``).

    It starts before the runner and stops after it (see ``create_app``), so
    the final states the runner writes while it stops are still pushed, by
    ``on_stop``, before the browsers lose their connection.
    """

    name = "live"

    def __init__(self, socketio, host_store, *, push_interval=0.05, room=None):
        super().__init__()
        self.socketio = socketio
        self.host_store = host_store
        self.push_interval = push_interval
        self.room = room
        self._changed = {}
        self._removed = set()

    def on_start(self):
        self._changed, self._removed = {}, set()
        self.listen("jobs:changed", self._on_job, origin="local")
        self.listen("jobs:pruned", self._on_pruned, origin="local")
        self.host_store.subscribe(self._on_host, owner=self)

    def on_stop(self):
        self._flush()  # the last window: final states written during shutdown

    def _on_job(self, job):
        # Runs in the writer's greenlet: keep the latest version and let one
        # timer per window do the sending.
        self._schedule()
        self._removed.discard(job["id"])
        self._changed[job["id"]] = job

    def _on_pruned(self, pruned):
        self._schedule()
        for job_id in pruned["ids"]:
            self._changed.pop(job_id, None)
            self._removed.add(job_id)

    def _schedule(self):
        if not (self._changed or self._removed) and self.running:
            self.timeout(self._flush, self.push_interval)

    def _flush(self):
        changed, self._changed = self._changed, {}
        removed, self._removed = self._removed, set()
        for job in changed.values():
            self.socketio.emit("job:update", job)
        for job_id in removed:
            self.socketio.emit("job:removed", {"id": job_id})

    def _on_host(self, snapshot, _store):
        self.socketio.emit("host:update", snapshot, to=self.room)


class Housekeeper(Service):
    """A supervised task that prunes finished jobs: too old, or beyond the newest ``keep``.

    A singleton: on a cluster one node sweeps (the others wait in
    'standby' and one takes over within ``singleton_ttl`` if it goes), and
    its ``jobs:pruned`` event removes the jobs from every node's model. On
    one process it is a plain service.
    """

    name = "jobs.housekeeper"
    singleton = True
    singleton_ttl = 5.0

    def __init__(self, model, *, interval=10.0, max_age=600.0, keep=50):
        super().__init__()
        self.model = model
        self.sweep_interval = interval
        self.max_age = max_age
        self.keep = keep

    def on_start(self):
        self.supervise(self._sweep_forever)

    def prune(self, now=None):
        """Remove expired finished jobs in one write; returns how many went."""
        now = time.time() if now is None else now
        jobs = self.model.get("jobs", {})
        finished = sorted((job for job in jobs.values() if job["status"] in FINISHED),
                          key=lambda job: job["finished_at"])
        doomed = {job["id"] for job in finished if now - job["finished_at"] > self.max_age}
        doomed.update(job["id"] for job in finished[:max(0, len(finished) - self.keep)])
        if doomed:
            self.model.set("jobs", {key: job for key, job in jobs.items() if key not in doomed})
            self.emit("jobs:pruned", {"count": len(doomed), "ids": sorted(doomed)})
        return len(doomed)

    def _sweep_forever(self):
        while True:
            gevent.sleep(self.sweep_interval)
            self.prune()


###############################################################################
# Controller
###############################################################################


class JobsController(Controller):
    """HTTP routes and socket events for jobs; dependencies come from the registry."""

    name = "jobs"
    schemas = {"job": JOB_SCHEMA}

    def on_start(self):
        # Created per start and owned, so a restart gets fresh bus subscriptions.
        self.stats = self.own(create_cache(
            "jobs.stats", depends_on=["jobs:submitted", "jobs:started", "jobs:finished", "jobs:pruned"]))

    @property
    def runner(self):
        return self.service("jobs.queue")

    # HTTP -------------------------------------------------------------------

    def build_routes(self, router):
        @router.route("/api/jobs", methods=["POST"], json_errors="Could not submit the job")
        def submit_job():
            return self.submit(expect_json(allow_empty=True)), 201

        @router.route("/api/jobs", json_errors="Could not list the jobs")
        def list_jobs():
            return self.list_jobs()

        @router.route("/api/jobs/<job_id>", json_errors="Could not read the job")
        def get_job(job_id):
            return self.find(job_id)

        @router.route("/api/jobs/<job_id>/cancel", methods=["POST"], json_errors="Could not cancel the job")
        def cancel_job(job_id):
            job = self.find(job_id)
            if job["status"] in FINISHED:
                raise HTTPError("Job %s is already %s" % (job_id, job["status"]), 409, payload={"job": job})
            return self.runner.cancel(job_id)

        @router.route("/api/health", json_errors="Could not read the health")
        def health():
            tree = self.service("service_manager").health()
            return tree, 200 if tree["status"] == "ok" else 503

        @router.route("/api/stats", json_errors="Could not compute the statistics")
        def stats():
            cached = self.stats.is_valid()
            return {"stats": self.stats.get_or_compute(self.compute_stats), "cached": cached}

    # Socket.IO --------------------------------------------------------------

    def build_events(self, handler):
        handler.on("connect", self.on_connect)
        handler.on("job:submit", self.on_submit, schema=self.schema("job"))
        handler.on("jobs:list", self.on_list)

    def on_connect(self, auth=None):
        room = self.service("live").room
        if room is not None:
            join_room(room)  # this node's browsers: host samples go to them only
        emit("host:update", self.service("host.store").get())

    def on_submit(self, spec):
        # Invalid payloads never get here: the ingress acks them with the 400 error dict.
        try:
            return {"ok": True, "status": 201, "value": self.submit(spec)}
        except HTTPError as exc:
            return {"ok": False, "status": exc.status_code, "error": exc.message, "value": None}

    def on_list(self, _data=None):
        return self.list_jobs()

    # Shared by both ---------------------------------------------------------

    def submit(self, payload):
        spec = self.schema("job").require(payload)
        job = self.runner.submit(spec)
        if job is None:
            raise HTTPError("The job queue is full or shutting down; try again later", 503)
        return job

    def find(self, job_id):
        job = self.runner.get(job_id)
        if job is None:
            raise HTTPError("No job %r" % job_id, 404)
        return job

    def list_jobs(self):
        jobs = self.runner.jobs()
        return {"jobs": jobs, "count": len(jobs)}

    def compute_stats(self):
        jobs = self.service("jobs.model").get("jobs", {}).values()
        counts = _count_statuses(jobs)
        durations = [job["finished_at"] - job["started_at"] for job in jobs
                     if job["status"] == "done" and job["started_at"]]
        return {
            "counts": counts,
            "total": sum(counts.values()),
            "average_duration": round(sum(durations) / len(durations), 3) if durations else None,
            "computed_at": time.time(),
        }


###############################################################################
# Composition root
###############################################################################


def create_app(config=None):
    """Build the Flask app, its SocketIO and the SPECTER pieces; nothing runs yet.

    Returns ``(app, socketio, boot_board)``: ``boot_board(signals=True)``
    boots everything once and returns the ServiceManager (``run()`` it to
    serve, or ``shutdown()`` it).
    """
    app = Flask(__name__)
    app.config.update(DEFAULTS)
    app.config.update(config or {})
    cfg = app.config
    queue_options = dict(worker_count=cfg["JOBBOARD_WORKERS"], maxsize=cfg["JOBBOARD_MAX_QUEUE"],
                         drain_timeout=cfg["JOBBOARD_DRAIN_TIMEOUT"], stop_grace=cfg["JOBBOARD_STOP_GRACE"])
    model = create_model("jobs", {"jobs": {}})
    cluster = None
    if cfg["JOBBOARD_REDIS_URL"]:
        # One node of several: the jobs:* events cross processes, the runner takes
        # jobs from a queue in Redis, and an emit reaches the browsers of every node.
        cluster = Cluster(cfg["JOBBOARD_REDIS_URL"], namespace="jobboard", node_id=cfg["JOBBOARD_NODE"],
                          share=["jobs:*"])
        socketio = SocketIO(app, async_mode="gevent", client_manager=cluster.socketio_manager())
        runner = ClusterJobRunner(model, node=cluster.node_id,
                                  visibility_timeout=cfg["JOBBOARD_VISIBILITY_TIMEOUT"], **queue_options)
        room = "node:" + cluster.node_id
    else:
        socketio = SocketIO(app, async_mode="gevent")
        runner = JobRunner(model, **queue_options)
        room = None

    host = create_store("host", {"load": [0.0, 0.0, 0.0], "cpus": os.cpu_count() or 1,
                                 "running": 0, "queued": 0})
    live = LiveUpdates(socketio, host, push_interval=cfg["JOBBOARD_PUSH_INTERVAL"], room=room)
    services = [
        HostMonitor(host, runner, interval=cfg["JOBBOARD_HOST_INTERVAL"]),
        Housekeeper(model, interval=cfg["JOBBOARD_PRUNE_INTERVAL"], max_age=cfg["JOBBOARD_KEEP_SECONDS"],
                    keep=cfg["JOBBOARD_KEEP_FINISHED"]),
    ]

    @app.get("/")
    def index():
        return render_template("index.html")

    def boot_board(*, signals=True):
        return specter.boot(
            app, socketio,
            # Providers start first, in this order, and stop last, in reverse:
            # 'live' outlives the runner, so it pushes the runner's final states.
            providers={"live": live, "jobs.model": model, "jobs.queue": runner, "host.store": host},
            services=services,
            controllers=[JobsController()],
            signals=signals,
            cluster=cluster,  # None on one process; else started first, stopped last
        )

    return app, socketio, boot_board


def main(argv=None):
    parser = argparse.ArgumentParser(description="SPECTER job board demo")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5000, help="port to listen on (default 5000)")
    parser.add_argument("--workers", type=int, default=DEFAULTS["JOBBOARD_WORKERS"],
                        help="jobs that run at once (default %(default)s)")
    parser.add_argument("--redis", metavar="URL",
                        help="run as one node of a cluster sharing this Redis (redis://host:6379/0)")
    parser.add_argument("--node", help="this node's name in the cluster (default: <hostname>:<port>)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be 1 or more")
    if args.node and not args.redis:
        parser.error("--node names a node of a cluster: give --redis URL too")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    # Any setting can also come from the environment: FLASK_JOBBOARD_STOP_GRACE=5 (a JSON value).
    config = Config(os.getcwd())
    config.from_prefixed_env()
    config = {key: value for key, value in config.items() if key.startswith("JOBBOARD_")}
    config["JOBBOARD_WORKERS"] = args.workers
    if args.redis:
        config.update(JOBBOARD_REDIS_URL=args.redis,
                      JOBBOARD_NODE=args.node or "%s:%d" % (socket.gethostname(), args.port))
    node = " as node %s" % config["JOBBOARD_NODE"] if args.redis else ""
    print("Job board on http://%s:%d/%s (Ctrl-C to stop)" % (args.host, args.port, node), flush=True)
    _app, _socketio, boot_board = create_app(config)
    try:
        manager = boot_board()
    except ConnectionError as exc:  # --redis, and no Redis there: nothing was started
        raise SystemExit("The job board did not start: %s" % exc)
    manager.run(host=args.host, port=args.port)  # returns after SIGINT/SIGTERM shut everything down
    print("Job board stopped.", flush=True)


if __name__ == "__main__":
    main()
