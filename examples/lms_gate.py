"""A minimal LMS session gate: admits a participant who brings a facesvc token, once.

The Scan Wajah page redirects the participant back to

    http://<gate>/sessions/<session_id>/enter?token=<jwt>

and this gate, for the participant logged in to the LMS (a real LMS knows them from its own
login session; this example reads a ``lms_user`` cookie in its place, never the token),

1. checks the token offline (signature against the cached JWKS, expiry, audience, participant,
   training, gate, session): forgeries, another participant's token and tokens for other
   sessions are refused without a network call;
2. redeems it online (RedeemToken, with the same participant), which marks it used: a token
   admits exactly once, even when the participant (or someone who copied the link) opens it
   twice, and never admits anyone but the participant it was issued for.

Run (see examples/README.md)::

    FACESVC_API_KEY=... python examples/lms_gate.py --target facesvc:50051 \\
        --audience lms-a --training-id t-1 --issuer facesvc
"""

from __future__ import annotations

import argparse
import html
import os
import re
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from facesvc.client import (
    Expectation,
    FaceServiceError,
    FaceVerificationClient,
    Gate,
    KeySetUnavailable,
    TokenVerifier,
)

_ENTER = re.compile(r"/sessions/([A-Za-z0-9._@+-]{1,128})/enter")


class Gatekeeper:
    """Decides whether a token admits its bearer to one session of this LMS's training."""

    def __init__(
        self,
        client: FaceVerificationClient,
        verifier: TokenVerifier,
        *,
        audience: str,
        training_id: str,
    ) -> None:
        self.client = client
        self.verifier = verifier
        self.audience = audience
        self.training_id = training_id

    def admit(self, participant_id: str, session_id: str, token: str) -> tuple[bool, str]:
        """(admitted, message for the participant) for ``participant_id``, the LMS user who
        brought ``token`` to the gate of ``session_id``."""
        expected = Expectation(
            audience=self.audience,
            gate=Gate.SESSION,
            session_id=session_id,
            training_id=self.training_id,
            participant_id=participant_id,
        )
        try:
            offline = self.verifier.verify(token, expected)
            if not offline.ok:
                return False, f"token refused: {offline.reason.value}"
        except KeySetUnavailable:
            pass  # cannot check offline now; RedeemToken below checks everything anyway
        try:
            redemption = self.client.redeem(
                token,
                participant_id=participant_id,
                audience=self.audience,
                gate=Gate.SESSION,
                session_id=session_id,
                training_id=self.training_id,
            )
        except FaceServiceError as exc:
            # Fail closed: without the one-time mark nobody is admitted.
            return False, f"verification service unavailable ({exc.code.name}); try again"
        if not redemption.valid or redemption.claims is None:
            return False, f"token refused: {redemption.reason.value}"
        return True, f"welcome, participant {redemption.claims.sub}"


def make_handler(gate: Gatekeeper) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            match = _ENTER.fullmatch(url.path)
            token = parse_qs(url.query).get("token", [""])[0]
            if match is None or not token:
                self._reply(HTTPStatus.NOT_FOUND, "use /sessions/<id>/enter?token=<token>")
                return
            user = SimpleCookie(self.headers.get("Cookie", "")).get("lms_user")
            if user is None or not user.value:
                self._reply(HTTPStatus.UNAUTHORIZED, "log in to the LMS first")
                return
            admitted, message = gate.admit(user.value, match.group(1), token)
            self._reply(HTTPStatus.OK if admitted else HTTPStatus.FORBIDDEN, message)

        def _reply(self, status: HTTPStatus, message: str) -> None:
            body = f"<!doctype html><p>{html.escape(message)}</p>\n".encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Cache-Control", "no-store")  # the URL carries a token
            self.end_headers()
            self.wfile.write(body)

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--target", required=True, help="facesvc gRPC host:port")
    parser.add_argument("--insecure", action="store_true", help="no TLS (local development only)")
    parser.add_argument(
        "--audience", required=True, help="this LMS's audience (its API key's tenant)"
    )
    parser.add_argument("--training-id", required=True)
    parser.add_argument("--issuer", default="facesvc", help="the service's tokens.issuer")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()

    client = FaceVerificationClient(
        args.target, api_key=os.environ.get("FACESVC_API_KEY"), insecure=args.insecure
    )
    verifier = TokenVerifier.from_client(client, issuer=args.issuer)
    gate = Gatekeeper(client, verifier, audience=args.audience, training_id=args.training_id)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(gate))
    print(f"LMS gate on http://127.0.0.1:{server.server_address[1]}/sessions/<id>/enter?token=...")
    try:
        server.serve_forever()
    finally:
        client.close()


if __name__ == "__main__":
    main()
