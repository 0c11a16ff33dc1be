"""Ray Data adapter: explain a Dataset of images on an actor pool, one Explainer (one session) per actor.

The ray extra (`pip install 'onnx-gradcam[ray]'`); imported only by `explain --ray` and by callers.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import onnx
from PIL import Image

from .errors import BadInputError, OnnxGradCamError
from .explain.explainer import Explainer, ExplainResult
from .explain.images import IMAGE_SUFFIXES, collect_inputs, load_image, to_rgb
from .explain.pipeline import (
    Decoded,
    FileSink,
    Job,
    Rendered,
    RenderOptions,
    RunSummary,
    decoded_image,
    explain_and_render,
    remove_stale_temporaries,
    run_settings,
    unique_stems,
    write_rendered,
)

try:
    import ray
    import ray.data
except ImportError as exc:  # the module is only imported by callers that asked for Ray
    raise ImportError(f"onnx_gradcam.ray needs the ray extra ({exc}): pip install 'onnx-gradcam[ray]'") from exc

IMAGE_COLUMNS = ("image", "bytes")  # ray.data.read_images, read_binary_files (and parquet of either)


@dataclass(frozen=True)
class ExplainOptions:
    """What each actor is asked: the Explainer's settings and the class choice."""

    target: int | str | None = None
    top_k: int | None = None
    method: str | None = None
    preprocess: Any = None  # a preset name or Preprocess
    size: tuple[int, int] | None = None
    layout: str | None = None
    labels: Sequence[str] | None = None
    batch_size: int = 8
    device: str = "auto"
    threads: int | None = None
    column: str | None = None


