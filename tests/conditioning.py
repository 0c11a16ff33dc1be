"""Conditioning checks for exactness tests (issue 16): a reference is worth comparing against only
where torch float32 agrees with float64 on it, and where a 1e-6 nudge of the input keeps the verdict.

A case that fails sits on a rounding knife-edge (a ReLU input within float32 rounding of zero, a
sum that cancels), where another CPU's summation order flips the verdict: condition it, don't
excuse it. Each check's margin is recorded and summarised per test file at the end of the run
(tests/conftest.py), so a note can give the largest float32-vs-float64 ratio.

Usage: a test runs the prepared model on `with_nudged(x)` (x, then x nudged by a relative 1e-6,
as float32), compares every sample with `well_conditioned(reference, that batch, tol, label)`,
and so asserts the same verdict for the nudged input.

Where a random input puts a ReLU input of a deep head within float32 rounding of zero on this CPU
(measured: 2 of the 28 torchvision cases on an AVX-512 CPU, none on an AVX2 one), a test may try
the next input of a fixed list (`conditioned_input`): the verdict is then given at an input whose
reference is well-conditioned here, and the case never passes for want of one.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from .conftest import rel_err

PERTURBATION = 1e-6  # relative nudge of the input
SHARE = 0.1  # float32 must agree with float64 within this share of the tolerance
DERIVED = 10.0  # a derived tolerance: this multiple of the reference's own float32 error

# (test file, label, largest float32-vs-float64 error / tolerance; for a derived one: its tolerance)
MARGINS: list[tuple[str, str, float]] = []

Reference = Callable[[np.ndarray, str], dict[str, np.ndarray]]


def per_sample_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """The largest per-sample rel_err (each sample against its own magnitude), batch axis first."""
    return max((rel_err(actual[i], expected[i]) for i in range(len(expected))), default=0.0)


def with_nudged(x: np.ndarray, seed: int = 1234) -> np.ndarray:
    """[x; x * (1 + 1e-6 u)] as float32, u uniform in [-1, 1]: the batch an exactness test runs."""
    u = np.random.RandomState(seed).uniform(-1.0, 1.0, x.shape)
    return np.concatenate([x, x * (1.0 + PERTURBATION * u)]).astype(np.float32)


def _record(label: str, ratio: float) -> None:
    test_file = os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[0]
    MARGINS.append((test_file, label, ratio))


def _both(reference: Reference, x: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    return reference(np.asarray(x, np.float64), "float64"), reference(np.asarray(x, np.float32), "float32")


class IllConditioned(AssertionError):
    """torch float32 and float64 disagree on a reference: no verdict can be given at this input."""


def conditioned_input(
    candidates: int, check: Callable[[int], dict[str, np.ndarray]], label: str
) -> tuple[int, dict[str, np.ndarray]]:
    """(seed, the check's result) for the first seed in range(candidates) whose check (a call of
    well_conditioned on the input made from that seed) passes; the last IllConditioned otherwise."""
    for seed in range(candidates):
        try:
            return seed, check(seed)
        except IllConditioned:
            if seed == candidates - 1:
                raise
            print(f"{label}: input {seed} ill-conditioned on this CPU, trying input {seed + 1}")
    raise AssertionError("no candidates")


def well_conditioned(
    reference: Reference, x: np.ndarray, tol: float, label: str, tols: dict[str, float] | None = None
) -> dict[str, np.ndarray]:
    """The float64 reference at x, after checking that float32 agrees with it per sample within
    SHARE * tol for every name `reference(x, dtype)` returns (`tols` overrides tol per name)."""
    exact, single = _both(reference, x)
    worst = 0.0
    for name, ref in exact.items():
        t = (tols or {}).get(name, tol)
        e32 = per_sample_error(single[name], ref)
        if e32 > SHARE * t:
            raise IllConditioned(
                f"{label}: {name} is ill-conditioned: torch float32 differs from float64 by {e32:.2e}, more than "
                f"{SHARE:g} of the tolerance {t:g}; condition the model (tools/export_torchvision.py: condition)"
            )
        worst = max(worst, e32 / t)
    _record(label, worst)
    return exact


def derived_tolerances(
    reference: Reference, x: np.ndarray, tol: float, label: str
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """(float64 reference, tolerance per name) for a comparison that conditioning cannot fix.

    A random net's forward pass amplifies float32 rounding by its depth (the model's property; the
    prepared model's own outputs are those of the untouched original graph): the tolerance is then
    DERIVED times torch's own float32-vs-float64 error on this very case, never below `tol`.
    """
    exact, single = _both(reference, x)
    tols = {name: max(tol, DERIVED * per_sample_error(single[name], ref)) for name, ref in exact.items()}
    _record(label + " (derived)", max(tols.values()))
    return exact, tols
