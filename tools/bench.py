"""Benchmark: Grad-CAM in the graph against plain inference and pytorch-grad-cam.

    python tools/bench.py [--threads 2] [--models resnet50 ...] [--batches 1 8] [--rounds 3] [--out BENCHMARKS.md]
    python tools/bench.py --int8 qdq qop dynamic --models resnet50 mobilenet_v3_large --out int8.md

Variants, each timed in a fresh process per round (warm-up, then at least --runs calls; the
variants take turns; the median of the rounds' medians is reported) with its peak RSS:
(a) plain onnxruntime on the original model, (b) the prepared model, (c) pytorch-grad-cam
GradCAM on the same torch model and layer, (d) the Explainer API with arrays in memory,
(e) the `explain` CLI on 100 JPEG files (images/s). Ratios compare variants of ONE run only.
With --int8 FORMS, (a) and (b) for each int8 form of each model instead (tools/quantize_int8.py,
calibrated on random images): the plain int8 model and the prepared int8 model.

    python tools/bench.py --folder [--images 500] [--rss-images 5000] [--before-src /work/main] [--out folder.md]

With --folder, the folder measurement of issue 15 instead, in one run: the prepared model's batch-8
images/s (a fresh process, as (b)) against the whole `explain` command on --images JPEGs of 500x375,
for this checkout's CLI (png and jpg) and, with --before-src, the CLI of another checkout (its png);
peak RSS of each command (its VmHWM, read while it runs), and of this CLI on --rss-images with mobilenet_v3_large, jpg.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

MODELS = ["resnet50", "vgg16", "mobilenet_v3_large", "efficientnet_b0"]
# the torch module whose output is the prepared model's default feature tensor
TORCH_LAYER = {
    "resnet50": "layer4",
    "resnet18": "layer4",
    "vgg16": "avgpool",
    "mobilenet_v3_large": "features.16",
    "efficientnet_b0": "features.8",
}


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it is not inherited from
    the parent that started the process)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _timed(fn, runs: int, warmup: int = 2, min_seconds: float = 1.0, max_runs: int = 200) -> dict[str, float]:
    """Median, min and max in ms of `runs` calls after warm-up; fast calls run more often (at
    least min_seconds in all, at most max_runs), so that a 4 ms call is not judged on 40 ms."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    per_call = (time.perf_counter() - start) / warmup
    runs = max(runs, min(max_runs, int(min_seconds / max(per_call, 1e-9))))
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "runs": runs}


