"""One verification, start to end; knows no transport.

The engine is driven by the gRPC and HTTP transports and, in tests, directly. It owns the
order of the steps, because the order is the policy:

1. the gate window and the enrollment are checked first: OUTSIDE_WINDOW and NOT_ENROLLED
   never touch the attempt counter;
2. the frames are decoded (a bad image is the caller's error, not an attempt);
3. one attempt is reserved atomically in Redis; an exhausted cap ends here, with no face work;
4. faces, quality, liveness and the match decide;
5. outcomes the policy does not count (capture problems the participant can fix at once) are
   refunded; a token is signed only for VERIFIED; every decision is audited.

Redis failing at any step raises ``StoreUnavailable``: the transport answers UNAVAILABLE, and
no token is ever issued without a completed cap check.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from facesvc.clock import Clock, SkewWatch
from facesvc.domain import Decision, Gate, LivenessMethod, TrainingType
from facesvc.errors import Conflict, NotFound, PermissionRefused, PreconditionFailed
from facesvc.limits.abuse import SpoofLockout
from facesvc.limits.caps import AttemptCaps, CapUsage, Exhausted, IdempotentScan, Reservation
from facesvc.limits.windows import GateWindows, WindowClosed
from facesvc.liveness.challenges import Challenge, ChallengeRefused, ChallengeStore
from facesvc.liveness.judge import LivenessJudge, frames_to_score
from facesvc.metrics import Metrics
from facesvc.models.facework import FaceWork
from facesvc.models.pack import ModelPack
from facesvc.models.pipeline import FaceAnalysis, FaceStatus
from facesvc.models.types import RGBImage
from facesvc.store.audit import AuditEvent, AuditLog
from facesvc.store.errors import StoreUnavailable
from facesvc.store.templates import Template, TemplateMetadata, TemplateStore
from facesvc.tokens.claims import CheckResult, Expectation, VerificationClaims
from facesvc.tokens.issuer import IssuedToken, TokenIssuer
from facesvc.tokens.keys import PublishedKey
from facesvc.tokens.passes import PassRefused, VenuePassCheck
from facesvc.tokens.redemption import TokenRedeemer

#: Capture problems the participant can fix at once: by default they cost no attempt.
DEFAULT_REFUNDED = frozenset({Decision.NO_FACE, Decision.MULTIPLE_FACES, Decision.LOW_QUALITY})

_NOT_MATCHED = "the face does not match the enrolled participant"

_FACE_DECISIONS = {
    FaceStatus.NO_FACE: Decision.NO_FACE,
    FaceStatus.MULTIPLE_FACES: Decision.MULTIPLE_FACES,
    FaceStatus.LOW_QUALITY: Decision.LOW_QUALITY,
}


class PolicyError(PreconditionFailed):
    """The request is well formed but the configured policy refuses it before any attempt
    is spent (e.g. a challenge is required and none was given). Transports answer
    FAILED_PRECONDITION with the message."""

    code = "POLICY"


class ScanInProgress(Conflict):
    """A scan with the same idempotency key is still being decided: retry in a moment.
    Transports answer ABORTED."""


class ParticipantNotFound(NotFound):
    """No enrollment of this participant is visible to the caller's tenant: nothing was read,
    spent or changed. Transports answer NOT_FOUND; an admin enrolls the participant for the
    tenant (Enroll or SetEnrollmentTenants)."""


class VenuePassRefused(PermissionRefused):
    """A kiosk's scan came without a venue pass that binds it to the kiosk's venue: nothing was
    spent. Transports answer PERMISSION_DENIED; the participant shows today's QR code."""


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: the authenticated client's ``name``, its ``role`` (lms, portal,
    kiosk, admin) and its ``tenant`` (the LMS or venue; the token audience).

    Whom a caller may act for (:meth:`Engine.admit`): an admin for every participant; a kiosk
    for the participant whose venue pass for its venue it presents; any other caller for the
    participants whose enrollment lists its tenant.
    """

    name: str
    role: str
    tenant: str

    @property
    def programme_wide(self) -> bool:
        """True for the programme's own operators, who act for every participant."""
        return self.role == "admin"

    @property
    def needs_venue_pass(self) -> bool:
        """True for a venue's kiosk: its key admits a scan only with the participant's pass."""
        return self.role == "kiosk"


