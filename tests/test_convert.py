"""``python -m facesvc.commands.convert`` fills the model cache once for every default-pack
model."""

from __future__ import annotations

from pathlib import Path

import pytest

from facesvc.commands.convert import DEFAULT_PACK_CONVERSIONS, main


def test_convert_fills_the_cache_and_a_second_run_reuses_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--cache-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [name for name, _ in DEFAULT_PACK_CONVERSIONS]
    paths = [Path(line.split(": ", 1)[1]) for line in lines]
    assert all(p.parent == tmp_path and p.stat().st_size > 0 for p in paths)
    stamps = [p.stat().st_mtime_ns for p in paths]
    assert main(["--cache-dir", str(tmp_path)]) == 0
    assert [p.stat().st_mtime_ns for p in paths] == stamps
