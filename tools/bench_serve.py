"""Benchmark: `onnx-gradcam serve` under load, with and without batching, against the offline session.

    python tools/bench_serve.py [--models demo resnet18] [--clients 8] [--requests 200] [--threads 2]
                                [--delay-ms 2] [--memory 5000] [--explain 25] [--out BENCHMARKS.md]

For each model (prepared once into .cache/bench_serve/), the real server (`onnx-gradcam serve` in
a subprocess on a free loopback port) is started twice: `--max-batch 8 --max-delay-ms D` and
`--max-batch 1`. Each time, --clients threads send --requests infer requests each (the Open
Inference Protocol with binary tensors, as tritonclient.http sends them; one sample per request,
its own `gradcam_class`: -1 for top-1 or a class index), over keep-alive connections (http.client:
the lightest client, since clients share this machine's cores with the server). Every response is
compared, bit for bit, with the offline session's batch-1 result for that input and class; 16 more
are sent by unmodified tritonclient.http and checked the same way. The mean batch comes from the
server's GET /v2/models/NAME/stats; CPU times from /proc. The batching server also answers
--memory requests in all: its VmRSS after 500 and after all of them. With --explain N, each client
also sends N images to /v2/models/NAME/explain (raw=1), checked against the offline Explainer
(class, score, map, raw map) and the offline PNG overlay. The offline reference throughput is
session.run at batch 8 in this process, with the same threads, measured just before each server
runs. Ratios compare measurements of ONE run only; `--out` rewrites the tables of BENCHMARKS.md's
serving section and keeps the reading written after them.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
CACHE = ROOT / ".cache" / "bench_serve"
POOL = 64  # distinct (input, class) pairs the clients cycle through
SECTION = "## Serving: batching and load"


def prepared_model(name: str) -> Path:
    """The prepared model file for `name` (demo: the bundled model; else a torchvision export at 224)."""
    from onnx_gradcam import prepare

    CACHE.mkdir(parents=True, exist_ok=True)
    out = CACHE / f"{name}.gradcam.onnx"
    if out.is_file():
        return out
    if name == "demo":
        src = ROOT / "models" / "demo.onnx"
    else:
        from export_torchvision import DEFAULT_CACHE, export

        src = export(name, DEFAULT_CACHE, size=224)
    prepare(src, out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vm_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """`onnx-gradcam serve` in a subprocess (the worktree's package), until stopped."""

    def __init__(self, model: Path, max_batch: int, delay_ms: float, threads: int) -> None:
        self.port = free_port()
        self.log = open(CACHE / f"serve.{model.stem}.{max_batch}.log", "w")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "onnx_gradcam.cli", "serve", str(model), "--port", str(self.port)]
        cmd += ["--max-batch", str(max_batch), "--max-delay-ms", str(delay_ms), "--threads", str(threads)]
        cmd += ["--device", "cpu", "--no-verify"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/v2/health/ready")
                if conn.getresponse().status == 200:
                    conn.close()
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: see {self.log.name}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def served_stats(port: int, model: str) -> tuple[int, int]:
    """(samples, session runs) the server's batcher has run for `model` (GET /v2/models/NAME/stats)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", f"/v2/models/{model}/stats")
    s = json.loads(conn.getresponse().read())["model_stats"][0]
    conn.close()
    return int(s["inference_count"]), int(s["execution_count"])


def triton_check(port: int, model: str, xs: list[np.ndarray], classes: list[int], refs: list) -> int:  # type: ignore[type-arg]
    """Mismatches of tritonclient.http (unmodified, binary tensors) against the references."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
    bad = 0
    for x, c, ref in zip(xs, classes, refs):
        inputs = [httpclient.InferInput("input", list(x.shape), "FP32")]
        inputs.append(httpclient.InferInput("gradcam_class", [1], "INT64"))
        inputs[0].set_data_from_numpy(x)
        inputs[1].set_data_from_numpy(np.array([c], np.int64))
        got = client.infer(model, inputs, outputs=[httpclient.InferRequestedOutput(n) for n in ref])
        bad += reference_bytes({n: got.as_numpy(n) for n in ref}) != ref
    client.close()
    return bad


def infer_body(x: np.ndarray, cls: int, outputs: list[str]) -> tuple[bytes, int]:
    """A binary-tensor infer request (JSON header, then raw bytes), as tritonclient.http writes it."""
    c = np.array([cls], np.int64)
    head = {
        "inputs": [
            {"name": "input", "shape": list(x.shape), "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}},
            {"name": "gradcam_class", "shape": [1], "datatype": "INT64", "parameters": {"binary_data_size": 8}},
        ],
        "outputs": [{"name": o, "parameters": {"binary_data": True}} for o in outputs],
    }
    raw = json.dumps(head).encode()
    return raw + x.tobytes() + c.tobytes(), len(raw)


def parse_infer(body: bytes, header_length: int) -> dict[str, tuple[str, list[int], bytes]]:
    doc = json.loads(body[:header_length])
    out, offset = {}, header_length
    for o in doc["outputs"]:
        n = o["parameters"]["binary_data_size"]
        out[o["name"]] = (o["datatype"], o["shape"], body[offset : offset + n])
        offset += n
    return out


def reference_bytes(values: dict[str, np.ndarray]) -> dict[str, tuple[str, list[int], bytes]]:
    from onnx_gradcam.serve.tensors import datatype_of

    return {k: (datatype_of(v), list(v.shape), np.ascontiguousarray(v).tobytes()) for k, v in values.items()}


def load(port: int, jobs: list[list[Any]], send, check) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Each thread sends its jobs in turn over one keep-alive connection; latencies, wall time,
    mismatches (a wrong answer) and errors (no answer, or not 200)."""
    barrier = threading.Barrier(len(jobs) + 1)
    lat: list[list[float]] = [[] for _ in jobs]
    bad = [0] * len(jobs)
    errors = [0] * len(jobs)
    first_error: list[str] = []

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        barrier.wait()
        for job in jobs[i]:
            t = time.perf_counter()
            try:
                status, headers, body = send(conn, job)
            except (OSError, http.client.HTTPException) as exc:
                errors[i] += 1
                first_error.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                continue
            lat[i].append(time.perf_counter() - t)
            if status != 200:
                errors[i] += 1
                first_error.append(f"{status} {body[:200]!r}")
            elif not check(job, headers, body):
                bad[i] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    barrier.wait()
    start, cpu = time.perf_counter(), time.process_time()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    all_lat = sorted(x for per in lat for x in per)
    n = sum(len(j) for j in jobs)
    return {
        "requests": n,
        "wall": wall,
        "rps": n / wall,
        "p50": 1000 * all_lat[len(all_lat) // 2] if all_lat else float("nan"),
        "p99": 1000 * all_lat[min(len(all_lat) - 1, int(0.99 * len(all_lat)))] if all_lat else float("nan"),
        "mismatches": sum(bad),
        "errors": sum(errors),
        "first_error": first_error[:1],
        "client_cpu_ms": 1000 * cpu / n,
    }


def split(total: int, clients: int, offset: int = 0) -> list[list[int]]:
    """`total` request indices over `clients` threads (round robin), starting at `offset`."""
    return [list(range(offset + i, offset + total, clients)) for i in range(clients)]


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from onnx_gradcam import Explainer
    from onnx_gradcam.explain.overlay import overlay
    from onnx_gradcam.serve.tensors import decode_request, encode_response

    path = prepared_model(name)
    exp = Explainer(path, device="cpu", threads=args.threads)
    sess = exp.session
    names = exp.output_names
    shape = [1, *[int(d) for d in exp.input_shape[1:]]]  # type: ignore[arg-type]
    k = exp.num_classes or 1
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(shape).astype(np.float32) for _ in range(POOL)]
    classes = [-1 if i % 3 == 0 else (i * 7) % k for i in range(POOL)]
    refs = []
    for x, c in zip(xs, classes):
        out = dict(zip(names, sess.run(None, {"input": x, "gradcam_class": np.array([c], np.int64)})))
        refs.append(reference_bytes(out))
    bodies = [infer_body(x, c, names) for x, c in zip(xs, classes)]

    # offline: batch 8 (the reference throughput) and batch 1; batch-8 rows against batch-1 runs
    x8 = np.concatenate(xs[:8])
    c8 = np.array(classes[:8], np.int64)
    out8 = dict(zip(names, sess.run(None, {"input": x8, "gradcam_class": c8})))
    rows_equal = all(reference_bytes({k2: v[i : i + 1] for k2, v in out8.items()}) == refs[i] for i in range(8))

    def timed(fn, seconds: float = 3.0, least: int = 10) -> tuple[float, float]:  # type: ignore[no-untyped-def]
        """Median wall seconds and mean CPU seconds (this process) of a call."""
        fn()
        times, cpu0, t0 = [], time.process_time(), time.perf_counter()
        while len(times) < least or time.perf_counter() - t0 < seconds:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times), (time.process_time() - cpu0) / len(times)

    feeds8 = {"input": x8, "gradcam_class": c8}
    feeds1 = {"input": xs[1], "gradcam_class": np.array([classes[1]], np.int64)}
    calm = Explainer(path, device="cpu", threads=args.threads, spin=False).session  # as the server's
    _, cpu8_calm = timed(lambda: calm.run(None, feeds8), 1.0)
    _, cpu1_calm = timed(lambda: calm.run(None, feeds1), 1.0)
    t1, _ = timed(lambda: sess.run(None, feeds1))

    # the server's Python work per request, in this process: decode the body, encode the response
    body, hl = bodies[1]
    one = dict(zip(names, sess.run(None, feeds1)))
    req = decode_request(body, str(hl))
    t_dec, _ = timed(lambda: decode_request(body, str(hl)), 0.5)
    t_enc, _ = timed(lambda: encode_response(name, req, one), 0.5)

    def send_infer(conn: http.client.HTTPConnection, i: int):  # type: ignore[no-untyped-def]
        data, length = bodies[i % POOL]
        conn.request(
            "POST",
            f"/v2/models/{path.name[: -len('.onnx')]}/infer",
            data,
            {"Inference-Header-Content-Length": str(length), "Content-Type": "application/octet-stream"},
        )
        r = conn.getresponse()
        return r.status, r.getheaders(), r.read()

    def check_infer(i: int, headers, body: bytes) -> bool:  # type: ignore[no-untyped-def]
        length = int(dict((h.lower(), v) for h, v in headers)["inference-header-content-length"])
        return parse_infer(body, length) == refs[i % POOL]

    # explain: images as PNG bytes; the offline Explainer and overlay on the same image
    images, png_refs = [], []
    if args.explain:
        from PIL import Image

        samples = sorted((ROOT / "models" / "samples").glob("*.png")) if name == "demo" else []
        for i in range(8):
            if samples:
                img = Image.open(samples[i % len(samples)]).convert("RGB")
            else:
                img = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            cls = -1 if i % 2 == 0 else (i * 3) % k
            res = exp.explain([img], None if cls < 0 else cls)
            ov = io.BytesIO()
            overlay(img, res.maps[0], "jet", 0.5).save(ov, format="PNG")
            png_refs.append(
                {
                    "class": int(res.targets[0]),
                    "score": float(res.scores[0]),
                    "map": res.maps[0].reshape(-1).tolist(),
                    "raw_map": res.raw[0].reshape(-1).tolist(),
                    "overlay_png": base64.b64encode(ov.getvalue()).decode(),
                }
            )
            images.append((buf.getvalue(), cls))

    def send_explain(conn: http.client.HTTPConnection, i: int):  # type: ignore[no-untyped-def]
        data, cls = images[i % len(images)]
        query = "raw=1" + (f"&class={cls}" if cls >= 0 else "")
        conn.request(
            "POST", f"/v2/models/{path.name[: -len('.onnx')]}/explain?{query}", data, {"Content-Type": "image/png"}
        )
        r = conn.getresponse()
        return r.status, r.getheaders(), r.read()

    def check_explain(i: int, headers, body: bytes) -> bool:  # type: ignore[no-untyped-def]
        got, ref = json.loads(body), png_refs[i % len(images)]
        return (
            got["class"] == ref["class"]
            and got["score"] == ref["score"]
            and got["map"]["data"] == ref["map"]
            and got["raw_map"]["data"] == ref["raw_map"]
            and got["overlay_png"] == ref["overlay_png"]
        )

    result: dict[str, Any] = {
        "model": name,
        "input": "x".join(map(str, shape[1:])),
        "offline8": [],
        "offline1_ms": 1000 * t1,
        "offline8_cpu_ms": 1000 * cpu8_calm / 8,
        "offline1_cpu_ms": 1000 * cpu1_calm,
        "rows_equal": rows_equal,
        "decode_us": 1e6 * t_dec,
        "encode_us": 1e6 * t_enc,
        "rows": [],
    }
    c, n = args.clients, args.requests
    served = path.name[: -len(".onnx")]
    for max_batch in (8, 1):
        t8, _ = timed(lambda: sess.run(None, feeds8))  # the reference, just before this server runs
        result["offline8"].append(1000 * t8)
        sps8 = 8 / t8
        srv = Server(path, max_batch, args.delay_ms if max_batch > 1 else 0.0, args.threads)
        try:
            warm = 500 if max_batch > 1 else 8 * c
            w = load(srv.port, split(warm, c), send_infer, check_infer)
            rss500 = vm_rss_mb(srv.proc.pid)
            cpu0, (s0, r0) = cpu_seconds(srv.proc.pid), served_stats(srv.port, served)
            m = load(srv.port, split(c * n, c, warm), send_infer, check_infer)
            m["server_cpu_ms"] = 1000 * (cpu_seconds(srv.proc.pid) - cpu0) / m["requests"]
            s1, r1 = served_stats(srv.port, served)
            m["mean_batch"] = (s1 - s0) / max(r1 - r0, 1)
            m["rss_timed"] = vm_rss_mb(srv.proc.pid)
            m["triton_mismatches"] = triton_check(srv.port, served, xs[:16], classes[:16], refs[:16])
            m.update(endpoint="infer (binary)", max_batch=max_batch, fraction=m["rps"] / sps8, offline8_sps=sps8)
            m["mismatches"] += w["mismatches"] + m["triton_mismatches"]
            m["errors"] += w["errors"]
            m["checked"] = w["requests"] + m["requests"] + 16
            if max_batch > 1 and args.memory > warm + c * n:
                rest = load(srv.port, split(args.memory - warm - c * n, c, warm + c * n), send_infer, check_infer)
                m["mismatches"] += rest["mismatches"]
                m["errors"] += rest["errors"]
                m["checked"] += rest["requests"]
                m["rss500"], m["rss_end"], m["rss_n"] = rss500, vm_rss_mb(srv.proc.pid), args.memory
            result["rows"].append(m)
            if images:
                s0, r0 = served_stats(srv.port, served)
                e = load(srv.port, split(c * args.explain, c), send_explain, check_explain)
                s1, r1 = served_stats(srv.port, served)
                e.update(endpoint="explain (PNG)", max_batch=max_batch, fraction=e["rps"] / sps8, offline8_sps=sps8)
                e["mean_batch"] = (s1 - s0) / max(r1 - r0, 1)
                e["checked"] = e["requests"]
                result["rows"].append(e)
        finally:
            srv.stop()
    return result


def machine() -> str:
    import onnxruntime

    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"onnxruntime {onnxruntime.__version__} (CPU provider)"
    )


def table(results: list[dict[str, Any]], args: argparse.Namespace, load_before: tuple, load_after: tuple) -> str:  # type: ignore[type-arg]
    lines = [
        SECTION,
        "",
        f"Command: `python tools/bench_serve.py {' '.join(sys.argv[1:])}`",
        "",
        f"Machine: {machine()}; onnxruntime {args.threads} intra-op threads in the server and offline. "
        f"Load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; "
        f"after: {', '.join(f'{x:.2f}' for x in load_after)}.",
        "",
        f"{args.clients} client threads in this process, one keep-alive connection each, one sample per request; "
        f"the server as a subprocess (`onnx-gradcam serve MODEL --max-batch B --max-delay-ms D --threads "
        f"{args.threads}`, D = {args.delay_ms:g} for B = 8, 0 for B = 1). Clients and server share the machine's "
        "cores.",
        "",
        "| model | endpoint | max batch | timed requests | checked | mismatches | errors | mean batch | p50 ms | "
        "p99 ms | requests/s | "
        "offline batch-8 samples/s | server / offline | server CPU ms/request | client CPU ms/request | "
        "RSS MB after 500 | after 500 + timed | after N | N | N / 500 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for m in r["rows"]:
            rss = ("", "", "", "", "")
            if "rss500" in m:
                rss = (f"{m['rss500']:.1f}", f"{m['rss_timed']:.1f}", f"{m['rss_end']:.1f}", str(m["rss_n"]))
                rss += (f"{m['rss_end'] / m['rss500']:.3f}",)
            cpu = f"{m['server_cpu_ms']:.2f}" if "server_cpu_ms" in m else ""
            lines.append(
                f"| {r['model']} {r['input']} | {m['endpoint']} | {m['max_batch']} | {m['requests']} | "
                f"{m['checked']} | "
                f"{m['mismatches']} | {m['errors']} | {m['mean_batch']:.2f} | {m['p50']:.1f} | {m['p99']:.1f} | "
                f"{m['rps']:.1f} | {m['offline8_sps']:.1f} | {m['fraction']:.2f} | {cpu} | {m['client_cpu_ms']:.2f} | "
                f"{' | '.join(rss)} |"
            )
    lines += ["", "Offline, in the benchmark process (same session options):", ""]
    lines += [
        "| model | batch 8 ms (before each server) | batch 1 ms | batch 8 CPU ms/sample, not spinning | "
        "batch 1 CPU ms, not spinning | batch-8 rows == batch-1 runs | decode request us | encode response us |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {', '.join(f'{v:.2f}' for v in r['offline8'])} | {r['offline1_ms']:.2f} | "
            f"{r['offline8_cpu_ms']:.2f} | {r['offline1_cpu_ms']:.2f} | {r['rows_equal']} | "
            f"{r['decode_us']:.0f} | {r['encode_us']:.0f} |"
        )
    return "\n".join(lines) + "\n"


END = "<!-- end of the table bench_serve.py writes; the reading below is kept -->"


def write_section(path: Path, text: str) -> None:
    """Replace (or append) this benchmark's tables in BENCHMARKS.md; the hand-written reading after
    the END marker, up to the next section, is kept."""
    old = path.read_text() if path.is_file() else "# Benchmarks\n"
    text = text + "\n" + END + "\n"
    if SECTION not in old:
        path.write_text(old.rstrip("\n") + "\n\n\n" + text)
        return
    head, rest = old.split(SECTION, 1)
    if END in rest:
        rest = rest.split(END, 1)[1]
        path.write_text(head + text.rstrip("\n") + rest)
        return
    nxt = rest.find("\n## ")
    path.write_text(head + text + ("\n" + rest[nxt + 1 :] if nxt >= 0 else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["demo", "resnet18"])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=200, help="infer requests per client (timed)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument("--delay-ms", type=float, default=2.0, help="--max-delay-ms of the batching server")
    p.add_argument("--memory", type=int, default=5000, help="requests in all to the batching server (RSS)")
    p.add_argument("--explain", type=int, default=25, help="explain requests per client (0: none)")
    p.add_argument("--out", type=Path, help="write the section into this markdown file")
    args = p.parse_args()
    before = os.getloadavg()
    results = []
    for name in args.models:
        r = bench_model(name, args)
        print(json.dumps(r, indent=1), flush=True)
        results.append(r)
    text = table(results, args, before, os.getloadavg())
    print(text)
    if args.out:
        write_section(args.out, text)


if __name__ == "__main__":
    main()
