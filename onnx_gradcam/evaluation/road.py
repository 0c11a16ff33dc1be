"""ROAD (Rong et al., ICML 2022): remove the most or least relevant pixels by noisy linear imputation
and measure the score's change, in pytorch-grad-cam's normalised space or the original pixel space."""

from __future__ import annotations

import collections
import functools
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import BadInputError, OnnxGradCamError
from .base import EvalContext, MetricResult
from .faithfulness import check_maps, check_score, clean_scores, scores_of

PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
MODES = ("normalised", "original")

# The 8 neighbours (dy, dx) and their weights in the imputation (road_evaluation's imputations.py).
NEIGHBOURS = (
    ((1, 1), 1 / 12),
    ((0, 1), 1 / 6),
    ((-1, 1), 1 / 12),
    ((1, -1), 1 / 12),
    ((0, -1), 1 / 6),
    ((-1, -1), 1 / 12),
    ((1, 0), 1 / 6),
    ((-1, 0), 1 / 6),
)


def _sparse():  # -> (scipy.sparse, qdldl)
    try:
        import qdldl
        import scipy.sparse
    except ImportError as exc:  # pragma: no cover - both come with the evaluate extra
        raise OnnxGradCamError(
            f"ROAD's imputation needs scipy and qdldl ({exc}): to fix this, pip install 'onnx-gradcam[evaluate]'"
        ) from None
    return scipy.sparse, qdldl


@functools.cache
def _grid(h: int, w: int):  # -> (off-diagonal weights [HW, HW] CSR, in-image weight sums [HW])
    """The imputation's operator on the whole h x w grid, built once per size: W[i, j] = w_ij for
    every in-image neighbour j of pixel i; a mask's system is then two slices of it."""
    sparse, _ = _sparse()
    y, x = np.mgrid[0:h, 0:w]
    y, x = y.reshape(-1), x.reshape(-1)
    rows, cols, vals = [], [], []
    for (dy, dx), wt in NEIGHBOURS:
        ny, nx = y + dy, x + dx
        inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        rows.append((y * w + x)[inside])
        cols.append((ny * w + nx)[inside])
        vals.append(np.full(int(inside.sum()), wt))
    weights = sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(h * w,) * 2
    )
    return weights, np.asarray(weights.sum(axis=1)).reshape(-1)


def solve_removed(values: np.ndarray, keep: np.ndarray) -> np.ndarray | None:
    """The noiseless imputation of the removed pixels: [C, n] for the n pixels where keep is False
    (in row-major order), or None where every pixel is removed (the system has no known value).

    For removed i: sum_j w_ij (x_i - x_j) = 0 over its in-image neighbours j, the known x_j fixed;
    one sparse symmetric positive definite system shared by the channels, solved exactly by one
    LDL^T factorisation (qdldl, AMD ordering; no pivoting is needed: A is positive definite, as
    each connected removed region borders a known pixel). 1.6x faster than scipy's SuperLU in
    symmetric mode on these systems, and it holds no Python lock, so several run at once in threads.
    """
    sparse, qdldl = _sparse()
    c, h, w = values.shape
    miss = ~np.asarray(keep, bool).reshape(-1)
    removed = np.flatnonzero(miss)
    if len(removed) == h * w:
        return None
    weights, total = _grid(h, w)
    rows = weights[removed]  # the removed pixels' equations, over all pixels
    known = np.asarray(values, np.float64).reshape(c, -1).T * ~miss[:, None]
    rhs = rows @ known  # the known neighbours' weighted values
    upper = sparse.triu(sparse.diags(total[removed]) - rows[:, removed], format="csc")
    factors = qdldl.Solver(upper, upper=True)
    return np.stack([factors.solve(np.ascontiguousarray(rhs[:, k])) for k in range(c)])


