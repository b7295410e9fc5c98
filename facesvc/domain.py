"""The programme's vocabulary, shared by every layer: training types, gates, decisions.

These are plain Python enums so that engine, limits, liveness and tokens speak the same
words without importing the generated protobuf code; the transports map them to the wire.
"""

from __future__ import annotations

import re
from enum import StrEnum

ID_PATTERN = re.compile(r"[A-Za-z0-9._@+\-]{1,128}")
"""Participant, training, session and challenge ids: 1-128 of ``A-Z a-z 0-9 . _ @ + -``.
The same rule at the edge (request validation) and in the stores (ids become parts of Redis
key names and hash tags, where ``{ } : * ? [ ]`` and whitespace would break them)."""
ID_CHARS = "letters, digits and . _ @ + -"


class TrainingType(StrEnum):
    SPL = "SPL"  # self-paced, online
    WEBINAR = "WEBINAR"  # live online
    OFFLINE = "OFFLINE"  # in a room at a venue, scanned by the venue's kiosk


class Gate(StrEnum):
    REDEEM = "REDEEM"  # before starting the training
    SESSION = "SESSION"  # before every session / meeting day / meeting
    POST_TEST = "POST_TEST"  # online types: before the post-test


class Decision(StrEnum):
    VERIFIED = "VERIFIED"
    NOT_MATCHED = "NOT_MATCHED"
    SPOOF_SUSPECTED = "SPOOF_SUSPECTED"
    NO_FACE = "NO_FACE"
    MULTIPLE_FACES = "MULTIPLE_FACES"
    LOW_QUALITY = "LOW_QUALITY"
    CHALLENGE_FAILED = "CHALLENGE_FAILED"
    ATTEMPTS_EXHAUSTED = "ATTEMPTS_EXHAUSTED"
    NOT_ENROLLED = "NOT_ENROLLED"
    OUTSIDE_WINDOW = "OUTSIDE_WINDOW"


class LivenessMethod(StrEnum):
    OFF = "off"  # no liveness check (supervised enrollment desks, tests)
    PASSIVE = "passive"  # the presentation-attack model's score only
    CHALLENGE = "challenge"  # server-issued head-turn challenge plus the passive score
