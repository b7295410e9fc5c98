"""The Redis key layout shared by every per-participant store.

Every key that belongs to one participant starts with ``<prefix>:{p:<participant_id>}:``.
The ``{p:...}`` part is a Redis Cluster hash tag: only it is hashed, so all of one
participant's keys (template, attempt counters, idempotency records, challenges) live in one
slot, a Lua script may touch several of them, and one SCAN on one node finds them all.

Layout (``prefix`` defaults to ``facesvc``; tests pass a unique one to isolate themselves)::

    <prefix>:{p:<pid>}:template                          STRING  encrypted template
    <prefix>:{p:<pid>}:cap:<training_id>:<yyyymmdd>      SET     reservation ids of that WIB day
    <prefix>:{p:<pid>}:idem:<sha256 hex>                 HASH    outcome of an idempotent reserve
    <prefix>:{p:<pid>}:idem:<sha256 hex>:lease           STRING  held while that scan is decided
    <prefix>:{p:<pid>}:abuse:spoof                       ZSET    recent spoof suspicions (ms scores)
    <prefix>:{p:<pid>}:abuse:lock                        STRING  end of a spoof lockout (Unix ms)
    <prefix>:{p:<pid>}:jti:<jti>                         STRING  a redeemed verification token
    <prefix>:{p:<pid>}:launch:<ticket id>                STRING  a launch ticket spent by a scan
    <prefix>:{p:<pid>}:challenge:<id>                    HASH    a liveness challenge
    <prefix>:{ch:<id>}:challenge-owner                   STRING  the participant of a challenge
    <prefix>:{c:<client>}:rate:<window index>            STRING  a client's requests in one window
    <prefix>:serving-pack                                STRING  tag of the model pack last served

The challenge keys are built in :mod:`facesvc.liveness.challenges`, the others here.
"""

from __future__ import annotations

import re
from datetime import date

from facesvc.domain import ID_CHARS, ID_PATTERN
from facesvc.errors import InvalidRequest

# Identifiers end up inside key names, SCAN patterns and hash tags: refuse the characters that
# would break them ("{" "}" move the hash tag, "*?[]\\" are glob syntax in SCAN MATCH, ":" is
# the separator, whitespace and control characters make keys unreadable in redis-cli).
_PREFIX = re.compile(r"[A-Za-z0-9._:\-]{1,64}")


def validate_id(value: str, field: str) -> str:
    """Return ``value`` if it is usable in a key (:data:`facesvc.domain.ID_PATTERN`), else
    raise ``InvalidRequest`` naming ``field`` (ids come from callers)."""
    if not ID_PATTERN.fullmatch(value):
        raise InvalidRequest(f"{field} must be 1-128 characters, only {ID_CHARS} (got {value!r})")
    return value


class KeySpace:
    """Builds key names under one prefix; holds no connection."""

    def __init__(self, prefix: str = "facesvc") -> None:
        """``prefix`` may end in ":" (``redis.key_prefix`` is written that way); the
        separator is added here either way, so "facesvc" and "facesvc:" name the same keys."""
        prefix = prefix.removesuffix(":")
        if not _PREFIX.fullmatch(prefix):
            raise ValueError(
                f"key prefix must be 1-64 characters of A-Z, a-z, 0-9, '.', '_', ':', '-' "
                f"(got {prefix!r})"
            )
        self.prefix = prefix

    def participant(self, participant_id: str) -> str:
        """``<prefix>:{p:<pid>}``: the start of every key of that participant (one slot)."""
        return f"{self.prefix}:{{p:{validate_id(participant_id, 'participant_id')}}}"

    def participant_pattern(self, participant_id: str) -> str:
        """SCAN MATCH pattern for every key of one participant (ids carry no glob syntax)."""
        return f"{self.participant(participant_id)}:*"

    def template(self, participant_id: str) -> str:
        """Key of the participant's encrypted template."""
        return f"{self.participant(participant_id)}:template"

    def cap(self, participant_id: str, training_id: str, day: date) -> str:
        """Key of the attempt reservations of one participant, training and WIB ``day``."""
        training = validate_id(training_id, "training_id")
        return f"{self.participant(participant_id)}:cap:{training}:{day:%Y%m%d}"

    def idempotency(self, participant_id: str, digest: str) -> str:
        """Key of an idempotent reservation; ``digest`` is a hex digest of the client's key."""
        return f"{self.participant(participant_id)}:idem:{digest}"

    @staticmethod
    def lease_of(idempotency_record: str) -> str:
        """Key of the lease an undecided idempotent scan holds (facesvc.limits.caps)."""
        return f"{idempotency_record}:lease"

    def spoof_strikes(self, participant_id: str) -> str:
        """Key of the participant's recent SPOOF_SUSPECTED decisions (facesvc.limits.abuse)."""
        return f"{self.participant(participant_id)}:abuse:spoof"

    def lockout(self, participant_id: str) -> str:
        """Key holding the end of the participant's spoof lockout (facesvc.limits.abuse)."""
        return f"{self.participant(participant_id)}:abuse:lock"

    def token_use(self, participant_id: str, jti: str) -> str:
        """Key marking the verification token ``jti`` as redeemed (facesvc.tokens.redemption)."""
        return f"{self.participant(participant_id)}:jti:{jti}"

    def launch_spent(self, participant_id: str, ticket_id: str) -> str:
        """Key marking a launch ticket as spent by a VERIFIED scan (facesvc.tokens.launch)."""
        return f"{self.participant(participant_id)}:launch:{ticket_id}"

    def client_rate(self, client_id: str, window: int) -> str:
        """Key counting one client's requests in rate window number ``window``; the
        ``{c:...}`` hash tag keeps a client's windows in one Cluster slot."""
        return f"{self.prefix}:{{c:{validate_id(client_id, 'client id')}}}:rate:{window}"

    def audit_stream(self) -> str:
        """The audit trail's Redis Stream (one key: every audited call appends to it)."""
        return f"{self.prefix}:audit"

    def serving_pack(self) -> str:
        """Key holding the tag of the model pack that served last (a pack change is logged)."""
        return f"{self.prefix}:serving-pack"

    def template_pattern(self) -> str:
        """SCAN MATCH pattern for every participant's template key."""
        return f"{self.prefix}:{{p:*}}:template"

    def participant_of_template(self, key: str) -> str:
        """The participant id inside a template key built by :meth:`template`."""
        head, tail = f"{self.prefix}:{{p:", "}:template"
        if not (key.startswith(head) and key.endswith(tail)):
            raise ValueError(f"not a template key under prefix {self.prefix!r}: {key!r}")
        return validate_id(key[len(head) : -len(tail)], "participant_id")
