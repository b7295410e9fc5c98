"""Model packs from manifests, with small ONNX stand-ins generated here.

The stand-ins have the input and output signatures of InsightFace's ArcFace
(``input.1`` [N, 3, 112, 112] -> [N, 512]) and SCRFD det_10g (9 outputs: scores,
boxes and keypoints at strides 8, 16 and 32), and outputs that are known functions
of their inputs, so the tests see exactly which tensor each pack fed them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from facesvc.accuracy.calibrate import calibrate
from facesvc.accuracy.evaluation import pairwise_comparisons
from facesvc.config import QualitySettings
from facesvc.models.alignment import ARCFACE_TEMPLATE_112
from facesvc.models.calibration import CalibrationData, load_calibration
from facesvc.models.manifest_packs import load_insightface_manifest, load_onnx_manifest
from facesvc.models.matching import Distance
from facesvc.models.pack import ModelPack, PackContext, PackError
from facesvc.models.packs import PackRegistry
from facesvc.models.pipeline import FacePipeline

pytest.importorskip("insightface", reason="the insightface extra is not installed")

GATHERED = np.random.default_rng(0).choice(3 * 112 * 112, size=512, replace=False)
"""Flat input positions whose values the recogniser stand-in outputs, in order."""

KPS_OFFSETS = np.array([-1.0, -0.5, 1.0, -0.5, 0.0, 0.0, -0.8, 1.0, 0.8, 1.0], np.float32)
"""Keypoint offsets of the detector stand-in, in units of its stride."""


def recogniser_standin(path: Path, shape: list[int | str], dim: int = 512) -> Path:
    """output[n, k] = input[n].flatten()[GATHERED[k]] (k < dim): a linear map that shows the
    input. The output's batch axis is the input's (fixed when the input's is)."""
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input.1"], ["flat"], axis=1, name="flatten0"),
            helper.make_node("Gather", ["flat", "idx"], ["683"], axis=1, name="gather0"),
        ],
        "arcface_standin",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, [shape[0], dim])],
        [numpy_helper.from_array(GATHERED[:dim].astype(np.int64), "idx")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def detector_standin(path: Path) -> Path:
    """SCRFD det_10g signature. Only stride 32 scores: the mean of input channel 0 over
    each 32x32 cell (so a cell of one colour scores its normalised red value); every
    anchor's box reaches 2 strides to each side; keypoints sit at KPS_OFFSETS strides."""
    nodes, outputs, inits = [], [], []
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "c0"))
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "c1"))
    inits.append(numpy_helper.from_array(np.array([-1, 1], np.int64), "flat1"))
    inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
    inits.append(numpy_helper.from_array(np.full((1, 4), 2.0, np.float32), "box_d"))
    inits.append(numpy_helper.from_array(KPS_OFFSETS[None, :], "kps_d"))
    scores, boxes, kps = [], [], []
    for s in (8, 16, 32):
        nodes += [
            helper.make_node(
                "AveragePool", ["input.1"], [f"pool{s}"], kernel_shape=[s, s], strides=[s, s]
            ),
            helper.make_node("Slice", [f"pool{s}", "c0", "c1", "c1"], [f"red{s}"]),
        ]
        signal = f"red{s}"
        if s != 32:
            nodes.append(helper.make_node("Mul", [signal, "zero"], [f"quiet{s}"]))
            signal = f"quiet{s}"
        nodes += [
            helper.make_node("Transpose", [signal], [f"t{s}"], perm=[0, 2, 3, 1]),
            helper.make_node("Concat", [f"t{s}", f"t{s}"], [f"two{s}"], axis=3),
            helper.make_node("Reshape", [f"two{s}", "flat1"], [f"score_{s}"]),
            helper.make_node("Mul", [f"score_{s}", "zero"], [f"z{s}"]),
            helper.make_node("Add", [f"z{s}", "box_d"], [f"bbox_{s}"]),
            helper.make_node("Add", [f"z{s}", "kps_d"], [f"kps_{s}"]),
        ]
        scores.append(helper.make_tensor_value_info(f"score_{s}", TensorProto.FLOAT, [f"n{s}", 1]))
        boxes.append(helper.make_tensor_value_info(f"bbox_{s}", TensorProto.FLOAT, [f"n{s}", 4]))
        kps.append(helper.make_tensor_value_info(f"kps_{s}", TensorProto.FLOAT, [f"n{s}", 10]))
    outputs = scores + boxes + kps
    graph = helper.make_graph(
        nodes,
        "scrfd_standin",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])],
        outputs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


