"""Builds the verification engine and everything it needs from the settings.

This is the one place that knows how the parts are put together: which model pack, which
stores on which Redis client, which keys and policies. The servers (app.py) receive the
finished engine; tests build engines the same way with their own settings.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt

from facesvc.clock import Clock, SkewWatch, SystemClock
from facesvc.config import ConfigError, Settings
from facesvc.domain import LivenessMethod, TrainingType
from facesvc.engine import Caller, Engine, LivenessPolicy
from facesvc.imaging import DecodeLimits
from facesvc.limits.abuse import LockoutRule, SpoofLockout
from facesvc.limits.caps import AttemptCaps, cap_rules
from facesvc.limits.windows import GateWindows
from facesvc.liveness.challenges import DEFAULT_STEPS, ChallengeStore, Step
from facesvc.liveness.judge import LivenessJudge
from facesvc.metrics import Metrics
from facesvc.models.dense_landmarks import DenseLandmarks
from facesvc.models.facework import BatchSettings, FaceWork, PadCrop
from facesvc.models.fas import FasFtModel, load_fas_calibration
from facesvc.models.model_cache import ModelCache
from facesvc.models.pack import ModelPack
from facesvc.models.packs import load_pack
from facesvc.serve.app import Resources
from facesvc.store.audit import AuditLog
from facesvc.store.connection import AsyncRedis
from facesvc.store.errors import StoreUnavailable
from facesvc.store.templates import TemplateStore, keyring_from_settings
from facesvc.tokens.check import CheckPolicy
from facesvc.tokens.issuer import TokenIssuer
from facesvc.tokens.keys import KeyDirectory, PublishedKey
from facesvc.tokens.passes import VenuePassCheck
from facesvc.tokens.redemption import TokenRedeemer

log = logging.getLogger(__name__)


async def note_pack_change(templates: TemplateStore, pack: ModelPack) -> None:
    """Record the serving pack in Redis and tell the operator, once, when it changed: every
    template records its pack, and a scan is never compared with another pack's template,
    so each participant enrolled before answers NOT_ENROLLED ("enroll again") until enrolled
    again with this pack (docs/packs.md)."""
    try:
        previous = await templates.swap_serving_pack(pack.tag)
    except StoreUnavailable as exc:
        log.warning("could not compare the model pack with the one served before: %s", exc)
        return
    if previous is not None and previous != pack.tag:
        log.warning(
            "MODEL PACK CHANGED from %s to %s: every participant enrolled with %s must enroll "
            "again (their scans answer NOT_ENROLLED with 'enroll again' until then); "
            "templates are never compared across packs. docs/packs.md: changing the pack",
            previous,
            pack.tag,
            previous,
        )


def liveness_policy(settings: Settings) -> LivenessPolicy:
    """Map (training type, caller) to the configured liveness method."""
    live = settings.liveness

    def method(training_type: TrainingType, caller: Caller) -> LivenessMethod:
        return LivenessMethod(live.method(training_type.value, kiosk=caller.role == "kiosk"))

    return method


async def build_engine(
    settings: Settings,
    redis: AsyncRedis,
    metrics: Metrics,
    *,
    clock: Clock | None = None,
    pack: ModelPack | None = None,
    skew: SkewWatch | None = None,
    keys: KeyDirectory | None = None,
    warm_up: bool = False,
) -> Engine:
    """The engine for ``settings``; loads the model pack unless one is given. With
    ``warm_up`` (the server's engine), face work sizes its memory for the largest frame
    before the engine is returned (:meth:`FaceWork.warm_up`)."""
    clock = clock or SystemClock()
    if pack is None:
        pack = await asyncio.to_thread(load_pack, settings.models)
    tz = ZoneInfo(settings.limits.timezone)
    prefix = settings.redis.key_prefix
    policies = {
        settings.liveness.spl,
        settings.liveness.webinar,
        settings.liveness.offline,
        settings.liveness.kiosk,
    }
    needs_challenge = "challenge" in policies
    needs_pad = "passive" in policies or (
        needs_challenge and settings.liveness.passive_with_challenge
    )
    # The passive model runs at the input size and crop its threshold was calibrated with.
    pad = load_fas_calibration(settings.liveness.pad_calibration)
    pad_model = FasFtModel(pad.input_size, threads=settings.models.threads) if needs_pad else None
    pad_threshold = (
        settings.liveness.pad_threshold if settings.liveness.pad_threshold >= 0 else pad.threshold
    )
    pipeline = pack.pipeline(settings.quality)
    throughput = settings.throughput
    faces = FaceWork(
        pipeline,
        pad_model,
        decode_limits=DecodeLimits(
            max_bytes=settings.server.max_image_bytes,
            max_decoded_pixels=settings.server.max_decode_pixels,
            jpeg_reduce_to_side=settings.server.jpeg_reduce_to_side or None,
        ),
        max_analyze_pixels=settings.server.max_analyze_pixels,
        threads=settings.models.threads,
        embed_batching=BatchSettings(
            throughput.embed_max_batch, throughput.max_wait_s, throughput.max_queue
        ),
        pad_batching=BatchSettings(
            throughput.pad_max_batch, throughput.max_wait_s, throughput.max_queue
        ),
        pad_crop=PadCrop(expand=pad.crop_expand),
        dense_landmarks=(
            await asyncio.to_thread(DenseLandmarks.load, ModelCache(settings.models.cache_dir))
            if needs_challenge
            else None
        ),
    )
    if warm_up:
        await asyncio.to_thread(faces.warm_up)
    if keys is None:
        keys = KeyDirectory(
            settings.tokens.key_dir, reload_s=settings.tokens.key_reload_s, clock=clock
        )
    issuer = TokenIssuer(
        keys, issuer=settings.tokens.issuer, ttl_s=settings.tokens.ttl_s, clock=clock
    )
    redeemer = TokenRedeemer(
        redis,
        keys,
        CheckPolicy(issuer=settings.tokens.issuer, leeway_s=settings.tokens.leeway_s),
        key_prefix=prefix,
        clock=clock,
    )
    caps = AttemptCaps(
        redis,
        cap_rules(settings.limits),
        key_prefix=prefix,
        tz=tz,
        expiry_grace=timedelta(seconds=settings.limits.cap_expiry_grace_s),
        idempotency_ttl=timedelta(seconds=settings.limits.idempotency_ttl_s),
        scan_lease=timedelta(seconds=settings.limits.scan_lease_s),
    )

    def published(now: datetime) -> list[PublishedKey]:
        return keys.published(now)

    templates = TemplateStore(redis, keyring_from_settings(settings.templates), key_prefix=prefix)
    await note_pack_change(templates, pack)

    return Engine(
        clock=clock,
        pack=pack,
        faces=faces,
        windows=GateWindows(tz=tz),
        caps=caps,
        templates=templates,
        challenges=ChallengeStore(
            redis,
            clock=lambda: clock.now().timestamp(),
            key_prefix=prefix,
            allowed_steps=challenge_steps(settings),
            num_steps=settings.liveness.challenge_length,
        ),
        liveness_policy=liveness_policy(settings),
        judge=LivenessJudge(
            live_threshold=pad_threshold,
            identity_metric=pack.distance,
            identity_centre=_centre(pack),
            turned_identity_threshold=pack.turned_threshold,
        ),
        passive_frames=settings.liveness.passive_frames,
        passive_with_challenge=settings.liveness.passive_with_challenge,
        issuer=issuer,
        redeemer=redeemer,
        published_keys=published,
        audit=AuditLog(
            redis,
            key_prefix=prefix,
            retention=timedelta(days=settings.audit.retention_days),
        ),
        lockout=SpoofLockout(
            redis,
            LockoutRule(
                settings.abuse.spoof_lockout_threshold,
                window=timedelta(seconds=settings.abuse.spoof_lockout_window_s),
                lock_for=timedelta(seconds=settings.abuse.spoof_lockout_s),
            ),
            clock,
            key_prefix=prefix,
            tz=tz,
        ),
        metrics=metrics,
        skew=skew,
        venue_passes=VenuePassCheck(keys, clock),
    )


async def engine_from_resources(resources: Resources) -> Engine:
    """The engine factory ``facesvc serve`` hands to the app: it runs once the servers are
    up, while health says NOT_SERVING."""
    return await build_engine(
        resources.settings,
        resources.redis,
        resources.metrics,
        skew=resources.skew,
        keys=resources.keys,
        warm_up=True,
    )


def challenge_steps(settings: Settings) -> tuple[Step, ...]:
    """The steps challenges are drawn from (``liveness.challenge_steps``, empty = the default
    set); a name that is no step, or a length the set cannot fill, stops the start here,
    naming the setting, instead of failing the first challenge."""
    live = settings.liveness
    try:
        steps = tuple(Step(name.strip().upper()) for name in live.challenge_steps)
    except ValueError:
        raise ConfigError(
            f"liveness.challenge_steps={','.join(live.challenge_steps)}: use names from "
            + ", ".join(Step)
        ) from None
    steps = steps or DEFAULT_STEPS
    if live.challenge_length > len(set(steps)):
        raise ConfigError(
            f"liveness.challenge_length={live.challenge_length}: at most {len(set(steps))}, "
            "the number of distinct liveness.challenge_steps"
        )
    return steps


def _centre(pack: ModelPack) -> npt.NDArray[np.float32] | None:
    """The pack's calibration centre as an array, for the liveness same-person check."""
    centre = pack.centre
    return None if centre is None else centre.astype(np.float32)
