"""Engine results as facesvc.v1 messages; enum values map through
:mod:`facesvc.wire`."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc.engine import EnrollOutcome, FrameReport, VerifyOutcome
from facesvc.liveness.challenges import Challenge
from facesvc.models.pipeline import FaceStatus
from facesvc.store.templates import TemplateMetadata
from facesvc.tokens.claims import CheckReason, CheckResult
from facesvc.tokens.keys import PublishedKey
from facesvc.wire import (
    DECISIONS,
    GATES,
    LIVENESS_METHODS,
    REDEEM_REASONS,
    TRAINING_TYPES,
)

_ISSUE_OF_STATUS = {
    FaceStatus.NO_FACE: pb.QUALITY_ISSUE_NO_FACE,
    FaceStatus.MULTIPLE_FACES: pb.QUALITY_ISSUE_MULTIPLE_FACES,
}

# Quality checks (facesvc.models.quality.Check values) to the wire's issue codes; exposure
# problems are split into too dark / too bright by the measured mean grey level.
_ISSUE_OF_CHECK = {
    "face_size": pb.QUALITY_ISSUE_FACE_TOO_SMALL,
    "sharpness": pb.QUALITY_ISSUE_BLURRY,
    "yaw": pb.QUALITY_ISSUE_POSE,
    "pitch": pb.QUALITY_ISSUE_POSE,
}
_EXPOSURE_CHECKS = frozenset({"brightness", "clipping"})
_MID_GREY = 128.0

# Reasons the wire has no word for fall back to the nearest one it has.
_REDEEM_FALLBACK = {
    CheckReason.WRONG_ISSUER: pb.REDEEM_REASON_BAD_SIGNATURE,
    CheckReason.WRONG_PARTICIPANT: pb.REDEEM_REASON_MALFORMED,
}


def timestamp(moment: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(moment.astimezone(UTC))
    return ts


def _epoch(seconds: float) -> Timestamp:
    return timestamp(datetime.fromtimestamp(seconds, UTC))


def image_quality(report: FrameReport, issue: pb.QualityIssue) -> pb.ImageQuality:
    message = pb.ImageQuality(
        index=report.index,
        accepted=report.accepted,
        issue=issue,
        reason=report.reason,
        width_px=report.width_px,
        height_px=report.height_px,
        face_count=report.face_count,
        face_height_px=round(report.face_height_px),
        detection_score=report.detection_score,
        sharpness=report.sharpness,
        brightness=report.brightness,
        yaw_deg=report.yaw_deg,
        pitch_deg=report.pitch_deg,
        roll_deg=report.roll_deg,
    )
    if report.live_score is not None:
        message.live_score = report.live_score
    return message


def _issue(report: FrameReport) -> pb.QualityIssue:
    """The wire's code for the first thing wrong with one image."""
    if report.accepted:
        return pb.QUALITY_ISSUE_UNSPECIFIED
    if report.status in _ISSUE_OF_STATUS:
        return _ISSUE_OF_STATUS[report.status]
    for check in report.failed_checks:
        if check in _EXPOSURE_CHECKS:
            dark = report.brightness < _MID_GREY
            return pb.QUALITY_ISSUE_TOO_DARK if dark else pb.QUALITY_ISSUE_TOO_BRIGHT
        if check in _ISSUE_OF_CHECK:
            return _ISSUE_OF_CHECK[check]
    return pb.QUALITY_ISSUE_UNSPECIFIED


def verify_response(outcome: VerifyOutcome) -> pb.VerifyResponse:
    usage = outcome.attempts
    response = pb.VerifyResponse(
        decision=DECISIONS.to_wire(outcome.decision),
        reason=outcome.reason,
        attempts_used=usage.used,
        attempts_remaining=usage.remaining,
        attempts_limit=usage.limit,
        attempts_reset_at=timestamp(usage.resets_at),
        verification_id=outcome.verification_id,
        frames=[image_quality(r, _issue(r)) for r in outcome.frames],
        liveness_method=LIVENESS_METHODS.to_wire(outcome.liveness),
        replayed=outcome.replayed,
    )
    if outcome.token is not None:
        response.token = outcome.token.token
        response.token_expires_at.CopyFrom(timestamp(outcome.token.expires_at))
    return response


def enrollment_message(metadata: TemplateMetadata) -> pb.Enrollment:
    return pb.Enrollment(
        participant_id=metadata.participant_id,
        enrolled_at=timestamp(metadata.enrolled_at),
        updated_at=timestamp(metadata.created_at),
        image_count=metadata.image_count,
        model_pack=metadata.model_pack,
        tenants=sorted(metadata.tenants),
    )


def enroll_response(outcome: EnrollOutcome) -> pb.EnrollResponse:
    response = pb.EnrollResponse(
        enrolled=outcome.enrolled,
        reason=outcome.reason,
        images=[image_quality(r, _issue(r)) for r in outcome.images],
    )
    if outcome.metadata is not None:
        response.enrollment.CopyFrom(enrollment_message(outcome.metadata))
    return response


def challenge_response(challenge: Challenge) -> pb.StartLivenessChallengeResponse:
    return pb.StartLivenessChallengeResponse(
        challenge_id=challenge.challenge_id,
        steps=[pb.ChallengeStep.Value(f"CHALLENGE_STEP_{step.name}") for step in challenge.steps],
        expires_at=_epoch(challenge.expires_at),
        # A neutral frame first, then at least one frame per step.
        min_frames=len(challenge.steps) + 1,
    )


def redeem_response(result: CheckResult) -> pb.RedeemTokenResponse:
    reason = _REDEEM_FALLBACK.get(result.reason) or REDEEM_REASONS.to_wire(result.reason)
    response = pb.RedeemTokenResponse(
        valid=result.ok, reason=reason, message=result.reason.value.replace("_", " ").lower()
    )
    claims = result.claims
    if claims is not None:
        response.claims.CopyFrom(
            pb.TokenClaims(
                token_id=claims.jti,
                issuer=claims.iss,
                audience=claims.aud,
                participant_id=claims.sub,
                training_id=claims.training_id,
                training_type=TRAINING_TYPES.to_wire(claims.training_type),
                gate=GATES.to_wire(claims.gate),
                session_id=claims.session_id,
                issued_at=_epoch(claims.iat),
                not_before=_epoch(claims.nbf),
                expires_at=_epoch(claims.exp),
                verification_id=claims.verification_id,
                key_id=result.kid or "",
                liveness_method=LIVENESS_METHODS.to_wire(claims.liveness),
                model_pack=claims.model_pack,
            )
        )
    return response


def signing_keys_response(keys: list[PublishedKey]) -> pb.GetSigningKeysResponse:
    response = pb.GetSigningKeysResponse(
        jwks_json=json.dumps({"keys": [k.jwk for k in keys]}, sort_keys=True)
    )
    for key in keys:
        jwk = key.jwk
        entry = pb.SigningKey(
            kid=key.kid,
            kty=jwk["kty"],
            crv=jwk["crv"],
            x=jwk["x"],
            alg=jwk.get("alg", "EdDSA"),
            use=jwk.get("use", "sig"),
            not_before=timestamp(key.signs_from),
            active=key.active,
        )
        if key.signs_until is not None:
            entry.not_after.CopyFrom(timestamp(key.signs_until))
        response.keys.append(entry)
    return response
