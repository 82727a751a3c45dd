"""A Redis Sentinel setup on loopback for tests and the soak: a primary, a replica and three
sentinels, all real `redis-server` processes started through the deploy scripts compose runs
(deploy/redis/entrypoint.sh on the ACL from acl.sh with the replication login, and
deploy/redis/sentinel.sh), with short failure-detection times."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from chatqueue_dev.servers import REPO_ROOT, TlsFiles, die_with_parent, free_port, wait_until

MASTER = "chatqueue"
DEPLOY = REPO_ROOT / "deploy" / "redis"
PASSWORDS = {
    "REDIS_ADMIN_PASSWORD": "admin-pw", "REDIS_PRODUCER_PASSWORD": "producer-pw",
    "REDIS_WORKER_PASSWORD": "worker-pw", "REDIS_FLOWER_PASSWORD": "flower-pw",
    "REDIS_REPLICA_PASSWORD": "replica-pw", "REDIS_SENTINEL_PASSWORD": "sentinel-user-pw",
    "SENTINEL_PASSWORD": "sentinels-own-pw", "SENTINEL_CLIENT_PASSWORD": "sentinel-client-pw",
}
# The sentinels' user for workers and producers (sentinel.sh): it may only ask for the primary.
SENTINEL_CLIENT = "client"


@dataclass
class Node:
    port: int
    workdir: Path
    command: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    tls: TlsFiles | None = None

    def start(self) -> None:
        log = (self.workdir / "redis.log").open("ab")
        self.process = subprocess.Popen(self.command, env=self.env, stdout=log,
                                        stderr=subprocess.STDOUT, preexec_fn=die_with_parent)

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, username="admin",
                           password=PASSWORDS["REDIS_ADMIN_PASSWORD"], **_tls(self.tls),
                           **kwargs)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def role(self) -> str | None:
        try:
            return str(self.client(socket_timeout=1).role()[0], "ascii")
        except (redis.ConnectionError, redis.TimeoutError):
            return None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(sig)
            self.process.wait(timeout=15)


@dataclass
class SentinelCluster:
    nodes: list[Node]
    sentinels: list[Node]
    down_after_ms: int
    events: list[str] = field(default_factory=list)
    tls: TlsFiles | None = None

    @property
    def addresses(self) -> str:
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def sentinel_client(self, index: int = 0, **login: Any) -> redis.Redis:
        """The operator's client of one sentinel (the default user: every command), or of
        another login (`username=`, `password=`)."""
        login = login or {"password": PASSWORDS["SENTINEL_PASSWORD"]}
        return redis.Redis(host="127.0.0.1", port=self.sentinels[index].port, socket_timeout=1,
                           **_tls(self.tls), **login)

    def acl_refusals(self, username: str = SENTINEL_CLIENT) -> list[dict[str, Any]]:
        """What the sentinels' ACL refused `username` (ACL LOG), on every sentinel."""
        return [entry for index in range(len(self.sentinels))
                for entry in self.sentinel_client(index).acl_log()
                if entry.get("username") in (username, username.encode())]

    def primary_port(self) -> int | None:
        """The primary's port as a majority of the sentinels name it (None while they differ
        or none answers)."""
        seen = []
        for index in range(len(self.sentinels)):
            try:
                address = self.sentinel_client(index).sentinel_get_master_addr_by_name(MASTER)
            except (redis.ConnectionError, redis.TimeoutError):
                continue
            if address:
                seen.append(int(address[1]))
        best = max(set(seen), key=seen.count, default=None)
        return best if best is not None and seen.count(best) >= 2 else None

    def primary(self) -> Node:
        port = self.primary_port()
        return next(node for node in self.nodes if node.port == port)

    def admin(self) -> redis.Redis:
        """The operator's client of whichever node is primary now."""
        from redis.sentinel import Sentinel

        sentinel = Sentinel([("127.0.0.1", s.port) for s in self.sentinels],
                            sentinel_kwargs={"password": PASSWORDS["SENTINEL_PASSWORD"],
                                             "socket_timeout": 1, **_tls(self.tls)})
        client: redis.Redis = sentinel.master_for(
            MASTER, username="admin", password=PASSWORDS["REDIS_ADMIN_PASSWORD"],
            **_tls(self.tls))
        return client

    def wait_replicated(self, timeout: float = 30) -> None:
        """Until a primary the sentinels agree on has a replica in sync and every sentinel
        knows it and the other sentinels."""
        def ready() -> bool:
            port = self.primary_port()
            if port is None:
                return False
            for index in range(len(self.sentinels)):
                try:
                    master = self.sentinel_client(index).sentinel_master(MASTER)
                except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                    return False
                if int(master["num-slaves"]) < 1 or int(master["num-other-sentinels"]) < 2:
                    return False
            info = next(n for n in self.nodes if n.port == port).client().info("replication")
            return any(isinstance(value, dict) and value.get("state") == "online"
                       for name, value in info.items() if name.startswith("slave"))
        wait_until(ready, timeout=timeout, what="a replicated primary known to 3 sentinels",
                   interval=0.1)

    def worker_settings(self) -> dict[str, str]:
        """worker_env(...) keywords that put a worker on the sentinels (their client user)."""
        tls = {"redis_ca_file": str(self.tls.ca)} if self.tls else {}
        return {"redis_sentinels": self.addresses, "redis_sentinel_master": MASTER,
                "redis_sentinel_username": SENTINEL_CLIENT,
                "redis_sentinel_password": PASSWORDS["SENTINEL_CLIENT_PASSWORD"],
                "redis_username": "worker", "redis_password": PASSWORDS["REDIS_WORKER_PASSWORD"],
                **tls}

    def producer_settings(self) -> dict[str, Any]:
        scheme = "rediss" if self.tls else "redis"
        tls = {"redis_ca_file": self.tls.ca} if self.tls else {}
        return {"broker_url": f"{scheme}://sentinel-named-primary/0",
                "redis_sentinels": self.addresses, "redis_sentinel_master": MASTER,
                "redis_sentinel_username": SENTINEL_CLIENT,
                "redis_sentinel_password": PASSWORDS["SENTINEL_CLIENT_PASSWORD"],
                "redis_username": "producer",
                "redis_password": PASSWORDS["REDIS_PRODUCER_PASSWORD"], **tls}