LENIENT = QualitySettings(
    min_face_px=40,
    min_detect_px=40,
    min_sharpness=0.0,
    min_brightness=0.0,
    max_clipped_fraction=1.0,
    max_abs_yaw_deg=180.0,
    max_abs_pitch_deg=180.0,
)
"""Quality gates that pass the stand-in detector's synthetic faces (a coloured block)."""
LENIENT_ENV = {
    "FACESVC_QUALITY_MIN_SHARPNESS": "0",
    "FACESVC_QUALITY_MIN_BRIGHTNESS": "0",
    "FACESVC_QUALITY_MAX_CLIPPED_FRACTION": "1",
}

RED = 200
"""Red value of the face block in test frames; its stand-in score is (200 - 127.5) / 128."""


def frame_with_block() -> np.ndarray:
    """640x480 RGB: black with a red 32x32 block filling the stride-32 cell (row 7, col 10)."""
    image = np.zeros((480, 640, 3), np.uint8)
    image[224:256, 320:352, 0] = RED
    image[224:256, 320:352, 1:] = 17  # green/blue must not reach the score
    return image


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("packs")
    recogniser_standin(d / "w600k_r50.onnx", ["None", 3, 112, 112])
    recogniser_standin(d / "nhwc.onnx", ["N", 112, 112, 3])
    recogniser_standin(d / "r128.onnx", ["None", 3, 128, 128])
    recogniser_standin(d / "batch1.onnx", [1, 3, 112, 112])
    detector_standin(d / "det_10g.onnx")
    return d


def context(**kw: object) -> PackContext:
    return PackContext(
        cache_dir=Path("/nonexistent"),
        threads=1,
        calibration_override=kw.get("calibration_override"),  # type: ignore[arg-type]
        logger=logging.getLogger("test_packs"),
    )


def registry() -> PackRegistry:
    r = PackRegistry()
    r.register_kind("onnx", load_onnx_manifest)
    r.register_kind("insightface", load_insightface_manifest)
    return r


ONNX_MANIFEST = """
name = "standin-arcface"
kind = "onnx"
licence = "test stand-in"

[recogniser]
model = "{model}"
input_size = 112
layout = "{layout}"
colour = "BGR"
mean = [10.0, 20.0, 30.0]
std = [2.0, 4.0, 8.0]
alignment = "arcface_112"
output_size = 512
distance = "cosine"

[detector]
kind = "scrfd"
model = "det_10g.onnx"
input_size = [640, 640]
score_threshold = 0.5
"""

INSIGHTFACE_MANIFEST = """
name = "standin-buffalo"
kind = "insightface"
{ack}

[recogniser]
model = "w600k_r50.onnx"

[detector]
model = "det_10g.onnx"
"""


def write(models: Path, name: str, text: str) -> Path:
    path = models / name
    path.write_text(text)
    return path


def test_insightface_model_zoo_recognises_the_standins(models: Path) -> None:
    from insightface import model_zoo

    assert type(model_zoo.get_model(str(models / "det_10g.onnx"))).__name__ == "SCRFD"
    rec = model_zoo.get_model(str(models / "w600k_r50.onnx"))
    assert type(rec).__name__ == "ArcFaceONNX"
    assert (rec.input_mean, rec.input_std) == (127.5, 127.5)


def chips(n: int) -> np.ndarray:
    return np.random.default_rng(5).integers(0, 256, size=(n, 112, 112, 3), dtype=np.uint8)


def test_generic_manifest_feeds_the_described_tensor_nchw(models: Path) -> None:
    path = write(
        models, "onnx_nchw.toml", ONNX_MANIFEST.format(model="w600k_r50.onnx", layout="NCHW")
    )
    pack = registry().load(str(path), context())
    c = chips(3)
    mean, std = np.array([10.0, 20.0, 30.0]), np.array([2.0, 4.0, 8.0])
    # Model channel k is colour k of BGR, i.e. RGB channel 2 - k.
    expected = (c[..., ::-1].astype(np.float64) - mean) / std  # (N, H, W, C) in BGR
    expected = expected.transpose(0, 3, 1, 2).reshape(3, -1)[:, GATHERED]
    np.testing.assert_allclose(pack.embedder.embed_raw(c), expected, rtol=1e-6)  # type: ignore[attr-defined]
    unit = pack.embedder.embed(c)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)
    assert pack.distance is Distance.COSINE and pack.landmarks is None
    assert pack.calibration is None and pack.threshold is None


