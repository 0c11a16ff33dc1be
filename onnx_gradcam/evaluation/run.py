"""evaluate(): explain a set of images with each method and layer, score the maps with the metrics
of one registry, and write metrics.json (and report.html) whole or not at all.

`onnx_gradcam.evaluate` is this function (imported on first use by onnx_gradcam/__init__.py); the
subpackage is `onnx_gradcam.evaluation`, so the two names never shadow each other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from PIL import Image

from ..errors import BadInputError, LayerNotFoundError, OnnxGradCamError
from ..explain.explainer import Explainer, ExplainResult, labels_beside, read_labels
from ..explain.images import load_image
from ..surgery.load import file_sha256, load_model
from ..surgery.prepare import prepare_model, read_metadata
from .base import EvalContext, MetricResult, make_context

ModelLike = str | os.PathLike[str] | onnx.ModelProto
ImageLike = str | os.PathLike[str] | Image.Image
Progress = Callable[[str], None]


# -- the registry: one entry per --metric name ---------------------------------------------


@dataclass(frozen=True)
class MetricSpec:
    """A --metric name: the function of evaluation/<module>.py that computes it, its options, the
    results it keeps (None: all the function returns) and what it needs beyond images and maps
    ("boxes", "truth": the true classes, "explainer": the model itself)."""

    module: str
    function: str
    summary: str
    options: tuple[tuple[str, object], ...] = ()
    keep: tuple[str, ...] | None = None
    needs: frozenset[str] = frozenset()

    def resolve(self) -> Callable[..., list[MetricResult]]:
        try:
            module = importlib.import_module(f"{__package__}.{self.module}")
            return getattr(module, self.function)  # type: ignore[no-any-return]
        except (ImportError, AttributeError) as exc:
            raise OnnxGradCamError(
                f"the metric function {self.module}.{self.function} is missing from this installation ({exc}): "
                "to fix this, reinstall onnx-gradcam"
            ) from exc


BOXES, TRUTH, EXPLAINER = "boxes", "truth", "explainer"

METRICS: dict[str, MetricSpec] = {
    "deletion": MetricSpec(
        "faithfulness",
        "deletion_insertion",
        "RISE: AUC of the probability as top pixels are set to 0 (lower: better)",
        keep=("deletion",),
    ),
    "insertion": MetricSpec(
        "faithfulness",
        "deletion_insertion",
        "RISE: AUC as top pixels return into a blurred image (higher: better)",
        keep=("insertion",),
    ),
    "average-drop": MetricSpec(
        "faithfulness",
        "average_drop_increase",
        "Grad-CAM++: Average Drop % and Increase in Confidence of map x image",
    ),
    "confidence-change": MetricSpec(
        "faithfulness",
        "confidence_change",
        "pytorch-grad-cam's confidence change, drop and increase (absolute)",
    ),
    "road": MetricSpec(
        "road",
        "road",
        "ROAD MoRF, LeRF, combined; imputed in normalised space (pytorch-grad-cam)",
        options=(("mode", "normalised"),),
    ),
    "road-original": MetricSpec(
        "road",
        "road",
        "ROAD imputed in pixels, before normalisation (Rong et al.'s own)",
        options=(("mode", "original"),),
    ),
    "pointing-game": MetricSpec(
        "localisation",
        "pointing_game",
        "hit if the map's maximum lies within 15 px of a box (TorchRay); needs boxes",
        needs=frozenset({BOXES}),
    ),
    "energy-pointing-game": MetricSpec(
        "localisation",
        "energy_pointing_game",
        "share of the map's energy inside the boxes (Score-CAM); needs boxes",
        needs=frozenset({BOXES}),
    ),
    "localisation": MetricSpec(
        "localisation",
        "localisation",
        "Grad-CAM §4.1: top-1 localisation error (15% threshold, IoU >= 0.5)",
        needs=frozenset({BOXES, TRUTH}),
    ),
    "sanity": MetricSpec(
        "sanity",
        "cascading_randomisation",
        "Adebayo et al.: Spearman rho of the maps as blocks are randomised",
        needs=frozenset({EXPLAINER}),
    ),
}


def default_metrics(has_boxes: bool, has_truth: bool) -> list[str]:
    """Every registered metric the inputs allow: box metrics need boxes, localisation true classes too."""
    have = {EXPLAINER} | ({BOXES} if has_boxes else set()) | ({TRUTH} if has_truth else set())
    return [name for name, spec in METRICS.items() if spec.needs <= have]


def _checked_metrics(metrics: Sequence[str] | None, has_boxes: bool, has_truth: bool) -> list[str]:
    if metrics is None or len(metrics) == 0:
        return default_metrics(has_boxes, has_truth)
    chosen: list[str] = []
    for name in metrics:
        if name not in METRICS:
            raise BadInputError(f"unknown metric {name!r}: to fix this, use one of {', '.join(METRICS)}")
        spec = METRICS[name]
        if BOXES in spec.needs and not has_boxes:
            raise BadInputError(f"metric {name!r} needs object boxes: to fix this, give --boxes FILE (boxes=...)")
        if TRUTH in spec.needs and not has_truth:
            raise BadInputError(
                f'metric {name!r} needs the true classes: to fix this, give each image a "class" in the boxes file'
            )
        if name not in chosen:
            chosen.append(name)
    return chosen


# -- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    """One method at one feature layer: its maps [N, H, W] and its metrics by result name."""

    method: str
    layer: str
    maps: np.ndarray
    metrics: dict[str, MetricResult]

    def to_json(self) -> dict[str, object]:
        return {
            "method": self.method,
            "layer": self.layer,
            "metrics": {k: m.to_json() for k, m in self.metrics.items()},
        }


@dataclass(frozen=True)
class EvaluationResult:
    """What evaluate() measured: per image its prediction and truth, per method x layer the metrics.

    classes: [N] top-1 on the clean image (the class explained); probabilities: [N] its softmax;
    truth: [N] true classes (-1 where unknown); labels: class names (None without a labels file);
    files: what was written (metrics.json, report.html), empty without out_dir.
    """

    names: list[str]
    classes: np.ndarray
    probabilities: np.ndarray
    truth: np.ndarray
    labels: list[str] | None
    runs: list[RunResult]
    metric_names: list[str]
    model: str
    model_sha256: str
    versions: dict[str, str]
    files: list[Path] = field(default_factory=list)

    def run(self, method: str, layer: str | None = None) -> RunResult:
        for r in self.runs:
            if r.method == method and (layer is None or r.layer == layer):
                return r
        raise BadInputError(f"no run for method {method!r} at layer {layer!r} in this evaluation")

    def metric(self, name: str, method: str | None = None, layer: str | None = None) -> MetricResult:
        """A metric of one run (default: the first run)."""
        run = self.run(method, layer) if method is not None else self.runs[0]
        if name not in run.metrics:
            raise BadInputError(f"no metric {name!r} in this evaluation (it has {', '.join(run.metrics)})")
        return run.metrics[name]

    def label(self, cls: int) -> str:
        return self.labels[cls] if self.labels is not None and 0 <= cls < len(self.labels) else str(cls)

    def predictions(self) -> list[dict[str, object]]:
        rows = []
        for name, cls, p, t in zip(self.names, self.classes, self.probabilities, self.truth):
            rows.append(
                {
                    "name": name,
                    "class": int(cls),
                    "label": self.label(int(cls)) if self.labels else None,
                    "probability": float(p),
                    "truth": int(t) if t >= 0 else None,
                    "correct": bool(cls == t) if t >= 0 else None,
                }
            )
        return rows

    def to_json(self) -> dict[str, object]:
        return {
            "versions": self.versions,
            "model": {"path": self.model, "sha256": self.model_sha256},
            "images": self.names,
            "labels": self.labels,
            "predictions": self.predictions(),
            "metrics": self.metric_names,
            "runs": [r.to_json() for r in self.runs],
        }


# -- inputs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Annotation:
    """One image's entry in a boxes file: boxes [x0, y0, x1, y1] in its own pixels, its class."""

    boxes: list[list[float]]
    cls: int | str | None


