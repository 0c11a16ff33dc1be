"""Benchmark of the evaluate metrics: ROAD (MoRF + LeRF, 9 percentiles) against pytorch-grad-cam's
ROAD on the same maps, and deletion + insertion in images/s, on resnet50 (random weights) at 224.

Usage: python tools/bench_evaluate.py [--images 32] [--pgc-images 8] [--out BENCHMARKS.md]

Both ROADs run noiseless (pytorch-grad-cam's imputer patched to noise 0) so the run also reports
how far apart they are; the imputation noise costs nothing next to the solve. pytorch-grad-cam
runs on the first --pgc-images images only (about 1 s per image and percentile on this machine);
the ratio compares seconds per image, measured in this one run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

PERCENTILES = [10, 20, 30, 40, 50, 60, 70, 80, 90]
SECTION = "## Evaluate"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--pgc-images", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--out", type=Path, default=None, help="write the section into this markdown file")
    args = ap.parse_args()

    import onnxruntime
    import torch
    from export_torchvision import build, export
    from pytorch_grad_cam.metrics import road as pgc_road
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    from onnx_gradcam.evaluation.base import make_context
    from onnx_gradcam.evaluation.faithfulness import deletion_insertion
    from onnx_gradcam.evaluation.road import road
    from onnx_gradcam.explain.explainer import Explainer
    from tests.demo_set import demo_set

    cache = ROOT / ".cache" / "models"
    path = export("resnet50", cache, size=args.size)
    net = build("resnet50", cache, args.size).eval()
    exp = Explainer(path, device="cpu", batch_size=32)
    images, _, _ = demo_set(args.images, seed=3)
    ctx = make_context(exp, images)
    maps = exp.explain(ctx.x, target=ctx.classes).maps
    zeros = float((maps == 0).mean())

    t = time.perf_counter()
    ours = {r.name: r for r in road(ctx, maps, percentiles=PERCENTILES, noise=0.0)}
    t_ours = time.perf_counter() - t

    class Noiseless(pgc_road.NoisyLinearImputer):
        def __init__(self) -> None:
            super().__init__(noise=0.0)

    pgc_road.NoisyLinearImputer = Noiseless  # type: ignore[misc]
    k = min(args.pgc_images, args.images)
    x = torch.from_numpy(ctx.x[:k])
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in ctx.classes[:k]]
    t = time.perf_counter()
    ref_morf = pgc_road.ROADMostRelevantFirstAverage(PERCENTILES)(x, maps[:k], targets, net)
    ref_lerf = pgc_road.ROADLeastRelevantFirstAverage(PERCENTILES)(x, maps[:k], targets, net)
    t_pgc = time.perf_counter() - t
    finite = np.isfinite(ref_morf) & np.isfinite(ref_lerf)
    diff = max(
        float(np.max(np.abs(ours["road_morf"].per_image[:k] - ref_morf)[finite], initial=0)),
        float(np.max(np.abs(ours["road_lerf"].per_image[:k] - ref_lerf)[finite], initial=0)),
    )

    t = time.perf_counter()
    dele, ins = deletion_insertion(ctx, maps)
    t_di = time.perf_counter() - t
    inputs = 2 * args.images * dele.curves["deletion"].shape[1]

    per_ours, per_pgc = t_ours / args.images, t_pgc / k
    rows = [
        "| metric | images | ours (s) | ours (s/image) | pytorch-grad-cam (s/image, on its images) | ratio |",
        "|---|---|---|---|---|---|",
        f"| ROAD MoRF + LeRF, 9 percentiles | {args.images} (pgc: {k}) | {t_ours:.1f} | {per_ours:.2f} "
        f"| {per_pgc:.2f} | {per_pgc / per_ours:.2f}x |",
        f"| deletion + insertion ({dele.settings['points']} points each) | {args.images} | {t_di:.1f} "
        f"| {t_di / args.images:.2f} | - | {args.images / t_di:.2f} images/s ({inputs / t_di:.1f} inputs/s) |",
    ]
    machine = (
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared with other jobs: load average "
        f"{os.getloadavg()[0]:.1f} at the end), Python {platform.python_version()}, onnxruntime "
        f"{onnxruntime.__version__}, torch {torch.__version__}, pytorch-grad-cam {version('grad-cam')}"
    )
    notes = [
        f"resnet50 (torchvision, random weights, BatchNorm calibrated), {args.size}x{args.size}, Grad-CAM maps of the "
        f"exported model on {args.images} pictures from tests/demo_set.py ({100 * zeros:.0f}% of map pixels "
        "exactly 0).",
        f"Both ROADs noiseless; on the {k} shared images their per-image MoRF/LeRF differ by at most {diff:.1e}"
        f" ({int((~finite).sum())} images where pytorch-grad-cam's solve was singular left out).",
    ]
    text = "\n".join(
        [
            SECTION,
            "",
            "Command: `python tools/bench_evaluate.py --out BENCHMARKS.md`",
            "",
            machine,
            "",
            *rows,
            "",
            *notes,
        ]
    )
    print(text)
    if args.out is not None:
        old = args.out.read_text() if args.out.is_file() else ""
        if SECTION in old:
            head, _, tail = old.partition(SECTION)
            rest = tail.split("\n## ", 1)
            old = head + (("## " + rest[1]) if len(rest) > 1 else "")
        args.out.write_text(old.rstrip("\n") + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
