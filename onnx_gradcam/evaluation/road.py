"""ROAD (Rong et al., ICML 2022): remove the most or least relevant pixels by noisy linear imputation
and measure the score's change, in pytorch-grad-cam's normalised space or the original pixel space."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

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


def _sparse():  # -> (scipy.sparse, scipy.sparse.linalg)
    try:
        import scipy.sparse
        import scipy.sparse.linalg
    except ImportError as exc:  # pragma: no cover - scipy comes with the evaluate extra
        raise OnnxGradCamError(
            f"ROAD's imputation needs scipy ({exc}): to fix this, pip install 'onnx-gradcam[evaluate]'"
        ) from None
    return scipy.sparse, scipy.sparse.linalg


def impute(
    values: np.ndarray,
    keep: np.ndarray,
    noise: float = 0.01,
    rng: np.random.Generator | None = None,
    fill: np.ndarray | float = 0.0,
) -> np.ndarray:
    """Noisy linear imputation of one image: values [C, H, W], keep [H, W] bool (False = removed).

    Each removed pixel becomes the weighted mean of its in-image 8 neighbours (weights 1/6 edge,
    1/12 corner): for removed i, sum_j w_ij (x_i - x_j) = 0 with known x_j fixed, one sparse
    symmetric system shared by the channels, solved exactly (as pytorch-grad-cam's spsolve); then
    noise * N(0, 1) is added to the removed pixels. values is not modified.

    Where every pixel is removed the system has no known value (pytorch-grad-cam's spsolve returns
    NaN there): the pixels become `fill` (per channel) plus the noise.
    """
    sparse, linalg = _sparse()
    c, h, w = values.shape
    out = np.array(values, np.float32, copy=True)
    miss = ~np.asarray(keep, bool)
    n = int(miss.sum())
    rng = rng if rng is not None else np.random.default_rng()
    if n == 0:
        return out
    if n == h * w:
        out[:] = np.broadcast_to(np.asarray(fill, np.float32).reshape(-1, 1, 1), out.shape)
        return (out + noise * rng.standard_normal(out.shape)).astype(np.float32) if noise else out
    vidx = np.full((h, w), -1, np.int64)
    vidx[miss] = np.arange(n)
    my, mx = np.nonzero(miss)
    img = np.asarray(values, np.float64)
    diag = np.zeros(n)
    rhs = np.zeros((n, c))
    rows, cols, vals = [], [], []
    for (dy, dx), wt in NEIGHBOURS:
        y, x = my + dy, mx + dx
        inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
        eq, y, x = np.nonzero(inside)[0], y[inside], x[inside]
        diag[eq] += wt
        known = ~miss[y, x]
        rhs[eq[known]] += wt * img[:, y[known], x[known]].T
        rows.append(eq[~known])
        cols.append(vidx[y[~known], x[~known]])
        vals.append(np.full(int((~known).sum()), -wt))
    rows.append(np.arange(n))
    cols.append(np.arange(n))
    vals.append(diag)
    a = sparse.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    solved = linalg.splu(a, permc_spec="MMD_AT_PLUS_A", options={"SymmetricMode": True}).solve(rhs)
    if noise:
        solved = solved + noise * rng.standard_normal(solved.shape)
    out[:, miss] = solved.T.astype(np.float32)
    return out


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

    def batches(morf: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for p in ps:
            keeps = [road_keep(m[i], p, morf) for i in range(n)]
            emptied["morf" if morf else "lerf"] += sum(not k.any() for k in keeps)
            imputed = np.stack([impute(space[i], keeps[i], noise, rng, fill) for i in range(n)])
            yield np.arange(n), imputed if mode == "normalised" else ctx.normalise(imputed)

    y = clean_scores(ctx, score)
    after = {k: scores_of(ctx, batches(k == "morf"), score).reshape(len(ps), n).T for k in ("morf", "lerf")}
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
        "imputation": "noisy linear, 8 neighbours (1/6 edge, 1/12 corner), exact sparse solve (scipy splu)",
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