def with_noise(
    values: np.ndarray,
    keep: np.ndarray,
    solved: np.ndarray | None,
    noise: float,
    rng: np.random.Generator,
    fill: np.ndarray | float = 0.0,
) -> np.ndarray:
    """The imputed image [C, H, W] float32: values with the removed pixels set to `solved` (or to
    `fill` per channel where `solved` is None, every pixel removed) plus noise * N(0, 1) there."""
    out = np.array(values, np.float32, copy=True)
    miss = ~np.asarray(keep, bool)
    if not miss.any():
        return out
    if solved is None:
        out[:] = np.broadcast_to(np.asarray(fill, np.float32).reshape(-1, 1, 1), out.shape)
        return (out + noise * rng.standard_normal(out.shape)).astype(np.float32) if noise else out
    if noise:
        solved = solved + noise * rng.standard_normal(solved.T.shape).T
    out[:, miss] = solved.astype(np.float32)
    return out


def impute(
    values: np.ndarray,
    keep: np.ndarray,
    noise: float = 0.01,
    rng: np.random.Generator | None = None,
    fill: np.ndarray | float = 0.0,
) -> np.ndarray:
    """Noisy linear imputation of one image: values [C, H, W], keep [H, W] bool (False = removed).

    Each removed pixel becomes the weighted mean of its in-image 8 neighbours (weights 1/6 edge,
    1/12 corner), solved exactly (`solve_removed`, as pytorch-grad-cam's spsolve); then
    noise * N(0, 1) is added to the removed pixels. values is not modified.

    Where every pixel is removed the system has no known value (pytorch-grad-cam's spsolve returns
    NaN there): the pixels become `fill` (per channel) plus the noise.
    """
    rng = rng if rng is not None else np.random.default_rng()
    solved = solve_removed(values, keep) if not np.all(keep) else None
    return with_noise(values, keep, solved, noise, rng, fill)


def imputed_stream(
    jobs: Iterable[tuple[np.ndarray, np.ndarray]],
    noise: float,
    rng: np.random.Generator,
    fill: np.ndarray | float = 0.0,
    workers: int | None = None,
    ahead: int = 64,
) -> Iterator[np.ndarray]:
    """impute() of each (values, keep) in order, the exact solves running `workers` at a time in
    threads (default: one per core) and up to `ahead` jobs in advance, so that they overlap each
    other and the caller's inference. The noise is drawn here, in job order: the result is the
    same as calling impute() on each job in turn with `rng`."""
    workers = workers or os.cpu_count() or 1
    pending: collections.deque = collections.deque()
    source = iter(jobs)
    with ThreadPoolExecutor(workers, thread_name_prefix="road-impute") as pool:

        def submit() -> bool:
            job = next(source, None)
            if job is None:
                return False
            values, keep = job
            pending.append((values, keep, pool.submit(solve_removed, values, keep) if not np.all(keep) else None))
            return True

        try:
            while len(pending) < ahead and submit():
                pass
            while pending:
                values, keep, future = pending.popleft()
                submit()
                yield with_noise(values, keep, future.result() if future is not None else None, noise, rng, fill)
        finally:  # stopped early (an error while scoring): drop the solves not started
            for _, _, future in pending:
                if future is not None:
                    future.cancel()


def road_keep(m: np.ndarray, percentile: float, morf: bool) -> np.ndarray:
    """pytorch-grad-cam's masks: MoRF keeps pixels with map < the map's `percentile`-th percentile,
    LeRF keeps those with 1 - map below the percentile of 1 - map (float32, as it compares)."""
    v = m if morf else (np.float32(1) - m).astype(np.float32)
    return v < np.float32(np.percentile(v, percentile))


