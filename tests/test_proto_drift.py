"""The committed stubs in facesvc/_proto are exactly what proto/ generates."""

from __future__ import annotations

import shutil
from pathlib import Path

from tools import protogen


def test_committed_stubs_match_the_proto() -> None:
    stale = protogen.drift()
    assert stale == [], f"stubs drift from proto/ in {stale}: run `make proto` and commit"


def test_drift_is_detected_when_the_proto_changes(tmp_path: Path) -> None:
    # The same check, on a copy of proto/ with one more field: it must notice.
    proto_copy = tmp_path / "proto"
    shutil.copytree(protogen.PROTO_ROOT, proto_copy)
    source = proto_copy / "facesvc" / "v1" / "facesvc.proto"
    text = source.read_text()
    source.write_text(
        text.replace(
            "message GetSigningKeysRequest {}", "message GetSigningKeysRequest { string kid = 1; }"
        )
    )
    assert protogen.drift(proto_root=proto_copy) == ["v1/facesvc_pb2.py", "v1/facesvc_pb2.pyi"]


def test_generated_imports_stay_inside_the_package() -> None:
    # protoc writes `from facesvc.v1 import ...`, which would not resolve; ours are rewritten.
    for path in protogen.STUBS_DIR.rglob("*.py"):
        assert "from facesvc.v1 " not in path.read_text(), path