class ExplainBatch:
    """A callable class for `Dataset.map_batches`: one Explainer per actor, created once.

    Each input row becomes one row per explained class (top_k rows with top_k, else one): the
    input's other columns, then rank, class, label, score, probability, method, feature_layer,
    map (float32 [H, W] in [0, 1] at the network's input size) and raw (float32, before
    normalisation; what the CLI saves as .npy).
    """

    def __init__(self, model: Any, options: ExplainOptions) -> None:
        self.options = options
        self.explainer = Explainer(
            _model_proto(model),
            device=options.device,
            preprocess=options.preprocess,
            batch_size=options.batch_size,
            threads=options.threads,
            labels=options.labels,
            size=options.size,
            layout=options.layout,
            spin=False,  # actors share the cores with Ray's readers and with each other
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        column = self.options.column or _image_column(batch)
        images = [_to_image(v, _row_name(batch, i)) for i, v in enumerate(batch[column])]
        results = self.explain(images)
        n = len(images)
        out: dict[str, list[Any]] = {k: [] for k in batch if k != column}
        fields: dict[str, list[Any]] = {k: [] for k in _FIELDS}
        for rank, result in enumerate(results, start=1):
            for i in range(n):
                for k in out:
                    out[k].append(batch[k][i])
                for k, v in self.fields(result, i, rank).items():
                    fields[k].append(v)
        columns: dict[str, Any] = {**out, **fields}
        columns["map"] = np.stack([np.asarray(m, np.float32) for m in fields["map"]]) if n else np.zeros((0, 0, 0))
        columns["raw"] = np.stack([np.asarray(m, np.float32) for m in fields["raw"]]) if n else np.zeros((0, 0, 0))
        return columns

    def explain(self, images: list[Image.Image]) -> list[ExplainResult]:
        """One result per rank for a batch of pictures, as the CLI asks (top-k, or one target)."""
        exp, opt = self.explainer, self.options
        x = exp.to_tensor(images)
        if opt.top_k:
            return exp.explain_top_k(x, opt.top_k, opt.method)
        return [exp.explain(x, opt.target, opt.method)]

    def fields(self, result: ExplainResult, i: int, rank: int) -> dict[str, Any]:
        exp = self.explainer
        cls = int(result.targets[i])
        return {
            "rank": rank,
            "class": cls,
            "label": exp.labels[cls] if exp.labels and 0 <= cls < len(exp.labels) else None,
            "score": float(result.scores[i]),
            "probability": float(result.probabilities[i, cls]) if result.probabilities is not None else None,
            "method": result.method,
            "feature_layer": result.feature_layer,
            "map": result.maps[i],
            "raw": result.raw[i],
        }


_FIELDS = ("rank", "class", "label", "score", "probability", "method", "feature_layer", "map", "raw")


def explain_dataset(
    ds: ray.data.Dataset,
    model: str | os.PathLike[str] | bytes | onnx.ModelProto,
    *,
    target: int | str | None = None,
    top_k: int | None = None,
    method: str | None = None,
    preprocess: Any = None,
    size: tuple[int, int] | None = None,
    layout: str | None = None,
    labels: Sequence[str] | None = None,
    column: str | None = None,
    batch_size: int = 8,
    concurrency: int | tuple[int, int] = 1,
    num_cpus: float = 1,
    num_gpus: float | None = None,
    threads: int | None = None,
    device: str = "auto",
    actor_class: type[ExplainBatch] = ExplainBatch,
) -> ray.data.Dataset:
    """A Dataset of maps and predictions for a Dataset of images, explained on an actor pool.

    `ds` comes from `ray.data.read_images` (column `image`: decoded pixels), `read_binary_files`
    (column `bytes`: encoded files, decoded as the CLI decodes them) or `read_parquet` of either;
    `column` names another. Each of `concurrency` actors (an int, or (min, max) to autoscale)
    loads the model once, with `num_cpus` (and `num_gpus`) reserved for it and `threads`
    onnxruntime threads (default: num_cpus). `model` is a path every node can read, or the
    model itself (bytes or a ModelProto: put in Ray's object store once, fetched by each actor).
    Result columns: see ExplainBatch. Nothing runs until the Dataset is consumed.

    Example:
        >>> ds = ray.data.read_images("s3://bucket/photos", include_paths=True, mode="RGB")
        >>> explain_dataset(ds, "resnet50.gradcam.onnx", concurrency=8, num_gpus=1).write_parquet("s3://bucket/maps")
    """
    if batch_size < 1:
        raise BadInputError(f"batch size {batch_size} is not positive: to fix this, give 1 or more")
    options = ExplainOptions(
        target, top_k, method, preprocess, size, layout, list(labels) if labels else None, batch_size, device,
        threads if threads is not None else max(1, int(num_cpus)), column,
    )  # fmt: skip
    return _map(ds, actor_class, model, options, concurrency, num_cpus, num_gpus)


def _map(
    ds: ray.data.Dataset,
    actor_class: type,
    model: Any,
    options: ExplainOptions,
    concurrency: int | tuple[int, int],
    num_cpus: float,
    num_gpus: float | None,
    extra: tuple[Any, ...] = (),
) -> ray.data.Dataset:
    shipped = model if isinstance(model, (str, os.PathLike)) else ray.put(_model_bytes(model))
    if isinstance(shipped, os.PathLike):
        shipped = os.fspath(shipped)
    size = concurrency if isinstance(concurrency, tuple) else (concurrency, concurrency)
    kwargs: dict[str, Any] = {"num_cpus": num_cpus}
    if num_gpus:
        kwargs["num_gpus"] = num_gpus
    return ds.map_batches(
        actor_class,
        fn_constructor_args=(shipped, options, *extra),
        batch_size=options.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=size[0], max_size=size[1]),
        **kwargs,
    )


# -- the command line: files in, the CLI's files out, written by the workers ---------------------


@dataclass(frozen=True)
class Listed:
    """The inputs of `explain --ray`: paths as Ray reads them, in the CLI's order, with the
    CLI's output names and the text predictions.json shows for each."""

    paths: list[str]
    filesystem: Any  # a pyarrow filesystem for URIs, None for local paths
    names: dict[str, tuple[int, str, str]]  # path -> (order, output name, shown as)
    problems: list[str]


