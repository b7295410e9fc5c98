"""Biometric verification metrics, identity-split protocols and accuracy reports.

Pure numpy (matplotlib only for the DET plot). Every comparison is a *distance*:
lower means more alike, and a comparison is accepted when its distance is at most
the threshold. Rates are fractions in [0, 1]:

- FMR (false-match rate): accepted impostor comparisons / impostor comparisons.
- FNMR (false-non-match rate): rejected genuine comparisons / genuine comparisons.

An identity is one folder of photos of one person; its *source* is the folder-name
prefix before ``__`` (``nuaa__client0001`` -> ``nuaa``). Identities, not pairs, are
the unit of independence: bootstrap intervals resample identities, and calibration
and report splits never share an identity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

from facesvc.config import QualitySettings
from facesvc.models.binomial import binomial_pmf
from facesvc.models.matching import Distance, MatchRules, match, pairwise_distances, unit_rows
from facesvc.models.pipeline import FacePipeline, FaceStatus
from facesvc.models.quality import (
    FrontalGeometry,
    LandmarkLayout,
    head_pose,
    nose_drop,
    pose_issues,
    profile_yaw,
)
from facesvc.models.types import Points, RGBImage

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
"""File suffixes (lower case) that identity folders are scanned for."""

DEFAULT_FMR_TARGETS = (1e-2, 1e-3)


def source_of(identity: str) -> str:
    """The source of an identity folder name: its prefix before ``__`` (the whole name if none)."""
    return identity.split("__", 1)[0]


@dataclass(frozen=True, slots=True)
class LabelledImage:
    """One photo with the identity folder it came from."""

    path: Path
    identity: str

    @property
    def source(self) -> str:
        return source_of(self.identity)


def scan_identity_folders(root: Path) -> list[LabelledImage]:
    """Every image under ``root/<identity>/``, sorted by identity then file name.

    Raises ``FileNotFoundError`` when ``root`` holds no identity folder with images,
    so that a typo in a path never yields an empty (and silently perfect) report.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; pass a folder of identity folders")
    images = [
        LabelledImage(path=f, identity=d.name)
        for d in sorted(p for p in root.iterdir() if p.is_dir())
        for f in sorted(d.iterdir())
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not images:
        raise FileNotFoundError(
            f"{root} has no identity folders with images; expected <root>/<identity>/<photo>.jpg"
        )
    return images


# --------------------------------------------------------------------------- comparisons


@dataclass(frozen=True, slots=True)
class Comparisons:
    """Scored comparisons, each between a claimed identity and a probe identity.

    ``distance`` (P,) float64, lower = more alike; ``claimed`` and ``probe`` (P,) int64
    indices into ``identities``; a comparison is genuine when ``claimed == probe``.
    ``sources`` gives each identity's source, aligned with ``identities``.
    """

    distance: FloatArray
    claimed: IntArray
    probe: IntArray
    identities: tuple[str, ...]

    def __post_init__(self) -> None:
        n = self.distance.shape[0]
        if self.claimed.shape != (n,) or self.probe.shape != (n,):
            raise ValueError("distance, claimed and probe must all have shape (P,)")

    @property
    def genuine(self) -> BoolArray:
        return np.asarray(self.claimed == self.probe)

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(source_of(i) for i in self.identities)

    def select(self, mask: BoolArray) -> Comparisons:
        """The comparisons where ``mask`` (P,) is true."""
        return Comparisons(
            self.distance[mask], self.claimed[mask], self.probe[mask], self.identities
        )

    def within(self, identity_indices: npt.ArrayLike) -> Comparisons:
        """Comparisons whose claimed and probe identities are both in ``identity_indices``."""
        keep = np.zeros(len(self.identities), dtype=bool)
        keep[np.asarray(identity_indices, dtype=np.int64)] = True
        return self.select(keep[self.claimed] & keep[self.probe])

    def of_source(self, source: str) -> Comparisons:
        """Comparisons whose claimed and probe identities both come from ``source``.

        Cross-source impostor pairs are easy (different cameras, populations) and
        count only in the overall figures; a source's table shows how its own
        people are told apart.
        """
        members = [k for k, s in enumerate(self.sources) if s == source]
        return self.within(members)

    @staticmethod
    def concatenate(parts: Sequence[Comparisons]) -> Comparisons:
        """All comparisons of ``parts`` (which must share ``identities``) in one set."""
        if not parts:
            raise ValueError("nothing to concatenate")
        ids = parts[0].identities
        if any(p.identities != ids for p in parts):
            raise ValueError("comparisons over different identity lists cannot be pooled")
        return Comparisons(
            np.concatenate([p.distance for p in parts]),
            np.concatenate([p.claimed for p in parts]),
            np.concatenate([p.probe for p in parts]),
            ids,
        )


def pairwise_comparisons(
    distances: FloatArray, image_identity: IntArray, identities: Sequence[str]
) -> Comparisons:
    """Every unordered pair of distinct images, once.

    ``distances`` (N, N) symmetric distance matrix between N images;
    ``image_identity`` (N,) identity index of each image.
    """
    n = distances.shape[0]
    a, b = np.triu_indices(n, k=1)
    return Comparisons(
        distance=np.asarray(distances[a, b], dtype=np.float64),
        claimed=np.asarray(image_identity[a], dtype=np.int64),
        probe=np.asarray(image_identity[b], dtype=np.int64),
        identities=tuple(identities),
    )


# --------------------------------------------------------------------------- rates


def rates_at(threshold: float, genuine: FloatArray, impostor: FloatArray) -> tuple[float, float]:
    """(FMR, FNMR) when comparisons with distance <= ``threshold`` are accepted."""
    fmr = float(np.mean(impostor <= threshold)) if impostor.size else math.nan
    fnmr = float(np.mean(genuine > threshold)) if genuine.size else math.nan
    return fmr, fnmr


def threshold_at_fmr(
    impostor: FloatArray, target_fmr: float, confidence: float | None = None
) -> float:
    """The largest distance threshold whose FMR on ``impostor`` (M,) is at most ``target_fmr``.

    Without ``confidence`` this is the point estimate: at most k = floor(target * M)
    pairs may be accepted, so the threshold sits just below the (k+1)-th smallest one and
    the true FMR on new people lands on either side of the target. With ``confidence``
    (e.g. 0.95) k is instead the largest count of accepted pairs at which the one-sided
    Clopper-Pearson bound still shows the FMR at most the target: the threshold a target
    written as "FMR <= 0.1%" asks for. When k is 0 the estimate rests on the single
    closest impostor: check :func:`fmr_resolvable` first.

    Raises ValueError when ``confidence`` cannot be shown with M pairs
    (:func:`impostors_needed` says how many it takes).
    """
    if impostor.size == 0:
        raise ValueError("no impostor comparisons: a false-match rate cannot be estimated")
    if not 0.0 < target_fmr < 1.0:
        raise ValueError(f"target FMR must be in (0, 1), got {target_fmr}")
    ordered = np.sort(impostor)
    if confidence is None:
        allowed = math.floor(target_fmr * ordered.size + 1e-9)
    else:
        allowed = _demonstrable_count(ordered.size, target_fmr, confidence)
        if allowed < 0:
            raise ValueError(
                f"{ordered.size} impostor pairs cannot show FMR <= {target_fmr:g} with "
                f"{confidence:.0%} confidence, at least "
                f"{impostors_needed(target_fmr, confidence)} are needed: add people"
            )
    if allowed >= ordered.size:
        return math.inf
    return float(np.nextafter(ordered[allowed], -np.inf))


def _demonstrable_count(pairs: int, target_fmr: float, confidence: float) -> int:
    """The most false matches among ``pairs`` at which the one-sided Clopper-Pearson upper
    bound on the FMR is still at most ``target_fmr``; -1 when even none is too many.

    The bound for k false matches is at most the target exactly when a binomial with the
    target's rate gives k or fewer with probability at most 1 - confidence.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    cumulative, k = 0.0, -1
    while k + 1 <= pairs:
        i = k + 1
        cumulative += binomial_pmf(pairs, i, target_fmr)
        if cumulative > 1.0 - confidence:
            break
        k = i
    return k


def impostors_needed(target_fmr: float, confidence: float) -> int:
    """The fewest impostor pairs with which no false match shows FMR <= ``target_fmr`` at
    ``confidence`` (2,995 for 1e-3 at 95%)."""
    return math.ceil(math.log1p(-confidence) / math.log1p(-target_fmr))


def fmr_resolvable(impostor_count: int, target_fmr: float) -> bool:
    """Whether ``impostor_count`` comparisons can show a false-match rate as low as the target.

    An FMR of 1e-3 needs at least 1000 impostor comparisons for even one false
    match to be allowed; below that the "FNMR at FMR 1e-3" is really at FMR 0.
    """
    return impostor_count * target_fmr >= 1.0 - 1e-9


def fnmr_at_fmr(genuine: FloatArray, impostor: FloatArray, target_fmr: float) -> float:
    """FNMR at the threshold :func:`threshold_at_fmr` picks on ``impostor``."""
    threshold = threshold_at_fmr(impostor, target_fmr)
    return rates_at(threshold, genuine, impostor)[1]


def roc_auc(genuine: FloatArray, impostor: FloatArray) -> float:
    """P(impostor distance > genuine distance), ties counting one half (Mann-Whitney U)."""
    if genuine.size == 0 or impostor.size == 0:
        return math.nan
    ranks = _average_ranks(np.concatenate([genuine, impostor]))
    impostor_rank_sum = float(ranks[genuine.size :].sum())
    u = impostor_rank_sum - impostor.size * (impostor.size + 1) / 2.0
    return u / (genuine.size * impostor.size)


def _average_ranks(values: FloatArray) -> FloatArray:
    """1-based ranks of ``values`` (N,), tied values sharing their average rank."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    # Start index of each run of equal values, then each run's average 1-based rank.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], sorted_values.size]
    run_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def equal_error_rate(genuine: FloatArray, impostor: FloatArray) -> float:
    """The rate where FMR and FNMR cross, interpolated linearly between thresholds.

    Thresholds run over every observed distance; FNMR - FMR falls from 1 to -1
    along them and the EER is read where it reaches 0.
    """
    if genuine.size == 0 or impostor.size == 0:
        return math.nan
    fmr, fnmr = det_points(genuine, impostor)
    diff = fnmr - fmr
    j = int(np.argmax(diff <= 0.0))
    if diff[j] == 0.0 or j == 0:
        return float(fmr[j])
    alpha = diff[j - 1] / (diff[j - 1] - diff[j])
    return float(fmr[j - 1] + alpha * (fmr[j] - fmr[j - 1]))


# --------------------------------------------------------------------------- summaries


@dataclass(frozen=True, slots=True)
class Interval:
    """A point estimate with a 95% bootstrap interval (NaN bounds when not computed)."""

    value: float
    low: float
    high: float

    def format(self, percent: bool = True) -> str:
        scale, unit = (100.0, "%") if percent else (1.0, "")
        if math.isnan(self.value):
            return "n/a"
        if math.isnan(self.low):
            return f"{self.value * scale:.2f}{unit}"
        return f"{self.value * scale:.2f}{unit} [{self.low * scale:.2f}, {self.high * scale:.2f}]"


@dataclass(frozen=True, slots=True)
class FnmrAtFmr:
    target_fmr: float
    fnmr: Interval
    resolvable: bool
    """False when there are too few impostor comparisons to allow one false match."""


@dataclass(frozen=True, slots=True)
class Summary:
    """Threshold-free accuracy of one set of comparisons, with its counts."""

    genuine_count: int
    impostor_count: int
    identity_count: int
    genuine_mean: float
    impostor_mean: float
    auc: Interval
    eer: Interval
    fnmr_at: tuple[FnmrAtFmr, ...]


def summarize(
    comparisons: Comparisons,
    fmr_targets: Sequence[float] = DEFAULT_FMR_TARGETS,
    bootstrap_rounds: int = 1000,
    seed: int = 0,
) -> Summary:
    """Counts, AUC, EER and FNMR at each FMR target, with identity-bootstrap intervals."""
    gen_mask = comparisons.genuine
    genuine = comparisons.distance[gen_mask]
    impostor = comparisons.distance[~gen_mask]
    point = _metrics(genuine, impostor, fmr_targets)
    samples = _bootstrap(comparisons, fmr_targets, bootstrap_rounds, seed)

    def interval(k: int) -> Interval:
        if samples.shape[0] == 0 or math.isnan(point[k]):
            return Interval(point[k], math.nan, math.nan)
        col = samples[:, k][~np.isnan(samples[:, k])]
        if col.size == 0:
            return Interval(point[k], math.nan, math.nan)
        low, high = np.quantile(col, [0.025, 0.975])
        return Interval(point[k], float(low), float(high))

    involved = np.unique(np.concatenate([comparisons.claimed, comparisons.probe]))
    return Summary(
        genuine_count=int(genuine.size),
        impostor_count=int(impostor.size),
        identity_count=int(involved.size),
        genuine_mean=float(genuine.mean()) if genuine.size else math.nan,
        impostor_mean=float(impostor.mean()) if impostor.size else math.nan,
        auc=interval(0),
        eer=interval(1),
        fnmr_at=tuple(
            FnmrAtFmr(t, interval(2 + k), fmr_resolvable(int(impostor.size), t))
            for k, t in enumerate(fmr_targets)
        ),
    )


def _metrics(
    genuine: FloatArray, impostor: FloatArray, fmr_targets: Sequence[float]
) -> list[float]:
    """[AUC, EER, FNMR@target...] of one genuine/impostor split (NaN where undefined)."""
    values = [roc_auc(genuine, impostor), equal_error_rate(genuine, impostor)]
    for target in fmr_targets:
        ok = genuine.size > 0 and impostor.size > 0
        values.append(fnmr_at_fmr(genuine, impostor, target) if ok else math.nan)
    return values


def _bootstrap(
    comparisons: Comparisons, fmr_targets: Sequence[float], rounds: int, seed: int
) -> FloatArray:
    """(rounds, 2 + len(targets)) metrics over identity resamples.

    Each round draws identities with replacement; a comparison is repeated as many
    times as the product of its identities' draw counts (a genuine one: its
    identity's count), so an identity drawn twice never impostors itself.
    """
    involved = np.unique(np.concatenate([comparisons.claimed, comparisons.probe]))
    if rounds <= 0 or involved.size < 2:
        return np.empty((0, 2 + len(fmr_targets)))
    rng = np.random.default_rng(seed)
    gen_mask = comparisons.genuine
    out = np.empty((rounds, 2 + len(fmr_targets)))
    for r in range(rounds):
        counts = np.zeros(len(comparisons.identities), dtype=np.int64)
        np.add.at(counts, rng.choice(involved, size=involved.size, replace=True), 1)
        weight = np.where(
            gen_mask,
            counts[comparisons.claimed],
            counts[comparisons.claimed] * counts[comparisons.probe],
        )
        genuine = np.repeat(comparisons.distance[gen_mask], weight[gen_mask])
        impostor = np.repeat(comparisons.distance[~gen_mask], weight[~gen_mask])
        out[r] = _metrics(genuine, impostor, fmr_targets)
    return out


# --------------------------------------------------------------------------- splits


def identity_folds(identities: Sequence[str], folds: int, seed: int = 0) -> list[IntArray]:
    """Split identity indices into ``folds`` disjoint groups, stratified by source.

    Each source's identities are shuffled and dealt round-robin, so every fold
    holds about the same share of every source. Returns ``folds`` sorted int64 arrays.
    """
    if folds < 2:
        raise ValueError("cross-validation needs at least 2 folds")
    rng = np.random.default_rng(seed)
    groups: list[list[int]] = [[] for _ in range(folds)]
    by_source: dict[str, list[int]] = {}
    for k, identity in enumerate(identities):
        by_source.setdefault(source_of(identity), []).append(k)
    offset = 0
    for source in sorted(by_source):
        members = list(rng.permutation(by_source[source]))
        for j, k in enumerate(members):
            groups[(offset + j) % folds].append(int(k))
        offset += len(members)
    return [np.array(sorted(g), dtype=np.int64) for g in groups]


def cross_validation(
    identity_count: int, folds: Sequence[IntArray]
) -> Iterator[tuple[IntArray, IntArray]]:
    """(calibration, report) identity indices per fold: report on one, calibrate on the rest."""
    for k, report in enumerate(folds):
        rest = [f for j, f in enumerate(folds) if j != k]
        calibration = np.sort(np.concatenate(rest)) if rest else np.empty(0, np.int64)
        if np.intersect1d(calibration, report).size or report.max(initial=-1) >= identity_count:
            raise ValueError("folds must be disjoint identity indices")
        yield calibration, report


@dataclass(frozen=True, slots=True)
class OperatingPoint:
    """Error counts at calibrated thresholds, pooled over folds."""

    false_matches: int
    impostor_count: int
    false_non_matches: int
    genuine_count: int

    @property
    def fmr(self) -> float:
        return self.false_matches / self.impostor_count if self.impostor_count else math.nan

    @property
    def fnmr(self) -> float:
        return self.false_non_matches / self.genuine_count if self.genuine_count else math.nan


@dataclass(frozen=True, slots=True)
class CrossValidated:
    """Report-fold comparisons pooled over folds, each with the threshold it was judged by.

    ``applied`` (P,) float64 aligns with ``report``; ``thresholds`` lists every threshold
    set (one per fold, or per fold and source with per-source calibration).
    """

    report: Comparisons
    applied: FloatArray
    thresholds: tuple[float, ...]

    def operating(self, mask: BoolArray | None = None) -> OperatingPoint:
        """Errors among the report comparisons where ``mask`` (P,) is true (all if None)."""
        keep = np.ones(self.applied.shape, bool) if mask is None else mask
        gen = self.report.genuine & keep
        imp = ~self.report.genuine & keep
        accepted = self.report.distance <= self.applied
        return OperatingPoint(
            false_matches=int(np.sum(accepted & imp)),
            impostor_count=int(imp.sum()),
            false_non_matches=int(np.sum(~accepted & gen)),
            genuine_count=int(gen.sum()),
        )

    def source_masks(self, source: str) -> tuple[BoolArray, BoolArray]:
        """(both identities from ``source``, claimed identity from ``source``) masks (P,)."""
        member = np.array([s == source for s in self.report.sources], dtype=bool)
        claimed = member[self.report.claimed]
        return claimed & member[self.report.probe], claimed


def cross_validate(
    comparisons_for: Callable[[IntArray], Comparisons],
    identity_count: int,
    folds: Sequence[IntArray],
    target_fmr: float,
    per_source: bool = False,
) -> CrossValidated:
    """Calibrate on each fold's complement, judge the fold's own comparisons, pool them.

    ``comparisons_for(calibration_identities)`` scores the comparisons of a fold split;
    it may use the calibration identities' photos (a cosine centre) but nothing else.
    The threshold comes from impostor comparisons among the calibration identities
    (with ``per_source``, one per source from that source's own impostors, applied by
    the claimed identity's source; a source without calibration impostors falls back
    to the pooled threshold). No judged comparison shares an identity with the ones
    that set its threshold.
    """
    parts: list[Comparisons] = []
    applied: list[FloatArray] = []
    thresholds: list[float] = []
    for calibration, report in cross_validation(identity_count, folds):
        comps = comparisons_for(calibration)
        cal = comps.within(calibration)
        rep = comps.within(report)
        pooled = threshold_at_fmr(cal.distance[~cal.genuine], target_fmr)
        by_claimed = np.full(len(comps.identities), pooled)
        if per_source:
            sources = comps.sources
            for source in sorted(set(sources)):
                own = cal.of_source(source)
                if np.any(~own.genuine):
                    t = threshold_at_fmr(own.distance[~own.genuine], target_fmr)
                    by_claimed[[k for k, x in enumerate(sources) if x == source]] = t
                    thresholds.append(t)
        else:
            thresholds.append(pooled)
        parts.append(rep)
        applied.append(by_claimed[rep.claimed])
    return CrossValidated(
        Comparisons.concatenate(parts), np.concatenate(applied), tuple(thresholds)
    )


# --------------------------------------------------------------------------- DET plot


def det_points(genuine: FloatArray, impostor: FloatArray) -> tuple[FloatArray, FloatArray]:
    """(FMR, FNMR) float64 arrays at threshold -inf and then at every observed distance.

    FMR rises from 0 and FNMR falls to 0 along the arrays.
    """
    thresholds = np.r_[-np.inf, np.unique(np.concatenate([genuine, impostor]))]
    fmr = np.searchsorted(np.sort(impostor), thresholds, side="right") / max(impostor.size, 1)
    fnmr = 1.0 - np.searchsorted(np.sort(genuine), thresholds, side="right") / max(genuine.size, 1)
    return np.asarray(fmr, dtype=np.float64), np.asarray(fnmr, dtype=np.float64)


def write_det_plot(curves: dict[str, Comparisons], path: Path, title: str) -> None:
    """Write a DET curve (normal-deviate axes) per labelled comparison set as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    normal = NormalDist()
    lo, hi = 1e-4, 0.5

    def deviate(rates: FloatArray) -> FloatArray:
        return np.array([normal.inv_cdf(float(r)) for r in np.clip(rates, lo, hi)])

    fig, ax = plt.subplots(figsize=(6, 6))
    try:
        for label, comp in curves.items():
            gen = comp.genuine
            fmr, fnmr = det_points(comp.distance[gen], comp.distance[~gen])
            ax.plot(
                deviate(fmr),
                deviate(fnmr),
                label=f"{label} ({int(gen.sum())} gen / {int((~gen).sum())} imp)",
            )
        ticks = [1e-4, 1e-3, 1e-2, 5e-2, 0.2, 0.5]
        ax.set_xticks(deviate(np.array(ticks)), [f"{t:g}" for t in ticks])
        ax.set_yticks(deviate(np.array(ticks)), [f"{t:g}" for t in ticks])
        limits = (normal.inv_cdf(lo), normal.inv_cdf(hi))
        ax.set_xlim(limits)
        ax.set_ylim(limits)
        ax.set_xlabel("false-match rate (FMR)")
        ax.set_ylabel("false-non-match rate (FNMR)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- scans


@dataclass(frozen=True, slots=True)
class DescriptorSet:
    """Descriptors of every usable photo of an identity-folder collection, for one pack.

    ``descriptors`` (N, D) float64: one per photo, the unit-length descriptor the service
    stores and matches. ``variants`` (N, A, D): A simulated extra frames per photo (see
    :class:`FrameSimulation`). ``landmarks`` (N, K, 2): the points that measured each
    face's pose, in ``layout``. ``image_identity`` (N,) indexes ``identities``;
    ``failures`` lists photos where no single usable face was found, each with the reason
    (they take no part in any comparison).
    """

    pack: str
    identities: tuple[str, ...]
    image_identity: IntArray
    paths: tuple[str, ...]
    descriptors: FloatArray
    variants: FloatArray
    failures: tuple[str, ...]
    landmarks: FloatArray = field(default_factory=lambda: np.zeros((0, 5, 2)))
    layout: str = LandmarkLayout.ARCFACE_5.value
    detector_points: FloatArray = field(default_factory=lambda: np.zeros((0, 5, 2)))
    """(N, 5, 2) the detector's own five points (ArcFace layout), NaN where it gives
    none (or (0, 5, 2): none for any photo): the profile gate reads their yaw
    (``facesvc.models.quality.profile_yaw``)."""

    def detector_points_or_nan(self) -> FloatArray:
        """(N, 5, 2) ``detector_points``, NaN for a set built without them."""
        if self.detector_points.size:
            return self.detector_points
        return np.full((len(self.paths), 5, 2), np.nan)

    def pose_refused(self, photo: int, frontal: FrontalGeometry, limits: QualitySettings) -> bool:
        """Whether the service's pose gates (``limits``) refuse photo ``photo``."""
        detector = self.detector_points[photo] if len(self.detector_points) else None
        pose = head_pose(
            self.landmarks[photo].astype(np.float32), LandmarkLayout(self.layout), frontal
        )
        seen = None if detector is None or np.isnan(detector).any() else detector.astype(np.float32)
        return bool(pose_issues(pose, profile_yaw(seen), limits))

    def save(self, path: Path) -> None:
        """Cache to an ``.npz`` file (no pickles)."""
        np.savez_compressed(
            path,
            pack=np.array(self.pack),
            identities=np.array(self.identities),
            image_identity=self.image_identity,
            paths=np.array(self.paths),
            descriptors=self.descriptors,
            variants=self.variants,
            failures=np.array(self.failures, dtype=str),
            landmarks=self.landmarks,
            layout=np.array(self.layout),
            detector_points=self.detector_points,
        )

    @staticmethod
    def load(path: Path) -> DescriptorSet:
        with np.load(path, allow_pickle=False) as z:
            return DescriptorSet(
                pack=str(z["pack"]),
                identities=tuple(str(x) for x in z["identities"]),
                image_identity=np.asarray(z["image_identity"], dtype=np.int64),
                paths=tuple(str(x) for x in z["paths"]),
                descriptors=np.asarray(z["descriptors"], dtype=np.float64),
                variants=np.asarray(z["variants"], dtype=np.float64),
                failures=tuple(str(x) for x in z["failures"]),
                landmarks=np.asarray(z["landmarks"], dtype=np.float64),
                layout=str(z["layout"]),
                detector_points=np.asarray(z["detector_points"], dtype=np.float64),
            )

    def photos_of(self, identity: int) -> IntArray:
        return np.flatnonzero(self.image_identity == identity)

    def single_photo_comparisons(
        self, distance: Distance, centre: FloatArray | None = None
    ) -> Comparisons:
        """Every unordered pair of photos, one descriptor each (cosine around ``centre``)."""
        d = pairwise_distances(self.descriptors, self.descriptors, distance, centre)
        return pairwise_comparisons(d, self.image_identity, self.identities)

    def centre_of(self, identities: IntArray) -> FloatArray:
        """(D,) mean unit descriptor of the photos of ``identities``: a cosine centre."""
        rows = self.descriptors[np.isin(self.image_identity, identities)]
        if rows.shape[0] == 0:
            raise ValueError("no photos to compute a centre from")
        return np.asarray(unit_rows(rows).mean(axis=0), dtype=np.float64)

    def keep(self, photos: BoolArray, why: str | None) -> DescriptorSet:
        """Only the photos where ``photos`` (N,) is true; the others become failures for
        ``why`` (None: they are left out, not failures). Identities (and their indices)
        stay as they are."""
        dropped = tuple(
            f"{p}: {why}"
            for p, k in zip(self.paths, photos, strict=True)
            if not k and why is not None
        )
        return replace(
            self,
            image_identity=self.image_identity[photos],
            paths=tuple(p for p, k in zip(self.paths, photos, strict=True) if k),
            descriptors=self.descriptors[photos],
            variants=self.variants[photos],
            landmarks=self.landmarks[photos],
            detector_points=self.detector_points[photos]
            if self.detector_points.size
            else self.detector_points,
            failures=self.failures + dropped,
        )

    def at_most(self, photos: int) -> DescriptorSet:
        """At most ``photos`` photos of each identity, spread evenly over its photos in
        folder order: a person filmed for a minute (hundreds of clip frames) then weighs
        in the pairs about as much as a person photographed a few times."""
        if photos < 1:
            raise ValueError(f"at least one photo per identity must be kept, got {photos}")
        keep = np.zeros(len(self.paths), dtype=bool)
        for identity in range(len(self.identities)):
            own = self.photos_of(identity)
            if own.size > photos:
                own = own[np.linspace(0, own.size - 1, photos).round().astype(np.int64)]
            keep[own] = True
        return self.keep(keep, None)

    @staticmethod
    def pooled(sets: Sequence[DescriptorSet]) -> DescriptorSet:
        """One set holding every photo of ``sets`` (one pack, one landmark layout), their
        identities listed one after the other; an identity name must not repeat."""
        if not sets:
            raise ValueError("nothing to pool")
        first = sets[0]
        if any(s.pack != first.pack or s.layout != first.layout for s in sets):
            raise ValueError("descriptor sets of different packs or layouts cannot be pooled")
        identities = tuple(i for s in sets for i in s.identities)
        if len(set(identities)) != len(identities):
            raise ValueError("the same identity folder name is in two collections")
        offsets = np.cumsum([0] + [len(s.identities) for s in sets[:-1]])
        return DescriptorSet(
            pack=first.pack,
            identities=identities,
            image_identity=np.concatenate(
                [s.image_identity + o for s, o in zip(sets, offsets, strict=True)]
            ).astype(np.int64),
            paths=tuple(p for s in sets for p in s.paths),
            descriptors=np.concatenate([s.descriptors for s in sets]),
            variants=np.concatenate([s.variants for s in sets]),
            failures=tuple(f for s in sets for f in s.failures),
            landmarks=np.concatenate([s.landmarks for s in sets]),
            layout=first.layout,
            detector_points=np.concatenate([s.detector_points_or_nan() for s in sets]),
        )

    def of_identities(self, names: Sequence[str]) -> DescriptorSet:
        """The photos (and failures) of the named identities only; the identity list is
        unchanged."""
        chosen = set(names)
        wanted = np.array([i in chosen for i in self.identities], dtype=bool)
        part = self.keep(wanted[self.image_identity], None)
        failures = tuple(f for f in self.failures if Path(f.split(": ")[0]).parent.name in chosen)
        return replace(part, failures=failures)

    def frontal_pose(self) -> tuple[FrontalGeometry, int]:
        """The pack's frontal geometry measured on these photos (the median nose drop) and
        the number of faces it rests on: calibration photos are portraits, looking at the
        camera."""
        layout = LandmarkLayout(self.layout)
        if len(self.paths) == 0:
            raise ValueError("no faces to measure the frontal geometry on")
        drops = [nose_drop(points, layout) for points in self.landmarks.astype(np.float32)]
        return FrontalGeometry(layout, float(np.median(drops))), len(drops)

    def posed(self, frontal: FrontalGeometry, limits: QualitySettings) -> DescriptorSet:
        """The photos whose head pose passes the quality gates (``limits``) measured against
        ``frontal``: the ones the service would accept."""
        ok = [not self.pose_refused(k, frontal, limits) for k in range(len(self.paths))]
        return self.keep(np.array(ok, dtype=bool), "head pose outside the quality gates")


@dataclass(frozen=True, slots=True)
class ScanProtocol:
    """How enrolments and multi-frame scans are drawn from identity folders.

    An identity with n photos gives n enrolments: photos s..s+K-1 (cyclically) form
    the template and the other m = n - K photos are held out. A genuine scan takes
    the held-out photos in cyclic order from each of them in turn; an impostor scan
    of another identity takes min(m, n_j) of that identity's photos the same way,
    so impostor scans never hold more distinct photos than genuine ones. Frame t
    of a scan over photos P is photo P[t] while t < len(P), then simulated variants
    of P[t mod len(P)]. Only identities with at least ``min_photos`` photos take
    part (claimed or probed), so rows with different K compare the same people.
    """

    enroll: int
    frames: int
    min_photos: int

    def __post_init__(self) -> None:
        if self.enroll < 1 or self.frames < 1 or self.min_photos < self.enroll + 1:
            raise ValueError("need enroll >= 1, frames >= 1 and min_photos >= enroll + 1")


def scan_comparisons(
    ds: DescriptorSet,
    protocol: ScanProtocol,
    rules: MatchRules,
    centre: FloatArray | None = None,
) -> Comparisons:
    """Every enrolment against every scan of :class:`ScanProtocol`, fused by ``rules``
    (cosine around ``centre`` (D,) when given).

    Comparisons are ordered (claimed, probe): with K = F = 1 each photo pair appears
    once in each direction, which leaves rates unchanged but doubles the counts;
    the reports say "comparisons" for these and "pairs" for unordered ones.
    """
    photos = {i: ds.photos_of(i) for i in range(len(ds.identities))}
    eligible = [i for i, p in photos.items() if p.size >= protocol.min_photos]

    def frames_of(p: IntArray) -> FloatArray:
        rows = []
        for t in range(protocol.frames):
            photo = int(p[t % p.size])
            round_ = t // p.size
            if round_ == 0:
                rows.append(ds.descriptors[photo])
            elif round_ - 1 < ds.variants.shape[1]:
                rows.append(ds.variants[photo, round_ - 1])
            else:
                raise ValueError(
                    f"{protocol.frames} frames over {p.size} photos need "
                    f"{round_} variants per photo; only {ds.variants.shape[1]} were simulated"
                )
        return np.stack(rows)

    distance: list[float] = []
    claimed: list[int] = []
    probe: list[int] = []
    for i in eligible:
        own = photos[i]
        n = own.size
        m = n - protocol.enroll
        for s in range(n):
            window = np.roll(own, -s)
            template = ds.descriptors[window[: protocol.enroll]]
            held_out = window[protocol.enroll :]
            for h in range(m):
                distance.append(
                    match(template, frames_of(np.roll(held_out, -h)), rules, centre).distance
                )
                claimed.append(i)
                probe.append(i)
            for j in eligible:
                if j == i:
                    continue
                theirs = photos[j]
                for h in range(theirs.size):
                    scan = np.roll(theirs, -h)[: min(m, theirs.size)]
                    distance.append(match(template, frames_of(scan), rules, centre).distance)
                    claimed.append(i)
                    probe.append(j)
    return Comparisons(
        np.array(distance, dtype=np.float64),
        np.array(claimed, dtype=np.int64),
        np.array(probe, dtype=np.int64),
        ds.identities,
    )


# --------------------------------------------------------------------------- reports


@dataclass(frozen=True, slots=True)
class Lever:
    """One way of comparing: single photo pairs (``protocol`` None) or enrolments vs scans.

    ``centred``: cosine around the mean unit descriptor of the calibration identities'
    photos. ``per_source``: one threshold per source (per-population calibration).
    """

    label: str
    rules: MatchRules
    protocol: ScanProtocol | None = None
    centred: bool = False
    per_source: bool = False

    def comparisons(self, ds: DescriptorSet, centre: FloatArray | None) -> Comparisons:
        if self.protocol is None:
            return ds.single_photo_comparisons(self.rules.distance, centre)
        return scan_comparisons(ds, self.protocol, self.rules, centre)


@dataclass(frozen=True, slots=True)
class LeverResult:
    """A lever's figures on the pooled report-fold comparisons, overall (key ``"all"``)
    and per source: threshold-free summaries, and operating points at the thresholds
    calibrated on the other folds, counting a source's impostors two ways: ``within``
    (both people from the source: impostors who look like the deployment's people) and
    ``claimed`` (any impostor against the source's enrolled people)."""

    lever: Lever
    summaries: dict[str, Summary]
    within: dict[str, OperatingPoint]
    claimed: dict[str, OperatingPoint]
    validated: CrossValidated

    def worst_source_ratio(self, by_claimed: bool = False) -> float:
        """The highest source FMR at the operating thresholds over the overall FMR."""
        table = self.claimed if by_claimed else self.within
        overall = table["all"].fmr
        ratios = [
            op.fmr / overall if overall > 0 else (math.inf if op.fmr > 0 else 0.0)
            for key, op in table.items()
            if key != "all" and op.impostor_count
        ]
        return max(ratios, default=math.nan)


def evaluate_lever(
    ds: DescriptorSet,
    lever: Lever,
    folds: Sequence[IntArray],
    target_fmr: float,
    bootstrap_rounds: int,
    seed: int = 0,
) -> LeverResult:
    """Cross-validate ``lever`` over identity ``folds`` and summarise the report comparisons."""
    fixed = None if lever.centred else lever.comparisons(ds, None)

    def comparisons_for(calibration: IntArray) -> Comparisons:
        if fixed is not None:
            return fixed
        return lever.comparisons(ds, ds.centre_of(calibration))

    cv = cross_validate(comparisons_for, len(ds.identities), folds, target_fmr, lever.per_source)
    summaries = {"all": summarize(cv.report, bootstrap_rounds=bootstrap_rounds, seed=seed)}
    within = {"all": cv.operating()}
    claimed = {"all": within["all"]}
    for source in sorted(set(cv.report.sources)):
        both, claims = cv.source_masks(source)
        summaries[source] = summarize(
            cv.report.of_source(source), bootstrap_rounds=bootstrap_rounds, seed=seed
        )
        within[source] = cv.operating(both)
        claimed[source] = cv.operating(claims)
    return LeverResult(lever, summaries, within, claimed, cv)


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.2f}%"


