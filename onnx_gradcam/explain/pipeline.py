"""The folder pipeline of `explain`: read, run, render, write, with bounded queues and a deterministic order.

Decoding and preprocessing run in a pool of threads feeding batches, in order, to one session; overlays,
encoding and file writes run in another pool. The per-batch steps (`explain_batch`, `render`, `write_rendered`)
are what the CLI, the server and the Ray adapter share.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import BadInputError, OnnxGradCamError
from ..surgery.load import file_sha256
from .explainer import Explainer, ExplainResult
from .images import IMAGE_SUFFIXES, load_image
from .overlay import guided_image, overlay
from .png import encode_png
from .seeds import box_seed, output_seed, region_seed
from .signals import SIGNAL_SUFFIXES, load_signal, plot_signal
from .tokens import array_picture, load_array, load_bytes, plot_tokens

FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
OUTPUT_FORMATS = ("files", "parquet")
PREDICTIONS = "predictions.json"
JOURNAL = "predictions.jsonl"
PARQUET = "predictions.parquet"


# -- what is asked and how it is drawn ------------------------------------------------------


@dataclass(frozen=True)
class RenderOptions:
    """How results are drawn and saved. format: png (lossless, explain/png.py), jpg or webp (with quality)."""

    colormap: str = "jet"
    alpha: float = 0.5
    upsample: str = "bilinear"
    format: str = "png"
    quality: int = 90
    overlay: bool = True
    save_raw: bool = True

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise BadInputError(f"unknown format {self.format!r}: to fix this, use one of {', '.join(FORMATS)}")
        if not 1 <= self.quality <= 100:
            raise BadInputError(f"quality {self.quality} is outside 1..100: to fix this, give e.g. 90")


class SeedSpec:
    """What a --target seed model is asked: a class over a region, or one box's class score."""

    def __init__(self, explainer: Explainer, target: str | None, region: str | None, box_index: int | None) -> None:
        self.active = explainer.metadata.get("target", "class") == "seed"
        self.cls = -1
        if not self.active:
            if region is not None or box_index is not None:
                raise BadInputError(
                    "--region and --box-index need a model prepared with --target seed: to fix this, "
                    "run onnx-gradcam prepare MODEL --target seed"
                )
            return
        if target is None:
            raise BadInputError(
                "this model was prepared with --target seed: to fix this, give --class K (with --region or --box-index)"
            )
        self.cls = explainer.resolve_target(target)
        self.region, self.box_index = region, box_index
        self.explainer = explainer
        meta = next(o for o in explainer.session.get_inputs() if o.name == "gradcam_seed")
        self.shape = list(meta.shape)

    def build(self, images: list[Any], x: np.ndarray) -> np.ndarray:
        """One seed per image; symbolic output sizes are taken as the network input's."""
        shape = [d if isinstance(d, int) else None for d in self.shape]
        layout = self.explainer.input.layout
        spatial = x.shape[2:] if layout in ("nchw", "nct") else x.shape[1:] if layout == "nt" else x.shape[1:-1]
        for k in range(2, len(shape)):
            if shape[k] is None and len(shape) - 2 == len(spatial):
                shape[k] = int(spatial[k - 2])
        if any(d is None for d in shape[1:]):
            raise BadInputError(
                f"the seed's shape {self.shape} is only known when running: to fix this, use the Python "
                "API (Explainer.explain(..., seed=...))"
            )
        rows = []
        for img in images:
            one = [1, *[int(d) for d in shape[1:] if d is not None]]
            if self.box_index is not None:
                rows.append(box_seed(one, self.box_index, self.cls))
            elif len(one) == 2:
                rows.append(output_seed(one, self.cls))
            else:
                rows.append(region_seed(one, self.cls, self._mask(img, one)))
        return np.concatenate(rows)

    def _mask(self, img: Any, shape: list[int]) -> Any:
        h, w = shape[-2], shape[-1]
        if self.region in (None, "all"):
            return (0, 0, w, h)
        assert self.region is not None
        if Path(self.region).suffix.lower() in (".png", ".bmp", ".tif", ".tiff", ".jpg"):
            return np.asarray(load_image(self.region).convert("L")) > 127
        try:
            x0, y0, x1, y1 = (float(v) for v in self.region.split(","))
        except ValueError:
            raise BadInputError(
                f"--region {self.region!r}: to fix this, give all, a mask PNG, or x0,y0,x1,y1"
            ) from None
        iw, ih = img.size  # image pixels -> output pixels
        left, top = int(x0 * w / iw), int(y0 * h / ih)
        return (left, top, max(int(round(x1 * w / iw)), left + 1), max(int(round(y1 * h / ih)), top + 1))


