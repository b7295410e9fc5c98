"""Domain enums and the facesvc.v1 enums they travel as, matched by member name.

``Gate.SESSION`` travels as ``GATE_SESSION``: the proto enum's prefix and the domain member's
*name* (never its value: ``LivenessMethod.PASSIVE`` is ``"passive"``). The server's transports
and the SDK both map through here, so the two ends cannot drift apart; it imports only the
generated code and the shared vocabularies, which keeps the SDK free of the engine.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Generic, TypeVar

from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc.domain import Decision, Gate, LivenessMethod, TrainingType
from facesvc.tokens.claims import CheckReason

_E = TypeVar("_E", bound=Enum)


def bare_name(proto_enum: Any, prefix: str, number: int) -> str:
    """Proto ``number``'s name without ``prefix`` (``QUALITY_ISSUE_BLURRY`` -> ``BLURRY``).

    ``proto_enum`` is a generated enum class (``pb.QualityIssue``); raises ValueError for a
    number it does not define.
    """
    return str(proto_enum.Name(number)).removeprefix(f"{prefix}_")


class ProtoEnum(Generic[_E]):
    """One domain enum and the proto enum it travels as (``prefix`` names the proto's values)."""

    def __init__(self, proto_enum: Any, prefix: str, domain: type[_E]) -> None:
        self._proto = proto_enum
        self._prefix = prefix
        self._domain = domain

    def to_wire(self, member: _E) -> str:
        """``member`` as its proto value's name (``GATE_SESSION``): protobuf takes the name
        wherever an enum field is set, and refuses a name its enum lacks."""
        return f"{self._prefix}_{member.name}"

    def from_wire(self, number: int) -> _E:
        """Proto ``number`` as the domain member; ValueError for UNSPECIFIED or an unknown one."""
        name = bare_name(self._proto, self._prefix, number)
        try:
            return self._domain[name]
        except KeyError:
            raise ValueError(f"{self._prefix}_{name} has no {self._domain.__name__}") from None


TRAINING_TYPES = ProtoEnum(pb.TrainingType, "TRAINING_TYPE", TrainingType)
GATES = ProtoEnum(pb.Gate, "GATE", Gate)
DECISIONS = ProtoEnum(pb.Decision, "DECISION", Decision)
LIVENESS_METHODS = ProtoEnum(pb.LivenessMethod, "LIVENESS_METHOD", LivenessMethod)
REDEEM_REASONS = ProtoEnum(pb.RedeemReason, "REDEEM_REASON", CheckReason)
"""Not every CheckReason has a wire word: see :mod:`facesvc.transport.grpc_messages` for the
fallbacks."""
