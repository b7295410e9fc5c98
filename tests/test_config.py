"""Settings: defaults, naming, sources and their order, validation, redaction."""

from __future__ import annotations

from pathlib import Path

import pytest

from facesvc.commands.arguments import settings_from_args
from facesvc.commands.cli import build_parser
from facesvc.config import ConfigError, describe, load_settings, redact_url, settings_info


def test_defaults_run_on_one_machine_with_the_programme_rules() -> None:
    s = load_settings(env={})
    assert (s.server.grpc_host, s.server.grpc_port) == ("127.0.0.1", 50051)
    assert s.redis.url == "redis://127.0.0.1:6379/0"
    assert [s.limits.daily_cap(t) for t in ("SPL", "WEBINAR", "OFFLINE")] == [5, 10, 10]
    assert s.limits.timezone == "Asia/Jakarta"
    assert s.tokens.ttl_s == 120
    assert s.liveness.method("SPL") == "challenge"


def test_every_setting_has_a_unique_env_name_and_flag() -> None:
    infos = settings_info()
    assert len({i.env for i in infos}) == len(infos)
    assert len({i.flag for i in infos}) == len(infos)
    names = {i.env for i in infos}
    assert {"FACESVC_REDIS_URL", "FACESVC_SERVER_GRPC_PORT", "FACESVC_LIMITS_CAP_SPL"} <= names


def test_env_values_are_typed() -> None:
    s = load_settings(
        env={
            "FACESVC_SERVER_GRPC_PORT": "7000",
            "FACESVC_SERVER_GRACE_S": "2.5",
            "FACESVC_SECURITY_ALLOW_PLAINTEXT": "yes",
            "FACESVC_SERVER_PLUGINS": "a:b, c:d",
            "FACESVC_LIVENESS_OFFLINE": "PASSIVE",
            "FACESVC_SECURITY_TLS_CA": "",
            "FACESVC_MODELS_CACHE_DIR": "/tmp/m",
        }
    )
    assert s.server.grpc_port == 7000
    assert s.server.grace_s == 2.5
    assert s.security.allow_plaintext is True
    assert s.server.plugins == ("a:b", "c:d")
    assert s.liveness.offline == "passive"
    assert s.security.tls_ca is None
    assert s.models.cache_dir == Path("/tmp/m")


def test_automatic_threads_share_the_cores_and_a_lone_scan_may_use_two(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("facesvc.config.usable_cores", lambda: 8)
    s = load_settings(env={"FACESVC_SERVER_WORKERS": "4"})
    assert (s.models.threads, s.models.lone_threads) == (2, 2)
    monkeypatch.setattr("facesvc.config.usable_cores", lambda: 1)
    s = load_settings(env={"FACESVC_SERVER_WORKERS": "2"})
    assert (s.models.threads, s.models.lone_threads) == (1, 1)
    s = load_settings(env={"FACESVC_MODELS_LONE_THREADS": "3"})
    assert s.models.lone_threads == 3
    with pytest.raises(ConfigError, match=r"models\.lone_threads"):
        load_settings(env={"FACESVC_MODELS_LONE_THREADS": "-1"})


def test_automatic_workers_are_one_per_usable_core_at_most_four(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for cores, workers, threads in ((1, 1, 1), (2, 2, 1), (3, 3, 1), (16, 4, 4)):
        monkeypatch.setattr("facesvc.config.usable_cores", lambda cores=cores: cores)
        s = load_settings(env={"FACESVC_SERVER_WORKERS": "0"})
        assert (s.server.workers, s.models.threads) == (workers, threads)
    assert load_settings(env={}).server.workers == 1  # the default stays one process
    with pytest.raises(ConfigError, match=r"server\.workers"):
        load_settings(env={"FACESVC_SERVER_WORKERS": "-1"})


def test_file_then_env_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "facesvc.toml"
    config.write_text("[server]\ngrpc_port = 6000\nhttp_port = 6001\n[limits]\ncap_offline = 3\n")
    env = {"FACESVC_CONFIG": str(config), "FACESVC_SERVER_HTTP_PORT": "7001"}
    s = load_settings(env=env, overrides={"limits.cap_offline": "4"})
    assert s.server.grpc_port == 6000  # file
    assert s.server.http_port == 7001  # env beats file
    assert s.limits.cap_offline == 4  # flag beats file


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"FACESVC_SERVER_GRPC_PORT": "http"},
            "server.grpc_port (from env FACESVC_SERVER_GRPC_PORT)",
        ),
        ({"FACESVC_SERVER_GRPC_PORT": "70000"}, "server.grpc_port=70000"),
        ({"FACESVC_LIVENESS_SPL": "maybe"}, "not one of off, passive, challenge"),
        ({"FACESVC_LIMITS_TIMEZONE": "Mars/Olympus"}, "not an IANA zone"),
        ({"FACESVC_REDIS_URL": "http://x"}, "redis.url=http://x"),
        ({"FACESVC_SECURITY_ALLOW_PLAINTEXT": "false"}, "no security.tls_cert"),
        ({"FACESVC_SECURITY_TLS_CERT": "/c.pem"}, "tls_cert and security.tls_key"),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env=env)
    assert message in str(info.value)


