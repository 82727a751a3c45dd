"""Settings come from CHATQUEUE_* (and HF_*) variables; secrets never show in their repr."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from pydantic import ValidationError

from producer.celery_app import celery_config, create_celery
from producer.settings import ProducerSettings
from worker.settings import WorkerSettings


def test_defaults(monkeypatch):
    for name in ("HF_ENDPOINT", "HF_HOME", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    settings = WorkerSettings(_env_file=None)
    assert settings.device == "auto"
    assert settings.dtype == "auto"
    assert settings.trust_remote_code is False
    assert settings.resolved_model_dir == Path("models/HuggingFaceTB--SmolLM2-135M-Instruct")
    assert settings.visibility_timeout_s > settings.max_job_seconds


def test_environment_and_hf_variables(monkeypatch):
    monkeypatch.setenv("CHATQUEUE_MODEL_ID", "Qwen/Qwen3-0.6B")
    monkeypatch.setenv("CHATQUEUE_MODELS_ROOT", "/srv/models")
    monkeypatch.setenv("CHATQUEUE_CONCURRENCY", "8")
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.local")
    settings = WorkerSettings(_env_file=None)
    assert settings.resolved_model_dir == Path("/srv/models/Qwen--Qwen3-0.6B")
    assert settings.concurrency == 8
    assert settings.hf_endpoint == "http://mirror.local"


def test_env_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("CHATQUEUE_QUEUE=qwen3\nCHATQUEUE_RESULT_TTL_S=60\n")
    settings = ProducerSettings()
    assert (settings.queue, settings.result_ttl_s) == ("qwen3", 60)


def test_secrets_are_hidden_and_url_gets_the_password(monkeypatch):
    monkeypatch.setenv("CHATQUEUE_REDIS_PASSWORD", "s3cr:t/pw")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
    settings = WorkerSettings(_env_file=None)
    assert "s3cr" not in repr(settings) and "hf_secret" not in repr(settings)
    assert settings.broker_connection_url() == "redis://:s3cr%3At%2Fpw@127.0.0.1:6379/0"
    assert settings.broker_url == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    ("env", "words"),
    [
        pytest.param({"CHATQUEUE_VISIBILITY_TIMEOUT_S": "60", "CHATQUEUE_MAX_JOB_SECONDS": "120"},
                     ["visibility_timeout_s", "60", "120"], id="visibility-shorter-than-job"),
        pytest.param({"CHATQUEUE_DEFAULT_MAX_NEW_TOKENS": "900",
                      "CHATQUEUE_MAX_NEW_TOKENS_CAP": "100"},
                     ["default_max_new_tokens", "900", "100"], id="default-over-cap"),
        pytest.param({"CHATQUEUE_CONCURRENCY": "0"}, ["concurrency", "0"], id="zero-slots"),
        pytest.param({"CHATQUEUE_JOB_LEASE_TTL_S": "5", "CHATQUEUE_JOB_LEASE_RENEW_S": "5"},
                     ["job_lease_renew_s", "job_lease_ttl_s", "5.0"], id="lease-renewed-too-late"),
        pytest.param({"CHATQUEUE_JOB_LEASE_TTL_S": "40", "CHATQUEUE_VISIBILITY_TIMEOUT_S": "40",
                      "CHATQUEUE_MAX_JOB_SECONDS": "20"},
                     ["job_lease_ttl_s", "visibility_timeout_s", "40.0"],
                     id="lease-outlives-visibility"),
    ],
)
def test_bad_settings_are_refused_with_the_values(monkeypatch, env, words):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as caught:
        WorkerSettings(_env_file=None)
    assert all(word in str(caught.value) for word in words)


def test_a_refused_setting_does_not_print_the_password(monkeypatch):
    """pydantic quotes a refused value (a password pasted into the wrong variable, say) unless
    hide_input_in_errors is on."""
    monkeypatch.setenv("CHATQUEUE_REDIS_PASSWORD", "topsecretpassword")
    monkeypatch.setenv("CHATQUEUE_REDIS_USERNAME", "worker")
    monkeypatch.setenv("CHATQUEUE_VISIBILITY_TIMEOUT_S", "60")
    monkeypatch.setenv("CHATQUEUE_MAX_JOB_SECONDS", "120")
    with pytest.raises(ValidationError) as caught:
        WorkerSettings(_env_file=None)
    assert "visibility_timeout_s" in str(caught.value)
    assert "topsec" not in str(caught.value)
    monkeypatch.setenv("CHATQUEUE_RESULT_TTL_S", "topsecretpassword")  # a password pasted wrong
    with pytest.raises(ValidationError) as caught:
        ProducerSettings(_env_file=None)
    assert "result_ttl_s" in str(caught.value) and "topsec" not in str(caught.value)


def test_each_side_logs_in_as_its_own_redis_user(monkeypatch):
    monkeypatch.setenv("CHATQUEUE_REDIS_USERNAME", "producer")
    monkeypatch.setenv("CHATQUEUE_REDIS_PASSWORD", "p@ss")
    settings = ProducerSettings(_env_file=None)
    assert settings.broker_connection_url() == "redis://producer:p%40ss@127.0.0.1:6379/0"
    assert settings.backend_connection_url() == settings.broker_connection_url()
    assert "p@ss" not in repr(settings)


def test_sentinel_setup_reaches_celery_kombu_and_our_clients(monkeypatch):
    from producer.celery_app import celery_config
    from producer.connections import redis_client
    from worker.delivery import SENTINEL_TRANSPORT, broker_options

    monkeypatch.setenv("CHATQUEUE_BROKER_URL", "redis://ignored:6379/2")
    monkeypatch.setenv("CHATQUEUE_REDIS_SENTINELS", "10.0.0.1:26379, s2:26380,s3:26381")
    monkeypatch.setenv("CHATQUEUE_REDIS_SENTINEL_MASTER", "cq")
    monkeypatch.setenv("CHATQUEUE_REDIS_SENTINEL_PASSWORD", "sentinel-s3cret")
    monkeypatch.setenv("CHATQUEUE_REDIS_USERNAME", "worker")
    monkeypatch.setenv("CHATQUEUE_REDIS_PASSWORD", "p@ss")
    settings = WorkerSettings(_env_file=None)
    assert "s3cret" not in repr(settings) and "p@ss" not in repr(settings)
    url = "sentinel://worker:p%40ss@{}/2"
    expected = ";".join(url.format(a) for a in ("10.0.0.1:26379", "s2:26380", "s3:26381"))
    assert settings.broker_connection_url() == settings.backend_connection_url() == expected
    sentinel_options = {"master_name": "cq", "sentinel_kwargs": {"password": "sentinel-s3cret"}}
    config = celery_config(settings)
    assert config["broker_transport_options"].items() >= sentinel_options.items()
    backend_options = config["result_backend_transport_options"]
    assert backend_options.items() >= sentinel_options.items()
    assert backend_options["additional_connection_errors"] == ["redis.exceptions.ReadOnlyError"]
    options = broker_options(settings)
    assert options["broker_transport"] == SENTINEL_TRANSPORT
    # A lost broker is retried within 0.5-2 s, not Celery's 2, 4, ... 30 s.
    assert options["worker_consumer"] == "worker.delivery:QuickReconnectConsumer"
    assert options["broker_transport_options"].items() >= sentinel_options.items()
    client = redis_client(settings)
    pool = client.connection_pool
    assert pool.service_name == "cq"
    sentinels = [s.connection_pool.connection_kwargs for s in pool.sentinel_manager.sentinels]
    assert [(s["host"], s["port"], s["password"]) for s in sentinels] == [
        ("10.0.0.1", 26379, "sentinel-s3cret"), ("s2", 26380, "sentinel-s3cret"),
        ("s3", 26381, "sentinel-s3cret")]
    assert pool.connection_kwargs["username"] == "worker"
    assert pool.connection_kwargs["db"] == 2


@pytest.mark.parametrize(("url", "sentinel_tls", "expected"), [
    pytest.param("redis://x/0", None, None, id="plain-follows-plain"),
    pytest.param("rediss://x/0", None, {"ssl": True, "ssl_cert_reqs": ssl.CERT_REQUIRED,
                                        "ssl_ca_certs": "CA"}, id="tls-follows-tls"),
    pytest.param("rediss://x/0", False, None, id="tls-nodes-plain-sentinels"),
    pytest.param("redis://x/0", True, {"ssl": True, "ssl_cert_reqs": ssl.CERT_REQUIRED,
                                       "ssl_ca_certs": "CA"}, id="plain-nodes-tls-sentinels"),
    pytest.param("rediss://x/0?ssl_certfile=/c.pem&ssl_keyfile=/k.pem", None,
                 {"ssl": True, "ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "CA",
                  "ssl_certfile": "/c.pem", "ssl_keyfile": "/k.pem"}, id="client-certificate"),
])
def test_the_sentinels_are_reached_over_tls_as_the_data_connection_unless_told(
    tmp_path, url, sentinel_tls, expected
):
    """Every client path (redis-py's Sentinel, kombu's broker and Celery's result backend
    transport options) gets its sentinel options from sentinel_kwargs()."""
    from producer.celery_app import celery_config
    from producer.connections import async_redis_client, redis_client

    ca = tmp_path / "ca.pem"
    ca.write_text("not read here")
    settings = ProducerSettings(broker_url=url, redis_sentinels="s1:26379", redis_ca_file=ca,
                                redis_sentinel_tls=sentinel_tls,
                                redis_sentinel_username="client",
                                redis_sentinel_password="pw", _env_file=None)
    if expected is not None:
        expected = {**expected, "ssl_ca_certs": str(ca)}
    assert settings.sentinel_tls_options() == expected
    kwargs = {**(expected or {}), "username": "client", "password": "pw"}
    assert settings.sentinel_kwargs() == kwargs
    config = celery_config(settings)
    assert config["broker_transport_options"]["sentinel_kwargs"] == kwargs
    assert config["result_backend_transport_options"]["sentinel_kwargs"] == kwargs
    for client in (redis_client(settings), async_redis_client(settings)):
        [sentinel] = client.connection_pool.sentinel_manager.sentinels
        pool = sentinel.connection_pool
        assert ("SSL" in pool.connection_class.__name__) == (expected is not None)
        assert pool.connection_kwargs["username"] == "client"


@pytest.mark.parametrize("value", ["s1", "s1:x", ":26379"])
def test_sentinel_addresses_are_checked(monkeypatch, value):
    monkeypatch.setenv("CHATQUEUE_REDIS_SENTINELS", value)
    with pytest.raises(ValidationError, match="redis_sentinels"):
        ProducerSettings(_env_file=None)


# --------------------------------------------------------------------------- TLS (rediss://)

TLS_URL = "rediss://redis.example:6380/0"


def test_rediss_verifies_the_certificate_on_both_sides_by_default(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    for settings in (ProducerSettings(broker_url=TLS_URL, _env_file=None),
                     WorkerSettings(broker_url=TLS_URL, _env_file=None)):
        config = celery_config(settings)
        expected = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        assert config["broker_use_ssl"] == expected
        assert config["redis_backend_use_ssl"] == expected
        # Celery's result backend takes the plain URL (it refused it without the option), and
        # kombu's connection carries the check (it fell back to CERT_NONE).
        app = create_celery(settings)
        assert app.backend.connparams["ssl_cert_reqs"] == ssl.CERT_REQUIRED
        assert app.connection_for_write().ssl == expected
    with_ca = ProducerSettings(broker_url=TLS_URL, redis_ca_file=ca, _env_file=None)
    assert with_ca.tls_options(TLS_URL) == {"ssl_cert_reqs": ssl.CERT_REQUIRED,
                                            "ssl_ca_certs": str(ca)}
    app = create_celery(with_ca)
    assert app.backend.connparams["ssl_ca_certs"] == str(ca)


def test_plain_redis_gets_no_tls_options():
    config = celery_config(ProducerSettings(broker_url="redis://127.0.0.1:6379/0",
                                            _env_file=None))
    assert "broker_use_ssl" not in config and "redis_backend_use_ssl" not in config


@pytest.mark.parametrize("reqs", ["none", "CERT_NONE", "optional", "CERT_OPTIONAL"])
def test_an_unverified_rediss_url_is_refused_unless_allowed(reqs):
    url = f"{TLS_URL}?ssl_cert_reqs={reqs}"
    for cls in (ProducerSettings, WorkerSettings):
        with pytest.raises(ValidationError, match="CHATQUEUE_REDIS_TLS_ALLOW_UNVERIFIED"):
            cls(broker_url=url, _env_file=None)
        with pytest.raises(ValidationError, match="result_backend"):
            cls(result_backend=url, _env_file=None)
    allowed = ProducerSettings(broker_url=url, redis_tls_allow_unverified=True, _env_file=None)
    options = allowed.tls_options(url)
    assert options is not None and options["ssl_cert_reqs"] != ssl.CERT_REQUIRED
    # The URL's TLS parameters are applied as options, not left in the URL for kombu.
    assert "ssl_cert_reqs" not in allowed.broker_connection_url()


def test_a_missing_ca_file_or_an_unknown_mode_is_refused(tmp_path):
    with pytest.raises(ValidationError, match="CHATQUEUE_REDIS_CA_FILE"):
        ProducerSettings(broker_url=TLS_URL, redis_ca_file=tmp_path / "nope.pem",
                         _env_file=None)
    with pytest.raises(ValidationError, match="ssl_cert_reqs must be one of"):
        ProducerSettings(broker_url=f"{TLS_URL}?ssl_cert_reqs=maybe", _env_file=None)