def test_generic_manifest_feeds_the_described_tensor_nhwc(models: Path) -> None:
    path = write(models, "onnx_nhwc.toml", ONNX_MANIFEST.format(model="nhwc.onnx", layout="NHWC"))
    pack = registry().load(str(path), context())
    c = chips(2)
    expected = (c[..., ::-1].astype(np.float64) - [10.0, 20.0, 30.0]) / [2.0, 4.0, 8.0]
    expected = expected.reshape(2, -1)[:, GATHERED]
    np.testing.assert_allclose(pack.embedder.embed_raw(c), expected, rtol=1e-6)  # type: ignore[attr-defined]


def test_a_fixed_batch_of_one_is_run_one_chip_at_a_time(models: Path) -> None:
    """A recogniser exported with batch 1 loads, and a batch of any size gets the
    descriptors each chip gets alone (ONNX Runtime would refuse the stacked batch)."""
    free = registry().load(
        str(
            write(models, "free.toml", ONNX_MANIFEST.format(model="w600k_r50.onnx", layout="NCHW"))
        ),
        context(),
    )
    fixed = registry().load(
        str(write(models, "fixed.toml", ONNX_MANIFEST.format(model="batch1.onnx", layout="NCHW"))),
        context(),
    )
    assert fixed.embedder.fixed_batch == 1 and free.embedder.fixed_batch is None  # type: ignore[attr-defined]
    c = chips(5)
    np.testing.assert_array_equal(fixed.embedder.embed(c), free.embedder.embed(c))
    assert fixed.embedder.embed(c[:0]).shape == (0, 512)


def test_wrong_input_shape_is_a_clear_error(models: Path) -> None:
    path = write(models, "onnx_bad.toml", ONNX_MANIFEST.format(model="r128.onnx", layout="NCHW"))
    with pytest.raises(PackError, match=r"declares \['None', 3, 128, 128\].*fix input_size"):
        registry().load(str(path), context())


def test_wrong_layout_is_a_clear_error(models: Path) -> None:
    path = write(models, "onnx_layout.toml", ONNX_MANIFEST.format(model="nhwc.onnx", layout="NCHW"))
    with pytest.raises(PackError, match="fix input_size/layout"):
        registry().load(str(path), context())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (('layout = "NCHW"', 'layout = "CHW"'), "layout = 'CHW' is not one of NCHW, NHWC"),
        (("output_size = 512", "output_size = 128"), "output_size 128"),
        (('alignment = "arcface_112"', 'alignment = "mine"'), "alignment = 'mine'"),
        (('model = "w600k_r50.onnx"', 'model = "absent.onnx"'), "does not exist"),
        (("mean = [10.0, 20.0, 30.0]", "mean = [1, 2]"), "'mean' must be a number or a list of 3"),
    ],
)
def test_bad_manifest_fields_name_the_field(
    models: Path, edit: tuple[str, str], message: str
) -> None:
    text = ONNX_MANIFEST.format(model="w600k_r50.onnx", layout="NCHW").replace(*edit)
    with pytest.raises(PackError, match=message):
        registry().load(str(write(models, "onnx_edit.toml", text)), context())


def test_unknown_pack_names_are_refused() -> None:
    with pytest.raises(PackError, match="neither a built-in pack"):
        registry().load("nosuchpack", context())


def test_scrfd_standin_decodes_to_the_block(models: Path) -> None:
    path = write(
        models, "onnx_det.toml", ONNX_MANIFEST.format(model="w600k_r50.onnx", layout="NCHW")
    )
    pack = registry().load(str(path), context())
    (det,) = pack.detector.detect(frame_with_block(), min_face_px=40)
    # anchor centre (320, 224) at stride 32, box 2 strides to each side
    assert (det.box.left, det.box.top, det.box.right, det.box.bottom) == (256, 160, 384, 288)
    assert det.score == pytest.approx((RED - 127.5) / 128.0)
    assert det.landmarks is not None
    np.testing.assert_allclose(det.landmarks, [320, 224] + KPS_OFFSETS.reshape(5, 2) * 32)
    assert pack.detector.detect(frame_with_block(), min_face_px=129) == []
    # a frame in BGR order would put the block in channel 2 and score nothing
    assert pack.detector.detect(frame_with_block()[..., ::-1].copy(), min_face_px=40) == []


def test_alignment_puts_the_landmarks_on_the_template(models: Path) -> None:
    path = write(
        models, "onnx_al.toml", ONNX_MANIFEST.format(model="w600k_r50.onnx", layout="NCHW")
    )
    pack = registry().load(str(path), context())
    image = np.random.default_rng(2).integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    landmarks = ARCFACE_TEMPLATE_112 + np.float32([150, 90])  # the template, shifted
    chip = pack.embedder.align(image, landmarks)
    np.testing.assert_array_equal(chip, image[90:202, 150:262])


