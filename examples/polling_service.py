"""A polling Service: a fixed-rate timer, owned greenlets, bus events, state, and a clean stop.

A greenhouse sensor is read ten times a second. The example shows:

* ``interval``: a fixed rate. Tick k is due at start + k * period, so the
  30 ms each read takes does not push the later ticks back.
* ``spawn``: owned greenlets (a heartbeat loop whose ``finally`` block runs
  when ``stop()`` kills it, and a scan for a backup sensor);
  ``spawn_later``: the calibration, 0.15 s after the start.
* ``timeout``: a one-shot callback.
* Cancelling work that is no longer needed: once calibrated, the service
  stops its calibration blinker (``cancel_interval``), disarms a watchdog
  (``cancel_timeout``) and ends the backup scan (``cancel_greenlet``; its
  ``finally`` runs).
* ``adopt``: a child ``ReadingLog`` service is started with the poller and
  stopped by the poller's ``stop()``.
* ``listen`` / ``emit``: the service publishes readings on the bus and takes
  commands from it.
* ``set_state`` with ``subscribe`` (an outside observer) and ``watch`` (an
  observer owned by the service, dropped when it stops).
* ``health()`` while running and after the stop.
* ``stop()`` leaves nothing running: the live greenlets are counted before
  the start, while running and after the stop.

Run:  python examples/polling_service.py [--once | --seconds N]
"""

import argparse
import gc
import logging
import math
import sys
import time

import gevent

from specter import Service, bus

PERIOD = 0.1  # seconds between two reads


class ReadingLog(Service):
    """Records every reading; adopted by the poller, so its lifecycle follows the poller's."""

    def on_start(self):
        self.readings = []
        self.listen("sensor:reading", lambda reading: self.readings.append(reading["celsius"]))

    def on_stop(self):
        print("ReadingLog.on_stop: stopped with its parent, after logging %d readings" % len(self.readings))


class SensorPoller(Service):
    """Reads a (simulated) sensor every PERIOD seconds and publishes each reading."""

    def __init__(self, threshold):
        super().__init__("sensor-poller", initial_state={
            "ticks": 0, "celsius": None, "threshold": threshold, "alarm": False, "calibrated": False,
        })
        self.tick_offsets = []
        self.log = ReadingLog()

    def on_start(self):
        self.started_at = time.monotonic()
        self.adopt(self.log)  # started now, stopped by our stop()
        self.interval(self.read_sensor, PERIOD)
        self.blinks = 0
        self.blinker = self.interval(self.blink, 0.05)  # an LED blinks while calibrating
        self.watchdog = self.timeout(self.calibration_overdue, 0.5)  # fires only if calibration hangs
        self.scanner = self.spawn(self.scan_for_backup, label="scan")
        self.spawn_later(0.15, self.calibrate, label="calibrate")
        self.spawn(self.heartbeat, label="heartbeat")
        self.timeout(self.first_report, 0.35)
        self.listen("sensor:set-threshold", self.on_set_threshold)
        self.watch(self.check_alarm)  # immediate: sees the initial state at once

    def on_stop(self):
        print("on_stop: after %d ticks (the timers and greenlets are still alive here)"
              % self.state["ticks"])

    # Owned work ---------------------------------------------------------------

    def read_sensor(self):
        offset = time.monotonic() - self.started_at
        self.tick_offsets.append(offset)
        gevent.sleep(0.03)  # a slow sensor read; the next tick is still due on time
        ticks = self.state["ticks"] + 1
        celsius = round(22.0 + 2.5 * math.sin(ticks / 2.0), 2)
        self.set_state({"ticks": ticks, "celsius": celsius})
        self.emit("sensor:reading", {"tick": ticks, "celsius": celsius, "at": offset})

    def calibrate(self):
        """Runs once, 0.15 s after the start; then the calibration-time work is cancelled."""
        self.set_state({"calibrated": True})
        print("calibrated at %.2f s after %d blinks: cancel_interval(blinker) -> %s, "
              "cancel_timeout(watchdog) -> %s, cancel_timeout again -> %s"
              % (time.monotonic() - self.started_at, self.blinks, self.cancel_interval(self.blinker),
                 self.cancel_timeout(self.watchdog), self.cancel_timeout(self.watchdog)))
        self.cancel_greenlet(self.scanner)  # kills it and waits: its finally has run on return
        print("cancel_greenlet(scanner) returned; scanner dead: %s" % self.scanner.dead)

    def blink(self):
        self.blinks += 1

    def calibration_overdue(self):
        print("watchdog: calibration is overdue!")  # never printed: calibrate() disarms it

    def scan_for_backup(self):
        tries = 0
        try:
            while True:
                gevent.sleep(0.04)
                tries += 1
        finally:
            print("scanner: finally block ran after %d tries (cancel_greenlet sent GreenletExit)" % tries)

    def heartbeat(self):
        beats = 0
        try:
            while True:
                gevent.sleep(0.25)
                beats += 1
        finally:
            print("heartbeat: finally block ran after %d beats (stop() sent GreenletExit)" % beats)

    def first_report(self):
        print("timeout fired once at %.2f s: %d readings so far"
              % (time.monotonic() - self.started_at, self.state["ticks"]))

    # Bus and state ------------------------------------------------------------

    def on_set_threshold(self, command):
        self.set_state({"threshold": command["celsius"]})

    def check_alarm(self, state, service):
        """Runs after every set_state; its own set_state is delivered after the current round."""
        if state["celsius"] is None:
            return
        alarm = state["celsius"] > state["threshold"]
        if alarm != state["alarm"]:
            self.set_state({"alarm": alarm})
            self.emit("sensor:alarm", {"on": alarm, "celsius": state["celsius"]})


