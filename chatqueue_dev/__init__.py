"""Development tooling, outside the package a production worker runs: the builders of the demo
and tiny test models (models.py, tiny_model.py) and the servers tests and benchmarks start
(servers.py: redis-server, worker processes; sentinel.py; mirror.py)."""