@dataclass(frozen=True)
class Job:
    """What each batch asks the model: a class (None: top-1), the K best, a method, a seed."""

    target: str | None = None
    top_k: int | None = None
    method: str | None = None
    seeds: SeedSpec | None = None


class Reader:
    """How `explain` reads its input files for this model: images (or .npy arrays of the input),
    signals (.npy, .csv), or ids (.npy, or raw bytes with --bytes)."""

    def __init__(self, explainer: Explainer, byte_count: int | None = None, pad: int | None = None) -> None:
        spec = explainer.input
        if byte_count is None and pad is not None:
            raise BadInputError("--pad goes with --bytes: to fix this, give --bytes N too")
        if byte_count is not None and not spec.is_tokens:
            raise BadInputError(
                f"--bytes reads raw files for models of integer ids [N, T], but the input {spec.name!r} is "
                f"{list(explainer.input_shape)} ({spec.layout}): to fix this, leave out --bytes"
            )
        self.explainer, self.byte_count, self.pad = explainer, byte_count, 0 if pad is None else pad
        if pad is not None and not 0 <= pad <= int(np.iinfo(np.dtype(spec.numpy_dtype)).max):
            raise BadInputError(f"--pad {pad} does not fit the input's {np.dtype(spec.numpy_dtype).name}")
        self.suffixes: set[str] | None = (
            set()
            if byte_count is not None
            else SIGNAL_SUFFIXES
            if spec.is_signal
            else {".npy"}
            if spec.is_tokens
            else IMAGE_SUFFIXES | {".npy"}
        )
        self.noun = "signals" if spec.is_signal else "inputs" if spec.is_tokens else "images"
        self.what = (
            "files (raw bytes)"
            if byte_count is not None
            else ".npy or .csv files"
            if spec.is_signal
            else ".npy files of ids (or raw files with --bytes N)"
            if spec.is_tokens
            else "image (or .npy) files"
        )

    def read(self, path: Path) -> tuple[np.ndarray, object]:
        """(one row of the model's input, what its picture is drawn from)."""
        exp, spec = self.explainer, self.explainer.input
        shape, dtype = exp.input_shape, spec.numpy_dtype
        if self.byte_count is not None:
            length = shape[1] if isinstance(shape[1], int) and shape[1] > 0 else None
            ids = load_bytes(path, self.byte_count, length, self.pad)
            return ids.astype(dtype), ids
        if spec.is_signal:
            signal = load_signal(path)
            return signal, signal
        if path.suffix.lower() == ".npy":
            row = load_array(path, shape, dtype)
            return row, (row if spec.is_tokens else array_picture(row, spec.layout))
        if spec.is_tokens:
            raise BadInputError(
                f"{str(path)!r} is not a .npy file, and the model reads integer ids: to fix this, save the ids "
                "with np.save, or read the file as raw bytes with --bytes N"
            )
        img = load_image(path)
        return exp.to_tensor([img])[0], img


# -- one batch: decoded inputs -> results -> rendered files ---------------------------------