def live_greenlets():
    """How many gevent greenlets exist and are not dead, in the whole process."""
    return sum(1 for obj in gc.get_objects() if isinstance(obj, gevent.Greenlet) and not obj.dead)


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
    parser.add_argument("--once", action="store_true", help="a short run (0.7 s)")
    parser.add_argument("--seconds", type=float, default=2.0, help="how long to poll (default 2)")
    args = parser.parse_args()
    seconds = 0.7 if args.once else args.seconds
    setup_logging()

    before = live_greenlets()
    poller = SensorPoller(threshold=23.5)

    seen = {}

    def on_state(state, service):
        changed = {key: value for key, value in state.items()
                   if key not in ("ticks", "celsius") and seen.get(key, value) != value}
        seen.update(state)
        if changed:
            print("  state changed: %s" % changed)

    poller.subscribe(on_state)
    bus.on("sensor:reading", lambda r: print(
        "reading #%(tick)d: %(celsius).2f C  (tick due at %(due).3f s, ran at %(at).3f s)"
        % dict(r, due=r["tick"] * PERIOD)))
    bus.on("sensor:alarm", lambda alarm: print(
        "  ALARM %s at %.2f C" % ("on" if alarm["on"] else "off", alarm["celsius"])))

    poller.start()
    print("started; live greenlets: before start %d, now %d" % (before, live_greenlets()))
    gevent.sleep(seconds / 2)
    print("bus -> sensor:set-threshold 24.0")
    bus.emit("sensor:set-threshold", {"celsius": 24.0})
    gevent.sleep(seconds / 2 + PERIOD / 2)  # stop between two ticks, not on one

    health = poller.health()
    print("health while running: status=%s counts=%s errors=%d"
          % (health["status"], health["counts"], health["errors"]))
    lateness = max(offset - (k + 1) * PERIOD for k, offset in enumerate(poller.tick_offsets))
    print("fixed rate: %d ticks, none ran more than %.1f ms after its due time "
          "(no drift, although each read takes 30 ms)" % (len(poller.tick_offsets), lateness * 1000))

    poller.stop()
    after = live_greenlets()
    health = poller.health()
    print("stopped: status=%s counts=%s; adopted ReadingLog status=%s"
          % (health["status"], health["counts"], poller.log.status))
    print("live greenlets after stop: %d (before start: %d); 'sensor:set-threshold' listeners left: %d"
          % (after, before, bus.listener_count("sensor:set-threshold")))
    assert after == before, "stop() left greenlets behind"
    assert health["status"] == "stopped" and not any(health["counts"].values())
    assert poller.log.status == "stopped" and poller.log.readings
    assert poller.blinks and poller.state["calibrated"]


if __name__ == "__main__":
    main()
