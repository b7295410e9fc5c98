"""``facesvc.serve.memory.pin_malloc_thresholds``: memory freed after a large frame goes back to
the system (issue 18.1: after large images the server stayed gigabytes larger).

Each case runs in a fresh interpreter, since the thresholds are per process and glibc's
dynamic threshold remembers every block freed before."""

from __future__ import annotations

import ctypes.util
import platform
import subprocess
import sys
import textwrap

import pytest

from tests.serve_process import REPO

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the thresholds are glibc's",
)

# A large frame (a 20 MB block) is decoded and freed; then frames of 4 MB are decoded and
# freed while small arrays made after them stay alive (above them in the heap), as the
# server's own objects do.
# Prints the RSS growth in MiB that remains after everything large has been freed.
_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from facesvc.serve.memory import pin_malloc_thresholds

    def rss_mib():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024

    if sys.argv[1] == "pinned":
        assert pin_malloc_thresholds()
    before = rss_mib()
    large = np.ones(20 << 20, dtype=np.uint8)
    del large
    frames = [np.ones(4 << 20, dtype=np.uint8) for _ in range(16)]
    keep = [np.ones(1024) for _ in range(10)]
    del frames
    print(round(rss_mib() - before, 1))
    """
)


def _retained_mib(mode: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, mode],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return float(done.stdout.strip())


def test_memory_of_large_frames_returns_once_the_thresholds_are_pinned() -> None:
    # Without pinning, freeing the 20 MB block raised glibc's mmap threshold to 20 MB, so the
    # 64 MB of 4 MB frames came from the heap and stayed there once freed.
    assert _retained_mib("dynamic") > 32
    assert _retained_mib("pinned") < 8


def test_pinning_reports_success_on_glibc() -> None:
    assert ctypes.util.find_library("c") is not None
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from facesvc.serve.memory import pin_malloc_thresholds as p; print(p())",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "True"