def test_insightface_pack_needs_the_licence_acknowledged(models: Path) -> None:
    path = write(models, "if_noack.toml", INSIGHTFACE_MANIFEST.format(ack=""))
    with pytest.raises(PackError, match="non-commercial research only"):
        registry().load(str(path), context())


def test_insightface_pack_runs_insightface_preprocessing(
    models: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(
        models, "if.toml", INSIGHTFACE_MANIFEST.format(ack="non_commercial_research_only = true")
    )
    with caplog.at_level(logging.WARNING):
        pack = registry().load(str(path), context())
    assert any("NON-COMMERCIAL RESEARCH" in r.getMessage() for r in caplog.records)
    c = chips(2)
    # insightface's ArcFace input: RGB, (x - 127.5) / 127.5, NCHW
    expected = ((c.astype(np.float64) - 127.5) / 127.5).transpose(0, 3, 1, 2).reshape(2, -1)
    np.testing.assert_allclose(pack.embedder.embed_raw(c), expected[:, GATHERED], rtol=1e-5)  # type: ignore[attr-defined]
    image = np.random.default_rng(3).integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    chip = pack.embedder.align(image, ARCFACE_TEMPLATE_112 + np.float32([150, 90]))
    np.testing.assert_array_equal(chip, image[90:202, 150:262])
    (det,) = pack.detector.detect(frame_with_block(), min_face_px=40)
    assert det.score == pytest.approx((RED - 127.5) / 128.0)


def calibration_for(pack: ModelPack, tmp: Path, name: str | None = None) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8))
    ids = np.repeat(np.arange(20), 2)
    d = np.linalg.norm(x[:, None] - x[None], axis=2)
    c = calibrate(
        pairwise_comparisons(d, ids, [f"s__{k}" for k in range(20)]),
        pack=name or pack.name,
        pack_digest=pack.digest,
        distance=pack.distance,
        data=CalibrationData("x", ("s",), 20, 40, 0),
        target_fmr=1e-2,
    )
    path = tmp / "cal.json"
    c.save(path)
    return path


def test_calibration_is_bound_to_the_pack(models: Path, tmp_path: Path) -> None:
    path = write(
        models, "onnx_cal.toml", ONNX_MANIFEST.format(model="w600k_r50.onnx", layout="NCHW")
    )
    pack = registry().load(str(path), context())
    good = calibration_for(pack, tmp_path)
    calibrated = registry().load(str(path), context(calibration_override=good))
    assert calibrated.threshold is not None and calibrated.tag == pack.tag
    foreign = calibration_for(pack, tmp_path, name="another-pack")
    with pytest.raises(PackError, match="not 'standin-arcface'"):
        registry().load(str(path), context(calibration_override=foreign))


def test_tag_changes_with_preprocessing(models: Path) -> None:
    a = write(models, "onnx_t1.toml", ONNX_MANIFEST.format(model="w600k_r50.onnx", layout="NCHW"))
    b = write(
        models,
        "onnx_t2.toml",
        ONNX_MANIFEST.format(model="w600k_r50.onnx", layout="NCHW").replace(
            "[10.0, 20.0, 30.0]", "127.5"
        ),
    )
    ta, tb = (registry().load(str(p), context()).tag for p in (a, b))
    assert ta.startswith("standin-arcface@sha256:") and ta != tb


def test_describe_photos_with_a_manifest_pack(models: Path, tmp_path: Path) -> None:
    from PIL import Image

    from facesvc.accuracy.evaluation import FrameSimulation, describe_photos, scan_identity_folders
    from facesvc.commands.accuracy import read_photo

    for person in ("s__a", "s__b"):
        (tmp_path / person).mkdir()
        for k in range(2):
            frame = frame_with_block()
            frame[240 + k, 330] = 90  # photos differ a little
            Image.fromarray(frame).save(tmp_path / person / f"{k}.png")
    Image.fromarray(np.zeros((480, 640, 3), np.uint8)).save(tmp_path / "s__b" / "empty.png")
    path = write(
        models, "onnx_desc.toml", ONNX_MANIFEST.format(model="w600k_r50.onnx", layout="NCHW")
    )
    pack = registry().load(str(path), context())
    pipeline = FacePipeline(pack.detector, pack.landmarks, pack.embedder, LENIENT)
    ds = describe_photos(
        scan_identity_folders(tmp_path),
        read_photo,
        pipeline,
        pack=pack.tag,
        simulation=FrameSimulation(variants=3),
    )
    assert ds.pack == pack.tag and ds.identities == ("s__a", "s__b")
    assert [Path(f.split(": ")[0]).name for f in ds.failures] == ["empty.png"]
    assert ds.failures[0].split(": ")[1] == "NO_FACE"
    assert ds.layout == "arcface_5" and ds.landmarks.shape == (4, 5, 2)
    assert ds.descriptors.shape == (4, 512) and ds.variants.shape == (4, 3, 512)
    assert ds.image_identity.tolist() == [0, 0, 1, 1]
    # variants are perturbed re-alignments, not copies of the photo's descriptor
    assert not np.allclose(ds.variants[0, 0], ds.descriptors[0])