def test_unknown_settings_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "facesvc.toml"
    config.write_text("[server]\ngrpc_prot = 1\n")
    with pytest.raises(ConfigError, match=r"unknown setting server\.grpc_prot"):
        load_settings(env={}, config_file=config)
    with pytest.raises(ConfigError, match="unknown setting"):
        load_settings(env={}, overrides={"server.nope": "1"})


def test_describe_lists_every_setting_without_secrets() -> None:
    s = load_settings(
        env={
            "FACESVC_REDIS_URL": "redis://user:hunter2@redis.internal:6380/1",
            "FACESVC_TEMPLATES_KEY": "c2VjcmV0LWtleS1ieXRlcw==",
        }
    )
    text = describe(s)
    assert "hunter2" not in text
    assert "c2VjcmV0" not in text
    assert "redis.url = redis://user:***@redis.internal:6380/1" in text
    assert "templates.key = <redacted>" in text
    assert len(text.splitlines()) == len(settings_info())


def test_redact_url_keeps_urls_without_password() -> None:
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url("rediss://:pw@h/0") == "rediss://:***@h/0"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # Several hosts: reading the port of "h1:26379,h2:26379" raised, and `facesvc serve`
        # died printing its settings.
        (
            "redis+sentinel://:s3cret@h1:26379,h2:26379/mymaster",
            "redis+sentinel://:***@h1:26379,h2:26379/mymaster",
        ),
        ("redis+cluster://ops:s3cret@h1:7000,h2:7001", "redis+cluster://ops:***@h1:7000,h2:7001"),
        # A password as a query parameter (redis-py reads it there too) was printed as is.
        ("redis://h:6379/0?password=s3cret", "redis://h:6379/0?password=***"),
        (
            "redis+sentinel://h1:26379/m?sentinel_password=s3cret&db=2",
            "redis+sentinel://h1:26379/m?sentinel_password=***&db=2",
        ),
        ("unix:///run/redis.sock?db=1&password=s3cret", "unix:///run/redis.sock?db=1&password=***"),
        # A password put where the user name goes must not reach a log either.
        ("redis://s3cret@h:6379/0", "redis://***@h:6379/0"),
    ],
)
def test_redact_url_hides_every_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    text = describe(load_settings(env={"FACESVC_REDIS_URL": url}))
    assert "s3cret" not in text
    assert f"redis.url = {shown}" in text


def test_serve_flags_reach_the_settings() -> None:
    args = build_parser().parse_args(
        ["serve", "--server-grpc-port", "0", "--redis-url", "redis://127.0.0.1:1/0"]
    )
    s = settings_from_args(args)
    assert s.server.grpc_port == 0
    assert s.redis.url == "redis://127.0.0.1:1/0"


def test_readme_settings_table_lists_every_setting() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [i.env for i in settings_info() if f"`{i.env}`" not in readme]
    assert not missing, (
        f"README.md's settings table lacks {missing}: paste the output of `facesvc settings`"
    )
