"""Benchmark: `explain --ray` on 1 and 2 workers against the single-machine CLI, on the same files, in one run.

    python tools/bench_ray.py [--images 300] [--model models/demo.onnx] [--rounds 2]

Each round: (cli) `onnx-gradcam explain MODEL imgs -o out --threads 1` as a subprocess, whole command;
(ray N) the same through onnx_gradcam.ray.explain_files on a local cluster started once for the
run (Ray's start-up is reported apart), N actors with 1 CPU and 1 thread each, timed from
submission to the last row (actor start-up and model load included), its files written by the
workers. Every ray run's files are checked byte for byte against the CLI's. Images/s, median of
the rounds; ratios compare variants of this one run only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_images(folder: Path, count: int) -> None:
    """JPEGs of 500x375 (as the issue's measurement), from the demo's samples, turned and shifted."""
    from PIL import Image

    samples = sorted((ROOT / "models" / "samples").glob("*.png"))
    folder.mkdir(parents=True)
    for k in range(count):
        img = Image.open(samples[k % len(samples)]).convert("RGB").resize((500, 375))
        img = img.rotate((k * 7) % 360, fillcolor=(255, 255, 255))
        img.save(folder / f"img{k:05d}.jpg", quality=90)


def run_cli(model: Path, images: Path, out: Path) -> float:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "onnx_gradcam.cli", "explain", str(model), str(images), "-o", str(out)]
    subprocess.run([*cmd, "--threads", "1"], check=True, capture_output=True)
    return time.perf_counter() - start


def run_ray(model: Path, images: Path, out: Path, workers: int) -> float:
    from onnx_gradcam import Explainer
    from onnx_gradcam import ray as on_ray
    from onnx_gradcam.explain.pipeline import Job, RenderOptions

    out.mkdir()
    exp = Explainer(model, threads=1)
    listed = on_ray.list_inputs([str(images)], exclude=out)
    start = time.perf_counter()
    on_ray.explain_files(exp, listed, out, Job(), RenderOptions(), threads=1, workers=workers, num_cpus=1)
    return time.perf_counter() - start


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names if not n.startswith("predictions.")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "demo.onnx")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import ray

    work = Path(tempfile.mkdtemp(prefix="bench_ray."))
    try:
        images = work / "imgs"
        make_images(images, args.images)
        start = time.perf_counter()
        ray.init(num_cpus=3, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        startup = time.perf_counter() - start
        times: dict[str, list[float]] = {"cli": [], "ray 1": [], "ray 2": []}
        for r in range(args.rounds):
            times["cli"].append(run_cli(args.model, images, work / f"cli{r}"))
            for w in (1, 2):
                out = work / f"ray{w}-{r}"
                times[f"ray {w}"].append(run_ray(args.model, images, out, w))
                if not same_files(out, work / f"cli{r}"):
                    raise SystemExit(f"ray {w} workers wrote other files than the CLI (round {r})")
        ips = {k: args.images / statistics.median(v) for k, v in times.items()}
        print(f"machine: {os.cpu_count()} cores; ray {ray.__version__}; {args.images} JPEGs 500x375; {args.model.name}")
        print(f"Ray local start-up (ray.init, once): {startup:.1f} s")
        print("| variant | images/s (median of rounds) | rounds (s) | / CLI |")
        print("|---|---|---|---|")
        for k, v in times.items():
            rounds = ", ".join(f"{t:.1f}" for t in v)
            print(f"| {k} | {ips[k]:.1f} | {rounds} | {ips[k] / ips['cli']:.2f} |")
        print(f"ray 2 / ray 1: {ips['ray 2'] / ips['ray 1']:.2f}; all ray outputs byte-identical to the CLI's")
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
