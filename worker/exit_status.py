"""The exit statuses of `chatqueue-worker run` (sysexits.h), for orchestrators and tests.

A module of its own, with no imports: reading them must not import worker.app, which turns the
importing process offline for the hub.
"""

OK = 0
# The worker could not become ready (model folder, load, device, warm-up): it took no job.
START_FAILED = 78  # EX_CONFIG
# The engine thread died while the worker ran: it stopped consuming and gave its jobs back.
ENGINE_DIED = 70  # EX_SOFTWARE