def list_inputs(inputs: Sequence[str], exclude: str | os.PathLike[str] | None) -> Listed:
    """Local files, folders and globs as the CLI collects them; URIs (s3://, gs://, file://, ...)
    listed recursively through pyarrow's filesystems, image suffixes only, sorted."""
    local = [i for i in inputs if "://" not in i]
    shown: list[str] = []
    paths: list[str] = []
    files, problems = collect_inputs(local, None, exclude=exclude) if local else ([], [])
    for f in files:
        shown.append(str(f))
        paths.append(os.path.abspath(f))
    filesystem = None
    for uri in (i for i in inputs if "://" in i):
        filesystem, found = _list_uri(uri, filesystem)
        if not found:
            problems.append(f"{uri!r}: holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        scheme = uri.split("://", 1)[0]
        for p in found:
            paths.append(p)
            shown.append(f"{scheme}://{p}")
    if local and filesystem is not None:
        raise BadInputError("local paths and URIs in one --ray run: to fix this, give file:// URIs for the local ones")
    stems = output_names(shown)
    return Listed(paths, filesystem, {p: (k, stems[k], s) for k, (p, s) in enumerate(zip(paths, shown))}, problems)


def _list_uri(uri: str, known: Any) -> tuple[Any, list[str]]:
    import pyarrow.fs

    try:
        fs, root = pyarrow.fs.FileSystem.from_uri(uri)
        info = fs.get_file_info(root)
        if info.type == pyarrow.fs.FileType.File:
            return fs, [root]
        found = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
    except (OSError, ValueError, pyarrow.ArrowException) as exc:
        raise BadInputError(
            f"cannot list {uri!r} ({exc}): to fix this, give a folder or file URI you can read"
        ) from None
    if known is not None and type(known) is not type(fs):
        raise BadInputError("URIs of different filesystems in one --ray run: to fix this, give one kind of URI")
    keep = [
        f.path
        for f in found
        if f.type == pyarrow.fs.FileType.File and PurePosixPath(f.path).suffix.lower() in IMAGE_SUFFIXES
    ]
    return fs, sorted(keep)


def output_names(files: Sequence[str]) -> list[str]:
    """File stems, made unique in order, as the CLI names outputs (sub/cat.jpg, cat.png -> cat, cat-2);
    paths and URIs alike, with / or \\ between folders."""
    return unique_stems([PurePosixPath(f.replace("\\", "/")).stem for f in files])


class ExplainToFiles(ExplainBatch):
    """The CLI's outputs, made with the folder pipeline's per-batch steps (explain/pipeline.py:
    explain_and_render, write_rendered) by the worker that explained them: every file written
    atomically (a temporary name, then a rename), so a worker killed mid-write and retried leaves no
    partial file and no duplicate. Returns small rows only: one per input, its order, its
    predictions entries (JSON) or the error of an unreadable image."""

    def __init__(self, model: Any, options: ExplainOptions, job: Job, render: RenderOptions, out: str, listed: Any):
        super().__init__(model, options)
        self.job, self.render, self.out = job, render, Path(out)
        names, sources = ray.get(listed) if isinstance(listed, ray.ObjectRef) else listed
        self.names: dict[str, tuple[int, str, str]] = names
        self.sources: frozenset[Path] = sources

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        rows: dict[str, list[Any]] = {"order": [], "entries": [], "error": []}
        good: list[Decoded] = []
        for path, data in zip(batch["path"], batch["bytes"]):
            order, name, shown = self.names[str(path)]
            try:
                good.append(decoded_image(self.explainer, shown, name, _to_image(data, shown)))
            except OnnxGradCamError as err:
                rows["order"].append(order)
                rows["entries"].append("")
                rows["error"].append(str(err).splitlines()[0])
        done = explain_and_render(self.explainer, good, self.job, self.render) if good else []
        for decoded, rendered in zip(good, done):
            self.write(rendered, decoded.name)
            rows["order"].append(self.names_by_file[decoded.file])
            rows["entries"].append(json.dumps(rendered.entries))
            rows["error"].append("")
        return rows

    @property
    def names_by_file(self) -> dict[str, int]:
        if not hasattr(self, "_by_file"):
            self._by_file = {shown: order for order, _, shown in self.names.values()}
        return self._by_file

    def write(self, rendered: Rendered, name: str) -> None:
        """One input's files into the output folder (each atomically)."""
        write_rendered(rendered, self.out, self.sources)


def explain_files(
    explainer: Explainer,
    listed: Listed,
    folder: str | os.PathLike[str],
    job: Job,
    render: RenderOptions,
    *,
    batch_size: int = 8,
    threads: int = 1,
    device: str = "auto",
    workers: int = 1,
    num_cpus: float = 1,
    num_gpus: float | None = None,
    resume: bool = False,
    actor_class: type[ExplainToFiles] = ExplainToFiles,
) -> RunSummary:
    """Explain listed files on the running Ray cluster into `folder` (one every node sees): the
    workers write each input's files, the driver only the journal predictions.jsonl (as inputs
    finish) and predictions.json (in the inputs' order), through the CLI's own FileSink, so
    `--resume` works as without Ray. `explainer` is the driver's (it checked the options); its
    prepared model is what the actors run (put in the object store once: one load per actor)."""
    out = Path(folder)
    remove_stale_temporaries(out)
    sink = FileSink(out, resume, run_settings(explainer, job, render))
    shown = [listed.names[p][2] for p in listed.paths]
    todo = [p for p in listed.paths if listed.names[p][2] not in sink.done]
    sources = frozenset(Path(p).resolve() for p in listed.paths) if listed.filesystem is None else frozenset()
    failed: list[str] = []
    try:
        if todo:
            ds = ray.data.read_binary_files(
                todo,
                include_paths=True,
                filesystem=listed.filesystem,
                num_cpus=0.25,  # reading is I/O: leave the cores to the actors
            )
            shared = ray.put((listed.names, sources))  # once in the object store, not once per actor
            options = ExplainOptions(
                job.target, job.top_k, job.method, explainer.preprocess, explainer.size, explainer.input.layout,
                explainer.labels, batch_size, device, threads,
            )  # fmt: skip
            extra = (job, render, str(out.resolve()), shared)
            result = _map(ds, actor_class, explainer.model, options, workers, num_cpus, num_gpus, extra)
            for row in result.iter_rows():
                if row["error"]:
                    failed.append(row["error"])
                else:
                    sink.add(Rendered(json.loads(row["entries"])))
        sink.finish(shown, sources)
    except Exception as exc:  # Ray wraps a worker's error (in RayTaskError, UserCodeException)
        sink.abort()
        ours = _our_error(exc)
        if ours is None:
            raise
        raise BadInputError(ours) from None
    finally:
        remove_stale_temporaries(out)  # of workers killed mid-write: their retries wrote the files whole
    explained = sum(1 for s in shown if s in sink.done)
    return RunSummary(explained, len(listed.paths) - len(todo), failed, sum(len(v) for v in sink.done.values()))


def connect(address: str | None, workers: int, num_cpus: float) -> None:
    """Join the cluster at `address` ('auto' or host:port or ray://...), or start a local one with
    room for the workers and Ray's readers beside them."""
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):  # Ray's own variable: join that cluster
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    else:
        cpus = max(os.cpu_count() or 1, int(np.ceil(workers * num_cpus + 1)))
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _our_error(exc: BaseException | None) -> str | None:
    """The first line of this package's error inside a Ray exception chain, if one is there."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, OnnxGradCamError):
            text = str(exc).strip().splitlines()
            return next((line for line in reversed(text) if "to fix this" in line), text[-1] if text else "")
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
        seen += 1
    return None


# -- decoding ------------------------------------------------------------------------------------


def _to_image(value: Any, name: str) -> Image.Image:
    """A row's picture: encoded bytes (decoded as the CLI decodes files) or decoded pixels [H, W(, C)]."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return load_image(io.BytesIO(bytes(value)))  # type: ignore[arg-type]
        except BadInputError as err:
            why = str(err).split("(", 1)[-1].split("):", 1)[0]
            raise BadInputError(
                f"{name!r} is not a readable image ({why}): to fix this, pass JPEG, PNG, BMP, WebP or TIFF files"
            ) from None
    arr = np.asarray(value)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise BadInputError(
            f"{name!r}: a pixel array of shape {list(arr.shape)} is not an image [H, W] or [H, W, C]: to fix this, "
            "read images with ray.data.read_images or files with read_binary_files"
        )
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return to_rgb(Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr))


def _image_column(batch: dict[str, np.ndarray]) -> str:
    for c in IMAGE_COLUMNS:
        if c in batch:
            return c
    raise BadInputError(
        f"the dataset has no image column (columns: {', '.join(batch)}): to fix this, read it with "
        "ray.data.read_images or read_binary_files, or name the column with column=..."
    )


def _row_name(batch: dict[str, np.ndarray], i: int) -> str:
    return str(batch["path"][i]) if "path" in batch else f"row {i}"


def _model_bytes(model: bytes | onnx.ModelProto) -> bytes:
    return model if isinstance(model, bytes) else model.SerializeToString()


def _model_proto(model: Any) -> Any:
    if isinstance(model, ray.ObjectRef):
        model = ray.get(model)
    return onnx.load_from_string(model) if isinstance(model, bytes) else model