def _interleaved(fa, fb, runs: int, min_seconds: float = 2.0, max_runs: int = 400) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Medians (ms) of fa and fb called in turn (a, b, a, b, ...) after warm-up, and the median of
    the per-pair ratios b/a: each ratio compares two calls a few ms apart."""
    start = time.perf_counter()
    for _ in range(2):
        fa()
        fb()
    per_pair = (time.perf_counter() - start) / 2
    runs = max(runs, min(max_runs, int(min_seconds / max(per_pair, 1e-9))))
    ta, tb = [], []
    for _ in range(runs):
        t = time.perf_counter()
        fa()
        ta.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        fb()
        tb.append((time.perf_counter() - t) * 1000)
    return {
        "a": statistics.median(ta),
        "b": statistics.median(tb),
        "ratio": statistics.median(b / a for a, b in zip(ta, tb)),
        "runs": runs,
        "rss_mb": peak_rss_mb(),
    }


def _appended_share(path: str, threads: int, x, runs: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Kernel time of the appended (gradcam/) nodes over that of the original ones, from
    onnxruntime's profiler over `runs` calls: drifts of a shared machine hit both alike."""
    import tempfile

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "profile")
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    names = ["logits", "gradcam_map", "gradcam_target", "gradcam_score"]
    for _ in range(2 + runs):
        sess.run(names, {"input": x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    appended = original = 0.0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            if e["name"].startswith("gradcam/"):
                appended += e["dur"]
            else:
                original += e["dur"]
    return {"share": appended / original, "rss_mb": peak_rss_mb()}


def _ort_session(path: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def worker(variant: str, model: str, batch: int, threads: int, runs: int, workdir: Path) -> dict[str, float]:
    """One variant in this (fresh) process; returns timings and peak RSS."""
    import numpy as np

    size = 299 if model.startswith("inception_v3") else 224
    x = np.random.RandomState(0).rand(batch, 3, size, size).astype(np.float32)
    plain, prepared = workdir / f"{model}.onnx", workdir / f"{model}.gradcam.onnx"
    if variant == "a":
        sess = _ort_session(str(plain), threads)
        result = _timed(lambda: sess.run(None, {"input": x}), runs)
    elif variant == "b":
        sess = _ort_session(str(prepared), threads)
        names = ["logits", "gradcam_map", "gradcam_target", "gradcam_score"]
        result = _timed(lambda: sess.run(names, {"input": x}), runs)
    elif variant == "ab":  # both in one process, call by call in turn: drifts of a shared machine hit both
        sa, sb = _ort_session(str(plain), threads), _ort_session(str(prepared), threads)
        names = ["logits", "gradcam_map", "gradcam_target", "gradcam_score"]
        return _interleaved(lambda: sa.run(None, {"input": x}), lambda: sb.run(names, {"input": x}), runs)
    elif variant == "p":  # onnxruntime's profiler: the appended nodes' share of the kernel time
        return _appended_share(str(prepared), threads, x, runs)
    elif variant == "c":
        import torch
        import torchvision
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        net = getattr(torchvision.models, model)(weights=None).eval()
        layer = net.get_submodule(TORCH_LAYER[model])
        cam = GradCAM(model=net, target_layers=[layer])
        xt = torch.from_numpy(x)
        targets = [ClassifierOutputTarget(1)] * batch
        result = _timed(lambda: cam(input_tensor=xt, targets=targets), runs)
    elif variant == "d":
        from onnx_gradcam import Explainer

        exp = Explainer(str(prepared), device="cpu", threads=threads, batch_size=batch)
        result = _timed(lambda: exp.explain(x), runs)
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    result["rss_mb"] = peak_rss_mb()
    return result


def _spawn(args: list[str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _prepare_in_subprocess(model: str, workdir: Path) -> dict[str, float]:
    code = (
        "import time, json, resource, sys; from onnx_gradcam import prepare; t = time.perf_counter(); "
        f"prepare({str(workdir / (model + '.onnx'))!r}, {str(workdir / (model + '.gradcam.onnx'))!r}); "
        "hwm = [int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM:')][0]; "
        "print(json.dumps({'s': time.perf_counter() - t, 'rss_mb': hwm / 1024}))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cli_throughput(model: str, workdir: Path, threads: int, n_images: int = 100) -> float:
    """Images per second of `onnx-gradcam explain` on n JPEG files (whole command, start included)."""
    import numpy as np
    from PIL import Image

    images = workdir / "jpegs"
    if not images.is_dir():
        images.mkdir()
        rs = np.random.RandomState(0)
        for i in range(n_images):
            Image.fromarray(rs.randint(0, 255, (256, 256, 3), np.uint8)).save(images / f"img{i:03d}.jpg")
    out = workdir / f"cli-{model}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "onnx_gradcam.cli",
            "explain",
            str(workdir / f"{model}.gradcam.onnx"),
            str(images),
            "-o",
            str(out),
            "--device",
            "cpu",
            "--batch-size",
            "8",
            "--threads",
            str(threads),
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    return n_images / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=10, help="at least this many timed calls per round")
    p.add_argument("--rounds", type=int, default=3, help="processes per variant; the median of their medians")
    p.add_argument("--variants", default="abcde")
    p.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "bench")
    p.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    p.add_argument("--int8", nargs="+", default=None, metavar="FORM", help="qdq, qdq_per_tensor, qop, dynamic")
    p.add_argument("--folder", action="store_true", help="the folder pipeline's measurement (issue 15)")
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--rss-images", type=int, default=5000)
    p.add_argument("--cli-rounds", type=int, default=3, help="--folder: rounds of the commands in turn; medians")
    p.add_argument("--render-costs", action="store_true", help="only the per-image costs around the model")
    p.add_argument("--before-src", type=Path, default=None, help="checkout whose CLI is 'before' (e.g. main)")
    p.add_argument("--worker", nargs=3, metavar=("VARIANT", "MODEL", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.worker:
        v, m, b = args.worker
        print(json.dumps(worker(v, m, int(b), args.threads, args.runs, args.workdir)))
        return
    if args.int8:
        int8_table(args)
        return
    if args.render_costs:
        print("\n".join(render_costs()))
        return
    if args.folder:
        folder_table(args)
        return

    from export_torchvision import export

    command = "python tools/bench.py " + " ".join(sys.argv[1:])
    rows, prep_rows = [], []
    for model in args.models:
        plain = args.workdir / f"{model}.onnx"  # the name the workers read
        if not plain.exists():
            plain.symlink_to(export(model, args.workdir).name)  # no copy of a 500 MB vgg16
        prep = _prepare_in_subprocess(model, args.workdir)
        prep_rows.append((model, prep))
        for batch in args.batches:
            rounds: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants if v != "e"}
            for r in range(args.rounds):  # the variants take turns, so drifts of the machine hit all
                for v in rounds:
                    worker_args = ["--worker", v, model, str(batch), "--threads", str(args.threads)]
                    rounds[v].append(_spawn([*worker_args, "--runs", str(args.runs), "--workdir", str(args.workdir)]))
                    print(f"{model} b{batch} ({v}) round {r + 1}: {rounds[v][-1]['median']:.1f} ms", file=sys.stderr)
            rows.append((model, batch, {v: _combine(results) for v, results in rounds.items()}))
    cli = {m: _cli_throughput(m, args.workdir, args.threads) for m in args.models} if "e" in args.variants else {}

    lines = [
        f"Command: `{command.strip()}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{args.threads} intra-op threads, Python {platform.python_version()}, "
        f"onnxruntime {_ort_version()}, torch {_version('torch')}",
        "",
        f"ms per call: median of {args.rounds} rounds' medians [min-max of all calls]; each round is a fresh "
        f"process per variant, the variants taking turns, with warm-up and then at least {args.runs} calls (fast "
        "calls: as many as fit in 1 s, at most 200); peak RSS in MB, the largest of the rounds.",
        "",
        "| model | batch | (a) plain ORT | (b) prepared | (c) pytorch-grad-cam | (d) Explainer | "
        "(b)/(a) | (c)/(b) | (d)/(b) | RSS (a) | RSS (b) | RSS (c) | RSS (b)/(a) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios_cb = []
    for model, batch, res in rows:
        if "c" in res and "b" in res:
            ratios_cb.append(res["c"]["median"] / res["b"]["median"])
        lines.append(_row(model, batch, res))
    if ratios_cb:
        lines += ["", f"Median (c)/(b) over the rows: {statistics.median(ratios_cb):.2f}"]
    lines += [
        "",
        "| model | prepare (s) | prepare peak RSS (MB) | (e) CLI on 100 JPEGs (images/s) |",
        "|---|---|---|---|",
    ]
    for model, prep in prep_rows:
        e = f"{cli[model]:.1f}" if model in cli else "-"
        lines.append(f"| {model} | {prep['s']:.2f} | {prep['rss_mb']:.0f} | {e} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


def int8_table(args: argparse.Namespace) -> None:
    """(a) plain int8 model and (b) prepared int8 model, per model, form and batch, interleaved."""
    from export_torchvision import export
    from quantize_int8 import quantize

    command = "python tools/bench.py " + " ".join(sys.argv[1:])
    lines = [
        f"Command: `{command.strip()}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{args.threads} intra-op threads, onnxruntime {_ort_version()}",
        "",
        f"ms per call: median over {args.rounds} fresh processes of the medians of (a) and (b) called in turn "
        f"in one process (a, b, a, b, ..., at least {args.runs} pairs, as many as fit in 2 s, at most 400); "
        "(b)/(a): median of the per-pair ratios [the processes' extremes]; peak RSS of the process holding "
        "both sessions. int8 files: onnxruntime's quantize_static (MinMax on 8 random images) or "
        "quantize_dynamic, default options. 1 + appended/original: onnxruntime's profiler on the prepared model "
        "(10 calls), the kernel time of the appended nodes over that of the model's own: what (b)/(a) would be "
        "without the machine's drift.",
        "",
        "| model | form | batch | (a) plain int8 | (b) prepared int8 | (b)/(a) | 1 + appended/original | RSS (a+b) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model in args.models:
        float_model = export(model, args.workdir)
        for form in args.int8:
            key = f"{model}.{form}"
            plain = args.workdir / f"{key}.onnx"
            if not plain.exists():
                plain.write_bytes(quantize(float_model, form).read_bytes())
            _prepare_in_subprocess(key, args.workdir)
            for batch in args.batches:
                worker_args = ["--worker", "ab", key, str(batch), "--threads", str(args.threads)]
                res = [_spawn([*worker_args, "--runs", str(args.runs), "--workdir", str(args.workdir)])]
                for _ in range(args.rounds - 1):
                    res.append(_spawn([*worker_args, "--runs", str(args.runs), "--workdir", str(args.workdir)]))
                a = statistics.median(r["a"] for r in res)
                b = statistics.median(r["b"] for r in res)
                ratio = statistics.median(r["ratio"] for r in res)
                spread = f"{min(r['ratio'] for r in res):.3f}-{max(r['ratio'] for r in res):.3f}"
                profiled = ["--worker", "p", key, str(batch), "--threads", str(args.threads), "--runs", "10"]
                share = _spawn([*profiled, "--workdir", str(args.workdir)])["share"]
                print(
                    f"{key} b{batch}: {a:.1f} / {b:.1f} ms, ratio {ratio:.3f} ({spread}), appended {share:.3f}",
                    file=sys.stderr,
                )
                lines.append(
                    f"| {model} | {form} | {batch} | {a:.1f} | {b:.1f} | {ratio:.3f} [{spread}] | "
                    f"{1 + share:.3f} | {max(r['rss_mb'] for r in res):.0f} |"
                )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


def _jpegs(folder: Path, n: int) -> Path:
    """n JPEGs of 500x375 with photo-like content (smooth random colour fields, a little noise), made once."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    have = len(list(folder.glob("*.jpg")))
    rs = np.random.RandomState(have)
    for i in range(have, n):
        small = rs.randint(0, 256, (12, 16, 3), np.uint8)
        img = np.asarray(Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC), np.int16)
        img = np.clip(img + rs.randint(-8, 9, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img{i:05d}.jpg", quality=90)
    return folder


def _cli_run(src: Path, model: Path, images: Path, outs: Path, threads: int, extra: list[str]) -> dict[str, float]:
    """images/s of the whole `explain` command (start-up included) and its peak RSS in MB.

    Each command writes into a new folder under outs, all deleted at the end (`folder_table`): on an ext4
    file system without a journal (this machine's), creating files just after deleting thousands makes
    the kernel skip each recently deleted inode in turn, which cost the next command 0.9 ms of system
    time a file when the previous output was deleted before it."""
    outs.mkdir(parents=True, exist_ok=True)
    out = outs / f"run{len(list(outs.iterdir()))}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(src)}
    model, images, out = model.resolve(), images.resolve(), out.resolve()
    cmd = [sys.executable, "-m", "onnx_gradcam.cli", "explain", str(model), str(images), "-o", str(out)]
    cmd += ["--device", "cpu", "--batch-size", "8", "--threads", str(threads), *extra]
    n = len(list(images.glob("*.jpg")))
    t = time.perf_counter()
    # cwd=src: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH, so from
    # this checkout's root the 'before' command would run this checkout's package
    proc = subprocess.Popen(cmd, env=env, cwd=src, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # VmHWM of the command itself, read while it runs (ru_maxrss would count the fork of this process)
    hwm = 0
    status_file = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            hwm = max(
                [hwm] + [int(x.split()[1]) for x in status_file.read_text().splitlines() if x.startswith("VmHWM:")]
            )
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    seconds = time.perf_counter() - t
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {err[-500:]}")
    return {"ips": n / seconds, "rss_mb": hwm / 1024.0}


def render_costs(runs: int = 40) -> list[str]:
    """ms per 500x375 image of each step around the model, the steps called in turn (a, b, c, ..., repeated)."""
    import io

    import numpy as np
    from PIL import Image

    from onnx_gradcam.explain.images import load_image
    from onnx_gradcam.explain.overlay import overlay, overlay_float
    from onnx_gradcam.explain.pipeline import encode
    from onnx_gradcam.explain.preprocess import InputSpec, to_tensor
    from onnx_gradcam.surgery.prepare import PRESETS

    rs = np.random.RandomState(0)
    small = Image.fromarray(rs.randint(0, 256, (12, 16, 3), np.uint8))
    jpeg = io.BytesIO()
    small.resize((500, 375), Image.Resampling.BICUBIC).save(jpeg, format="JPEG", quality=90)
    img = load_image(io.BytesIO(jpeg.getvalue()))  # type: ignore[arg-type]
    spec = InputSpec.from_shape("input", ["N", 3, 224, 224], None, "tensor(float)")
    cam = rs.rand(224, 224).astype(np.float32)
    shown = overlay(img, cam)
    steps = {
        "JPEG decode": lambda: load_image(io.BytesIO(jpeg.getvalue())),  # type: ignore[arg-type]
        "preprocess to 224": lambda: to_tensor([img], spec, PRESETS["imagenet"], None),
        "overlay, float64 colour map (before)": lambda: overlay_float(img, cam),
        "overlay, Pillow palette + blend (after)": lambda: overlay(img, cam),
        "PNG encode, Pillow zlib level 6 (before)": lambda: shown.save(io.BytesIO(), format="PNG"),
        "PNG encode, Pillow zlib level 1 (the pipeline's first form)": lambda: shown.save(
            io.BytesIO(), format="PNG", compress_level=1
        ),
        "PNG encode, Up filter + zlib RLE (after)": lambda: encode(shown, "png"),
        "JPEG encode, quality 90": lambda: encode(shown, "jpg"),
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(runs):
        for k, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t) * 1000)
    lines = ["| step (one 500x375 image, one thread) | ms, median |", "|---|---|"]
    lines += [f"| {k} | {statistics.median(v):.1f} |" for k, v in times.items()]
    return lines


def folder_table(args: argparse.Namespace) -> None:
    """The folder measurement: CLI images/s against the model's batch-8 images/s, before and after."""
    from export_torchvision import export

    command = "python tools/bench.py " + " ".join(sys.argv[1:])
    models = [m for m in args.models if m in ("resnet50", "mobilenet_v3_large")] or ["resnet50", "mobilenet_v3_large"]
    images = _jpegs(args.workdir / f"jpegs500x375-{args.images}", args.images)
    outs = args.workdir / "folder-out"
    if outs.exists():  # an earlier run's, set aside: deleting it now would slow this run's file creation
        outs.rename(args.workdir / f"folder-out-old-{time.time_ns()}")
    load_before = os.getloadavg()[0]
    rows = []
    for model in models:
        plain = args.workdir / f"{model}.onnx"
        if not plain.exists():
            plain.symlink_to(export(model, args.workdir).name)
        if not (args.workdir / f"{model}.gradcam.onnx").exists():
            _prepare_in_subprocess(model, args.workdir)
        prepared = args.workdir / f"{model}.gradcam.onnx"
        worker_args = ["--worker", "b", model, "8", "--threads", str(args.threads), "--runs", str(args.runs)]
        model_runs = [8 / (_spawn([*worker_args, "--workdir", str(args.workdir)])["median"] / 1000)]
        variants = [("after png", ROOT, ["--format", "png"]), ("after jpg", ROOT, ["--format", "jpg"])]
        if args.before_src is not None:
            variants.insert(0, ("before png", args.before_src, []))
        measured: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in variants}
        for _ in range(args.cli_rounds):  # the commands take turns, then the model again: drifts hit all
            for name, src, extra in variants:
                measured[name].append(_cli_run(src, prepared, images, outs, args.threads, extra))
            model_runs.append(8 / (_spawn([*worker_args, "--workdir", str(args.workdir)])["median"] / 1000))
        # the reference: the median of the model's measurements around the rounds; each command's median
        model_ips = statistics.median(model_runs)
        runs = {
            name: {"ips": statistics.median(r["ips"] for r in rs), "rss_mb": max(r["rss_mb"] for r in rs)}
            for name, rs in measured.items()
        }
        for name, rs in measured.items():
            shown = ", ".join(f"{r['ips']:.1f}" for r in rs)
            print(f"{model} {name}: {shown} images/s (model {model_ips:.1f})", file=sys.stderr)
        rows.append((model, model_ips, runs))
        print(f"{model}: model batch 8 {', '.join(f'{v:.1f}' for v in model_runs)}", file=sys.stderr)
    rss = {}
    if args.rss_images:
        cheap = args.workdir / "mobilenet_v3_large.gradcam.onnx"
        big = _jpegs(args.workdir / f"jpegs500x375-{args.rss_images}", args.rss_images)
        for name, folder in ((args.images, images), (args.rss_images, big)):
            rss[name] = _cli_run(ROOT, cheap, folder, outs, args.threads, ["--format", "jpg"])
    load_after = os.getloadavg()[0]
    lines = [
        f"Command: `{command.strip()}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other "
        f"sessions: load average {load_before:.1f} before, {load_after:.1f} after), {args.threads} intra-op threads, "
        f"Python {platform.python_version()}, onnxruntime {_ort_version()}",
        "",
        f"Whole `explain` command (start-up included) on {args.images} JPEGs of 500x375, --batch-size 8, against "
        "the prepared model's batch-8 images/s (fresh process, random input, as (b)); the commands take turns for "
        f"{args.cli_rounds} rounds, the model measured before the first and after each: medians of both, and the "
        "peak RSS of the command.",
        "",
        "| model | model batch 8 (images/s) | CLI | images/s | CLI / model | peak RSS (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for model, model_ips, runs in rows:
        for name, r in runs.items():
            lines.append(
                f"| {model} | {model_ips:.1f} | {name} | {r['ips']:.1f} | {r['ips'] / model_ips:.2f} | "
                f"{r['rss_mb']:.0f} |"
            )
    if rss:
        lines += ["", "| mobilenet_v3_large, after, jpg | images/s | peak RSS (MB) |", "|---|---|---|"]
        lines += [f"| {n} images | {r['ips']:.1f} | {r['rss_mb']:.0f} |" for n, r in rss.items()]
    lines += ["", *render_costs()]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    for old in [outs, *args.workdir.glob("folder-out-old-*")]:
        shutil.rmtree(old, ignore_errors=True)


def _combine(results: list[dict[str, float]]) -> dict[str, float]:
    """Rounds of one variant: the median of their medians, the extremes of all calls, the peak RSS."""
    return {
        "median": statistics.median(r["median"] for r in results),
        "min": min(r["min"] for r in results),
        "max": max(r["max"] for r in results),
        "rss_mb": max(r["rss_mb"] for r in results),
    }


def _row(model: str, batch: int, res: dict[str, dict[str, float]]) -> str:
    """One markdown row: timings, ratios and peak RSS of the variants measured."""

    def cell(v: str) -> str:
        r = res.get(v)
        return f"{r['median']:.1f} [{r['min']:.1f}-{r['max']:.1f}]" if r else "-"

    def ratio(x: str, y: str) -> str:
        return f"{res[x]['median'] / res[y]['median']:.3f}" if x in res and y in res else "-"

    def rss(v: str) -> str:
        return f"{res[v]['rss_mb']:.0f}" if v in res else "-"

    rss_ratio = f"{res['b']['rss_mb'] / res['a']['rss_mb']:.2f}" if "a" in res and "b" in res else "-"
    return (
        f"| {model} | {batch} | {cell('a')} | {cell('b')} | {cell('c')} | {cell('d')} | "
        f"{ratio('b', 'a')} | {ratio('c', 'b')} | {ratio('d', 'b')} | "
        f"{rss('a')} | {rss('b')} | {rss('c')} | {rss_ratio} |"
    )


def _ort_version() -> str:
    import onnxruntime

    return f"{onnxruntime.__version__} ({', '.join(onnxruntime.get_available_providers())})"


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "absent"


if __name__ == "__main__":
    main()
