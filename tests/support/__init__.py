"""Real servers for tests: redis-server and `chatqueue-worker` subprocesses, started and stopped
here."""