@dataclass(frozen=True, slots=True)
class VerifyCommand:
    participant_id: str
    training_id: str
    training_type: TrainingType
    gate: Gate
    session_id: str
    frames: Sequence[bytes]
    caller: Caller
    scheduled_start: datetime | None = None
    challenge_id: str | None = None
    idempotency_key: str | None = None
    deadline: float | None = None
    """``time.monotonic()`` seconds after which model work for this call is dropped."""
    venue_pass: str | None = None
    """A kiosk's scan: the participant's signed venue pass (the QR code's text)."""

    def request_digest(self) -> str:
        """sha256 of everything this scan asks (not who asks, nor its idempotency key or
        deadline): a retry under the same idempotency key must send exactly this again."""
        h = hashlib.sha256()
        start = "" if self.scheduled_start is None else self.scheduled_start.isoformat()
        for part in (
            self.participant_id,
            self.training_id,
            self.training_type.value,
            self.gate.value,
            self.session_id,
            start,
            self.challenge_id or "",
            self.venue_pass or "",
        ):
            h.update(part.encode() + b"\0")
        for frame in self.frames:
            h.update(hashlib.sha256(frame).digest())
        return h.hexdigest()


@dataclass(frozen=True, slots=True)
class FrameReport:
    """What the participant (or an enrolling admin) may learn about one image: measured
    quality, never biometric data. Sizes in pixels, angles in degrees."""

    index: int
    accepted: bool
    status: FaceStatus
    reason: str
    width_px: int
    height_px: int
    face_count: int
    face_height_px: float = 0.0
    detection_score: float = 0.0
    sharpness: float = 0.0
    brightness: float = 0.0
    yaw_deg: float = 0.0
    pitch_deg: float = 0.0
    roll_deg: float = 0.0
    live_score: float | None = None
    failed_checks: tuple[str, ...] = ()
    """Names of the quality checks the face failed (facesvc.models.quality.Check)."""


@dataclass(frozen=True, slots=True)
class VerifyOutcome:
    verification_id: str
    decision: Decision
    reason: str
    attempts: CapUsage
    liveness: LivenessMethod
    token: IssuedToken | None = None
    frames: tuple[FrameReport, ...] = ()
    timings_ms: Mapping[str, float] = field(default_factory=dict)
    replayed: bool = False
    """True when this is the stored answer to an earlier scan with the same idempotency key."""


@dataclass(frozen=True, slots=True)
class EnrollOutcome:
    enrolled: bool
    reason: str
    metadata: TemplateMetadata | None
    images: tuple[FrameReport, ...]


LivenessPolicy = Callable[[TrainingType, Caller], LivenessMethod]
"""Which liveness method a scan of a training type by a caller must pass."""


