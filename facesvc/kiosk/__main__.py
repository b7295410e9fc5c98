"""``facesvc-kiosk``: the venue's scanning program (also ``python -m facesvc.kiosk``).

::

    FACESVC_KIOSK_API_KEY=fsk_... facesvc-kiosk --target facesvc.example.id:443 \\
        --venue venue-jkt-01 [--camera 0 | --images pass.png face1.jpg ...] [--headless]

The API key is the venue's own (``facesvc apikeys add --role kiosk --tenant <venue>``); it is
read from the environment or a file, never from a flag, so it does not show in ``ps``.

With a camera the kiosk scans one participant after another (the terminal view waits for
Enter between scans; headless goes on by itself). With ``--images`` it makes one scan from
the files (the QR picture first, then the face pictures) and exits with the outcome:

    0  admitted          1  not admitted (face, pass, window, caps...)
    2  kiosk misconfigured (flags, keys, camera)    3  service unreachable
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from facesvc.client import FaceVerificationClient
from facesvc.kiosk.camera import Camera, CameraError, ImageFiles, OpenCVCamera
from facesvc.kiosk.flow import CaptureSettings, RetryPolicy, ScanEvent, ScanFlow, ScanState
from facesvc.kiosk.qr import JwksFileKeys, PassChecker, PassKeys, ServiceKeys
from facesvc.kiosk.tui import JsonLinesOutput, TerminalUI

API_KEY_ENV = "FACESVC_KIOSK_API_KEY"

EXIT_ADMITTED, EXIT_NOT_ADMITTED, EXIT_MISCONFIGURED, EXIT_UNREACHABLE = 0, 1, 2, 3

_EXIT_CODES = {
    ScanState.ADMITTED: EXIT_ADMITTED,
    ScanState.UNREACHABLE: EXIT_UNREACHABLE,
    ScanState.CAMERA_ERROR: EXIT_MISCONFIGURED,
    ScanState.SERVICE_REFUSED: EXIT_MISCONFIGURED,
}


def build_parser() -> argparse.ArgumentParser:
    """The command line (every flag also has an environment variable where noted)."""
    p = argparse.ArgumentParser(
        prog="facesvc-kiosk", description="Scan participants' QR passes and faces at a venue."
    )
    env = os.environ.get
    p.add_argument(
        "--target",
        default=env("FACESVC_KIOSK_TARGET"),
        help="the service's gRPC host:port (env FACESVC_KIOSK_TARGET)",
    )
    p.add_argument(
        "--venue",
        default=env("FACESVC_KIOSK_VENUE"),
        help="this venue's id, the tenant of the kiosk's API key (env FACESVC_KIOSK_VENUE)",
    )
    p.add_argument(
        "--api-key-file",
        type=Path,
        default=None,
        help=f"file holding the API key (else ${API_KEY_ENV})",
    )
    tls = p.add_argument_group("transport security")
    tls.add_argument("--insecure", action="store_true", help="plaintext gRPC (development only)")
    tls.add_argument("--ca-cert", type=Path, default=None, help="PEM roots (default: system)")
    tls.add_argument("--client-cert", type=Path, default=None, help="PEM chain for mTLS")
    tls.add_argument("--client-key", type=Path, default=None, help="PEM key for mTLS")
    p.add_argument(
        "--pass-keys",
        type=Path,
        default=env("FACESVC_KIOSK_PASS_KEYS"),
        help="JWKS file of the programme's pass keys (default: the service's GetSigningKeys)",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--camera", type=int, default=None, help="camera device index (OpenCV)")
    source.add_argument(
        "--images",
        type=Path,
        nargs="+",
        default=None,
        help="one scan from files: the QR picture, then face pictures (or one folder of them)",
    )
    p.add_argument("--frames", type=int, default=2, help="face frames per scan (default 2)")
    p.add_argument(
        "--challenge",
        action="store_true",
        help="ask for a head-turn challenge (when the service's liveness.kiosk is challenge)",
    )
    p.add_argument("--timeout-s", type=float, default=20.0, help="deadline of one call")
    p.add_argument("--tries", type=int, default=5, help="tries per call before 'unreachable'")
    p.add_argument("--headless", action="store_true", help="print JSON lines, no screen")
    p.add_argument("--no-color", action="store_true", help="no ANSI colours (also env NO_COLOR)")
    return p


def _api_key(args: argparse.Namespace) -> str:
    if args.api_key_file is not None:
        return str(args.api_key_file.read_text()).strip()
    key = os.environ.get(API_KEY_ENV, "")
    if not key:
        raise ValueError(f"no API key: set {API_KEY_ENV} or pass --api-key-file")
    return key


def _read(path: Path | None) -> bytes | None:
    return None if path is None else path.read_bytes()


def _client(args: argparse.Namespace) -> FaceVerificationClient:
    return FaceVerificationClient(
        args.target,
        api_key=_api_key(args),
        insecure=args.insecure,
        root_certificates=_read(args.ca_cert),
        certificate_chain=_read(args.client_cert),
        private_key=_read(args.client_key),
        timeout_s=args.timeout_s,
    )


def _camera(args: argparse.Namespace) -> Camera:
    if args.images is None:
        return OpenCVCamera(0 if args.camera is None else args.camera)
    paths: list[Path] = args.images
    if len(paths) == 1 and paths[0].is_dir():
        return ImageFiles.from_folder(paths[0])
    return ImageFiles(paths)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the kiosk; returns the exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)
    if not args.target or not args.venue:
        print("facesvc-kiosk: --target and --venue are required", file=sys.stderr)
        return EXIT_MISCONFIGURED
    try:
        client = _client(args)
        camera = _camera(args)
    except (OSError, ValueError, CameraError) as exc:
        print(f"facesvc-kiosk: {exc}", file=sys.stderr)
        return EXIT_MISCONFIGURED
    keys: PassKeys = (
        JwksFileKeys(args.pass_keys)
        if args.pass_keys is not None
        else ServiceKeys(lambda: client.signing_keys(timeout_s=args.timeout_s))
    )
    color = not args.no_color and "NO_COLOR" not in os.environ and sys.stdout.isatty()
    screen = None if args.headless else TerminalUI(sys.stdout, color=color)
    output = JsonLinesOutput(sys.stdout) if screen is None else screen
    flow = ScanFlow(
        client,
        PassChecker(keys, args.venue),
        camera,
        output.show,
        retry=RetryPolicy(call_timeout_s=args.timeout_s, max_tries=args.tries),
        capture=CaptureSettings(frames=args.frames, live=args.images is None),
        challenge=args.challenge,
    )
    try:
        if args.images is not None:
            return _EXIT_CODES.get(flow.scan().state, EXIT_NOT_ADMITTED)
        return _run_camera(flow, screen)
    except KeyboardInterrupt:
        return 0  # staff closing the kiosk is a normal end
    finally:
        camera.close()
        client.close()


def _run_camera(flow: ScanFlow, screen: TerminalUI | None) -> int:
    """Scan until interrupted; a camera failure ends the program (staff restart it)."""
    while True:
        event: ScanEvent = flow.scan(ignore_pass=flow.last_pass_text)
        if event.state is ScanState.CAMERA_ERROR:
            return EXIT_MISCONFIGURED
        if screen is not None:
            screen.prompt_next()
            input()


if __name__ == "__main__":
    sys.exit(main())
