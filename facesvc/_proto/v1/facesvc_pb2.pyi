import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TrainingType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAINING_TYPE_UNSPECIFIED: _ClassVar[TrainingType]
    TRAINING_TYPE_SPL: _ClassVar[TrainingType]
    TRAINING_TYPE_WEBINAR: _ClassVar[TrainingType]
    TRAINING_TYPE_OFFLINE: _ClassVar[TrainingType]

class Gate(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GATE_UNSPECIFIED: _ClassVar[Gate]
    GATE_REDEEM: _ClassVar[Gate]
    GATE_SESSION: _ClassVar[Gate]
    GATE_POST_TEST: _ClassVar[Gate]

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_VERIFIED: _ClassVar[Decision]
    DECISION_NOT_MATCHED: _ClassVar[Decision]
    DECISION_SPOOF_SUSPECTED: _ClassVar[Decision]
    DECISION_NO_FACE: _ClassVar[Decision]
    DECISION_MULTIPLE_FACES: _ClassVar[Decision]
    DECISION_LOW_QUALITY: _ClassVar[Decision]
    DECISION_CHALLENGE_FAILED: _ClassVar[Decision]
    DECISION_ATTEMPTS_EXHAUSTED: _ClassVar[Decision]
    DECISION_NOT_ENROLLED: _ClassVar[Decision]
    DECISION_OUTSIDE_WINDOW: _ClassVar[Decision]

class ChallengeStep(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHALLENGE_STEP_UNSPECIFIED: _ClassVar[ChallengeStep]
    CHALLENGE_STEP_TURN_LEFT: _ClassVar[ChallengeStep]
    CHALLENGE_STEP_TURN_RIGHT: _ClassVar[ChallengeStep]
    CHALLENGE_STEP_LOOK_UP: _ClassVar[ChallengeStep]
    CHALLENGE_STEP_LOOK_DOWN: _ClassVar[ChallengeStep]
    CHALLENGE_STEP_COME_CLOSER: _ClassVar[ChallengeStep]
    CHALLENGE_STEP_LOOK_STRAIGHT: _ClassVar[ChallengeStep]

class LivenessMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LIVENESS_METHOD_UNSPECIFIED: _ClassVar[LivenessMethod]
    LIVENESS_METHOD_OFF: _ClassVar[LivenessMethod]
    LIVENESS_METHOD_PASSIVE: _ClassVar[LivenessMethod]
    LIVENESS_METHOD_CHALLENGE: _ClassVar[LivenessMethod]

class QualityIssue(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    QUALITY_ISSUE_UNSPECIFIED: _ClassVar[QualityIssue]
    QUALITY_ISSUE_UNDECODABLE: _ClassVar[QualityIssue]
    QUALITY_ISSUE_TOO_MANY_PIXELS: _ClassVar[QualityIssue]
    QUALITY_ISSUE_NO_FACE: _ClassVar[QualityIssue]
    QUALITY_ISSUE_MULTIPLE_FACES: _ClassVar[QualityIssue]
    QUALITY_ISSUE_FACE_TOO_SMALL: _ClassVar[QualityIssue]
    QUALITY_ISSUE_BLURRY: _ClassVar[QualityIssue]
    QUALITY_ISSUE_TOO_DARK: _ClassVar[QualityIssue]
    QUALITY_ISSUE_TOO_BRIGHT: _ClassVar[QualityIssue]
    QUALITY_ISSUE_POSE: _ClassVar[QualityIssue]
    QUALITY_ISSUE_INCONSISTENT_IDENTITY: _ClassVar[QualityIssue]

class RedeemReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REDEEM_REASON_UNSPECIFIED: _ClassVar[RedeemReason]
    REDEEM_REASON_OK: _ClassVar[RedeemReason]
    REDEEM_REASON_EXPIRED: _ClassVar[RedeemReason]
    REDEEM_REASON_NOT_YET_VALID: _ClassVar[RedeemReason]
    REDEEM_REASON_BAD_SIGNATURE: _ClassVar[RedeemReason]
    REDEEM_REASON_WRONG_AUDIENCE: _ClassVar[RedeemReason]
    REDEEM_REASON_WRONG_GATE: _ClassVar[RedeemReason]
    REDEEM_REASON_WRONG_SESSION: _ClassVar[RedeemReason]
    REDEEM_REASON_ALREADY_USED: _ClassVar[RedeemReason]
    REDEEM_REASON_MALFORMED: _ClassVar[RedeemReason]
    REDEEM_REASON_UNKNOWN_KEY: _ClassVar[RedeemReason]
    REDEEM_REASON_WRONG_TRAINING: _ClassVar[RedeemReason]
    REDEEM_REASON_WRONG_PARTICIPANT: _ClassVar[RedeemReason]
TRAINING_TYPE_UNSPECIFIED: TrainingType
TRAINING_TYPE_SPL: TrainingType
TRAINING_TYPE_WEBINAR: TrainingType
TRAINING_TYPE_OFFLINE: TrainingType
GATE_UNSPECIFIED: Gate
GATE_REDEEM: Gate
GATE_SESSION: Gate
GATE_POST_TEST: Gate
DECISION_UNSPECIFIED: Decision
DECISION_VERIFIED: Decision
DECISION_NOT_MATCHED: Decision
DECISION_SPOOF_SUSPECTED: Decision
DECISION_NO_FACE: Decision
DECISION_MULTIPLE_FACES: Decision
DECISION_LOW_QUALITY: Decision
DECISION_CHALLENGE_FAILED: Decision
DECISION_ATTEMPTS_EXHAUSTED: Decision
DECISION_NOT_ENROLLED: Decision
DECISION_OUTSIDE_WINDOW: Decision
CHALLENGE_STEP_UNSPECIFIED: ChallengeStep
CHALLENGE_STEP_TURN_LEFT: ChallengeStep
CHALLENGE_STEP_TURN_RIGHT: ChallengeStep
CHALLENGE_STEP_LOOK_UP: ChallengeStep
CHALLENGE_STEP_LOOK_DOWN: ChallengeStep
CHALLENGE_STEP_COME_CLOSER: ChallengeStep
CHALLENGE_STEP_LOOK_STRAIGHT: ChallengeStep
LIVENESS_METHOD_UNSPECIFIED: LivenessMethod
LIVENESS_METHOD_OFF: LivenessMethod
LIVENESS_METHOD_PASSIVE: LivenessMethod
LIVENESS_METHOD_CHALLENGE: LivenessMethod
QUALITY_ISSUE_UNSPECIFIED: QualityIssue
QUALITY_ISSUE_UNDECODABLE: QualityIssue
QUALITY_ISSUE_TOO_MANY_PIXELS: QualityIssue
QUALITY_ISSUE_NO_FACE: QualityIssue
QUALITY_ISSUE_MULTIPLE_FACES: QualityIssue
QUALITY_ISSUE_FACE_TOO_SMALL: QualityIssue
QUALITY_ISSUE_BLURRY: QualityIssue
QUALITY_ISSUE_TOO_DARK: QualityIssue
QUALITY_ISSUE_TOO_BRIGHT: QualityIssue
QUALITY_ISSUE_POSE: QualityIssue
QUALITY_ISSUE_INCONSISTENT_IDENTITY: QualityIssue
REDEEM_REASON_UNSPECIFIED: RedeemReason
REDEEM_REASON_OK: RedeemReason
REDEEM_REASON_EXPIRED: RedeemReason
REDEEM_REASON_NOT_YET_VALID: RedeemReason
REDEEM_REASON_BAD_SIGNATURE: RedeemReason
REDEEM_REASON_WRONG_AUDIENCE: RedeemReason
REDEEM_REASON_WRONG_GATE: RedeemReason
REDEEM_REASON_WRONG_SESSION: RedeemReason
REDEEM_REASON_ALREADY_USED: RedeemReason
REDEEM_REASON_MALFORMED: RedeemReason
REDEEM_REASON_UNKNOWN_KEY: RedeemReason
REDEEM_REASON_WRONG_TRAINING: RedeemReason
REDEEM_REASON_WRONG_PARTICIPANT: RedeemReason

class ImageQuality(_message.Message):
    __slots__ = ("index", "accepted", "issue", "reason", "width_px", "height_px", "face_count", "face_height_px", "detection_score", "sharpness", "brightness", "yaw_deg", "pitch_deg", "roll_deg", "live_score")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ISSUE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_PX_FIELD_NUMBER: _ClassVar[int]
    FACE_COUNT_FIELD_NUMBER: _ClassVar[int]
    FACE_HEIGHT_PX_FIELD_NUMBER: _ClassVar[int]
    DETECTION_SCORE_FIELD_NUMBER: _ClassVar[int]
    SHARPNESS_FIELD_NUMBER: _ClassVar[int]
    BRIGHTNESS_FIELD_NUMBER: _ClassVar[int]
    YAW_DEG_FIELD_NUMBER: _ClassVar[int]
    PITCH_DEG_FIELD_NUMBER: _ClassVar[int]
    ROLL_DEG_FIELD_NUMBER: _ClassVar[int]
    LIVE_SCORE_FIELD_NUMBER: _ClassVar[int]
    index: int
    accepted: bool
    issue: QualityIssue
    reason: str
    width_px: int
    height_px: int
    face_count: int
    face_height_px: int
    detection_score: float
    sharpness: float
    brightness: float
    yaw_deg: float
    pitch_deg: float
    roll_deg: float
    live_score: float
    def __init__(self, index: _Optional[int] = ..., accepted: _Optional[bool] = ..., issue: _Optional[_Union[QualityIssue, str]] = ..., reason: _Optional[str] = ..., width_px: _Optional[int] = ..., height_px: _Optional[int] = ..., face_count: _Optional[int] = ..., face_height_px: _Optional[int] = ..., detection_score: _Optional[float] = ..., sharpness: _Optional[float] = ..., brightness: _Optional[float] = ..., yaw_deg: _Optional[float] = ..., pitch_deg: _Optional[float] = ..., roll_deg: _Optional[float] = ..., live_score: _Optional[float] = ...) -> None: ...

class Enrollment(_message.Message):
    __slots__ = ("participant_id", "enrolled_at", "updated_at", "image_count", "model_pack", "tenants")
    PARTICIPANT_ID_FIELD_NUMBER: _ClassVar[int]
    ENROLLED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    MODEL_PACK_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    participant_id: str
    enrolled_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    image_count: int
    model_pack: str
    tenants: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, participant_id: _Optional[str] = ..., enrolled_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., image_count: _Optional[int] = ..., model_pack: _Optional[str] = ..., tenants: _Optional[_Iterable[str]] = ...) -> None: ...

class TokenClaims(_message.Message):
    __slots__ = ("token_id", "issuer", "audience", "participant_id", "training_id", "training_type", "gate", "session_id", "issued_at", "not_before", "expires_at", "verification_id", "key_id", "liveness_method", "model_pack")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_ID_FIELD_NUMBER: _ClassVar[int]
    TRAINING_ID_FIELD_NUMBER: _ClassVar[int]
    TRAINING_TYPE_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    VERIFICATION_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_METHOD_FIELD_NUMBER: _ClassVar[int]
    MODEL_PACK_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    issuer: str
    audience: str
    participant_id: str
    training_id: str
    training_type: TrainingType
    gate: Gate
    session_id: str
    issued_at: _timestamp_pb2.Timestamp
    not_before: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    verification_id: str
    key_id: str
    liveness_method: LivenessMethod
    model_pack: str
    def __init__(self, token_id: _Optional[str] = ..., issuer: _Optional[str] = ..., audience: _Optional[str] = ..., participant_id: _Optional[str] = ..., training_id: _Optional[str] = ..., training_type: _Optional[_Union[TrainingType, str]] = ..., gate: _Optional[_Union[Gate, str]] = ..., session_id: _Optional[str] = ..., issued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., not_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., verification_id: _Optional[str] = ..., key_id: _Optional[str] = ..., liveness_method: _Optional[_Union[LivenessMethod, str]] = ..., model_pack: _Optional[str] = ...) -> None: ...

class SigningKey(_message.Message):
    __slots__ = ("kid", "kty", "crv", "x", "alg", "use", "not_before", "not_after", "active")
    KID_FIELD_NUMBER: _ClassVar[int]
    KTY_FIELD_NUMBER: _ClassVar[int]
    CRV_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    ALG_FIELD_NUMBER: _ClassVar[int]
    USE_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    kid: str
    kty: str
    crv: str
    x: str
    alg: str
    use: str
    not_before: _timestamp_pb2.Timestamp
    not_after: _timestamp_pb2.Timestamp
    active: bool
    def __init__(self, kid: _Optional[str] = ..., kty: _Optional[str] = ..., crv: _Optional[str] = ..., x: _Optional[str] = ..., alg: _Optional[str] = ..., use: _Optional[str] = ..., not_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., not_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., active: _Optional[bool] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("participant_id", "images", "replace", "tenants")
    PARTICIPANT_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    participant_id: str
    images: _containers.RepeatedScalarFieldContainer[bytes]
    replace: bool
    tenants: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, participant_id: _Optional[str] = ..., images: _Optional[_Iterable[bytes]] = ..., replace: _Optional[bool] = ..., tenants: _Optional[_Iterable[str]] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("enrolled", "reason", "enrollment", "images")
    ENROLLED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ENROLLMENT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    enrolled: bool
    reason: str
    enrollment: Enrollment
    images: _containers.RepeatedCompositeFieldContainer[ImageQuality]
    def __init__(self, enrolled: _Optional[bool] = ..., reason: _Optional[str] = ..., enrollment: _Optional[_Union[Enrollment, _Mapping]] = ..., images: _Optional[_Iterable[_Union[ImageQuality, _Mapping]]] = ...) -> None: ...

class GetEnrollmentRequest(_message.Message):
    __slots__ = ("participant_id",)
    PARTICIPANT_ID_FIELD_NUMBER: _ClassVar[int]
    participant_id: str
    def __init__(self, participant_id: _Optional[str] = ...) -> None: ...

class GetEnrollmentResponse(_message.Message):
    __slots__ = ("enrollment",)
    ENROLLMENT_FIELD_NUMBER: _ClassVar[int]
    enrollment: Enrollment
    def __init__(self, enrollment: _Optional[_Union[Enrollment, _Mapping]] = ...) -> None: ...

class DeleteEnrollmentRequest(_message.Message):
    __slots__ = ("participant_id",)
    PARTICIPANT_ID_FIELD_NUMBER: _ClassVar[int]
    participant_id: str
    def __init__(self, participant_id: _Optional[str] = ...) -> None: ...

class DeleteEnrollmentResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class SetEnrollmentTenantsRequest(_message.Message):
    __slots__ = ("participant_id", "tenants")
    PARTICIPANT_ID_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    participant_id: str
    tenants: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, participant_id: _Optional[str] = ..., tenants: _Optional[_Iterable[str]] = ...) -> None: ...

class SetEnrollmentTenantsResponse(_message.Message):
    __slots__ = ("enrollment",)
    ENROLLMENT_FIELD_NUMBER: _ClassVar[int]
    enrollment: Enrollment
    def __init__(self, enrollment: _Optional[_Union[Enrollment, _Mapping]] = ...) -> None: ...

class StartLivenessChallengeRequest(_message.Message):
    __slots__ = ("participant_id", "training_id", "training_type", "gate", "venue_pass")
    PARTICIPANT_ID_FIELD_NUMBER: _ClassVar[int]
    TRAINING_ID_FIELD_NUMBER: _ClassVar[int]
    TRAINING_TYPE_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    VENUE_PASS_FIELD_NUMBER: _ClassVar[int]
    participant_id: str
    training_id: str
    training_type: TrainingType
    gate: Gate
    venue_pass: str
    def __init__(self, participant_id: _Optional[str] = ..., training_id: _Optional[str] = ..., training_type: _Optional[_Union[TrainingType, str]] = ..., gate: _Optional[_Union[Gate, str]] = ..., venue_pass: _Optional[str] = ...) -> None: ...

class StartLivenessChallengeResponse(_message.Message):
    __slots__ = ("challenge_id", "steps", "expires_at", "min_frames")
    CHALLENGE_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    MIN_FRAMES_FIELD_NUMBER: _ClassVar[int]
    challenge_id: str
    steps: _containers.RepeatedScalarFieldContainer[ChallengeStep]
    expires_at: _timestamp_pb2.Timestamp
    min_frames: int
    def __init__(self, challenge_id: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[ChallengeStep, str]]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., min_frames: _Optional[int] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("participant_id", "training_id", "training_type", "gate", "session_id", "scheduled_start", "challenge_id", "frames", "idempotency_key", "venue_pass")
    PARTICIPANT_ID_FIELD_NUMBER: _ClassVar[int]
    TRAINING_ID_FIELD_NUMBER: _ClassVar[int]
    TRAINING_TYPE_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SCHEDULED_START_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_ID_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    VENUE_PASS_FIELD_NUMBER: _ClassVar[int]
    participant_id: str
    training_id: str
    training_type: TrainingType
    gate: Gate
    session_id: str
    scheduled_start: _timestamp_pb2.Timestamp
    challenge_id: str
    frames: _containers.RepeatedScalarFieldContainer[bytes]
    idempotency_key: str
    venue_pass: str
    def __init__(self, participant_id: _Optional[str] = ..., training_id: _Optional[str] = ..., training_type: _Optional[_Union[TrainingType, str]] = ..., gate: _Optional[_Union[Gate, str]] = ..., session_id: _Optional[str] = ..., scheduled_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., challenge_id: _Optional[str] = ..., frames: _Optional[_Iterable[bytes]] = ..., idempotency_key: _Optional[str] = ..., venue_pass: _Optional[str] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("decision", "reason", "attempts_used", "attempts_remaining", "attempts_reset_at", "attempts_limit", "token", "token_expires_at", "verification_id", "frames", "liveness_method", "replayed")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_USED_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_REMAINING_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_RESET_AT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    VERIFICATION_ID_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_METHOD_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    reason: str
    attempts_used: int
    attempts_remaining: int
    attempts_reset_at: _timestamp_pb2.Timestamp
    attempts_limit: int
    token: str
    token_expires_at: _timestamp_pb2.Timestamp
    verification_id: str
    frames: _containers.RepeatedCompositeFieldContainer[ImageQuality]
    liveness_method: LivenessMethod
    replayed: bool
    def __init__(self, decision: _Optional[_Union[Decision, str]] = ..., reason: _Optional[str] = ..., attempts_used: _Optional[int] = ..., attempts_remaining: _Optional[int] = ..., attempts_reset_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempts_limit: _Optional[int] = ..., token: _Optional[str] = ..., token_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., verification_id: _Optional[str] = ..., frames: _Optional[_Iterable[_Union[ImageQuality, _Mapping]]] = ..., liveness_method: _Optional[_Union[LivenessMethod, str]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class GetAttemptsRequest(_message.Message):
    __slots__ = ("participant_id", "training_id", "training_type")
    PARTICIPANT_ID_FIELD_NUMBER: _ClassVar[int]
    TRAINING_ID_FIELD_NUMBER: _ClassVar[int]
    TRAINING_TYPE_FIELD_NUMBER: _ClassVar[int]
    participant_id: str
    training_id: str
    training_type: TrainingType
    def __init__(self, participant_id: _Optional[str] = ..., training_id: _Optional[str] = ..., training_type: _Optional[_Union[TrainingType, str]] = ...) -> None: ...

class GetAttemptsResponse(_message.Message):
    __slots__ = ("used", "remaining", "limit", "resets_at")
    USED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    RESETS_AT_FIELD_NUMBER: _ClassVar[int]
    used: int
    remaining: int
    limit: int
    resets_at: _timestamp_pb2.Timestamp
    def __init__(self, used: _Optional[int] = ..., remaining: _Optional[int] = ..., limit: _Optional[int] = ..., resets_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RedeemTokenRequest(_message.Message):
    __slots__ = ("token", "expected_gate", "expected_session_id", "expected_training_id", "audience", "expected_participant_id")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_GATE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_TRAINING_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_PARTICIPANT_ID_FIELD_NUMBER: _ClassVar[int]
    token: str
    expected_gate: Gate
    expected_session_id: str
    expected_training_id: str
    audience: str
    expected_participant_id: str
    def __init__(self, token: _Optional[str] = ..., expected_gate: _Optional[_Union[Gate, str]] = ..., expected_session_id: _Optional[str] = ..., expected_training_id: _Optional[str] = ..., audience: _Optional[str] = ..., expected_participant_id: _Optional[str] = ...) -> None: ...

class RedeemTokenResponse(_message.Message):
    __slots__ = ("valid", "reason", "message", "claims")
    VALID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CLAIMS_FIELD_NUMBER: _ClassVar[int]
    valid: bool
    reason: RedeemReason
    message: str
    claims: TokenClaims
    def __init__(self, valid: _Optional[bool] = ..., reason: _Optional[_Union[RedeemReason, str]] = ..., message: _Optional[str] = ..., claims: _Optional[_Union[TokenClaims, _Mapping]] = ...) -> None: ...

class GetSigningKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetSigningKeysResponse(_message.Message):
    __slots__ = ("jwks_json", "keys")
    JWKS_JSON_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    jwks_json: str
    keys: _containers.RepeatedCompositeFieldContainer[SigningKey]
    def __init__(self, jwks_json: _Optional[str] = ..., keys: _Optional[_Iterable[_Union[SigningKey, _Mapping]]] = ...) -> None: ...

class CreateLaunchTicketRequest(_message.Message):
    __slots__ = ("participant_id", "training_id", "training_type", "gate", "session_id", "scheduled_start", "return_url")
    PARTICIPANT_ID_FIELD_NUMBER: _ClassVar[int]
    TRAINING_ID_FIELD_NUMBER: _ClassVar[int]
    TRAINING_TYPE_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SCHEDULED_START_FIELD_NUMBER: _ClassVar[int]
    RETURN_URL_FIELD_NUMBER: _ClassVar[int]
    participant_id: str
    training_id: str
    training_type: TrainingType
    gate: Gate
    session_id: str
    scheduled_start: _timestamp_pb2.Timestamp
    return_url: str
    def __init__(self, participant_id: _Optional[str] = ..., training_id: _Optional[str] = ..., training_type: _Optional[_Union[TrainingType, str]] = ..., gate: _Optional[_Union[Gate, str]] = ..., session_id: _Optional[str] = ..., scheduled_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., return_url: _Optional[str] = ...) -> None: ...

class CreateLaunchTicketResponse(_message.Message):
    __slots__ = ("ticket", "page_url", "expires_at")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    PAGE_URL_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    ticket: str
    page_url: str
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, ticket: _Optional[str] = ..., page_url: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
