"""Child processes and watchers: ManagedProcess, start_process, Watcher (poll and stream), own().

The example shows:

1. ``start_process`` with a ``sys.executable -c`` child, ``watch_stream``
   in line mode, and ``poll()`` / ``wait(timeout)``.
2. ``watch_stream`` in chunk mode (raw bytes, ``chunk_size``).
3. ``follow_output``: one handler per stream (stdout and stderr).
4. ``stop()`` of a child that ignores SIGTERM: it is killed once
   ``terminate_timeout`` has passed.
5. No orphans: ``stop()`` ends the child's whole process group, so the
   grandchild of ``sh -c 'sleep 30 & wait'`` is gone too.
6. A ``SensorHub`` service that ``own()``s two Watchers: one in poll mode
   (``transform``, ``dedupe``, and retry with backoff on a flaky
   thermometer) and one in stream mode following a child's output. Its
   ``stop()`` stops both and the child they follow.
7. ``attach(owner)``: children started with no owner are handed to a
   service afterwards; its ``stop()`` stops them. A child that is stopped
   earlier leaves its owner, so a long-lived service does not pile up the
   short-lived processes it once owned.

Run:  python examples/process_watcher.py [--once | --seconds N]
"""

import argparse
import logging
import os
import sys
import time

import gevent
import gevent.event
import gevent.queue

from specter import ManagedProcess, Service, Watcher, WatcherError, start_process

PIPE = ManagedProcess.PIPE

COUNTER = """
import time
for n in range(1, 4):
    print("reading", n, flush=True)
    time.sleep(0.05)
"""

BLOB = "import sys; sys.stdout.buffer.write(b'x' * 10000)"

CHATTY = """
import sys
print("all good", flush=True)
print("disk almost full", file=sys.stderr, flush=True)
print("still good", flush=True)
"""

STUBBORN = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready, and ignoring SIGTERM", flush=True)
time.sleep(30)
"""

TICKER = """
import time
for n in range(1, 200):
    print("cellar %.1f" % (12 + n / 10), flush=True)
    time.sleep(0.15)