@dataclass
class Decoded:
    """One input, read and preprocessed: `row` is its model input, `shown` what its picture is drawn from."""

    file: str  # as the caller named it (predictions' "file")
    name: str  # the unique stem its outputs are named after
    row: np.ndarray
    shown: object


@dataclass
class Explained:
    """One input's results, one per rank (one rank unless top-k)."""

    decoded: Decoded
    entries: list[dict[str, object]]
    maps: list[np.ndarray]
    raws: list[np.ndarray]
    guided: list[np.ndarray | None]


@dataclass
class Rendered:
    """One input's outputs: its predictions' rows and the encoded files (name -> bytes) to write."""

    entries: list[dict[str, object]]
    files: dict[str, bytes] = field(default_factory=dict)
    maps: list[np.ndarray] = field(default_factory=list)
    raws: list[np.ndarray] = field(default_factory=list)
    overlays: list[bytes | None] = field(default_factory=list)


def stacked(rows: Sequence[np.ndarray]) -> np.ndarray:
    if len({r.shape for r in rows}) > 1:
        shapes = ", ".join(str(list(r.shape)) for r in rows)
        raise BadInputError(
            f"inputs of different shapes in one batch ({shapes}): to fix this, give inputs of one shape, or "
            "--batch-size 1"
        )
    return np.stack(rows)


def run_job(explainer: Explainer, x: np.ndarray, shown: list[Any], job: Job) -> list[ExplainResult]:
    """The session's part: one result per rank for a batch x."""
    if job.seeds is not None and job.seeds.active:
        return [explainer.explain(x, None, job.method, seed=job.seeds.build(shown, x))]
    if job.top_k:
        return explainer.explain_top_k(x, job.top_k, job.method)
    return [explainer.explain(x, job.target, job.method)]


def explain_batch(
    explainer: Explainer, batch: Sequence[Decoded], job: Job, options: RenderOptions | None = None
) -> list[Explained]:
    """Run one batch of decoded inputs through the session: one Explained per input, in order."""
    options = options or RenderOptions()
    results = run_job(explainer, stacked([d.row for d in batch]), [d.shown for d in batch], job)
    seeded = job.seeds is not None and job.seeds.active
    ext = "jpg" if options.format == "jpg" else options.format
    out = []
    for i, d in enumerate(batch):
        entries, maps, raws, guided = [], [], [], []
        for rank, result in enumerate(results, start=1):
            cls = job.seeds.cls if seeded and job.seeds is not None else int(result.targets[i])
            suffix = f".top{rank}" if job.top_k and not seeded else ""
            stem = f"{d.name}.{result.method}{suffix}.c{cls}"
            labels = explainer.labels
            g = result.extra.get("gradcam_guided")
            entry: dict[str, object] = {
                "file": d.file,
                "rank": rank,
                "class": cls,
                "label": labels[cls] if labels and 0 <= cls < len(labels) else None,
                "score": float(result.scores[i]),
                "probability": float(result.probabilities[i, cls]) if result.probabilities is not None else None,
                "feature_layer": result.feature_layer,
                "method": result.method,
                "overlay": f"{stem}.{ext}" if options.overlay else None,
                "raw_map": f"{stem}.npy" if options.save_raw else None,
            }
            if g is not None and options.overlay:
                entry["guided"] = f"{stem}.guided.{ext}"
            entries.append(entry)
            maps.append(result.maps[i])
            raws.append(result.raw[i])
            guided.append(None if g is None else g[i])
        out.append(Explained(d, entries, maps, raws, guided))
    return out


def picture(explainer: Explainer, shown: Any, cam: np.ndarray, options: RenderOptions) -> Image.Image:
    """The picture of one explained input: an overlay, a signal plot, or the ids with the map."""
    if explainer.input.is_tokens:
        return plot_tokens(shown, cam, options.colormap)
    if explainer.input.is_signal:
        return plot_signal(shown, cam, options.colormap)
    return overlay(shown, cam, options.colormap, options.alpha, options.upsample)


