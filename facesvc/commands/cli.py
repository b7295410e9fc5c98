"""The ``facesvc`` command line.

Each subcommand is registered by a small ``_add_*`` function below that defines
its flags and points at a handler; handlers import the implementing module only
when run, so ``facesvc serve`` never loads evaluation or operator code.

To add one: write ``_add_name(sub)`` that calls ``sub.add_parser(...)`` and
``set_defaults(func=...)``, with ``func(args) -> int`` (the exit code), and list
it in :data:`_COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeAlias

from facesvc.commands.arguments import add_settings_flags, settings_from_args
from facesvc.config import ConfigError, describe, settings_info, shown

Handler = Callable[[argparse.Namespace], int]
SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _handler(module: str, function: str) -> Handler:
    """A handler calling ``module.function(args) -> int``, imported only when run: ``facesvc
    serve`` never loads evaluation or operator code."""

    def handler(args: argparse.Namespace) -> int:
        result: int = getattr(importlib.import_module(module), function)(args)
        return result

    return handler


# ---------------------------------------------------------------- serve


def _serve(args: argparse.Namespace) -> int:
    from facesvc.serve.logs import configure_logging
    from facesvc.serve.workers import serve

    settings = settings_from_args(args)
    configure_logging(settings.logging)
    print("facesvc settings:\n" + describe(settings), file=sys.stderr, flush=True)
    return serve(settings)


def _add_serve(sub: SubParsers) -> None:
    p = sub.add_parser("serve", help="run the gRPC and HTTP servers")
    add_settings_flags(p)
    p.add_argument(
        "--workers",
        dest="setting__server__workers",
        metavar="N",
        default=None,
        help="worker processes sharing the ports (same as --server-workers)",
    )
    p.set_defaults(func=_serve)


def _settings_table(args: argparse.Namespace) -> int:
    """Print every setting as a Markdown table (README's settings table comes from here)."""
    print("| setting | env | default | what it is |")
    print("|---|---|---|---|")
    for info in settings_info():
        default = shown(info, info.default).replace(str(Path.home()), "~")
        print(f"| `{info.dotted}` | `{info.env}` | `{default}` | {info.doc} |")
    return 0


def _add_settings(sub: SubParsers) -> None:
    p = sub.add_parser("settings", help="list every setting, its env name and default")
    p.set_defaults(func=_settings_table)


# ---------------------------------------------------------------- operator commands


def _add_eval(sub: SubParsers) -> None:
    p = sub.add_parser("eval", help="verification accuracy of a model pack on a face folder")
    p.add_argument("data", type=Path, help="folder of faces, one subfolder per identity")
    p.add_argument("--pack", default=None, help="model pack (default: models.pack)")
    p.add_argument("--out", type=Path, default=None, help="folder for the report and plots")
    _add_accuracy_flags(p)
    p.add_argument("--folds", type=int, default=2, help="identity folds (calibrate vs report)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap rounds for 95%% CIs")
    p.add_argument("--variants", type=int, default=4, help="simulated frames per photo")
    p.add_argument("--seed", type=int, default=0, help="seed of folds, frames and bootstrap")
    p.add_argument("--full", action="store_true", help="measure every frame/template rule")
    p.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="also judge, at this record's threshold, the identities it was not calibrated on",
    )
    p.add_argument(
        "--turned",
        type=Path,
        default=None,
        help="folder of identity folders with turned heads: judge --calibration's turned "
        "threshold on them",
    )
    p.set_defaults(func=_handler("facesvc.commands.accuracy", "run_eval"))


def _add_accuracy_flags(p: argparse.ArgumentParser) -> None:
    """Flags that ``eval`` and ``calibrate`` share (facesvc.commands.accuracy)."""
    p.add_argument("--cache", type=Path, default=None, help="descriptor cache (.npz) to reuse")
    p.add_argument(
        "--min-face-px",
        type=int,
        default=None,
        help="smallest face detected and matched (default: the quality settings', as served)",
    )