def source_table(result: LeverResult) -> str:
    """A markdown table of one lever: a row per source and one for all comparisons."""
    head = (
        "| source | identities | genuine | impostor | ROC AUC | EER | FNMR @ FMR 1e-2 "
        "| FNMR @ FMR 1e-3 | FMR at threshold (same-source impostors) "
        "| FMR at threshold (any impostor vs. this source) | FNMR at threshold |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for key in [*sorted(k for k in result.summaries if k != "all"), "all"]:
        s = result.summaries[key]
        op = result.within[key]
        cl = result.claimed[key]
        fnmr = []
        for f in s.fnmr_at:
            text = f.fnmr.format()
            fnmr.append(
                text if f.resolvable else f"{text} (unresolved: <{1 / f.target_fmr:.0f} imp.)"
            )
        rows.append(
            f"| {'**all**' if key == 'all' else key} | {s.identity_count} | {s.genuine_count} "
            f"| {s.impostor_count} | {s.auc.format(percent=False)} | {s.eer.format()} "
            f"| {fnmr[0]} | {fnmr[1]} "
            f"| {_pct(op.fmr)} ({op.false_matches}/{op.impostor_count}) "
            f"| {_pct(cl.fmr)} ({cl.false_matches}/{cl.impostor_count}) "
            f"| {_pct(op.fnmr)} ({op.false_non_matches}/{op.genuine_count}) |"
        )
    return head + "\n".join(rows) + "\n"


def lever_table(results: Sequence[LeverResult]) -> str:
    """A markdown table comparing levers on all comparisons."""
    head = (
        "| lever | genuine | impostor | EER | FNMR @ FMR 1e-2 | FNMR @ FMR 1e-3 "
        "| FMR / FNMR at calibrated threshold | worst source FMR / overall: "
        "same-source, any impostor |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in results:
        s, op = r.summaries["all"], r.within["all"]
        rows.append(
            f"| {r.lever.label} | {s.genuine_count} | {s.impostor_count} | {s.eer.format()} "
            f"| {s.fnmr_at[0].fnmr.format()} | {s.fnmr_at[1].fnmr.format()} "
            f"| {_pct(op.fmr)} ({op.false_matches}/{op.impostor_count}) / "
            f"{_pct(op.fnmr)} ({op.false_non_matches}/{op.genuine_count}) "
            f"| {r.worst_source_ratio():.1f}x, {r.worst_source_ratio(by_claimed=True):.1f}x |"
        )
    return head + "\n".join(rows) + "\n"


# --------------------------------------------------------------------------- describing photos


@dataclass(frozen=True, slots=True)
class FrameSimulation:
    """How simulated extra frames of a photo are made (faces/ has no real multi-frame scans).

    A variant re-aligns the photo from landmarks moved by a random similarity (rotation
    ``rotation`` rad, scale ``scale``, shift ``shift`` of the landmark spread, all standard
    deviations) as detector and landmark jitter and small head motion would, and changes
    exposure by a gain drawn from ``gain`` plus Gaussian sensor noise of ``noise`` grey
    levels. It cannot simulate pose, expression or lighting changes between frames, so
    fusion gains measured with it are those of averaging out jitter and noise, not of
    seeing the face anew.
    """

    variants: int = 2
    rotation: float = 0.05
    scale: float = 0.03
    shift: float = 0.03
    gain: tuple[float, float] = (0.7, 1.2)
    noise: float = 4.0
    seed: int = 0

    def perturb(
        self, image: RGBImage, landmarks: Points, rng: np.random.Generator
    ) -> tuple[RGBImage, Points]:
        """One simulated frame: (image (H, W, 3) uint8, landmarks (K, 2) float32)."""
        centre = landmarks.mean(axis=0)
        spread = float(np.sqrt(((landmarks - centre) ** 2).sum(axis=1).mean()))
        angle = rng.normal(0.0, self.rotation)
        scale = 1.0 + rng.normal(0.0, self.scale)
        c, s = math.cos(angle), math.sin(angle)
        rot = scale * np.array([[c, -s], [s, c]])
        moved = (landmarks - centre) @ rot.T + centre + rng.normal(0.0, self.shift * spread, 2)
        lit = image.astype(np.float32) * rng.uniform(*self.gain)
        lit += rng.normal(0.0, self.noise, image.shape).astype(np.float32)
        return np.clip(lit, 0, 255).astype(np.uint8), moved.astype(np.float32)


def open_pose(limits: QualitySettings) -> QualitySettings:
    """``limits`` with every pose gate (yaw, profile, pitch) open: a collection is described
    with its pose measured but not gated, because the gate's frontal geometry is itself
    calibrated on it; :meth:`DescriptorSet.posed` applies the gates afterwards."""
    return replace(
        limits, max_abs_yaw_deg=180.0, max_profile_yaw_deg=180.0, max_abs_pitch_deg=180.0
    )


def describe_photos(
    images: Sequence[LabelledImage],
    read_image: Callable[[Path], RGBImage],
    pipeline: FacePipeline,
    *,
    pack: str,
    simulation: FrameSimulation,
) -> DescriptorSet:
    """Descriptors of every photo (and its simulated frames), made as the service makes
    them: ``pipeline`` is the service's FacePipeline for the pack (detection, choice of
    the one face, landmarks, alignment, quality gates) and its ``embed``.

    Photos the pipeline does not accept (no face, several faces, a failed quality check)
    are listed in ``failures`` with the reason and take part in no comparison. Build the
    pipeline with :func:`open_pose` limits to gate the pose later (``posed``).
    """
    identities = tuple(sorted({i.identity for i in images}))
    rng = np.random.default_rng(simulation.seed)
    rows: list[FloatArray] = []
    variant_rows: list[FloatArray] = []
    points_rows: list[FloatArray] = []
    detector_rows: list[FloatArray] = []
    kept: list[LabelledImage] = []
    failures: list[str] = []
    for item in images:
        image = read_image(item.path)
        analysis = pipeline.analyze(image)
        if analysis.status is not FaceStatus.OK:
            failures.append(f"{item.path}: {analysis.status.value}: {analysis.reason}")
            continue
        assert analysis.detection is not None and analysis.landmarks is not None
        assert analysis.chip is not None
        align = analysis.detection.landmarks
        align = analysis.landmarks if align is None else align
        chips = [analysis.chip]
        for _ in range(simulation.variants):
            chips.append(pipeline.align(*simulation.perturb(image, align, rng)))
        out = np.asarray(pipeline.embed(chips), dtype=np.float64)
        rows.append(out[0])
        variant_rows.append(out[1:])
        points_rows.append(np.asarray(analysis.landmarks, dtype=np.float64))
        seen = analysis.detection.landmarks
        detector_rows.append(
            np.full((5, 2), np.nan) if seen is None or len(seen) != 5 else seen.astype(np.float64)
        )
        kept.append(item)
    dim = pipeline.dim
    points = len(points_rows[0]) if points_rows else 5
    return DescriptorSet(
        pack=pack,
        identities=identities,
        image_identity=np.array([identities.index(i.identity) for i in kept], dtype=np.int64),
        paths=tuple(str(i.path) for i in kept),
        descriptors=np.stack(rows) if rows else np.empty((0, dim)),
        variants=np.stack(variant_rows) if rows else np.empty((0, simulation.variants, dim)),
        failures=tuple(failures),
        landmarks=np.stack(points_rows) if rows else np.empty((0, points, 2)),
        layout=pipeline.layout.value,
        detector_points=np.stack(detector_rows) if rows else np.empty((0, 5, 2)),
    )


# --------------------------------------------------------------------------- turned faces


FRONTAL_MAX_DEG = 15.0
"""A face whose measured yaw and pitch are both within this many degrees is frontal."""
TURNED_MIN_DEG = 20.0
"""A face whose yaw or pitch reaches this many degrees is turned (the liveness challenge's
turns measure 24 degrees and more, its look-ups rather less in pitch)."""
TURNED_MAX_YAW_DEG = 70.0
"""Beyond this the head is in profile: no challenge asks for it."""


def pose_classes(ds: DescriptorSet, frontal: FrontalGeometry) -> tuple[BoolArray, BoolArray]:
    """(frontal, turned) masks (N,) over ``ds``'s photos by their measured head pose."""
    layout = LandmarkLayout(ds.layout)
    front, turned = [], []
    for points in ds.landmarks.astype(np.float32):
        pose = head_pose(points, layout, frontal)
        yaw, pitch = abs(pose.yaw), abs(pose.pitch)
        front.append(yaw <= FRONTAL_MAX_DEG and pitch <= FRONTAL_MAX_DEG)
        turned.append(max(yaw, pitch) >= TURNED_MIN_DEG and yaw <= TURNED_MAX_YAW_DEG)
    return np.array(front, dtype=bool), np.array(turned, dtype=bool)


def turned_comparisons(
    turned_set: DescriptorSet,
    frontal: FrontalGeometry,
    others: DescriptorSet,
    distance: Distance,
    centre: FloatArray | None,
) -> Comparisons:
    """Every turned face of ``turned_set`` against every frontal face: of the same person
    (genuine) and of everyone else there and in ``others`` (frontal photos of other people,
    e.g. a calibration collection: impostors). ``claimed`` is the frontal face's identity,
    ``probe`` the turned face's; ``identities`` lists ``turned_set``'s then ``others``'."""
    front, turned = pose_classes(turned_set, frontal)
    if not turned.any() or not front.any():
        raise ValueError(
            f"{turned_set.pack}: need frontal and turned faces (found {int(front.sum())} "
            f"frontal, {int(turned.sum())} turned)"
        )
    identities = turned_set.identities + others.identities
    offset = len(turned_set.identities)
    frontal_desc = np.concatenate([turned_set.descriptors[front], others.descriptors])
    frontal_ids = np.concatenate([turned_set.image_identity[front], others.image_identity + offset])
    probe_desc = turned_set.descriptors[turned]
    probe_ids = turned_set.image_identity[turned]
    d = pairwise_distances(frontal_desc, probe_desc, distance, centre)
    claimed = np.repeat(frontal_ids, probe_ids.size)
    probe = np.tile(probe_ids, frontal_ids.size)
    return Comparisons(d.reshape(-1).astype(np.float64), claimed, probe, identities)