def encode(image: Image.Image, fmt: str = "png", quality: int = 90) -> bytes:
    """An image as PNG (lossless: explain/png.py's fixed-filter encoder), JPEG or WebP bytes."""
    if fmt == "png":
        return encode_png(image)
    buf = io.BytesIO()
    img = image if image.mode in ("RGB", "L") else image.convert("RGB")
    img.save(buf, format=FORMATS[fmt], quality=quality)
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def render(explainer: Explainer, item: Explained, options: RenderOptions) -> Rendered:
    """Draw and encode one input's files (safe to run in any thread or on a worker)."""
    done = Rendered(item.entries, maps=item.maps, raws=item.raws)
    for entry, cam, raw, g in zip(item.entries, item.maps, item.raws, item.guided):
        encoded = None
        if options.overlay:
            encoded = encode(picture(explainer, item.decoded.shown, cam, options), options.format, options.quality)
            done.files[str(entry["overlay"])] = encoded
            if g is not None:
                pic = guided_image(g, explainer.input.layout)
                done.files[str(entry["guided"])] = encode(pic, options.format, options.quality)
        if options.save_raw:
            done.files[str(entry["raw_map"])] = npy_bytes(raw)
        done.overlays.append(encoded)
    return done


def explain_and_render(
    explainer: Explainer, batch: Sequence[Decoded], job: Job, options: RenderOptions | None = None
) -> list[Rendered]:
    """One batch of decoded inputs -> each input's rows and encoded files (what a worker of a distributed run
    does before `write_rendered`)."""
    options = options or RenderOptions()
    return [render(explainer, item, options) for item in explain_batch(explainer, batch, job, options)]


def decoded_image(explainer: Explainer, file: str, name: str, image: Image.Image) -> Decoded:
    """A decoded picture (from any source: bytes, a dataset) as the pipeline's input."""
    return Decoded(file, name, explainer.to_tensor([image])[0], image)


def atomic_write(path: Path, data: bytes, sources: frozenset[Path] | set[Path] = frozenset()) -> None:
    """Write through a hidden temporary file in the same folder, then rename: never a partial file."""
    if sources:
        _refuse_inputs(path.parent.resolve() / path.name, path, sources)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BadInputError(
            f"cannot write {path} ({exc.strerror or exc}): to fix this, free disk space or choose another -o folder"
        ) from None


def _refuse_inputs(real: Path, path: Path, sources: frozenset[Path] | set[Path]) -> None:
    """real: path with its folder resolved. The rename replaces the folder's entry itself (a link there
    is replaced, not followed), so only an input that is that very entry would be lost."""
    if real in sources:
        raise BadInputError(f"refusing to overwrite the input image {path}: to fix this, choose another -o folder")


def write_rendered(
    rendered: Rendered,
    folder: Path,
    sources: frozenset[Path] | set[Path] = frozenset(),
    real_folder: Path | None = None,
) -> None:
    """Write one input's files into folder, each atomically. real_folder: folder.resolve(), given by a
    caller that writes many inputs (resolving a path costs a system call per component: 5% of a folder
    run's time when it was done for every file)."""
    real = real_folder or (folder.resolve() if sources else folder)
    for name, data in rendered.files.items():
        if sources:
            _refuse_inputs(real / name, folder / name, sources)
        atomic_write(folder / name, data)


def output_names(files: Sequence[Path]) -> dict[Path, str]:
    """File stems, made unique (sub/cat.jpg and cat.png -> 'cat', 'cat-2')."""
    return dict(zip(files, unique_stems([f.stem for f in files])))


def unique_stems(stems: Sequence[str]) -> list[str]:
    """Stems made unique in order: a stem's second use gets '-2', its third '-3', ..."""
    names: list[str] = []
    used: dict[str, int] = {}
    for stem in stems:
        used[stem] = used.get(stem, 0) + 1
        names.append(stem if used[stem] == 1 else f"{stem}-{used[stem]}")
    return names