def road(
    ctx: EvalContext,
    maps: np.ndarray,
    mode: str = "normalised",
    percentiles: Sequence[float] = PERCENTILES,
    noise: float = 0.01,
    seed: int | None = 0,
    score: str = "probability",
) -> list[MetricResult]:
    """ROAD MoRF, LeRF and their combination (LeRF - MoRF) / 2, averaged over percentiles.

    For each percentile p, MoRF removes the pixels whose map value is at or above the map's p-th
    percentile, LeRF those at or below its (100 - p)-th (pytorch-grad-cam's masks), imputes them
    (noisy linear imputation, noise `noise` in the imputed space) and scores the clean top-1 class.
    mode "normalised" imputes the normalised input (pytorch-grad-cam 1.5.7); "original" imputes the
    [0, 1] pixels and then normalises (Rong et al.'s road_evaluation). Per image: mean over
    percentiles of score(imputed) - score(clean). curves: "morf", "lerf" [N, P] the scores after
    removal, "x" [P] the percentiles.
    """
    if mode not in MODES:
        raise BadInputError(f"unknown ROAD mode {mode!r}: to fix this, use one of {', '.join(MODES)}")
    m = check_maps(ctx, maps)
    check_score(score)
    ps = [float(p) for p in percentiles]
    if not ps or any(not 0 < p < 100 for p in ps):
        raise BadInputError(f"ROAD percentiles {list(percentiles)} must lie in (0, 100): to fix this, give e.g. 10..90")
    if noise < 0:
        raise BadInputError(f"ROAD noise {noise} is negative: to fix this, give 0 or more (default 0.01)")
    rng = np.random.default_rng(seed)
    space = ctx.x if mode == "normalised" else ctx.pixels
    n = len(m)

    fill = np.zeros(len(space[0])) if mode == "normalised" else ctx.mean.reshape(-1)  # normalises to 0
    if mode == "original" and ctx.bgr:
        fill = fill[::-1]
    emptied = {"morf": 0, "lerf": 0}

    orders = (("morf", True), ("lerf", False))
    keeps = {(k, p): [road_keep(m[i], p, morf) for i in range(n)] for k, morf in orders for p in ps}
    for (k, _), masks in keeps.items():
        emptied[k] += sum(not mask.any() for mask in masks)
    # one stream over both orders and every percentile, in the order the noise is drawn: the solves
    # run in threads ahead of the batches being scored
    imputed = imputed_stream(
        ((space[i], mask) for masks in keeps.values() for i, mask in enumerate(masks)), noise, rng, fill
    )

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for _ in keeps:
            group = np.stack([next(imputed) for _ in range(n)])
            yield np.arange(n), group if mode == "normalised" else ctx.normalise(group)

    y = clean_scores(ctx, score)
    scored = scores_of(ctx, batches(), score).reshape(len(orders), len(ps), n)
    after = {k: scored[j].T for j, (k, _) in enumerate(orders)}
    morf = (after["morf"] - y[:, None]).mean(axis=1)
    lerf = (after["lerf"] - y[:, None]).mean(axis=1)
    suffix = "" if mode == "normalised" else "_original"
    settings = {
        "score": score,
        "class": "top-1 on the clean image",
        "mode": mode,
        "space": "normalised input" if mode == "normalised" else "[0, 1] pixels, normalised after imputation",
        "percentiles": ps,
        "masks": "MoRF removes map >= its p-th percentile, LeRF removes 1 - map >= its p-th percentile",
        "imputation": "noisy linear, 8 neighbours (1/6 edge, 1/12 corner), exact sparse solve (LDL^T, qdldl)",
        "modes_differ_by": "the noise's scale only: the noiseless imputation commutes with the per-channel "
        "normalisation (weights sum to 1)",
        "noise": noise,
        "seed": seed,
        "all_removed": "where a mask removes every pixel (many map values tied at the percentile), the image "
        "becomes 0 in normalised space plus the noise (pytorch-grad-cam: NaN)",
        "all_removed_count": emptied,
        "per_image": "mean over percentiles of score(imputed) - score(clean)",
        "reference": "Rong et al., ICML 2022; pytorch-grad-cam 1.5.7 metrics/road.py"
        + (" (its mode)" if mode == "normalised" else "; road_evaluation (imputes before normalising)"),
    }
    x_axis = np.asarray(ps)
    curves = {"morf": after["morf"], "lerf": after["lerf"], "x": x_axis}
    return [
        MetricResult(
            "road_morf" + suffix, float(morf.mean()), morf, dict(settings), {"morf": after["morf"], "x": x_axis}
        ),
        MetricResult(
            "road_lerf" + suffix, float(lerf.mean()), lerf, dict(settings), {"lerf": after["lerf"], "x": x_axis}
        ),
        MetricResult(
            "road_combined" + suffix,
            float(((lerf - morf) / 2).mean()),
            (lerf - morf) / 2,
            {**settings, "combined": "(LeRF - MoRF) / 2"},
            curves,
        ),
    ]
