"""A first taste of SPECTER: a service that owns a timer, a store, and a contract.

Run:  python examples/quickstart.py [--seconds N]
"""

import argparse
import logging

import gevent

from specter import Field, Schema, Service, bus, create_store

readings = create_store("readings", {"count": 0, "last": None})

reading_schema = Schema("reading", {
    "sensor": Field(str, required=True, min_length=1),
    "celsius": Field(float, required=True, min=-90, max=60),
})


class SensorService(Service):
    """Samples a fake sensor five times a second and publishes each reading."""

    def on_start(self):
        self.samples = 0
        self.interval(self.sample, 0.2)
        self.listen("reading:taken", self.record)

    def sample(self):
        self.samples += 1
        raw = {"sensor": "greenhouse", "celsius": str(18 + self.samples % 5)}
        outcome = reading_schema.validate(raw)
        self.emit("reading:taken", outcome.value)

    def record(self, reading):
        readings.update(lambda draft: draft.update(count=draft["count"] + 1, last=reading))

    def on_stop(self):
        print("stopping after %d samples" % self.samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=1.5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")

    readings.subscribe(lambda snapshot, store: print("reading #%(count)d: %(last)s" % snapshot))
    print("invalid payload ->", reading_schema.validate({"celsius": "hot"}).error)

    service = SensorService().start()
    gevent.sleep(args.seconds)
    service.stop()
    print("health:", service.health()["status"], "| bus listeners left:", bus.listener_count())


if __name__ == "__main__":
    main()