# -- where the results go: files and a journal, or one Parquet file --------------------------


class FileSink:
    """Files per input, a JSON Lines journal appended as inputs complete, and a final predictions.json."""

    def __init__(self, folder: Path, resume: bool, settings: dict[str, object]) -> None:
        """settings (`run_settings`): the journal's first line; --resume refuses a journal with others."""
        self.folder = folder
        self.journal = folder / JOURNAL
        self.done: dict[str, list[dict[str, object]]] = {}
        if resume and self.journal.is_file():
            self.done = self._read_journal(settings)
        elif self.journal.exists():
            self.journal.unlink()
        self._fd = os.open(self.journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if os.fstat(self._fd).st_size == 0:
            os.write(self._fd, (json.dumps({"run": settings}) + "\n").encode("utf-8"))

    def _read_journal(self, settings: dict[str, object]) -> dict[str, list[dict[str, object]]]:
        """Entries of inputs whose files all exist; a torn last line (a kill mid-write) is cut off."""
        data = self.journal.read_bytes()
        if data:
            _check_settings(self.journal, data.split(b"\n", 1)[0], settings)
        good = data[: data.rfind(b"\n") + 1]
        if len(good) != len(data):
            with open(self.journal, "r+b") as f:
                f.truncate(len(good))
        found: dict[str, list[dict[str, object]]] = {}
        for line in good.decode("utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "file" not in entry:  # the settings line
                continue
            found.setdefault(str(entry["file"]), []).append(entry)
        keys = ("overlay", "raw_map", "guided")
        return {
            f: es
            for f, es in found.items()
            if all((self.folder / str(e[k])).is_file() for e in es for k in keys if e.get(k))
        }

    def add(self, rendered: Rendered) -> None:
        """After the input's files exist: one write of its lines (all ranks), so a kill tears at most one line."""
        text = "".join(json.dumps(e) + "\n" for e in rendered.entries)
        os.write(self._fd, text.encode("utf-8"))
        self.done[str(rendered.entries[0]["file"])] = rendered.entries

    def finish(self, order: Sequence[str], sources: frozenset[Path] | set[Path]) -> None:
        os.close(self._fd)
        entries = [e for f in order for e in self.done.get(f, [])]
        atomic_write(self.folder / PREDICTIONS, (json.dumps(entries, indent=2) + "\n").encode("utf-8"), sources)

    def abort(self) -> None:
        os.close(self._fd)


def run_settings(explainer: Explainer, job: Job, options: RenderOptions) -> dict[str, object]:
    """What decides a folder run's outputs: the prepared model's metadata (its source's sha256, layer,
    methods; where no source sha256 is recorded, e.g. a plain model prepared in memory, the file's own),
    the input's preprocessing, what is asked and how it is drawn."""
    seeds = job.seeds
    labels = json.dumps(list(explainer.labels)) if explainer.labels else ""
    model = dict(sorted(explainer.metadata.items()))
    if not model.get("source_sha256") and explainer.path is not None:
        model["source_sha256"] = file_sha256(explainer.path)
    return {
        "model": model,
        "preprocess": explainer.preprocess.to_json(),
        "size": list(explainer.size) if explainer.size else None,
        "layout": explainer.input.layout,
        "labels_sha256": hashlib.sha256(labels.encode("utf-8")).hexdigest() if labels else None,
        "target": job.target,
        "top_k": job.top_k,
        "method": job.method,
        "seed": [seeds.cls, seeds.region, seeds.box_index] if seeds is not None and seeds.active else None,
        "render": dataclasses.asdict(options),
    }


def _first_difference(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> tuple[str, Any, Any]:
    """The first key (dotted, into nested dicts) where two settings differ, with both values."""
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if x != y:
            if isinstance(x, dict) and isinstance(y, dict):
                return _first_difference(x, y, f"{prefix}{k}.")
            return f"{prefix}{k}", x, y
    return prefix.rstrip("."), a, b


def _check_settings(journal: Path, first: bytes, settings: dict[str, object]) -> None:
    """A --resume must ask what the journal's run asked, or its outputs would mix two runs."""
    try:
        earlier = json.loads(first).get("run")
    except (json.JSONDecodeError, AttributeError):
        earlier = None
    now = json.loads(json.dumps(settings))
    if earlier == now:
        return
    if not isinstance(earlier, dict):
        what = "its journal does not record the run's options"
    else:
        key, was, is_ = _first_difference(earlier, now)
        what = f"{key} was {json.dumps(was)[:60]}, now {json.dumps(is_)[:60]}"
    raise BadInputError(
        f"--resume: {journal.parent} comes from a run with other options ({what}): to fix this, give that "
        "run's model and options, or leave out --resume to start again"
    )


class ParquetSink:
    """One Parquet file: a row per input and rank with its prediction, map, raw map and overlay bytes.

    Written through a hidden temporary file, a row group per batch, renamed at the end (no --resume)."""

    def __init__(self, folder: Path, resume: bool) -> None:
        if resume:
            raise BadInputError("--resume works with --output-format files: to fix this, leave out --resume")
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise BadInputError(
                f"--output-format parquet needs pyarrow ({exc}): to fix this, pip install 'onnx-gradcam[parquet]'"
            ) from None
        self.pa, self.pq = pa, pq
        self.path = folder / PARQUET
        self.tmp = folder / f".{PARQUET}.tmp"
        self.done: dict[str, list[dict[str, object]]] = {}
        self._rows: list[tuple[dict[str, object], np.ndarray, np.ndarray, bytes | None]] = []
        self._writer: Any = None

    def add(self, rendered: Rendered) -> None:
        for e, m, r, o in zip(rendered.entries, rendered.maps, rendered.raws, rendered.overlays):
            self._rows.append((e, m, r, o))
        self.done[str(rendered.entries[0]["file"])] = rendered.entries
        if len(self._rows) >= 64:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        pa = self.pa

        def floats(arrays: list[np.ndarray]) -> Any:
            flat = [np.asarray(a, np.float32).ravel() for a in arrays]
            offsets = np.concatenate([[0], np.cumsum([len(a) for a in flat])]).astype(np.int32)
            return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(flat)))

        entries = [row[0] for row in self._rows]
        columns: dict[str, Any] = {
            k: pa.array([e[k] for e in entries])
            for k in ("file", "rank", "class", "label", "score", "probability", "feature_layer", "method")
        }
        columns["label"] = pa.array([e["label"] for e in entries], pa.string())
        columns["probability"] = pa.array([e["probability"] for e in entries], pa.float64())
        columns["map_shape"] = pa.array([list(r[1].shape) for r in self._rows], pa.list_(pa.int32()))
        columns["map"] = floats([r[1] for r in self._rows])
        columns["raw_shape"] = pa.array([list(r[2].shape) for r in self._rows], pa.list_(pa.int32()))
        columns["raw_map"] = floats([r[2] for r in self._rows])
        columns["overlay"] = pa.array([r[3] for r in self._rows], pa.binary())
        table = pa.table(columns)
        if self._writer is None:
            self._writer = self.pq.ParquetWriter(self.tmp, table.schema)
        self._writer.write_table(table)
        self._rows = []

    def finish(self, order: Sequence[str], sources: frozenset[Path] | set[Path]) -> None:
        self._flush()
        if self._writer is None:
            return
        self._writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.tmp.unlink(missing_ok=True)


# -- the folder run --------------------------------------------------------------------------


@dataclass
class RunSummary:
    explained: int  # inputs with results (resumed ones included)
    resumed: int  # of those, taken from an earlier run
    failed: list[str]  # one-line messages of inputs skipped as unreadable
    entries: int


def _chunks(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def remove_stale_temporaries(folder: Path) -> None:
    """Hidden `.NAME.tmp` files left by a killed run (ours: a finished file is renamed from one)."""
    for p in folder.glob(".*.tmp"):
        if p.is_file():
            p.unlink(missing_ok=True)


def explain_files(
    explainer: Explainer,
    reader: Reader,
    files: Sequence[Path],
    folder: Path,
    job: Job,
    options: RenderOptions,
    *,
    batch_size: int = 8,
    resume: bool = False,
    output_format: str = "files",
    read_threads: int = 2,
    render_threads: int = 2,
    prefetch: int = 2,
    progress: Callable[[int], object] | None = None,
    skipped: Callable[[str], object] | None = None,
) -> RunSummary:
    """Explain files into folder: predictions.json (or predictions.parquet) and each input's files.

    At most `prefetch` batches are being read and 2 batches rendered at any time, so memory does not
    grow with the number of files. Results are collected in the files' order whatever the threads do.
    """
    if output_format not in OUTPUT_FORMATS:
        raise BadInputError(f"unknown output format {output_format!r}: to fix this, use files or parquet")
    sources = frozenset(f.resolve() for f in files)
    real_folder = folder.resolve()
    remove_stale_temporaries(folder)
    sink: FileSink | ParquetSink = (
        FileSink(folder, resume, run_settings(explainer, job, options))
        if output_format == "files"
        else ParquetSink(folder, resume)
    )
    names = output_names(files)
    keys = [str(f) for f in files]
    todo = [f for f in files if str(f) not in sink.done]
    resumed = len(files) - len(todo)
    if progress and resumed:
        progress(resumed)
    failed: list[str] = []
    readers = ThreadPoolExecutor(max(1, read_threads), thread_name_prefix="onnx-gradcam-read")
    renderers = ThreadPoolExecutor(max(1, render_threads), thread_name_prefix="onnx-gradcam-render")
    reading: deque[list[tuple[Path, Future[tuple[np.ndarray, object]]]]] = deque()
    rendering: deque[Future[Rendered]] = deque()
    most_rendering = 2 * batch_size + max(1, render_threads)
    pending = _chunks(todo, batch_size)

    def submit_reads(n: int) -> None:
        for chunk in _take(pending, n):
            reading.append([(f, readers.submit(reader.read, f)) for f in chunk])

    def draw_and_write(item: Explained) -> Rendered:
        done = render(explainer, item, options)
        if output_format == "files":
            write_rendered(done, folder, sources, real_folder)
        return done

    def collect(limit: int) -> None:
        while len(rendering) > limit:
            done = rendering.popleft().result()
            sink.add(done)
            if progress:
                progress(1)

    try:
        submit_reads(prefetch)
        while reading:
            chunk = reading.popleft()
            submit_reads(1)  # keep `prefetch` batches being read while this one runs
            batch = []
            for f, fut in chunk:
                try:
                    row, shown = fut.result()
                except OnnxGradCamError as err:
                    failed.append(str(err).splitlines()[0])
                    if skipped:
                        skipped(failed[-1])
                    if progress:
                        progress(1)
                    continue
                batch.append(Decoded(str(f), names[f], row, shown))
            if batch:
                for item in explain_batch(explainer, batch, job, options):
                    rendering.append(renderers.submit(draw_and_write, item))
            collect(most_rendering)
        collect(0)
        sink.finish(keys, sources)
    except BaseException:
        sink.abort()
        raise
    finally:
        readers.shutdown(wait=True, cancel_futures=True)
        renderers.shutdown(wait=True, cancel_futures=True)
    explained = sum(1 for k in keys if k in sink.done)
    return RunSummary(explained, resumed, failed, sum(len(v) for v in sink.done.values()))


def _take(it: Iterator[Sequence[Path]], n: int) -> Iterable[Sequence[Path]]:
    for _ in range(n):
        chunk = next(it, None)
        if chunk is None:
            return
        yield chunk