def _add_calibrate(sub: SubParsers) -> None:
    p = sub.add_parser("calibrate", help="fit a pack's threshold to a target false-match rate")
    p.add_argument("data", type=Path, help="folder of faces, one subfolder per identity")
    p.add_argument("--pack", default=None, help="model pack (default: models.pack)")
    p.add_argument("--fmr", type=float, default=1e-3, help="target false-match rate")
    p.add_argument(
        "--confidence",
        type=float,
        default=0.95,
        help="one-sided confidence with which the impostor pairs must show the FMR at most "
        "--fmr (Clopper-Pearson; 1e-3 at 0.95 needs at least 2,995 pairs); 0: the point "
        "estimate, whose FMR on new people lands on either side of --fmr",
    )
    p.add_argument(
        "--more-people",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="another folder of identity folders whose photos inside the pose gates join the "
        "pairs (repeatable): more people, a steadier FMR tail; the frontal geometry is still "
        "measured on DATA's portraits",
    )
    p.add_argument(
        "--max-photos",
        type=int,
        default=5,
        help="photos of one person used at most, spread evenly over their folder, so that a "
        "filmed person's frames do not outweigh photographed people",
    )
    p.add_argument("--out", type=Path, default=None, help="where to write the calibration record")
    _add_accuracy_flags(p)
    p.add_argument(
        "--centre",
        choices=("auto", "on", "off"),
        default="auto",
        help="cosine around the photos' mean descriptor (on), around the origin (off), or "
        "whichever measures the lower FNMR at the target on identity folds (auto)",
    )
    p.add_argument("--folds", type=int, default=2, help="identity folds for --hold-out and auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the identity folds")
    p.add_argument(
        "--hold-out",
        type=int,
        default=None,
        metavar="FOLD",
        help="calibrate without the identities of this fold of DATA (--more-people stay "
        "in), so that `facesvc eval --calibration` can report on them",
    )
    p.add_argument(
        "--turned",
        type=Path,
        default=None,
        help="folder of identity folders with frontal and turned-head photos: also calibrate "
        "the same-person threshold between turned and frontal faces (liveness challenges)",
    )
    p.set_defaults(func=_handler("facesvc.commands.accuracy", "run_calibrate"))


def _add_eval_liveness(sub: SubParsers) -> None:
    p = sub.add_parser("eval-liveness", help="APCER/BPCER of the passive model on live/ and spoof/")
    p.add_argument("data", type=Path, help="folder with live/ and spoof/ subfolders")
    p.add_argument("--out", type=Path, default=None, help="folder for the report and the curve")
    p.add_argument(
        "--input-size",
        type=int,
        default=None,
        help="side of the model's square input (default: the shipped calibration's)",
    )
    p.set_defaults(func=_handler("facesvc.accuracy.liveness", "main"))


def _add_keys(sub: SubParsers) -> None:
    p = sub.add_parser("keys", help="token signing keys")
    add_settings_flags(p)
    keys = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    for action, text in (
        ("generate", "create the first signing key"),
        ("rotate", "publish a new key now, sign with it after the overlap"),
        ("list", "list keys with their validity (never private parts)"),
    ):
        keys.add_parser(action, help=text).set_defaults(
            func=_handler("facesvc.commands.keys", f"cli_keys_{action}")
        )


def _add_templates(sub: SubParsers) -> None:
    p = sub.add_parser("templates", help="stored face templates")
    add_settings_flags(p)
    t = p.add_subparsers(dest="templates_command", required=True, metavar="ACTION")
    t.add_parser("rekey", help="re-encrypt every template under the current key").set_defaults(
        func=_handler("facesvc.commands.templates", "cli_rekey")
    )
    t.add_parser("keygen", help="add a new template encryption key to the key file").set_defaults(
        func=_handler("facesvc.commands.templates", "cli_keygen")
    )


def _add_audit(sub: SubParsers) -> None:
    p = sub.add_parser("audit", help="the audit trail")
    add_settings_flags(p)
    a = p.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    tail = a.add_parser("tail", help="print the newest audit events")
    tail.add_argument("-n", type=int, default=20, help="how many events")
    tail.add_argument("--follow", action="store_true", help="keep printing new events")
    tail.set_defaults(func=_handler("facesvc.commands.audit", "cli_audit_tail"))


