"""``python -m facesvc.commands.convert``: convert every built-in pack's models into the
model cache.

The Docker image runs this at build time so that a container starts without converting.
Options: ``--cache-dir DIR`` (default ``$XDG_CACHE_HOME/facesvc/models`` or
``~/.cache/facesvc/models``). Prints one line per model: its name and converted file.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from facesvc.models.dense_landmarks import cached_landmarks_68
from facesvc.models.dlib.mmod import cached_mmod
from facesvc.models.dlib.resnet import cached_resnet
from facesvc.models.dlib.shape_predictor import ShapePredictorLandmarks
from facesvc.models.model_cache import ModelCache, default_cache_dir
from facesvc.models.opencv_zoo import cached_sface, cached_yunet
from facesvc.models.pack import landmarks_5_dat

Conversion = Callable[[ModelCache], Path]
"""Converts one model into the cache (once) and returns the converted file's path."""

DEFAULT_PACK_CONVERSIONS: tuple[tuple[str, Conversion], ...] = (
    ("yunet", cached_yunet),
    ("sface", cached_sface),
    (
        "dlib_landmarks_5",
        lambda cache: ShapePredictorLandmarks.cached_arrays(cache, landmarks_5_dat()),
    ),
    ("dlib_resnet", cached_resnet),
    ("dlib_mmod", cached_mmod),
    # Not the pack's: the liveness landmark stage's, which challenge scans need with any pack.
    ("liveness_landmarks_68", cached_landmarks_68),
)
"""The default pack (yunet-sface, which measures pose with dlib's 5 points) first, then
the rest of the dlib pack, which stays selectable."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m facesvc.commands.convert", description=__doc__)
    parser.add_argument("--cache-dir", type=Path, default=None, help="model cache directory")
    args = parser.parse_args(argv)
    cache = ModelCache(args.cache_dir or default_cache_dir(os.environ))
    for name, convert in DEFAULT_PACK_CONVERSIONS:
        print(f"{name}: {convert(cache)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
