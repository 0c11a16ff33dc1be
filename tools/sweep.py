"""The architecture sweep: `onnx_gradcam.prepare` with default settings over timm and torchvision
classifiers (random, conditioned weights), each checked against torch autograd.

    python tools/sweep.py [--fast] [--models timm:NAME,torchvision:NAME,...] [--out docs/architectures.md]

Per model (each in its own process, so a crash or a hang is one row): export (tools/export_timm.py,
TorchScript, opset 17), prepare with expose_gradient=True, load and run the written file in
onnxruntime on the CPU (2 samples), and compare the gradient at the chosen feature tensor with
torch autograd in float64 at that very tensor (the ONNX tensor mapped to its torch module call,
tools/onnx_scopes.py; the mapping is checked by value). Verdicts:

- exact: every sample's gradient within 1e-4 of torch, relative to the sample's largest |gradient|
- wrong: a written file whose gradient differs
- refused: prepare raised a clear error (unsupported op, no layer) and wrote nothing
- error: prepare's self-check failed (a bug the check caught: nothing written), a crash, a written
  file that does not load or run, or a timeout
- unverified: the file runs, but its feature tensor is no torch module's output

Where prepare's self-check fails, the gradient is still checked on the prepared graph without its
CAM nodes (prepare with verify=False, pruned to the gradient outputs): column "gradient".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent
EXACT = 1e-4
MAPPING = 1e-2  # the ONNX tensor vs the torch module's float32 output: same tensor, not a mismatch

CNNS = [
    "resnet18",
    "resnet26d",
    "seresnext26d_32x4d",
    "res2net50_14w_8s",
    "resnest14d",
    "efficientnet_b0",
    "tf_efficientnetv2_b0",
    "mobilenetv2_100",
    "mobilenetv3_small_100",
    "mobilenetv3_large_100",
    "mobilenetv4_conv_small",
    "ghostnet_100",
    "densenet121",
    "convnext_atto",
    "regnety_002",
    "rexnet_100",
    "mixnet_s",
    "dla34",
    "cspresnet50",
    "repvgg_a0",
    "hgnetv2_b0",
]
HYBRIDS = [
    "levit_128s",
    "efficientformer_l1",
    "efficientformerv2_s0",
    "coat_lite_tiny",
    "mobilevit_xxs",
    "mobilevitv2_050",
    "edgenext_xx_small",
    "poolformer_s12",
    "pvt_v2_b0",
    "fastvit_t8",
    "efficientvit_b0",
    "efficientvit_m0",
    "tiny_vit_5m_224",
    "visformer_tiny",
    "coatnet_nano_rw_224",
    "sequencer2d_s",
]
TRANSFORMERS = [
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "swin_tiny_patch4_window7_224",
    "cait_xxs24_224",
    "xcit_nano_12_p16_224",
    "pit_ti_224",
    "mixer_s16_224",
    "resmlp_12_224",
    "gmlp_ti16_224",
    "crossvit_tiny_240",
    "eva02_tiny_patch14_224",
]
TORCHVISION = [
    "resnet18",
    "resnet50",
    "googlenet",
    "inception_v3",
    "densenet121",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "convnext_tiny",
    "regnet_y_400mf",
    "shufflenet_v2_x1_0",
    "squeezenet1_1",
    "mnasnet1_0",
    "vit_b_16",
    "swin_t",
]
MODELS = [f"timm:{n}" for n in CNNS + HYBRIDS + TRANSFORMERS] + [f"torchvision:{n}" for n in TORCHVISION]
# the CI subset: a CNN of each exporter source, a squeeze-excitation net, the Gather of a token grid
# (coat_lite), a class-token ViT and a distilled DeiT
FAST = [
    "timm:resnet18",
    "timm:mobilenetv3_small_100",
    "timm:coat_lite_tiny",
    "timm:vit_tiny_patch16_224",
    "timm:deit_tiny_distilled_patch16_224",
    "torchvision:squeezenet1_1",
]


@dataclass
class Row:
    model: str  # "source:name"
    result: str = "error"  # exact / wrong / error / refused / unverified
    feature: str = "-"
    layout: str = "-"
    gradient: str = "-"  # the largest per-sample relative error, or why it was not measured
    error: str = ""
    seconds: float = 0.0


def one_line(e: BaseException | str, limit: int = 320) -> str:
    text = " ".join(str(e).split())
    text = text if isinstance(e, str) else f"{type(e).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _session(model_bytes: bytes):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def gradient_only(model):  # type: ignore[no-untyped-def]
    """The prepared graph pruned to the original outputs and gradcam_features/gradcam_gradient."""
    import onnx

    keep = [o for o in model.graph.output if not o.name.startswith("gradcam_")]
    keep += [o for o in model.graph.output if o.name in ("gradcam_features", "gradcam_gradient", "gradcam_target")]
    needed = {o.name for o in keep}
    nodes = []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output):
            nodes.append(node)
            needed.update(i for i in node.input if i)
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    del pruned.graph.node[:]
    pruned.graph.node.extend(reversed(nodes))
    del pruned.graph.output[:]
    pruned.graph.output.extend(keep)
    return pruned


def torch_gradient(net, call, features: np.ndarray, x: np.ndarray, classes: np.ndarray, dtype: str):  # type: ignore[no-untyped-def]
    """d logits[i, classes[i]] / d (the module call's output), the output replaced by `features`."""
    import copy

    import torch

    dt = getattr(torch, dtype)
    model = copy.deepcopy(net).to(dt).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    a = torch.from_numpy(features).to(dt).requires_grad_(True)
    call.hook(model, lambda _out: a)
    out = model(torch.from_numpy(x).to(dt))
    out[torch.arange(len(classes)), torch.from_numpy(classes)].sum().backward()
    return a.grad.double().numpy()


def torch_features(net, call, x: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    import torch

    store: list[np.ndarray] = []
    handle = call.hook(net, lambda out: store.append(out.detach().double().numpy()))
    with torch.no_grad():
        net(torch.from_numpy(x))
    handle.remove()
    return store[0]


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and per_sample(b, a) <= MAPPING


def per_sample(a: np.ndarray, b: np.ndarray) -> float:
    worst = 0.0
    for i in range(len(b)):
        scale = float(np.max(np.abs(b[i])))
        diff = float(np.max(np.abs(np.asarray(a[i], np.float64) - b[i])))
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def check(spec: str, workdir: Path) -> Row:
    """Export, prepare, run and compare one model; never raises."""
    import export_timm
    import onnx
    from onnx_scopes import module_calls

    from onnx_gradcam import prepare
    from onnx_gradcam.errors import OnnxGradCamError, VerificationError

    row = Row(spec)
    source, name = spec.split(":", 1)
    try:
        size = export_timm.input_size(name, source)
        src = export_timm.export(name, size, source=source)
    except Exception as e:  # noqa: BLE001 - one row per model, whatever happened
        row.error = "export failed: " + one_line(e)
        return row
    out = workdir / f"{name}.prepared.onnx"
    written = True
    try:
        report = prepare(src, out, expose_gradient=True)
        row.feature = report.feature_tensor
    except VerificationError as e:
        row.error = one_line(e)
        written = False
    except OnnxGradCamError as e:
        row.result, row.error = "refused", one_line(e)
        return row
    except Exception as e:  # noqa: BLE001
        row.error = "prepare crashed: " + one_line(e)
        return row
    if not written:  # the CAM part failed its check; the gradient can still be measured
        try:
            report = prepare(src, out, expose_gradient=True, verify=False)
            row.feature = report.feature_tensor
        except Exception as e:  # noqa: BLE001
            row.gradient = "not measured: " + one_line(e, 80)
            return row
    prepared = onnx.load(str(out))
    meta = {p.key: p.value for p in prepared.metadata_props}
    row.layout = meta.get("feature_layout", meta.get("gradcam.feature_layout", "-"))
    x = np.random.RandomState(0).rand(2, 3, size, size).astype(np.float32)
    try:
        sess = _session((prepared if written else gradient_only(prepared)).SerializeToString())
        names = [o.name for o in sess.get_outputs()]
        got = dict(zip(names, sess.run(None, {"input": x})))
    except Exception as e:  # noqa: BLE001
        if written:
            row.error = "the written file does not run in onnxruntime: " + one_line(e)
        else:
            row.gradient = "not measured: " + one_line(e, 80)
        return row
    if written and not all(np.isfinite(v).all() for k, v in got.items() if k.startswith("gradcam_")):
        row.error = "non-finite gradcam_* outputs"
        return row

    net = export_timm.build(name, size, source)
    calls = module_calls(prepared, row.feature, net)
    call = next((c for c in calls if _same(torch_features(net, c, x), got["gradcam_features"])), None)
    if call is None:
        why = f"{', '.join(map(str, calls))} not the tensor" if calls else "the tensor is no module's output"
        row.gradient = "not measured: " + why
        if written:
            row.result = "unverified"
        return row
    classes = got["gradcam_target"].astype(np.int64)
    ref = torch_gradient(net, call, got["gradcam_features"], x, classes, "float64")
    err = per_sample(got["gradcam_gradient"], ref)
    row.gradient = f"{err:.1e}"
    if err >= EXACT:
        ref32 = torch_gradient(net, call, got["gradcam_features"], x, classes, "float32")
        row.gradient += f" (torch float32: {per_sample(ref32, ref):.1e})"
    if written:
        row.result = "exact" if err < EXACT else "wrong"
        row.feature = f"{row.feature} ({call})"
    else:
        row.feature = f"{row.feature} ({call})"
    return row


def run_one(spec: str, timeout: float) -> Row:
    """`check` in a child process (a crash or a hang is one row)."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "row.json"
        cmd = [sys.executable, __file__, "--one", spec, "--json", str(result)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Row(spec, error=f"timed out after {timeout:.0f} s", seconds=timeout)
        if result.is_file():
            row = Row(**json.loads(result.read_text()))
        else:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            row = Row(spec, error="the check crashed: " + one_line(tail[0]))
    row.seconds = round(time.monotonic() - start, 1)
    return row


def table(rows: list[Row]) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.result] = counts.get(r.result, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    lines = [
        "# Architectures",
        "",
        "Generated by `python tools/sweep.py` (do not edit by hand): `onnx_gradcam.prepare` with default",
        "settings on random, conditioned weights (tools/export_timm.py: TorchScript exporter, opset 17),",
        "the written file run in onnxruntime (CPU), its gradient at the feature tensor compared with torch",
        f"autograd in float64 at the same tensor (exact: within {EXACT:g} of each sample's largest |gradient|).",
        "*gradient*: that error; where prepare's self-check failed, measured on the graph without its CAM part.",
        "",
        f"{len(rows)} architectures: {summary}.",
        "",
        "| architecture | source | result | feature tensor (torch module) | layout | gradient | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        source, name = r.model.split(":", 1)
        cells = [name, source, r.result, f"`{r.feature}`" if r.feature != "-" else "-", r.layout, r.gradient, r.error]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fast", action="store_true", help=f"the CI subset ({len(FAST)} models)")
    p.add_argument("--models", default=None, help="comma-separated source:name (source timm or torchvision)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "architectures.md")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per model")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:  # the child process of run_one
        import torch

        torch.set_num_threads(2)
        with tempfile.TemporaryDirectory() as tmp:
            row = check(args.one, Path(tmp))
        args.json.write_text(json.dumps(asdict(row)))
        return
    specs = args.models.split(",") if args.models else FAST if args.fast else MODELS
    specs = [s if ":" in s else f"timm:{s}" for s in specs]
    rows = []
    for spec in specs:
        row = run_one(spec, args.timeout)
        print(f"{spec}: {row.result} {row.gradient} {row.error} ({row.seconds} s)", flush=True)
        rows.append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table(rows))


if __name__ == "__main__":
    main()