class Engine:
    """Runs enrollments and verifications against the programme's rules.

    Every collaborator is passed in: the engine holds no global state and can be driven
    from a test with a real Redis and real models and no server.
    """

    def __init__(
        self,
        *,
        clock: Clock,
        pack: ModelPack,
        faces: FaceWork,
        windows: GateWindows,
        caps: AttemptCaps,
        templates: TemplateStore,
        challenges: ChallengeStore,
        liveness_policy: LivenessPolicy,
        judge: LivenessJudge,
        issuer: TokenIssuer | None,
        redeemer: TokenRedeemer | None,
        published_keys: Callable[[datetime], list[PublishedKey]],
        audit: AuditLog,
        metrics: Metrics,
        refunded: frozenset[Decision] = DEFAULT_REFUNDED,
        lockout: SpoofLockout | None = None,
        passive_frames: int = 2,
        skew: SkewWatch | None = None,
        venue_passes: VenuePassCheck | None = None,
        passive_with_challenge: bool = False,
    ) -> None:
        """``passive_with_challenge``: also run the passive model on challenge scans (off by
        default: it refuses real people, docs/liveness.md). A scan that only the passive
        model calls an attack is SPOOF_SUSPECTED but never costs an attempt or a spoof
        strike, whatever the policy."""
        if pack.threshold is None:
            raise PolicyError(
                f"model pack {pack.name!r} has no calibration, so no match can be decided: "
                "run `facesvc calibrate` and set models.calibration"
            )
        self._clock = clock
        self._pack = pack
        self._threshold: float = pack.threshold
        self._faces = faces
        self._windows = windows
        self._caps = caps
        self._templates = templates
        self._challenges = challenges
        self._liveness_policy = liveness_policy
        self._judge = judge
        self._issuer = issuer
        self._redeemer = redeemer
        self._published_keys = published_keys
        self._audit = audit
        self._metrics = metrics
        self._refunded = refunded
        self._passive_frames = passive_frames
        self._passive_with_challenge = passive_with_challenge
        self._lockout = lockout
        self._skew = skew
        self._venue_passes = venue_passes

    @property
    def pack(self) -> ModelPack:
        return self._pack

    async def close(self) -> None:
        """Stop the model workers; in-flight model calls are cancelled."""
        await self._faces.close()

    # ------------------------------------------------------------------- enrollment

    async def enroll(
        self,
        participant_id: str,
        images: Sequence[bytes],
        *,
        replace: bool,
        caller: Caller,
        tenants: frozenset[str] = frozenset(),
    ) -> EnrollOutcome:
        """Store one template from the photos that pass the quality gates, for ``tenants``
        (the LMS tenants that may act for the participant; empty on a replace: keep them).

        Raises ``ImageRejected`` (undecodable photo), ``AlreadyEnrolled`` (enrolled and not
        ``replace``), ``StoreUnavailable``.
        """
        started = time.perf_counter()
        decoded = await self._faces.decode(images)
        analyses = await self._faces.analyze(decoded)
        reports = _reports(decoded, analyses)
        usable = [a for a in analyses if a.status is FaceStatus.OK]
        if not usable:
            reason = "no photo passed the quality checks: " + "; ".join(
                f"photo {r.index}: {r.reason}" for r in reports
            )
            await self._audit_enroll(caller, participant_id, "rejected", reason, started)
            return EnrollOutcome(False, reason, None, reports)
        descriptors = await self._faces.embed([_chip(a) for a in usable])
        template = Template(
            participant_id=participant_id,
            model_pack=self._pack.tag,
            descriptors=descriptors,
            created_at=self._clock.now(),
            image_count=len(usable),
            tenants=tenants,
        )
        metadata = await self._templates.put(template, replace=replace)
        reason = f"enrolled from {len(usable)} of {len(images)} photos"
        await self._audit_enroll(caller, participant_id, "ok", reason, started)
        return EnrollOutcome(True, reason, metadata, reports)

    async def enrollment(self, participant_id: str) -> TemplateMetadata | None:
        """When and how the participant was enrolled (never the descriptors)."""
        return await self._templates.metadata(participant_id)

    async def set_tenants(
        self, participant_id: str, tenants: frozenset[str], *, caller: Caller
    ) -> TemplateMetadata:
        """Replace the LMS tenants that may act for an enrolled participant. Raises
        ``ParticipantNotFound`` when there is no enrollment, ``StoreUnavailable``."""
        metadata = await self._templates.set_tenants(participant_id, tenants)
        await self._audited(
            action="set_tenants",
            caller=caller,
            participant_id=participant_id,
            outcome="ok" if metadata is not None else "not_enrolled",
            reason=",".join(sorted(tenants)),
        )
        if metadata is None:
            raise ParticipantNotFound(f"participant {participant_id} has no enrollment")
        return metadata

    async def admit(
        self,
        caller: Caller,
        participant_id: str,
        *,
        venue_pass: str | None = None,
        training_id: str = "",
        gate: Gate | None = None,
        session_id: str | None = None,
    ) -> Template | None:
        """The participant's template once ``caller`` may act for them (see :class:`Caller`);
        None when there is no enrollment and the caller may still ask (an admin, a kiosk with
        its pass, any caller on Verify, which then decides NOT_ENROLLED).

        A kiosk's ``venue_pass`` must name this ``training_id``, ``gate`` and (when given)
        ``session_id``. Raises ``VenuePassRefused``, ``ParticipantNotFound`` (an enrollment
        that does not list the caller's tenant), ``TemplateUnreadable``, ``StoreUnavailable``.
        """
        if caller.needs_venue_pass:
            self._admit_venue_pass(
                caller, participant_id, venue_pass, training_id, gate, session_id
            )
        template = await self._templates.get(participant_id)
        if template is None or caller.programme_wide or caller.needs_venue_pass:
            return template
        if caller.tenant not in template.tenants:
            raise ParticipantNotFound(
                f"no enrollment of participant {participant_id} is visible to tenant "
                f"{caller.tenant}: the programme enrolls participants for the LMS tenants "
                "that may act for them"
            )
        return template

    def _admit_venue_pass(
        self,
        caller: Caller,
        participant_id: str,
        venue_pass: str | None,
        training_id: str,
        gate: Gate | None,
        session_id: str | None,
    ) -> None:
        if self._venue_passes is None or gate is None:
            raise VenuePassRefused("this service checks no venue passes, so kiosks cannot scan")
        if not venue_pass:
            raise VenuePassRefused(
                "a kiosk's scan needs the participant's venue pass (the QR code's text)"
            )
        try:
            self._venue_passes.admit(
                venue_pass,
                venue=caller.tenant,
                participant_id=participant_id,
                training_id=training_id,
                gate=gate,
                session_id=session_id,
            )
        except PassRefused as exc:
            raise VenuePassRefused(f"the venue pass was refused: {exc}") from exc

    async def delete_enrollment(self, participant_id: str, *, caller: Caller) -> bool:
        """Erase the template and every key derived from it; True if there was one."""
        deleted = await self._templates.delete(participant_id)
        await self._audited(
            action="delete",
            caller=caller,
            participant_id=participant_id,
            outcome="deleted" if deleted else "not_enrolled",
        )
        return deleted

    async def _audit_enroll(
        self, caller: Caller, participant_id: str, outcome: str, reason: str, started: float
    ) -> None:
        await self._audited(
            action="enroll",
            caller=caller,
            participant_id=participant_id,
            outcome=outcome,
            reason=reason,
            timings_ms={"total": _ms(started)},
        )

    # ------------------------------------------------------------ challenge, attempts

    async def start_challenge(
        self,
        participant_id: str,
        training_id: str,
        training_type: TrainingType,
        gate: Gate,
        *,
        caller: Caller,
        venue_pass: str | None = None,
    ) -> Challenge:
        """A fresh single-use challenge bound to the participant, training and gate.

        Raises ``ParticipantLocked`` while the participant's scans are paused, and what
        :meth:`admit` raises (also ``ParticipantNotFound`` for a participant not enrolled,
        unless the caller is an admin or a kiosk)."""
        del training_type  # every type draws from the same measurable steps
        template = await self.admit(
            caller, participant_id, venue_pass=venue_pass, training_id=training_id, gate=gate
        )
        if template is None and not (caller.programme_wide or caller.needs_venue_pass):
            raise ParticipantNotFound(f"participant {participant_id} has no enrollment")
        if self._lockout is not None:
            await self._lockout.check(participant_id)
        return await self._challenges.issue(participant_id, training_id, gate)

    async def attempts(
        self, participant_id: str, training_id: str, training_type: TrainingType, *, caller: Caller
    ) -> CapUsage:
        """Attempts used and left today (WIB) and when the count resets. Raises
        ``ParticipantNotFound`` unless ``caller`` may act for the participant (an admin may
        ask about anyone)."""
        template = await self.admit(caller, participant_id)
        if template is None and not caller.programme_wide:
            raise ParticipantNotFound(f"participant {participant_id} has no enrollment")
        return await self._caps.usage(participant_id, training_id, training_type, self._clock.now())

    # ------------------------------------------------------------------------ tokens

    async def redeem(self, token: str, expected: Expectation, *, caller: Caller) -> CheckResult:
        """Check and spend a token once. Raises ``StoreUnavailable``.

        No redemption without its audit entry, and no token burnt by a failed one: when the
        entry cannot be appended after this call spent the token, the spend is taken back
        before the caller hears UNAVAILABLE, so its retry redeems the token."""
        if self._redeemer is None:
            raise PolicyError("token signing is not configured on this service")
        result = await self._redeemer.redeem(token, expected)
        claims = result.claims
        try:
            await self._audited(
                action="redeem",
                caller=caller,
                participant_id=claims.sub if claims is not None else "",
                outcome=result.reason.name,
                training_id=claims.training_id if claims is not None else "",
                gate=expected.gate.value,
                session_id=expected.session_id,
                verification_id=claims.verification_id if claims is not None else "",
            )
        except StoreUnavailable:
            if result.ok and claims is not None:
                await self._redeemer.unspend(claims)
            raise
        return result

    async def inspect(self, frame: bytes) -> FrameReport:
        """What the quality gates see in one frame, for live guidance before a scan (the
        Scan Wajah page's pre-check): no attempt is spent, nothing is matched, stored or
        audited. Raises ``ImageRejected``."""
        (image,) = await self._faces.decode([frame])
        (analysis,) = await self._faces.analyze([image])
        return _report(0, image, analysis)

    def signing_keys(self) -> list[PublishedKey]:
        """The public keys a gate needs to check tokens offline (the JWKS)."""
        return self._published_keys(self._clock.now())

    def liveness_method(self, training_type: TrainingType, caller: Caller) -> LivenessMethod:
        """How a scan of ``training_type`` by ``caller`` proves liveness: the one answer both
        Verify and the Scan Wajah page (which must know whether to ask for a challenge) use."""
        return self._liveness_policy(training_type, caller)

    async def _audited(self, *, action: str, caller: Caller, **event: Any) -> None:
        """Append an ``AuditEvent`` of ``action`` by ``caller``; ``event``: its other fields."""
        await self._audit.append(
            AuditEvent(action=action, caller=caller.name, tenant=caller.tenant, **event)
        )

    # ------------------------------------------------------------------ verification

    async def verify(self, cmd: VerifyCommand) -> VerifyOutcome:
        """Decide one scan.

        Raises, each a ``facesvc.errors`` kind the transports answer from one table:
        ``StoreUnavailable`` (fail closed), ``ImageRejected`` and ``InvalidRequest``
        (invalid input, nothing spent), ``PolicyError`` (refused by policy, nothing spent),
        ``ScanInProgress``, ``ParticipantLocked`` (repeated spoof suspicions, nothing spent),
        ``TimeoutError`` (``cmd.deadline`` passed; nothing spent), ``Overloaded`` (the
        models' queues are full; nothing spent), ``ClockUntrusted`` (this server's clock
        is too far from Redis's to tell the day; nothing spent), what :meth:`admit` raises
        (nothing read or spent) and ``IdempotencyConflict`` (the key was used for another
        request; nothing spent).
        """
        started = time.perf_counter()
        timings: dict[str, float] = {}
        now = self._clock.now()
        method = self.liveness_method(cmd.training_type, cmd.caller)
        if method is LivenessMethod.CHALLENGE and not cmd.challenge_id:
            raise PolicyError(
                f"{cmd.training_type.value} scans from a {cmd.caller.role} need a liveness "
                "challenge: call StartLivenessChallenge and send its challenge_id with the frames"
            )
        template = await self.admit(
            cmd.caller,
            cmd.participant_id,
            venue_pass=cmd.venue_pass,
            training_id=cmd.training_id,
            gate=cmd.gate,
            session_id=cmd.session_id,
        )
        if self._lockout is not None:
            await self._lockout.check(cmd.participant_id)

        window = self._windows.check(cmd.training_type, cmd.gate, cmd.scheduled_start, now)
        if isinstance(window, WindowClosed):
            usage = await self._caps.usage(
                cmd.participant_id, cmd.training_id, cmd.training_type, now
            )
            return await self._finish(
                cmd, Decision.OUTSIDE_WINDOW, window.reason, usage, method, started, timings
            )
        if template is None or template.model_pack != self._pack.tag:
            usage = await self._caps.usage(
                cmd.participant_id, cmd.training_id, cmd.training_type, now
            )
            reason = (
                "no face is enrolled for this participant: enroll first"
                if template is None
                else f"the enrollment was made with model pack {template.model_pack}, and this "
                f"service now matches with {self._pack.tag}: enroll again (faces are never "
                "compared across model packs)"
            )
            return await self._finish(
                cmd, Decision.NOT_ENROLLED, reason, usage, method, started, timings
            )

        t0 = time.perf_counter()
        images = await self._faces.decode(cmd.frames)
        timings["decode"] = _ms(t0)

        if cmd.deadline is not None and time.monotonic() >= cmd.deadline:
            # Nobody waits for the answer any more: no attempt may be spent on it.
            raise TimeoutError("the call's deadline passed before its attempt was reserved")
        if self._skew is not None:
            # Which WIB day the attempt counts on is this clock's call: refuse rather than
            # count it on the wrong day when the clock is far from Redis's.
            self._skew.check()
        t0 = time.perf_counter()
        held = await self._caps.reserve(
            cmd.participant_id,
            cmd.training_id,
            cmd.training_type,
            now,
            idempotent=None
            if cmd.idempotency_key is None
            else IdempotentScan(cmd.idempotency_key, cmd.caller.name, cmd.request_digest()),
        )
        timings["reserve"] = _ms(t0)
        self._metrics.redis_latency.labels("reserve").observe(timings["reserve"] / 1000)
        if held.replayed:
            return await self._replay(cmd, held, method)
        if isinstance(held, Exhausted):
            self._metrics.cap_exhausted.labels(cmd.training_type.value).inc()
            resets = held.resets_at  # in limits.timezone, whose abbreviation the message shows
            reason = (
                f"all {held.limit} attempts for today are used; the count resets at "
                f"{resets:%H:%M %Z} on {resets:%Y-%m-%d}"
            )
            return await self._finish(
                cmd,
                Decision.ATTEMPTS_EXHAUSTED,
                reason,
                held.usage,
                method,
                started,
                timings,
                held=held,
            )

        try:
            decision, reason, reports, free = await self._decide(
                cmd, method, template, images, timings
            )
        except BaseException:
            # Nothing was decided (deadline, overload, a bug): the attempt must not count,
            # and a retry with the same idempotency key must be decided afresh.
            await self._caps.abandon(held)
            raise
        if decision in self._refunded or free:
            await self._caps.refund(held)
            usage = held.usage_if_refunded
        else:
            usage = held.usage
        return await self._finish(
            cmd,
            decision,
            reason,
            usage,
            method,
            started,
            timings,
            frames=reports,
            held=held,
            strike=not free,
        )

    async def _decide(
        self,
        cmd: VerifyCommand,
        method: LivenessMethod,
        template: Template,
        images: Sequence[RGBImage],
        timings: dict[str, float],
    ) -> tuple[Decision, str, tuple[FrameReport, ...], bool]:
        """The decision, its reason, the frames' reports, and whether the decision is free
        (refunded and no spoof strike: the passive model's verdict alone)."""
        challenge: Challenge | None = None
        if method is LivenessMethod.CHALLENGE:
            assert cmd.challenge_id is not None
            try:
                challenge = await self._challenges.consume(
                    cmd.challenge_id, cmd.participant_id, cmd.training_id, cmd.gate
                )
            except ChallengeRefused as refused:
                return Decision.CHALLENGE_FAILED, str(refused), (), False

        t0 = time.perf_counter()
        # Analysed and described in one step (described early when the worker is idle: a
        # frame with a problem then leaves its scan's descriptors unused).
        analyses, descriptors = await self._faces.describe(images, cmd.deadline)
        timings["faces"] = _ms(t0)
        reports = _reports(images, analyses)
        problem = _face_problem(analyses, turns_expected=challenge is not None)
        if problem is not None:
            return problem[0], problem[1], reports, False

        if method is not LivenessMethod.OFF:
            t0 = time.perf_counter()
            scores: list[float | None] = [None] * len(analyses)
            if method is LivenessMethod.PASSIVE or self._passive_with_challenge:
                scored = frames_to_score(len(analyses), self._passive_frames)
                some = await self._faces.live_scores(
                    [images[i] for i in scored], [analyses[i] for i in scored], cmd.deadline
                )
                for i, value in zip(scored, some, strict=True):
                    scores[i] = float(value)
                reports = tuple(
                    replace(r, live_score=s) for r, s in zip(reports, scores, strict=True)
                )
            dense = None
            if challenge is not None:
                dense = await self._faces.landmarks_68(images, analyses, cmd.deadline)
            verdict = self._judge.judge(
                images, analyses, descriptors, scores, challenge, self._threshold, dense
            )
            timings["liveness"] = _ms(t0)
        else:
            verdict = None

        t0 = time.perf_counter()
        frontal = descriptors[[a.status is FaceStatus.OK for a in analyses]]
        score = self._pack.match(template.descriptors, frontal)
        timings["match"] = _ms(t0)
        matched = score.accepted(self._threshold)
        if verdict is not None and verdict.decision is not None:
            if verdict.decision is Decision.SPOOF_SUSPECTED and not matched:
                # A suspected attack with someone else's face is a plain mismatch: a spoof
                # strike (which pauses the participant) needs the participant's likeness, or
                # anyone could lock anyone out.
                return Decision.NOT_MATCHED, _NOT_MATCHED, reports, False
            if verdict.passive_only:
                reason = verdict.reason + " This scan was not counted as an attempt."
                return verdict.decision, reason, reports, True
            return verdict.decision, verdict.reason, reports, False
        if not matched:
            return Decision.NOT_MATCHED, _NOT_MATCHED, reports, False
        return Decision.VERIFIED, "the face matches the enrolled participant", reports, False

    async def _replay(
        self, cmd: VerifyCommand, held: Reservation | Exhausted, method: LivenessMethod
    ) -> VerifyOutcome:
        """The first answer to a scan retried with the same idempotency key (and the same
        request): nothing new is reserved or computed; a token is signed again from its
        stored claims. The replay is audited too: the first answer may have been stored and
        then lost with its audit entry (the caller heard UNAVAILABLE and retried), and no
        answer, least of all a token, may leave without one."""
        if held.prior_decision is None:
            raise ScanInProgress(
                "a scan with this idempotency key is still being decided: retry in a moment"
            )
        first = json.loads(held.prior_decision)
        await self._audited(
            action="verify",
            caller=cmd.caller,
            participant_id=cmd.participant_id,
            outcome=first["decision"],
            reason="replayed",
            training_id=cmd.training_id,
            training_type=cmd.training_type.value,
            gate=cmd.gate.value,
            session_id=cmd.session_id,
            verification_id=first["verification_id"],
        )
        token = None
        if first["claims"] is not None and self._issuer is not None:
            token = self._issuer.reissue(VerificationClaims.from_json(first["claims"]))
        return VerifyOutcome(
            verification_id=first["verification_id"],
            decision=Decision(first["decision"]),
            reason=first["reason"],
            attempts=held.usage,
            liveness=method,
            token=token,
            replayed=True,
        )

    async def _finish(
        self,
        cmd: VerifyCommand,
        decision: Decision,
        reason: str,
        usage: CapUsage,
        method: LivenessMethod,
        started: float,
        timings: dict[str, float],
        *,
        frames: tuple[FrameReport, ...] = (),
        held: Reservation | Exhausted | None = None,
        strike: bool = True,
    ) -> VerifyOutcome:
        verification_id = uuid.uuid4().hex
        token = None
        if decision is Decision.VERIFIED:
            if self._issuer is None:
                reason += "; no token was issued: token signing is not configured"
            else:
                token = self._issuer.issue(
                    participant_id=cmd.participant_id,
                    audience=cmd.caller.tenant,
                    training_id=cmd.training_id,
                    training_type=cmd.training_type,
                    gate=cmd.gate,
                    session_id=cmd.session_id,
                    liveness=method,
                    model_pack=self._pack.tag,
                    verification_id=verification_id,
                )
        timings["total"] = _ms(started)
        outcome = VerifyOutcome(
            verification_id=verification_id,
            decision=decision,
            reason=reason,
            attempts=usage,
            liveness=method,
            token=token,
            frames=frames,
            timings_ms=dict(timings),
        )
        if held is not None:
            await self._caps.record_decision(held, _remember(outcome))
        await self._audited(
            action="verify",
            caller=cmd.caller,
            participant_id=cmd.participant_id,
            outcome=decision.value,
            reason=reason,
            training_id=cmd.training_id,
            training_type=cmd.training_type.value,
            gate=cmd.gate.value,
            session_id=cmd.session_id,
            verification_id=verification_id,
            timings_ms=timings,
        )
        if decision is Decision.SPOOF_SUSPECTED and strike and self._lockout is not None:
            # After the audit append: the lockout is a consequence of an audited decision.
            await self._lockout.record_spoof(cmd.participant_id, verification_id)
        self._metrics.decisions.labels(
            decision.value, cmd.training_type.value, cmd.gate.value
        ).inc()
        for stage, ms in timings.items():
            self._metrics.stage_seconds.labels(stage).observe(ms / 1000)
        return outcome


