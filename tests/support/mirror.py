"""Moved to chatqueue_dev.mirror (dev tooling that benchmarks and scripts use too); kept so that
tests may import it from here."""

from chatqueue_dev.mirror import *  # noqa: F403
