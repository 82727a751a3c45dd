"""Start real servers on loopback for tests and benchmarks, and wait on real readiness signals."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

REPO_ROOT = Path(__file__).resolve().parents[1]
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """In a child before exec: the kernel sends it SIGTERM when the test process dies, so a
    killed test run leaves no worker holding a model and two cores behind."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate, *, timeout: float, what: str, interval: float = 0.05):  # type: ignore[no-untyped-def]
    """Poll `predicate` until it returns something truthy; fail loudly after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]
    workdir: Path
    password: str | None = None
    username: str | None = None
    command: tuple[str, ...] = ()
    tls: TlsFiles | None = None

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        tls = {"ssl": True, "ssl_ca_certs": str(self.tls.ca)} if self.tls else {}
        return redis.Redis(host="127.0.0.1", port=self.port, username=self.username,
                           password=self.password, **tls)  # type: ignore[arg-type]

    def stop(self, timeout: float = 30) -> None:
        """Shut Redis down the way an orchestrator does (SIGTERM): with appendonly it fsyncs its
        AOF first, so what it acknowledged is there when it comes back."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=timeout)

    def start(self, timeout: float = 20) -> None:
        """Start it again on the same port and directory: it reloads its AOF (or RDB)."""
        if self.process.poll() is None:
            raise RuntimeError(f"redis-server on port {self.port} is still running")
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        wait_until(lambda: _pings(self), timeout=timeout, what=f"redis-server on port {self.port}")

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the CA that signed the server's certificate, the certificate and its key."""

    ca: Path
    cert: Path
    key: Path


def make_tls_files(folder: Path, host: str = "127.0.0.1") -> TlsFiles:
    """A fresh CA and a server certificate it signed for `host` (an IP address SAN), valid
    for a day; `cryptography` builds them."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name(f"chatqueue test CA {uuid.uuid4().hex[:6]}")
    usage = x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False)
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(usage, critical=True)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        alt = x509.DNSName(host)
    cert = (x509.CertificateBuilder().subject_name(name(host)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    files = TlsFiles(ca=folder / "ca.pem", cert=folder / "server.pem", key=folder / "server.key")
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return files


@contextmanager
def redis_server(*, password: str | None = None, appendonly: bool = False,
                 acl: str | None = None, username: str | None = None,
                 tls: TlsFiles | None = None, args: tuple[str, ...] = ()) -> Iterator[RedisServer]:
    """`acl`: the text of an ACL file to start with (deploy/redis/acl.sh writes one); then
    `username` / `password` are the login server.client() uses (the admin's). `tls`: serve
    TLS only (its URL is rediss://), clients not asked for certificates. `args`: more
    redis-server options."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            "redis-server is not on PATH: install it (.ci/run does: apt-get install redis-server)"
        )
    workdir = Path(tempfile.mkdtemp(prefix="chatqueue-redis-"))
    port = free_port()
    command = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
               "--appendonly", "yes" if appendonly else "no", "--dir", str(workdir), *args]
    if tls is not None:
        command[command.index("--port") + 1] = "0"
        command += ["--tls-port", str(port), "--tls-cert-file", str(tls.cert), "--tls-key-file",
                    str(tls.key), "--tls-ca-cert-file", str(tls.ca), "--tls-auth-clients", "no"]
    if acl is not None:
        (workdir / "users.acl").write_text(acl)
        command += ["--aclfile", str(workdir / "users.acl")]
    elif password:
        command += ["--requirepass", password]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisServer(port=port, process=process, workdir=workdir, password=password,
                         username=username, command=tuple(command), tls=tls)
    try:
        wait_until(lambda: _pings(server), timeout=20, what=f"redis-server on port {port}")
        yield server
    finally:
        server.process.terminate()  # the latest process: a test may have restarted it
        server.process.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def _pings(server: RedisServer) -> bool:
    if server.process.poll() is not None:
        raise RuntimeError(f"redis-server exited with code {server.process.returncode}")
    try:
        return bool(server.client().ping())
    except redis.ConnectionError:
        return False