def _face_problem(
    analyses: Sequence[FaceAnalysis], *, turns_expected: bool
) -> tuple[Decision, str] | None:
    """The decision for the first frame whose face cannot be used, with its reason.

    A challenge asks for turned heads, so there a frame may fail the pose check alone; the
    match then uses the frames that pass every check, and at least one must.
    """
    for index, analysis in enumerate(analyses):
        if analysis.status is FaceStatus.OK:
            continue
        if turns_expected and analysis.only_pose_failed:
            continue
        where = f"frame {index + 1}: " if len(analyses) > 1 else ""
        return _FACE_DECISIONS[analysis.status], where + analysis.reason
    if not any(a.status is FaceStatus.OK for a in analyses):
        return Decision.LOW_QUALITY, "no frame shows the face straight on: look at the camera"
    return None


def _chip(analysis: FaceAnalysis) -> RGBImage:
    assert analysis.chip is not None, "only analyses with a measured face are embedded"
    return analysis.chip


def _reports(
    images: Sequence[RGBImage], analyses: Sequence[FaceAnalysis]
) -> tuple[FrameReport, ...]:
    return tuple(
        _report(i, image, analysis)
        for i, (image, analysis) in enumerate(zip(images, analyses, strict=True))
    )


def _report(index: int, image: RGBImage, analysis: FaceAnalysis) -> FrameReport:
    base = FrameReport(
        index=index,
        accepted=analysis.status is FaceStatus.OK,
        status=analysis.status,
        reason=analysis.reason,
        width_px=int(image.shape[1]),
        height_px=int(image.shape[0]),
        face_count=analysis.faces,
    )
    detection, quality = analysis.detection, analysis.quality
    if detection is None or quality is None:
        return base
    return replace(
        base,
        face_height_px=detection.box.height,
        detection_score=detection.score,
        sharpness=quality.sharpness,
        brightness=quality.brightness,
        yaw_deg=quality.pose.yaw,
        pitch_deg=quality.pose.pitch,
        roll_deg=quality.pose.roll,
        failed_checks=tuple(issue.check.value for issue in quality.issues),
    )


def _remember(outcome: VerifyOutcome) -> bytes:
    """What a retry with the same idempotency key gets back: the decision and the token's
    claims. Never the token itself: Redis keeps no live credential, and the replay signs the
    same claims again (:meth:`TokenIssuer.reissue`)."""
    token = outcome.token
    return json.dumps(
        {
            "decision": outcome.decision.value,
            "reason": outcome.reason,
            "verification_id": outcome.verification_id,
            "claims": token.claims.to_json() if token else None,
        }
    ).encode()


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000