def _tls(tls: TlsFiles | None) -> dict[str, Any]:
    return {"ssl": True, "ssl_ca_certs": str(tls.ca)} if tls else {}


def _fake_image_entrypoint(bin_dir: Path) -> None:
    """The redis image's docker-entrypoint.sh drops to the redis user and runs its arguments;
    here the tests' own user runs them."""
    script = bin_dir / "docker-entrypoint.sh"
    script.write_text('#!/bin/sh\nexec "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


@contextmanager
def sentinel_cluster(*, down_after_ms: int = 1000, failover_timeout_ms: int = 3000,
                     tls: TlsFiles | None = None) -> Iterator[SentinelCluster]:
    """`tls`: every node and sentinel serves TLS only (sentinel.sh's SENTINEL_TLS_*), and
    replication and the sentinels' own connections go over it, verified against tls.ca."""
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not on PATH (.ci/run installs it)")
    root = Path(tempfile.mkdtemp(prefix="chatqueue-sentinel-"))
    bin_dir = root / "bin"
    bin_dir.mkdir()
    _fake_image_entrypoint(bin_dir)
    base_env = {**{k: v for k, v in os.environ.items() if not k.startswith("CHATQUEUE_")},
                **PASSWORDS, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    nodes: list[Node] = []
    for index in range(2):
        port, workdir = free_port(), root / f"node{index}"
        workdir.mkdir()
        listen = ["--port", str(port)] if tls is None else [
            "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tls.cert),
            "--tls-key-file", str(tls.key), "--tls-ca-cert-file", str(tls.ca),
            "--tls-auth-clients", "no", "--tls-replication", "yes"]
        command = ["sh", str(DEPLOY / "entrypoint.sh"), "redis-server", "--bind", "127.0.0.1",
                   *listen, "--dir", str(workdir), "--save", "",
                   "--appendonly", "yes", "--repl-diskless-sync-delay", "0"]
        if index == 1:
            command += ["--replicaof", "127.0.0.1", str(nodes[0].port)]
        nodes.append(Node(port, workdir, command,
                          {**base_env, "CHATQUEUE_ACL_DIR": str(workdir / "acl")}, tls=tls))
    sentinels: list[Node] = []
    for index in range(3):
        port, workdir = free_port(), root / f"sentinel{index}"
        workdir.mkdir()
        env = {**base_env, "SENTINEL_DIR": str(workdir), "SENTINEL_PORT": str(port),
               "SENTINEL_PRIMARY_HOST": "127.0.0.1", "SENTINEL_PRIMARY_PORT": str(nodes[0].port),
               "SENTINEL_DOWN_AFTER_MS": str(down_after_ms),
               "SENTINEL_FAILOVER_TIMEOUT_MS": str(failover_timeout_ms)}
        if tls is not None:
            env |= {"SENTINEL_TLS_CERT_FILE": str(tls.cert), "SENTINEL_TLS_KEY_FILE": str(tls.key),
                    "SENTINEL_TLS_CA_FILE": str(tls.ca)}
        sentinels.append(Node(port, workdir, ["sh", str(DEPLOY / "sentinel.sh")], env, tls=tls))
    cluster = SentinelCluster(nodes, sentinels, down_after_ms, tls=tls)
    try:
        for node in nodes:
            node.start()
            wait_until(node.role, timeout=20, what=f"redis-server on port {node.port}")
        for sentinel in sentinels:
            sentinel.start()
        cluster.wait_replicated()
        yield cluster
    finally:
        for node in [*sentinels, *nodes]:
            with contextlib.suppress(Exception):  # best effort at teardown
                node.stop(signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def wait_for_new_primary(cluster: SentinelCluster, old_port: int, timeout: float = 30) -> float:
    """Block until the sentinels name another primary; returns when (time.monotonic())."""
    wait_until(lambda: (port := cluster.primary_port()) is not None and port != old_port,
               timeout=timeout, what="the sentinels to promote the replica", interval=0.05)
    return time.monotonic()