@dataclass
class WorkerProcess:
    name: str
    process: subprocess.Popen[str]
    log_path: Path
    lines: list[str] = field(default_factory=list)
    # The thread that reads the process's output into `lines` (spawn_worker's pump).
    reader: threading.Thread | None = None

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout: float = 30) -> int:
        """Stop the process (SIGTERM, then SIGKILL after `timeout`) and wait until everything
        it wrote is in `lines`: a test that looks for a line's absence after the stop reads the
        whole log, not what the reader thread had got to."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.reader is not None:
            self.reader.join(timeout=timeout)  # the pipe ends with the process
        return self.process.returncode


def worker_env(
    redis_url: str, model_dir: Path, queue: str | None, **settings: str
) -> dict[str, str]:
    """A worker's environment; queue None leaves it on its model's own queue."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATQUEUE_")}
    manifest = json.loads((model_dir / "chatqueue-manifest.json").read_text())
    env.update({
        "CHATQUEUE_BROKER_URL": redis_url,
        "CHATQUEUE_MODEL_DIR": str(model_dir),
        "CHATQUEUE_MODEL_ID": manifest["repo_id"],
        "CHATQUEUE_DEVICE": "cpu",
        # Tests run several workers on two cores: one torch thread each keeps them from
        # starving each other's OpenMP barriers.
        "CHATQUEUE_TORCH_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    })
    if queue is not None:
        env["CHATQUEUE_QUEUE"] = queue
    env.update({f"CHATQUEUE_{key.upper()}": value for key, value in settings.items()})
    return env


def spawn_worker(
    env: dict[str, str], log_dir: Path, *, extra_args: tuple[str, ...] = (),
    module: str = "worker.cli", nice: int = 0,
) -> WorkerProcess:
    """Start `chatqueue-worker run` as a real process; its output is kept for assertions.
    `module`: another entry point taking the same arguments (a fault-injecting wrapper).
    `nice`: added to the process's niceness, for all its threads (a benchmark's worker that
    should not take the CPU from the processes measured beside it)."""

    def before_exec() -> None:
        die_with_parent()
        if nice:
            os.nice(nice)

    name = f"w{uuid.uuid4().hex[:8]}@%h"
    log_path = log_dir / f"{name.split('@')[0]}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", module, "run", "-n", name, "--without-mingle",
         "--without-gossip", *extra_args],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=before_exec,
    )
    worker = WorkerProcess(name=name, process=process, log_path=log_path)

    def pump() -> None:
        assert process.stdout is not None
        with log_path.open("w") as sink:
            for line in process.stdout:
                worker.lines.append(line)
                sink.write(line)
                sink.flush()

    worker.reader = threading.Thread(target=pump, daemon=True)
    worker.reader.start()
    return worker


def wait_ready(worker: WorkerProcess, timeout: float = 180) -> None:
    """Celery prints 'ready.' once it consumes; our startup has loaded the model before that."""

    def ready() -> bool:
        if worker.process.poll() is not None:
            raise RuntimeError(
                f"worker exited with {worker.process.returncode}:\n{worker.log()[-4000:]}"
            )
        return any(" ready." in line for line in worker.lines)

    wait_until(ready, timeout=timeout, what=f"worker {worker.name} to be ready", interval=0.1)


def tiny_model_dir() -> Path:
    """The tiny test model, built once and cached by its builder's source: a changed recipe
    builds a new model, an unchanged one is reused across sessions (the builder verifies the
    folder against its manifest first)."""
    from chatqueue_dev import models, tiny_model

    recipe = hashlib.sha256(Path(tiny_model.__file__).read_bytes()).hexdigest()[:12]
    folder = REPO_ROOT / ".cache" / "models" / f"tiny-qwen3-{recipe}"
    models.build_tiny_qwen(folder)
    return folder


def wait_listed(gateway: subprocess.Popen[Any], url: str, model_id: str,
                timeout: float = 60) -> None:
    """Until the gateway at `url` lists `model_id` (it is up, and sees a worker or its presence
    entry); fails at once if the gateway's process exits."""
    import httpx  # the gateway extra's; only what drives a gateway needs it

    def listed() -> bool:
        assert gateway.poll() is None, f"the gateway exited with {gateway.returncode}"
        try:
            return model_id in httpx.get(f"{url}/v1/models", timeout=5).text
        except httpx.TransportError:
            return False

    wait_until(listed, timeout=timeout, what=f"the gateway to list {model_id}", interval=0.1)
