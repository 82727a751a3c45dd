"""Moved to chatqueue_dev.servers (dev tooling that benchmarks and scripts use too); kept so that
tests may import it from here."""

from chatqueue_dev.servers import *  # noqa: F403
