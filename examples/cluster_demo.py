"""The same app on three processes sharing one Redis: shared work, one reporter, shared events.

The example shows:

1. Three node processes of one app (this file with ``--node``), each with
   a ``Cluster`` booted before its services.
2. A ``ClusterQueue`` named ``'thumbnails'``: the coordinator enqueues 30
   jobs and every node takes a share; each job is handled once.
3. A shared bus event: each node emits ``'thumbnail:done'``; the
   coordinator (a node too) hears every one, with ``origin='remote'``.
4. A singleton interval: every node schedules the ``'report'`` tick, but
   only the node holding the lease ticks.
5. A graceful stop: SIGTERM ends each node through its ServiceManager.

Redis: the URL in ``SPECTER_REDIS_URL``, or else a private ``redis-server``
(``apt-get install -y redis-server``) started on a free port in a temp dir
and stopped at the end.

Run:  python examples/cluster_demo.py [--once] [--nodes 3] [--jobs 30]
"""

import argparse
import collections
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import flask
import gevent
import gevent.subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the checkout's specter.py, when not installed

from specter import Cluster, ClusterQueue, Service, boot, bus  # noqa: E402


class Thumbnails(ClusterQueue):
    """Makes a thumbnail per job; any node may take any job, each is acknowledged once done."""

    def handle_item(self, job):
        gevent.sleep(0.02)  # the work
        bus.emit("thumbnail:done", {"job": job["id"], "node": os.environ["NODE_NAME"]})


class Reporter(Service):
    """Schedules a report on every node; the lease lets one node tick at a time."""

    singleton_ttl = 2.0

    def on_start(self):
        self.interval(self.report, 0.2, singleton=True)

    def report(self):
        print("%s: report tick (the only node ticking)" % os.environ["NODE_NAME"], flush=True)


def run_node(url):
    cluster = Cluster(url, node_id=os.environ["NODE_NAME"], share=["thumbnail:*"])
    boot(flask.Flask(__name__), None, services=[Thumbnails("thumbnails", worker_count=2), Reporter()],
         cluster=cluster)
    print("%s: ready" % cluster.node_id, flush=True)
    gevent.sleep(3600)  # SIGTERM: the manager shuts down and ends the program


def start_redis():
    """A private redis-server: (process, url, folder)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    folder = tempfile.mkdtemp(prefix="cluster-demo-")
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", folder],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return process, "redis://127.0.0.1:%d/0" % port, folder


def coordinate(url, nodes, jobs):
    """This process is a node too: it starts the others, enqueues, and counts who did what."""
    os.environ["NODE_NAME"] = "coordinator"
    done = collections.Counter()
    bus.on("thumbnail:done", lambda data: done.update([data["node"]]))  # local and remote
    cluster = Cluster(url, node_id="coordinator", share=["thumbnail:*"])
    deadline = time.monotonic() + 10
    while True:  # a fresh redis-server takes a moment to listen
        try:
            cluster.start()
            break
        except ConnectionError:
            if time.monotonic() > deadline:
                raise
            gevent.sleep(0.05)
    children = []
    for number in range(1, nodes + 1):
        env = dict(os.environ, NODE_NAME="node-%d" % number, SPECTER_REDIS_URL=url)
        children.append(gevent.subprocess.Popen([sys.executable, __file__, "--node"], env=env,
                                                start_new_session=True))
    queue = Thumbnails("thumbnails", worker_count=1)
    try:
        with gevent.Timeout(60):
            while len(cluster.nodes()) < nodes + 1:
                gevent.sleep(0.05)
        print("cluster: %s" % ", ".join(node["node_id"] for node in cluster.nodes()), flush=True)
        queue.start()
        for job in range(jobs):
            queue.enqueue({"id": job})
        if not queue.join(timeout=60):
            raise SystemExit("the jobs did not finish within 60 s")
        gevent.sleep(0.1)  # the last 'thumbnail:done' events are on their way
        print("done: %d jobs, by node: %s" % (sum(done.values()), dict(sorted(done.items()))), flush=True)
    finally:
        queue.stop()
        for child in children:
            if child.poll() is None:
                os.kill(child.pid, signal.SIGTERM)  # graceful: each node's manager shuts down
        for child in children:
            try:
                child.wait(timeout=10)
            except gevent.subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        cluster.stop()
    print("nodes stopped with exit codes %s" % [child.returncode for child in children])
    if sum(done.values()) != jobs:
        raise SystemExit("expected %d jobs done, got %d" % (jobs, sum(done.values())))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--once", action="store_true", help="a short run (2 nodes, 12 jobs)")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=30)
    args = parser.parse_args()
    url = os.environ.get("SPECTER_REDIS_URL")
    if args.node:
        return run_node(url)
    nodes, jobs = (2, 12) if args.once else (args.nodes, args.jobs)
    if url:
        return coordinate(url, nodes, jobs)
    if shutil.which("redis-server") is None:
        print("redis-server is not installed: apt-get install -y redis-server "
              "(or set SPECTER_REDIS_URL to a Redis of yours)")
        sys.exit(1 if os.environ.get("CI") else 0)
    process, url, folder = start_redis()
    try:
        coordinate(url, nodes, jobs)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
