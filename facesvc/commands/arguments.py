"""What every ``facesvc`` subcommand shares: the ``--<section>-<name>`` settings flags and the
settings they give."""

from __future__ import annotations

import argparse
from pathlib import Path

from facesvc.config import Settings, load_settings, settings_info


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one ``--<section>-<name>`` flag per setting to ``parser``."""
    parser.add_argument(
        "--config", type=Path, default=None, help="TOML settings file (env FACESVC_CONFIG)"
    )
    group = parser.add_argument_group("settings (each also env FACESVC_<SECTION>_<NAME>)")
    for info in settings_info():
        group.add_argument(
            info.flag,
            dest=f"setting__{info.section}__{info.name}",
            metavar="VALUE",
            default=None,
            help=f"{info.doc} [{info.env}]" if info.doc else f"[{info.env}]",
        )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from defaults, file, env and the ``--<section>-<name>`` flags given."""
    overrides = {}
    for key, value in vars(args).items():
        if key.startswith("setting__") and value is not None:
            _, section, name = key.split("__", 2)
            overrides[f"{section}.{name}"] = value
    return load_settings(config_file=args.config, overrides=overrides)