def test_calibrate_command_output_loads_into_the_pack(
    models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`facesvc calibrate` on a manifest pack that names the calibration file it is about to
    write (as docs/packs.md says to) runs, and the record it writes loads into the pack."""
    import argparse

    from PIL import Image

    from facesvc.commands.accuracy import run_calibrate

    rng = np.random.default_rng(9)
    for folder, person, photos in (
        ("faces", "s__a", 2), ("faces", "s__b", 2), ("faces", "t__c", 2), ("more", "u__d", 3),
    ):  # fmt: skip
        (tmp_path / folder / person).mkdir(parents=True)
        base = rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8) // 4
        for k in range(photos):
            frame = base.copy()
            frame[224:256, 320:352] = frame_with_block()[224:256, 320:352]
            frame[rng.integers(0, 480, 50), rng.integers(0, 640, 50)] = 255  # photo noise
            Image.fromarray(frame).save(tmp_path / folder / person / f"{k}.png")
    for name, value in LENIENT_ENV.items():
        monkeypatch.setenv(name, value)
    out = models / "calcmd-calibration.json"
    out.unlink(missing_ok=True)
    text = ONNX_MANIFEST.format(model="w600k_r50.onnx", layout="NCHW")
    manifest = write(models, "onnx_calcmd.toml", f'calibration = "{out.name}"\n' + text)
    with pytest.raises(PackError, match="does not exist; run `facesvc calibrate`"):
        registry().load(str(manifest), context())  # serving needs it...
    args = argparse.Namespace(
        pack=str(manifest),
        data=tmp_path / "faces",
        more_people=[tmp_path / "more"],
        max_photos=2,
        cache=None,
        min_face_px=40,
        fmr=0.01,
        confidence=0.95,
        out=out,
        centre="on",
        folds=2,
        seed=0,
        hold_out=None,
        turned=None,
    )
    with pytest.raises(SystemExit, match=r"cannot show FMR <= 0\.01 with 95% confidence"):
        run_calibrate(args)  # 8 photos give 24 impostor pairs: too few to show 1%
    args.fmr = 0.25
    assert run_calibrate(args) == 0  # ...calibrating never does
    pack = registry().load(str(manifest), context())
    assert pack.calibration is not None and pack.threshold is not None
    # u__d's third photo is left out (--max-photos 2)
    assert pack.calibration.data.identities == 4 and pack.calibration.data.images == 8
    assert pack.calibration.data.folder == "faces+more"
    assert pack.calibration.fmr_confidence == 0.95
    assert pack.calibration.overall.genuine_pairs == 4
    assert pack.calibration.overall.impostor_pairs == 24
    # at most 2 of 24 accepted: with 3 the 95% bound on the FMR would pass 25%
    assert pack.calibration.overall.false_matches <= 2
    assert [s.source for s in pack.calibration.per_source] == ["s", "t", "u"]
    assert pack.calibration.centre is not None and len(pack.calibration.centre) == 512
    assert pack.calibration.data.identity_names == ("s__a", "s__b", "t__c", "u__d")
    # --hold-out leaves out a fold of DATA's people only; --more-people stay in
    held_out = out.with_name("calcmd-held-out.json")
    held_args = {**vars(args), "hold_out": 0, "out": held_out, "confidence": 0}
    assert run_calibrate(argparse.Namespace(**held_args)) == 0
    names = load_calibration(held_out).data.identity_names
    assert "u__d" in names and 0 < len({"s__a", "s__b", "t__c"} - set(names)) < 3
    assert pack.calibration.frontal is not None and pack.calibration.frontal.layout == "arcface_5"
    # the frontal geometry measured on the stand-in's keypoints: the nose half a stride below
    # the eye line, the eyes two strides apart
    assert pack.calibration.frontal.nose_drop == pytest.approx(0.25)
    assert pack.frontal is not None and pack.frontal.nose_drop == pytest.approx(0.25)