"""


def python(code):
    return [sys.executable, "-u", "-c", code]


def alive(pid):
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open("/proc/%d/stat" % pid) as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return True  # no /proc here: kill(0) succeeded, so it exists


def lines_demo():
    print("== 1. start_process, watch_stream (lines), poll and wait")
    proc = start_process("counter", python(COUNTER), stdout=PIPE, text=True)
    reader = proc.watch_stream("stdout", lambda line: print("  stdout: %r" % line))
    print("pid %d running=%s poll() -> %r wait(timeout=0.01) -> %r"
          % (proc.pid, proc.running, proc.poll(), proc.wait(timeout=0.01)))
    print("wait() -> %r" % proc.wait(timeout=5))
    reader.join(timeout=1)  # the reader may still be delivering the last line
    proc.stop()
    print("after stop(): running=%s returncode=%r poll() -> %r"
          % (proc.running, proc.returncode, proc.poll()))


def chunks_demo():
    print("\n== 2. watch_stream in chunk mode")
    proc = start_process("blob", python(BLOB), stdout=PIPE)
    sizes = []
    reader = proc.watch_stream("stdout", lambda chunk: sizes.append(len(chunk)), chunk_size=4096)
    proc.wait(timeout=5)
    reader.join(timeout=1)
    proc.stop()
    print("chunks of at most 4096 bytes: %s, %d bytes in all" % (sizes, sum(sizes)))
    assert sum(sizes) == 10000 and max(sizes) <= 4096


def follow_demo():
    print("\n== 3. follow_output: a handler per stream")
    proc = start_process("chatty", python(CHATTY), stdout=PIPE, stderr=PIPE, text=True)
    readers = proc.follow_output(stdout_handler=lambda line: print("  out: %s" % line),
                                 stderr_handler=lambda line: print("  err: %s" % line))
    proc.wait(timeout=5)
    gevent.joinall(readers, timeout=1)
    proc.stop()
    print("exit code %r" % proc.returncode)


def stubborn_demo():
    print("\n== 4. stop() of a child that ignores SIGTERM")
    proc = ManagedProcess("stubborn", terminate_timeout=0.3)
    proc.start(python(STUBBORN), stdout=PIPE, text=True)
    ready = gevent.event.Event()
    proc.watch_stream("stdout", lambda line: (print("  child: %s" % line), ready.set()))
    ready.wait(timeout=5)  # its SIGTERM handler is in place now
    started = time.monotonic()
    proc.stop()
    print("stop() took %.2f s (terminate_timeout=0.3), returncode=%r (killed by SIGKILL)"
          % (time.monotonic() - started, proc.returncode))
    assert proc.returncode == -9


def group_demo():
    print("\n== 5. the process group: no orphaned grandchild")
    proc = start_process("shell", ["sh", "-c", "sleep 30 & echo $!; wait"], stdout=PIPE, text=True)
    pids = gevent.queue.Queue()
    proc.watch_stream("stdout", lambda line: pids.put(int(line)))
    grandchild = pids.get(timeout=5)
    print("sh pid %d, its 'sleep 30' pid %d: alive=%s" % (proc.pid, grandchild, alive(grandchild)))
    proc.stop()
    gone = not gevent.with_timeout(1, wait_gone, grandchild, timeout_value=False)
    print("after stop(): sh alive=%s, grandchild alive=%s" % (alive(proc.pid), not gone))
    assert gone and not alive(proc.pid)


def wait_gone(pid):
    while alive(pid):
        gevent.sleep(0.01)
    return False


class Thermometer:
    """A flaky device: it times out twice and is unplugged once before settling down."""

    def __init__(self):
        self.script = [20.04, 20.01, 20.4, "timeout", "timeout", 21.2, "unplugged", 21.4, 21.0, 22.6]
        self.value = None
        self.reads = []  # (monotonic time, what happened)

    def read(self):
        step = self.script.pop(0) if self.script else self.value
        self.reads.append((time.monotonic(), step))
        if step == "timeout":
            raise WatcherError("thermometer did not answer")  # logged as a warning, no traceback
        if step == "unplugged":
            raise OSError("thermometer unplugged")  # logged as an error with its traceback
        self.value = step
        return step


def follow_child_lines(pids):
    """A Watcher stream: the lines of a child process; closing it stops the child."""
    lines = gevent.queue.Queue()
    child = start_process("ticker", python(TICKER), stdout=PIPE, text=True)
    pids.append(child.pid)
    reader = child.watch_stream("stdout", lines.put)
    reader.link(lambda _: lines.put(StopIteration))  # end the iteration at end of output
    try:
        for line in lines:
            yield line
    finally:
        child.stop()


class SensorHub(Service):
    """Owns a poll watcher on the thermometer and a stream watcher on the ticker child."""

    def on_start(self):
        self.started_at = time.monotonic()
        self.device = Thermometer()
        self.ticker_pids = []
        self.thermometer = self.own(Watcher(
            "thermometer", poll=self.device.read, interval=0.05, max_backoff=0.4,
            transform=round, dedupe=True,
        )).start()
        self.ticker = self.own(Watcher(
            "ticker", stream=lambda: follow_child_lines(self.ticker_pids),
            transform=lambda line: float(line.split()[1]),
        )).start()
        self.thermometer.subscribe(self.on_temperature)
        self.ticker.subscribe(self.on_ticker)

    def on_temperature(self, celsius, watcher):
        print("  %.2f s  thermometer -> %s C (rounded, only when it changes)"
              % (time.monotonic() - self.started_at, celsius))

    def on_ticker(self, celsius, watcher):
        print("  %.2f s  ticker child -> %s C" % (time.monotonic() - self.started_at, celsius))


def hub_demo(seconds):
    print("\n== 6. a Service owning a poll Watcher and a stream Watcher")
    hub = SensorHub().start()
    gevent.sleep(seconds)
    with gevent.Timeout(5, False):  # on a loaded machine, let the thermometer finish its script
        while hub.device.script:
            gevent.sleep(0.05)
    thermometer = hub.thermometer.health()
    reads = hub.device.reads
    print("thermometer reads as '+gap result' (interval 0.05 s; after the n-th failure in a row the "
          "next try waits 0.05 * 2**(n-1) s, jittered to 50-100%):")
    print("  " + ", ".join("+%.2f %s" % (at - prev, step)
                           for (prev, _), (at, step) in zip(reads, reads[1:12])))
    print("thermometer health: errors=%d last_error=%r last_value=%r"
          % (thermometer["error_count"], thermometer["last_error"], hub.thermometer.last_value))
    print("ticker health: mode=%s running=%s subscribers=%d"
          % (hub.ticker.health()["mode"], hub.ticker.running, hub.ticker.health()["subscribers"]))
    hub.stop()
    child = hub.ticker_pids[0]
    print("hub stopped: thermometer running=%s, ticker running=%s, ticker child %d alive=%s"
          % (hub.thermometer.running, hub.ticker.running, child, alive(child)))
    assert thermometer["error_count"] == 3 and not alive(child)


class Supervisor(Service):
    """Owns nothing of its own: the children are attached to it from outside."""


def attach_demo():
    print("\n== 7. attach(owner): hand already-running children to a service")
    supervisor = Supervisor().start()
    workers = [start_process("worker-%d" % n, ["sleep", "30"]) for n in (1, 2)]  # no owner yet
    for worker in workers:
        worker.attach(supervisor)  # supervisor.stop() will now stop it
    print("attached pids %s; supervisor owns %d resource(s)"
          % ([w.pid for w in workers], len(supervisor.health()["resources"])))
    workers[0].stop()  # ended early: it leaves its owner
    print("worker-1 stopped early: supervisor owns %d resource(s)" % len(supervisor.health()["resources"]))
    supervisor.stop()
    print("supervisor stopped: worker-2 running=%s returncode=%r (SIGTERM); pids alive: %s"
          % (workers[1].running, workers[1].returncode, [alive(w.pid) for w in workers]))
    assert not any(w.running or alive(w.pid) for w in workers)


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
    parser.add_argument("--once", action="store_true", help="a short run of the watchers (0.9 s)")
    parser.add_argument("--seconds", type=float, default=2.0, help="how long the hub runs (default 2)")
    args = parser.parse_args()
    setup_logging()
    lines_demo()
    chunks_demo()
    follow_demo()
    stubborn_demo()
    group_demo()
    hub_demo(0.9 if args.once else max(args.seconds, 0.9))
    attach_demo()


if __name__ == "__main__":
    main()
