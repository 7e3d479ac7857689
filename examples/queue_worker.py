"""A QueueService job worker: backpressure, failures, join, drain on stop, dropped items, supervision.

The example shows:

1. Backpressure: a bounded queue (``maxsize``) makes ``enqueue`` return
   False when full; ``enqueue(block=True, timeout=...)`` waits for room.
2. A job that raises is logged and counted (``failed``); the worker goes on.
3. ``join()`` waits until every queued job has been handled.
4. ``stop()`` drains: jobs still queued at stop time run before it returns,
   and ``enqueue`` on a stopped service returns False.
5. No silent loss: with a tiny ``drain_timeout`` and slow jobs, the job in
   hand finishes and what is still queued goes to ``on_dropped(items)``.
6. ``supervise()``: a flaky feed task is restarted with exponential
   backoff; when it fails too often the service is marked 'failed' and the
   bus gets ``'service:failed'``.

Run:  python examples/queue_worker.py [--once]
      (the demo ends by itself in about a second; --once is accepted so
      every example can be run the same way)
"""

import argparse
import logging
import sys
import time

import gevent

from specter import QueueService, bus


class JobWorker(QueueService):
    """Runs jobs: ``seconds`` is how long a job takes, ``corrupt`` makes it raise."""

    def __init__(self, name="job-worker", *, workers=3, maxsize=0):
        super().__init__(name, worker_count=workers, maxsize=maxsize)
        self.done = []
        self.dropped = []

    def handle_item(self, job):
        gevent.sleep(job.get("seconds", 0.01))
        if job.get("corrupt"):
            raise ValueError("job %s has a corrupt payload" % job["id"])
        self.done.append(job["id"])

    def on_workers_started(self):
        print("[%s] %d workers started" % (self.name, self.worker_count))

    def on_workers_stopping(self):
        print("[%s] stopping with %d job(s) queued: draining first" % (self.name, self.pending_count()))

    def on_dropped(self, jobs):
        self.dropped.extend(jobs)
        print("[%s] on_dropped got %d job(s) the drain could not reach: %s"
              % (self.name, len(jobs), [job["id"] for job in jobs]))


class SlowWorker(JobWorker):
    drain_timeout = 0.1  # seconds stop() waits for the queue before handing the rest to on_dropped


class FlakyFeed:
    """An upstream that hands out batches of jobs, when it is up."""

    def __init__(self, script):
        self.script = list(script)

    def fetch(self):
        step = self.script.pop(0) if self.script else "down"
        if step == "down":
            raise ConnectionError("feed unreachable")
        return step


class FeedWorker(JobWorker):
    """Pulls jobs from a flaky feed in a supervised task and runs them."""

    restart_backoff = 0.05  # first restart delay; doubles up to restart_max_backoff
    restart_max_backoff = 0.4

    def __init__(self, feed):
        super().__init__("feed-worker", workers=2)
        self.feed = feed
        self.attempts = []

    def on_start(self):
        self.started_at = time.monotonic()
        self.supervise(self.pull_feed, max_restarts=3, within=10.0)

    def pull_feed(self):
        now = time.monotonic() - self.started_at
        waited = now - self.attempts[-1] if self.attempts else 0.0
        self.attempts.append(now)
        print("[%s] pull_feed attempt %d at %.2f s (after a %.2f s backoff)"
              % (self.name, len(self.attempts), now, waited))
        while True:
            for job in self.feed.fetch():  # raises while the feed is down
                self.enqueue(job, block=True)
            gevent.sleep(0.01)


def jobs(prefix, count, **fields):
    return [dict(fields, id="%s-%d" % (prefix, n)) for n in range(1, count + 1)]


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

    print("== 1. backpressure: 3 workers, a queue of at most 5 jobs")
    worker = JobWorker(workers=3, maxsize=5).start()
    batch = jobs("job", 10, seconds=0.05)
    batch[2]["corrupt"] = True
    rejected = []
    for index, job in enumerate(batch):
        if index == 5:
            gevent.sleep(0.01)
            print("(the 3 workers took a job each; %d still queued)" % worker.pending_count())
        accepted = worker.enqueue(job)
        print("enqueue %s -> %s%s" % (job["id"], accepted, "" if accepted else "  (queue full)"))
        if not accepted:
            rejected.append(job)
    for job in rejected:
        started = time.monotonic()
        accepted = worker.enqueue(job, block=True, timeout=1.0)
        print("enqueue %s, block=True -> %s after waiting %.2f s for room"
              % (job["id"], accepted, time.monotonic() - started))

    print("== 2 and 3. a failing job, then join()")
    print("join() -> %s" % worker.join(timeout=2.0))
    state = worker.get_state()
    health = worker.health()
    print("state: processed=%(processed)d failed=%(failed)d queue_size=%(queue_size)d" % state)
    print("health: errors=%d last_error=%s" % (health["errors"], health["last_error"]))
    assert (state["processed"], state["failed"]) == (9, 1)

    print("== 4. stop() drains what is still queued")
    for job in jobs("late", 4, seconds=0.02):
        worker.enqueue(job)
    print("queued %d jobs, calling stop() at once" % worker.pending_count())
    worker.stop()
    print("stop() returned: processed=%d, pending=%d, dropped=%d"
          % (worker.get_state()["processed"], worker.pending_count(), len(worker.dropped)))
    print("enqueue on a stopped service -> %s" % worker.enqueue({"id": "too-late"}))
    assert worker.get_state()["processed"] == 13 and not worker.dropped

    print("== 5. a drain that times out hands the rest to on_dropped")
    slow = SlowWorker("slow-worker", workers=1).start()
    for job in jobs("slow", 5, seconds=0.3):
        slow.enqueue(job)
    gevent.sleep(0)  # let the worker pick up slow-1
    started = time.monotonic()
    slow.stop()
    print("stop() took %.2f s: the job in hand finished (done=%s), the other %d went to on_dropped"
          % (time.monotonic() - started, slow.done, len(slow.dropped)))
    assert slow.done == ["slow-1"] and len(slow.dropped) == 4

    print("== 6. supervise(): a flaky feed is restarted with backoff, then gives up")
    bus.on("service:failed", lambda event: print("bus 'service:failed': %s" % event))
    feed = FlakyFeed(["down", jobs("feed", 2), "down", "down", "down"])
    feeder = FeedWorker(feed).start()
    with gevent.Timeout(5, False):  # the backoffs add up to about 0.35 s
        while feeder.status != "failed":
            gevent.sleep(0.02)
    health = feeder.health()
    print("status=%s restarts=%d failure=%s processed=%d"
          % (feeder.status, health["restarts"], health["failure"]["error"], feeder.get_state()["processed"]))
    assert feeder.status == "failed" and health["restarts"] == 3
    feeder.stop()
    print("after stop(): status=%s, health status=%s" % (feeder.status, feeder.health()["status"]))


if __name__ == "__main__":
    main()