def read_boxes(source: str | os.PathLike[str] | Mapping[str, object]) -> dict[str, Annotation]:
    """A boxes file (JSON, as models/demo_boxes.json): {"name.png": {"class": label or index,
    "box": [x0, y0, x1, y1]} or {"boxes": [[x0, y0, x1, y1], ...]}}, keyed by image file name."""
    where = "the boxes mapping"
    if isinstance(source, Mapping):
        data: object = source
    else:
        where = f"the boxes file {str(source)!r}"
        try:
            data = json.loads(Path(source).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadInputError(
                f"cannot read {where} ({exc}): to fix this, give a JSON file like models/demo_boxes.json"
            ) from exc
    if not isinstance(data, Mapping):
        raise BadInputError(
            f"{where} is not a JSON object of image names: to fix this, write it like models/demo_boxes.json"
        )
    out: dict[str, Annotation] = {}
    for name, entry in data.items():
        if not isinstance(entry, Mapping) or ("box" in entry) == ("boxes" in entry):
            raise BadInputError(
                f'{where}: the entry of {name!r} has no box: to fix this, give it "box": [x0, y0, x1, y1] '
                'or "boxes": [[x0, y0, x1, y1], ...] (one of the two)'
            )
        raw = [entry["box"]] if "box" in entry else entry["boxes"]
        if not isinstance(raw, list):
            raise BadInputError(f'{where}: "boxes" of {name!r} is not a list: to fix this, write [[x0, y0, x1, y1]]')
        boxes = [_checked_box(b, name, where) for b in raw]
        cls = entry.get("class")
        if cls is not None and (isinstance(cls, bool) or not isinstance(cls, (int, str))):
            raise BadInputError(f"{where}: the class of {name!r} is {cls!r}: to fix this, give a label or an index")
        out[str(name)] = Annotation(boxes, cls)
    return out


def _checked_box(box: object, name: str, where: str) -> list[float]:
    values: list[float] = []
    if (
        isinstance(box, list)
        and len(box) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
    ):
        values = [float(v) for v in box]
    if not values or not (values[2] > values[0] and values[3] > values[1] and all(np.isfinite(values))):
        raise BadInputError(
            f"{where}: {name!r} has the box {box!r}: to fix this, give [x0, y0, x1, y1] in the image's pixels "
            "with x1 > x0 and y1 > y0"
        )
    return values


def _truth(cls: int | str | None, labels: list[str] | None, name: str, k: int | None) -> int:
    if cls is None:
        return -1
    if isinstance(cls, str) and not cls.lstrip("-").isdigit():
        if labels is None:
            raise BadInputError(
                f"the class of {name!r} is the name {cls!r} but the model has no labels: to fix this, pass --labels "
                "FILE (or put labels.txt beside the model), or give class indices"
            )
        if cls not in labels:
            raise BadInputError(
                f"the class {cls!r} of {name!r} is not in the labels: to fix this, use one of {', '.join(labels[:10])}"
            )
        return labels.index(cls)
    index = int(cls)
    if index < 0 or (k is not None and index >= k):
        raise BadInputError(
            f"the class {index} of {name!r} is out of range: to fix this, give an index below the model's {k} classes"
        )
    return index


# -- explainers: one per feature layer -----------------------------------------------------


def _explainers(
    proto: onnx.ModelProto,
    sha: str,
    methods: Sequence[str] | None,
    layers: Sequence[str] | None,
    device: str,
    threads: int | None,
    batch_size: int,
    labels: list[str] | None,
    verify: bool,
) -> list[tuple[str, Explainer, list[str]]]:
    """(layer, explainer, methods) per layer: a plain model is prepared in memory at each layer
    with every method; a prepared one is used as it is."""
    meta = read_metadata(proto)
    if "method" in meta:
        exp = Explainer(proto, device=device, batch_size=batch_size, threads=threads, labels=labels)
        own = json.loads(meta.get("feature_tensors", json.dumps([exp.feature_layer])))
        if layers and list(layers) != own:
            raise LayerNotFoundError(
                f"the model is already prepared at {', '.join(own)}, not {', '.join(layers)}: to fix this, evaluate "
                "the plain model (it is prepared at each --layer), or leave out --layer"
            )
        chosen = list(methods) if methods else list(exp.methods)
        for m in chosen:
            exp.checked_method(m)
        return [(" + ".join(own), exp, chosen)]
    chosen = list(methods) if methods else ["gradcam"]
    found = []
    for layer in list(layers) if layers else [None]:
        prepared, _ = prepare_model(proto, feature_layer=layer, methods=chosen, source_sha256=sha)
        if verify:
            from ..explain.verify import verify_prepared

            verify_prepared(proto, prepared, _)
        exp = Explainer(prepared, device=device, batch_size=batch_size, threads=threads, labels=labels)
        found.append((exp.feature_layer, exp, chosen))
    return found


def _explained(explainer: Explainer, ctx: EvalContext, method: str) -> ExplainResult:
    """The maps of the clean images for their top-1 classes (ctx.x is NCHW; NHWC models get it transposed)."""
    x = ctx.x.transpose(0, 2, 3, 1) if explainer.input.layout == "nhwc" else ctx.x
    return explainer.explain(x, target=list(ctx.classes), method=method)


def _score(
    explainer: Explainer,
    ctx: EvalContext,
    method: str,
    maps: np.ndarray,
    names: list[str],
    progress: Progress,
    verify: bool = True,
) -> dict[str, MetricResult]:
    """The metrics `names` of one run; a function that several names share runs once."""
    done: dict[tuple[str, str, tuple[tuple[str, object], ...]], list[MetricResult]] = {}
    out: dict[str, MetricResult] = {}
    for name in names:
        spec = METRICS[name]
        key = (spec.module, spec.function, spec.options)
        if key not in done:
            progress(f"{method} @ {explainer.feature_layer}: {name}")
            fn = spec.resolve()
            opts = dict(spec.options)
            if EXPLAINER in spec.needs:  # the sanity check prepares the model again: with the same self-check
                done[key] = fn(explainer, ctx, method=method, verify=verify, **opts)
            else:
                done[key] = fn(ctx, maps, **opts)
        for result in done[key]:
            if spec.keep is None or result.name in spec.keep:
                out[result.name] = result
    return out


# -- the verb ------------------------------------------------------------------------------


def evaluate(
    model: ModelLike,
    images: Sequence[ImageLike],
    boxes: str | os.PathLike[str] | Mapping[str, object] | None = None,
    methods: Sequence[str] | None = None,
    layers: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 32,
    device: str = "auto",
    threads: int | None = None,
    labels: Sequence[str] | str | os.PathLike[str] | None = None,
    names: Sequence[str] | None = None,
    report: bool = True,
    verify: bool = True,
    progress: Progress | None = None,
) -> EvaluationResult:
    """Explain `images` with each method at each layer and score the maps with `metrics`
    (names of METRICS; default: all that the inputs allow), on the model's top-1 class.

    A plain model is prepared in memory at each of `layers` (default: prepare's choice) with all
    `methods` (default gradcam); a prepared model is used as it is. `boxes`: a JSON file or mapping
    as models/demo_boxes.json, keyed by image file name (`names` for PIL images), with boxes in
    each image's own pixels and optionally its true "class" (a label needs `labels`: a list or a
    file, by default labels.txt beside the model). With `out_dir`, metrics.json and (`report`, the
    report extra) report.html are written there, both or neither.

    Example:
        >>> result = evaluate("models/demo.onnx", paths, boxes="models/demo_boxes.json", out_dir="eval")
        >>> result.metric("deletion").value, result.metric("pointing_game").value
    """
    say = progress or (lambda _msg: None)
    if batch_size < 1:
        raise BadInputError(f"batch size {batch_size} is not positive: to fix this, give 1 or more")
    if len(images) == 0:
        raise BadInputError("no images to evaluate: to fix this, pass one image or more")
    if report and out_dir is not None:
        from .report import require_matplotlib

        require_matplotlib()
    pictures = [img if isinstance(img, Image.Image) else load_image(img) for img in images]
    image_names = _names(images, names)
    if isinstance(model, onnx.ModelProto):
        proto, where = model, "<ModelProto>"
        sha = hashlib.sha256(model.SerializeToString()).hexdigest()
    else:
        proto, where, sha = load_model(model), str(model), file_sha256(model)
    label_list, beside = _labels(labels, model)
    notes = read_boxes(boxes) if boxes is not None else None
    if notes is not None:
        missing = [n for n in image_names if n not in notes]
        if missing:
            raise BadInputError(
                f"{len(missing)} image(s) are not in the boxes file, e.g. {missing[0]!r}: to fix this, add them to it "
                "(keyed by file name), or leave out --boxes"
            )
    say("preparing the model" if "method" not in read_metadata(proto) else "loading the model")
    found = _explainers(proto, sha, methods, layers, device, threads, batch_size, None, verify)
    k = found[0][1].num_classes
    if label_list is not None and k is not None and len(label_list) != k:
        if beside:  # as `explain`: a labels.txt beside the model that does not fit it is not used
            label_list = None
        else:
            raise BadInputError(
                f"the labels list has {len(label_list)} names but the model has {k} classes: to fix this, give a "
                "labels file with one name per class, in class-index order"
            )
    own_boxes = [notes[n].boxes for n in image_names] if notes is not None else None
    truth = [_truth(notes[n].cls, label_list, n, k) for n in image_names] if notes is not None else None
    has_boxes = own_boxes is not None and any(own_boxes)
    has_truth = truth is not None and any(t >= 0 for t in truth)
    chosen = _checked_metrics(metrics, has_boxes, has_truth)
    runs: list[RunResult] = []
    ctx: EvalContext | None = None
    versions: dict[str, str] = {}
    for layer, exp, layer_methods in found:
        ctx = make_context(exp, pictures, image_names, own_boxes, truth, batch_size)
        for method in layer_methods:
            say(f"{method} @ {layer}: maps")
            explained = _explained(exp, ctx, method)
            versions = explained.versions
            maps = np.asarray(explained.maps, np.float32)
            runs.append(RunResult(method, layer, maps, _score(exp, ctx, method, maps, chosen, say, verify)))
    assert ctx is not None
    probabilities = _softmax(ctx.logits)[np.arange(len(ctx.classes)), ctx.classes]
    result = EvaluationResult(
        names=image_names,
        classes=ctx.classes,
        probabilities=probabilities.astype(np.float64),
        truth=ctx.truth,
        labels=label_list,
        runs=runs,
        metric_names=chosen,
        model=where,
        model_sha256=sha,
        versions=_versions(versions, report and out_dir is not None),
    )
    if out_dir is None:
        return result
    say("writing")
    files = {"metrics.json": (json.dumps(result.to_json(), indent=1) + "\n").encode("utf-8")}
    if report:
        from .report import report_html

        files["report.html"] = report_html(result, pictures).encode("utf-8")
    written = write_files(Path(out_dir), files)
    return dataclasses.replace(result, files=written)


def _names(images: Sequence[ImageLike], names: Sequence[str] | None) -> list[str]:
    if names is not None:
        if len(names) != len(images):
            raise BadInputError(f"{len(names)} names for {len(images)} images: to fix this, give one name per image")
        return list(names)
    out = []
    for i, img in enumerate(images):
        out.append(Path(img).name if not isinstance(img, Image.Image) else f"image{i}.png")
    if len(set(out)) != len(out):
        twice = next(n for n in out if out.count(n) > 1)
        raise BadInputError(
            f"two images are named {twice!r}: to fix this, give images with distinct file names (the boxes file "
            "and the report key them by name)"
        )
    return out


def _labels(labels: Sequence[str] | str | os.PathLike[str] | None, model: ModelLike) -> tuple[list[str] | None, bool]:
    """(class names, whether they were found beside the model rather than given)."""
    if isinstance(labels, (str, os.PathLike)):
        return read_labels(labels), False
    if labels is not None:
        return list(labels), False
    if isinstance(model, onnx.ModelProto):
        return None, False
    found = labels_beside(model)
    return (read_labels(found), True) if found is not None else (None, False)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _versions(explained: dict[str, str], with_matplotlib: bool) -> dict[str, str]:
    found = {**explained, "numpy": np.__version__}
    if with_matplotlib:
        import matplotlib

        found["matplotlib"] = matplotlib.__version__
    return found


def write_files(folder: Path, files: dict[str, bytes]) -> list[Path]:
    """Write every file or none: all go to a hidden folder beside them first, then are renamed in."""
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".evaluate.", suffix=".tmp", dir=folder))
    except OSError as exc:
        raise BadInputError(
            f"cannot create the output folder {folder} ({exc.strerror or exc}): to fix this, choose another -o folder"
        ) from None
    written: list[Path] = []
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        for name in files:
            os.replace(tmp / name, folder / name)
            written.append(folder / name)
    except OSError as exc:
        for path in written:
            path.unlink(missing_ok=True)
        written = []
        raise BadInputError(
            f"cannot write {folder} ({exc.strerror or exc}): to fix this, free disk space or choose another -o folder"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not written:
            shutil.rmtree(folder, ignore_errors=True)
    return written
