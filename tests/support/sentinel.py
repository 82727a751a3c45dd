"""Moved to chatqueue_dev.sentinel (dev tooling that benchmarks and scripts use too); kept so that
tests may import it from here."""

from chatqueue_dev.sentinel import *  # noqa: F403