def _add_apikeys(sub: SubParsers) -> None:
    p = sub.add_parser("apikeys", help="API keys and mTLS identities of callers (roles, tenants)")
    add_settings_flags(p)
    p.add_argument("--file", type=Path, default=None, help="keys file (security.api_keys_file)")
    a = p.add_subparsers(dest="apikeys_command", required=True, metavar="ACTION")
    add = a.add_parser("add", help="register a client; prints its new API key once")
    add.add_argument("--name", required=True, help="client name (audit trail, rate limit)")
    add.add_argument(
        "--role", required=True, choices=["lms", "portal", "kiosk", "admin", "monitor"]
    )
    add.add_argument("--tenant", required=True, help="the LMS (token audience) or the venue")
    add.add_argument(
        "--training-type",
        action="append",
        choices=["SPL", "WEBINAR", "OFFLINE"],
        help="allow only this training type (repeatable); a kiosk is OFFLINE only",
    )
    add.add_argument(
        "--mtls-identity",
        default=None,
        help="client certificate CN or subjectAltName; then no API key unless --with-key",
    )
    add.add_argument("--with-key", action="store_true", help="also make an API key")
    add.set_defaults(func=_handler("facesvc.commands.apikeys", "cli_apikeys_add"))
    a.add_parser("list", help="list clients (never secrets)").set_defaults(
        func=_handler("facesvc.commands.apikeys", "cli_apikeys_list")
    )
    revoke = a.add_parser("revoke", help="remove a client by name")
    revoke.add_argument("--name", required=True)
    revoke.set_defaults(func=_handler("facesvc.commands.apikeys", "cli_apikeys_revoke"))


def _add_passes(sub: SubParsers) -> None:
    p = sub.add_parser("passes", help="venue passes: the QR codes kiosks scan (OFFLINE)")
    add_settings_flags(p)
    a = p.add_subparsers(dest="passes_command", required=True, metavar="ACTION")
    issue = a.add_parser("issue", help="sign a pass and write its QR code as a PNG")
    issue.add_argument("--participant", required=True)
    issue.add_argument("--training", required=True, help="the OFFLINE training id")
    issue.add_argument("--session", required=True, help="the meeting id")
    issue.add_argument("--start", required=True, help="scheduled start, ISO 8601 with zone")
    issue.add_argument("--venue", required=True, help="venue id (the kiosk's tenant)")
    issue.add_argument("--gate", choices=["redeem", "session"], default="redeem")
    issue.add_argument("--expires", default=None, help="ISO 8601 (default: start + 2 h)")
    issue.add_argument("--out", type=Path, required=True, help="PNG file to write")
    issue.add_argument("--key-dir", type=Path, default=None, help="default: tokens.key_dir")
    issue.add_argument("--print-pass", action="store_true", help="also print the pass text")
    issue.set_defaults(func=_handler("facesvc.commands.passes", "cli_passes_issue"))
    jwks = a.add_parser("jwks", help="print the public keys that check passes (for --pass-keys)")
    jwks.add_argument("--key-dir", type=Path, default=None, help="default: tokens.key_dir")
    jwks.set_defaults(func=_handler("facesvc.commands.passes", "cli_passes_jwks"))


def _add_init(sub: SubParsers) -> None:
    p = sub.add_parser(
        "init",
        help="make the keys and TLS certificate a first start needs, where the settings say "
        "(keeps whatever exists)",
    )
    add_settings_flags(p)
    p.add_argument(
        "--tls-host",
        action="append",
        default=[],
        help="a DNS name or address callers use to reach the service (repeatable); loopback "
        "is always included",
    )
    p.set_defaults(func=_handler("facesvc.commands.init", "cli_init"))


_COMMANDS: tuple[Callable[[SubParsers], None], ...] = (
    _add_serve,
    _add_init,
    _add_settings,
    _add_eval,
    _add_calibrate,
    _add_eval_liveness,
    _add_keys,
    _add_templates,
    _add_audit,
    _add_apikeys,
    _add_passes,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facesvc", description="Face verification service.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"facesvc: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
