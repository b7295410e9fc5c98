"""An operator's third-party pack, served: the decisions the service gives are the ones
``facesvc eval`` computes for the same photos.

The pack has the shape of the real one that broke (an ArcFace-class MobileFaceNet with
SCRFD): a recogniser exported with a fixed batch of 1 and 128-d descriptors, SCRFD's five
points (whose nose sits far lower than ArcFace's template puts it) and a manifest that
names the calibration file ``facesvc calibrate`` is about to write. The models are small
ONNX stand-ins with those signatures (tests/test_packs.py): the detector finds a red block
and puts five fixed points around it; the recogniser returns chip pixels, so a person is
the texture around the block.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from PIL import Image

from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc.accuracy.calibrate import calibrate
from facesvc.accuracy.evaluation import FrameSimulation, pairwise_comparisons
from facesvc.commands.accuracy import describe, quality_limits, run_calibrate
from facesvc.config import QualitySettings
from facesvc.models.calibration import CalibrationData
from facesvc.models.pack import PackContext
from facesvc.models.packs import default_registry
from facesvc.models.pipeline import FacePipeline, FaceStatus
from facesvc.serve.wiring import engine_from_resources
from facesvc.store.templates import generate_template_key
from facesvc.tokens.keys import keys_generate
from tests.conftest import ServerStarter
from tests.test_packs import ONNX_MANIFEST, detector_standin, recogniser_standin

pytest.importorskip("insightface", reason="SCRFD runs through the insightface extra")

PEOPLE = ("s__ana", "s__budi", "s__citra", "t__dewi", "t__eko")
PHOTOS = 3
QUALITY = {
    # The stand-in's faces are flat coloured blocks: no detail, little light. The pitch
    # gate stays strict (20 degrees): it passes only on the pack's own frontal geometry.
    "min_face_px": 40,
    "min_detect_px": 40,
    "min_sharpness": 0.0,
    "min_brightness": 0.0,
    "max_clipped_fraction": 1.0,
    "max_abs_pitch_deg": 20.0,
}
SCRFD_128_FIXED_BATCH = (
    ONNX_MANIFEST.format(model="mbf_batch1.onnx", layout="NCHW")
    .replace("output_size = 512", "output_size = 128")
    .replace('colour = "BGR"', 'colour = "RGB"')
)


def photo(person: int, k: int) -> np.ndarray:
    """640x480: the person's texture (green and blue, a seeded pattern) around a red block
    in a stride-32 cell that moves from photo to photo, with fresh sensor noise."""
    texture = np.random.default_rng(100 + person).integers(0, 200, size=(192, 192, 2))
    image = np.zeros((480, 640, 3), np.uint8)
    top, left = 224 - 32 * (k % 2), 320 + 32 * (k - 1)
    image[top - 80 : top + 112, left - 80 : left + 112, 1:] = texture
    image[top : top + 32, left : left + 32, 0] = 200
    noise = np.random.default_rng(1000 * person + k).integers(-3, 4, size=image.shape)
    return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("mbf")
    recogniser_standin(d / "mbf_batch1.onnx", [1, 3, 112, 112], dim=128)
    detector_standin(d / "det_10g.onnx")
    (d / "pack.toml").write_text('calibration = "calibration.json"\n' + SCRFD_128_FIXED_BATCH)
    faces = d / "faces"
    for i, person in enumerate(PEOPLE):
        (faces / person).mkdir(parents=True)
        for k in range(PHOTOS):
            (faces / person / f"{k}.png").write_bytes(png(photo(i, k)))
    return d


def test_served_decisions_are_the_evaluated_ones(
    pack_dir: Path,
    start_server: ServerStarter,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in QUALITY.items():
        monkeypatch.setenv(f"FACESVC_QUALITY_{name.upper()}", str(value))
    manifest = pack_dir / "pack.toml"
    # 1. Calibrate, with the manifest already naming the file being written.
    args = argparse.Namespace(
        pack=str(manifest),
        data=pack_dir / "faces",
        cache=None,
        min_face_px=None,
        fmr=0.1,
        confidence=0,  # a point estimate: a handful of photos can show no rate
        more_people=[],
        max_photos=5,
        out=pack_dir / "calibration.json",
        centre="auto",
        folds=2,
        seed=0,
        hold_out=None,
        turned=None,
    )
    assert run_calibrate(args) == 0

    # 2. What eval computes for every (enrolled photo, scan photo) pair.
    context = PackContext(Path("/nonexistent"), 1, None, logging.getLogger("test"))
    pack = default_registry().load(str(manifest), context)
    assert pack.embedder.fixed_batch == 1  # type: ignore[attr-defined]
    assert pack.calibration is not None and pack.threshold is not None
    limits = quality_limits(None)
    assert limits.max_abs_pitch_deg == 20.0
    described = describe(pack, pack_dir / "faces", None, FrameSimulation(variants=0), limits)
    frontal = pack.frontal
    assert frontal is not None
    ds = described.posed(frontal, limits)
    assert len(ds.paths) == len(PEOPLE) * PHOTOS and not ds.failures
    index = {Path(p).relative_to(pack_dir / "faces").as_posix(): k for k, p in enumerate(ds.paths)}
    expected: dict[tuple[str, str], bool] = {}
    for a, ia in index.items():
        for b, ib in index.items():
            if a != b:
                score = pack.match(ds.descriptors[ia : ia + 1], ds.descriptors[ib : ib + 1])
                expected[(a, b)] = score.accepted(pack.threshold)
    same = {pair: pair[0].split("/")[0] == pair[1].split("/")[0] for pair in expected}
    assert all(expected[pair] for pair, genuine in same.items() if genuine)
    assert not all(expected[pair] for pair, genuine in same.items() if not genuine)

    # Without its calibrated frontal geometry, the SCRFD-style points fail the pitch gate.
    strict = QualitySettings(**QUALITY)  # type: ignore[arg-type]
    naive = FacePipeline(pack.detector, pack.landmarks, pack.embedder, strict)
    own = FacePipeline(pack.detector, pack.landmarks, pack.embedder, strict, frontal)
    assert naive.analyze(photo(0, 0)).status is FaceStatus.LOW_QUALITY
    assert own.analyze(photo(0, 0)).status is FaceStatus.OK

    # 3. The same pairs through the service, eight callers at once (fixed-batch model).
    key_dir = tmp_path / "token-keys"
    keys_generate(key_dir)
    template_key = tmp_path / "templates.key"
    template_key.write_text(generate_template_key("k1") + "\n")
    overrides: dict[str, Any] = {
        "models__pack": str(manifest),
        "models__threads": 1,
        "tokens__key_dir": key_dir,
        "templates__key_file": template_key,
        "liveness__spl": "off",
        **{f"quality__{k}": v for k, v in QUALITY.items()},
    }
    server = start_server(redis_url, engine_factory=engine_from_resources, **overrides)
    server.wait_health(health_pb2.HealthCheckResponse.SERVING, within_s=60)
    for name in index:
        reply = server.stub.Enroll(
            pb.EnrollRequest(
                participant_id=name.replace("/", "-").replace(".png", ""),
                images=[(pack_dir / "faces" / name).read_bytes()],
            ),
            timeout=30,
        )
        assert reply.enrolled, reply.reason

    def served(pair: tuple[str, str]) -> tuple[tuple[str, str], int]:
        a, b = pair
        reply = server.stub.Verify(
            pb.VerifyRequest(
                participant_id=a.replace("/", "-").replace(".png", ""),
                training_id=f"t-{abs(hash(pair)) % 10**9}",
                training_type=pb.TRAINING_TYPE_SPL,
                gate=pb.GATE_SESSION,
                session_id="s1",
                frames=[(pack_dir / "faces" / b).read_bytes()],
            ),
            timeout=30,
        )
        return pair, reply.decision

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        decisions = dict(pool.map(served, expected))
    verified = {pair for pair, d in decisions.items() if d == pb.DECISION_VERIFIED}
    assert set(decisions.values()) <= {pb.DECISION_VERIFIED, pb.DECISION_NOT_MATCHED}
    assert verified == {pair for pair, ok in expected.items() if ok}


def broken_recogniser(path: Path) -> Path:
    """Declares [N, 3, 112, 112] -> [N, 128] like a good one; every run fails in ONNX
    Runtime (a reshape of 37632 values into rows of 5)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["input.1", "rows"], ["bad"], name="reshape0"),
            helper.make_node("Gather", ["bad", "idx"], ["683"], axis=1, name="gather0"),
        ],
        "broken",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["N", 128])],
        [
            numpy_helper.from_array(np.array([-1, 5], np.int64), "rows"),
            numpy_helper.from_array(np.arange(128, dtype=np.int64) % 5, "idx"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_a_failing_model_is_internal_with_a_message_never_unknown(
    pack_dir: Path, start_server: ServerStarter, redis_url: str, tmp_path: Path
) -> None:
    import grpc

    broken_recogniser(pack_dir / "broken.onnx")
    manifest = pack_dir / "broken.toml"
    manifest.write_text(
        'calibration = "calibration-broken.json"\n'
        + SCRFD_128_FIXED_BATCH.replace("mbf_batch1.onnx", "broken.onnx")
    )
    uncalibrated = PackContext(
        Path("/nonexistent"), 1, None, logging.getLogger("test"), calibrated=False
    )
    pack = default_registry().load(str(manifest), uncalibrated)

    ids = np.repeat(np.arange(4), 2)
    d = np.abs(np.subtract.outer(np.arange(8.0), np.arange(8.0))) / 8
    calibrate(
        pairwise_comparisons(d, ids, [f"s__{k}" for k in range(4)]),
        pack=pack.name,
        pack_digest=pack.digest,
        distance=pack.distance,
        data=CalibrationData("x", ("s",), 4, 8, 0),
        target_fmr=0.2,
    ).save(pack_dir / "calibration-broken.json")
    key_dir = tmp_path / "token-keys"
    keys_generate(key_dir)
    template_key = tmp_path / "templates.key"
    template_key.write_text(generate_template_key("k1") + "\n")
    server = start_server(
        redis_url,
        engine_factory=engine_from_resources,
        models__pack=str(manifest),
        models__threads=1,
        tokens__key_dir=key_dir,
        templates__key_file=template_key,
        liveness__spl="off",
        **{f"quality__{k}": v for k, v in {**QUALITY, "max_abs_pitch_deg": 90.0}.items()},
    )
    server.wait_health(health_pb2.HealthCheckResponse.SERVING, within_s=60)
    with pytest.raises(grpc.RpcError) as enrolled:
        server.stub.Enroll(
            pb.EnrollRequest(participant_id="p-1", images=[png(photo(0, 0))]), timeout=30
        )
    assert enrolled.value.code() is grpc.StatusCode.INTERNAL
    assert "the face models failed while describing the faces" in str(enrolled.value.details())
    assert "no attempt was counted" in str(enrolled.value.details())
