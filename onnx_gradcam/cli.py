"""The `onnx-gradcam` command: prepare, layers, explain, evaluate, export-triton, serve. The only module that imports click."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ._version import __version__
from .errors import OnnxGradCamError

if TYPE_CHECKING:
    from .api import Explainer
    from .explain.pipeline import Job, Reader, RenderOptions
    from .surgery.metadata import Preprocess

# The option choices, spelled out so that --help imports neither numpy nor onnx; tests/test_pipeline.py
# checks them against the tables they name (COLORMAPS, RESAMPLE, METHODS, CLASS_INPUTS, PRESETS, CHOICES).
COLORMAP_NAMES = ("jet", "turbo", "viridis", "inferno", "hot", "gray")
RESAMPLE_NAMES = ("bilinear", "bicubic", "nearest")
METHOD_NAMES = ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "gradcam-elementwise")
CLASS_INPUT_NAMES = ("optional", "required", "none")
PRESET_NAMES = ("imagenet", "unit", "symmetric", "none")
LAYOUT_NAMES = ("nchw", "nhwc", "tokens", "sequence-first")
FORMAT_NAMES = ("png", "jpg", "webp")
# evaluate's --metric names and their one-line summaries (evaluation/run.py's METRICS, same order)
METRIC_SUMMARIES = (
    ("deletion", "RISE: AUC of the probability as top pixels are set to 0 (lower: better)"),
    ("insertion", "RISE: AUC as top pixels return into a blurred image (higher: better)"),
    ("average-drop", "Grad-CAM++: Average Drop % and Increase in Confidence of map x image"),
    ("confidence-change", "pytorch-grad-cam's confidence change, drop and increase (absolute)"),
    ("road", "ROAD MoRF, LeRF, combined; imputed in normalised space (pytorch-grad-cam)"),
    ("road-original", "ROAD imputed in pixels, before normalisation (Rong et al.'s own)"),
    ("pointing-game", "hit if the map's maximum lies within 15 px of a box (TorchRay); needs boxes"),
    ("energy-pointing-game", "share of the map's energy inside the boxes (Score-CAM); needs boxes"),
    ("localisation", "Grad-CAM §4.1: top-1 localisation error (15% threshold, IoU >= 0.5)"),
    ("sanity", "Adebayo et al.: Spearman rho of the maps as blocks are randomised"),
)


# options several commands share
DEVICE_OPTION = click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="auto: CUDA when onnxruntime can load it, else the CPU.",
)
THREADS_OPTION = click.option(
    "--threads", type=click.IntRange(1, 1024), help="onnxruntime intra-op threads (default: all cores)."
)

EXAMPLES_PREPARE = """
\b
Examples:
  onnx-gradcam prepare resnet50.onnx                  # writes resnet50.gradcam.onnx
  onnx-gradcam prepare model.onnx -o out.onnx --feature-layer /layer3/layer3.5/relu_2/Relu_output_0
  onnx-gradcam prepare model.onnx --method gradcam --method gradcam++ --counterfactual --guided
  onnx-gradcam prepare segmenter.onnx --target seed   # explain any output via a gradcam_seed input
"""


class _Failure(click.ClickException):
    """An OnnxGradCamError shown as one line, exit code 1."""

    def show(self, file=None) -> None:  # type: ignore[no-untyped-def]
        click.echo(f"error: {self.message}", err=True)


def _fail(err: Exception) -> _Failure:
    return _Failure(str(err).splitlines()[0] if str(err) else type(err).__name__)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="onnx-gradcam")
def main() -> None:
    """Grad-CAM for any exported ONNX CNN, computed inside the graph.

    \b
    1. `prepare` rewrites MODEL.onnx so one forward pass also returns its Grad-CAM map.
    2. `explain` runs a model (prepared or not) on images and writes heat-map overlays.
    3. `layers` lists the feature maps Grad-CAM can use.
    4. `export-triton` writes a Triton model folder (config.pbtxt, model, labels).
    5. `serve` answers inference and explain requests over HTTP (the serve extra).
    6. `evaluate` scores the maps' faithfulness and localisation and writes a report.

    \b
    Example:
      onnx-gradcam explain models/demo.onnx models/samples/star.png -o demo-out
    """


@main.command("prepare", epilog=EXAMPLES_PREPARE)
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Default: MODEL.gradcam.onnx beside MODEL."
)
@click.option(
    "--feature-layer",
    multiple=True,
    help="Tensor or node name of the feature map A (repeat for several; default: the last conv feature map).",
)
@click.option(
    "--reduction-layer", help="Tensor or node giving the score (default: the logits; the input of a final softmax)."
)
@click.option(
    "--method",
    "methods",
    multiple=True,
    type=click.Choice(METHOD_NAMES),
    help="CAM method; repeat for several (default gradcam).",
)
@click.option("--counterfactual", is_flag=True, help="Also output the counterfactual map (negated gradient).")
@click.option(
    "--guided",
    is_flag=True,
    help="Also output Guided Backprop and Guided Grad-CAM (a backward pass through the whole network).",
)
@click.option(
    "--target",
    type=click.Choice(["class", "seed"]),
    default="class",
    show_default=True,
    help="'seed' adds a gradcam_seed input for segmentation, regression, detection outputs.",
)
@click.option(
    "--class-input",
    type=click.Choice(CLASS_INPUT_NAMES),
    default="optional",
    show_default=True,
    help="How the model takes gradcam_class: 'optional' (an initializer-backed input, -1 = top-1 by default); "
    "'required' (a plain input every request sends, -1 for top-1: Triton with dynamic batching, OpenVINO); "
    "'none' (no class input, top-1 only).",
)
@click.option(
    "--preprocess", type=click.Choice(PRESET_NAMES), help="Record this preprocessing so `explain` needs no flags."
)
@click.option(
    "--expose-gradient",
    is_flag=True,
    help="Also output the feature map and its gradient (gradcam_features, gradcam_gradient).",
)
@click.option(
    "--layout",
    type=click.Choice(LAYOUT_NAMES),
    help="Layout of the feature tensor, where the graph does not tell it (`layers` shows '?'): nchw, nhwc, "
    "tokens ([N, tokens, C], class tokens first, a grid of the image's aspect), sequence-first ([T, N, C], "
    "T along the image's width). Default: found from the graph.",
)
@click.option(
    "--opset",
    type=int,
    help="Upgrade MODEL to this ai.onnx opset first (onnx's version converter), e.g. 16, where overlapping MaxPool "
    "windows scatter-add their gradient. Default: keep MODEL's opset (13 at least), so that the runtime that ran "
    "MODEL runs the result; the IR version stays MODEL's where the opset allows.",
)
@click.option(
    "--no-verify",
    is_flag=True,
    help="Skip the self-check (load the result in onnxruntime on the CPU and run a probe batch beside MODEL), "
    "for models too large to run twice: it saves the check's time and the memory of an onnxruntime session, "
    "but a result that does not load or run, changes an original output or breaks the gradcam_* contract "
    "is then written without an error.",
)
def prepare_cmd(
    model: Path,
    output: Path | None,
    feature_layer: tuple[str, ...],
    reduction_layer: str | None,
    methods: tuple[str, ...],
    counterfactual: bool,
    guided: bool,
    target: str,
    class_input: str,
    preprocess: str | None,
    expose_gradient: bool,
    layout: str | None,
    opset: int | None,
    no_verify: bool,
) -> None:
    """Write a prepared model: MODEL plus its Grad-CAM, in standard ONNX operators.

    The result has every original input and output, plus an input `gradcam_class` (int64 per
    sample; negative = top-1; optional unless --class-input says otherwise) and outputs `gradcam_map` (at the input's
    size, in [0, 1]), `gradcam_raw`, `gradcam_target` and `gradcam_score`. Before anything
    is written the result is run in onnxruntime beside MODEL on a probe batch; if it fails to
    load or run, or breaks that contract, the error names the failing node and no file is written.
    """
    from .api import default_output, prepare

    try:
        report = prepare(
            model,
            output,
            feature_layer=list(feature_layer) or None,
            reduction_layer=reduction_layer,
            preprocess=preprocess,
            expose_gradient=expose_gradient,
            methods=list(methods) or ["gradcam"],
            counterfactual=counterfactual,
            guided=guided,
            target=target,
            layout=layout,
            verify=not no_verify,
            opset=opset,
            class_input=class_input,
        )
    except OnnxGradCamError as err:
        raise _fail(err) from None
    out = output or default_output(model)
    click.echo(f"feature layer:   {', '.join(report.feature_tensors)} ({report.feature_layout})")
    click.echo(f"reduction layer: {report.reduction_tensor}")
    click.echo(f"methods:         {', '.join(report.methods)}")
    click.echo(f"outputs:         {', '.join(report.outputs)}")
    if no_verify:
        click.echo("verified:        no (--no-verify)")
    else:
        click.echo(
            "verified:        loads and runs in onnxruntime (CPU); original outputs equal MODEL's on a probe batch"
        )
    click.echo(f"wrote {out}")


EXAMPLES_TRITON = """
\b
Examples:
  onnx-gradcam export-triton resnet50.onnx -o models              # models/resnet50/{config.pbtxt,1/model.onnx}
  onnx-gradcam export-triton resnet50.onnx -o models --kind gpu --instances 1 --max-batch 16
  onnx-gradcam export-triton resnet50.onnx -o models --max-batch 0 --class-input optional
"""


@main.command("export-triton", epilog=EXAMPLES_TRITON)
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    "repository",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Triton model repository to write NAME/ into (created if missing).",
)
@click.option("--name", help="Model name (the folder's name). Default: MODEL's file name without .onnx/.gradcam.onnx.")
@click.option(
    "--max-batch",
    type=int,
    default=8,
    show_default=True,
    help="max_batch_size; > 0 adds dynamic_batching and leaves the batch axis out of the dims, 0 turns batching off.",
)
@click.option("--instances", type=int, default=2, show_default=True, help="instance_group count.")
@click.option(
    "--kind", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True, help="KIND_CPU or KIND_GPU."
)
@click.option(
    "--class-input",
    type=click.Choice(CLASS_INPUT_NAMES),
    help="For a plain MODEL, how the prepared model takes gradcam_class (see `prepare --help`). Default: 'required' "
    "when --max-batch > 0 (Triton refuses optional inputs on batching models), else 'optional'. A prepared MODEL "
    "keeps its own form (given another, an error).",
)
@click.option(
    "--labels",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Class names, one per line. Default: MODEL.labels.txt or labels.txt beside MODEL, if it names every class.",
)
@click.option(
    "--no-verify", is_flag=True, help="Skip the self-check when preparing a plain MODEL (see `prepare --help`)."
)
def export_triton_cmd(
    model: Path,
    repository: Path,
    name: str | None,
    max_batch: int,
    instances: int,
    kind: str,
    class_input: str | None,
    labels: Path | None,
    no_verify: bool,
) -> None:
    """Write a Triton model folder: REPOSITORY/NAME/config.pbtxt, 1/model.onnx and labels.txt.

    MODEL may be plain (it is prepared first, with the self-check) or prepared. The config
    declares platform onnxruntime_onnx, every input and output with its data type and dims,
    dynamic batching, the instance group and the labels file on the logits output. Nothing is
    written if any check fails.
    """
    from .api import export_triton

    try:
        done = export_triton(
            model,
            repository,
            name=name,
            max_batch=max_batch,
            instances=instances,
            kind=kind,
            class_input=class_input,
            labels=labels,
            verify=not no_verify,
        )
    except OnnxGradCamError as err:
        raise _fail(err) from None
    click.echo(f"class input:     {done.class_input}")
    if done.labels is not None:
        click.echo(f"labels:          {done.labels} (label_filename of {done.labels_output!r})")
    click.echo(f"wrote {done.config}")
    click.echo(f"wrote {done.model}")


@main.command("layers", epilog="\b\nExample:\n  onnx-gradcam layers resnet50.onnx")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--reduction-layer", help="Score tensor to measure paths to (default: the logits).")
@click.option("--all", "show_all", is_flag=True, help="Also list tensors that some path bypasses.")
def layers_cmd(model: Path, reduction_layer: str | None, show_all: bool) -> None:
    """List the feature maps Grad-CAM can use, deepest last; `*` marks the default.

    A feature map every path to the score passes through ('all paths: yes') explains the
    whole decision; others explain only the part that flows through them. In int8 models the
    list holds dequantized (float) tensors; an int8 tensor marked +DQ (QOperator models) is
    dequantized for the CAM.
    """
    from .surgery.layers import list_layers  # not api: that would import onnxruntime

    try:
        reduction, found = list_layers(model, reduction_layer)
    except OnnxGradCamError as err:
        raise _fail(err) from None
    rows = [c for c in found if c.dominates or show_all]
    click.echo(f"score: {reduction}")
    width = max([len(c.name) for c in rows] + [6])
    click.echo(f"  {'tensor':<{width}}  {'op':<20} {'shape':<24} {'layout':<16} all paths")
    for c in rows:
        shape = "[" + ", ".join(str(d) if d is not None else "?" for d in c.shape) + "]"
        mark = "*" if c.default else " "
        op = f"{c.op_type}+DQ" if c.dequantize else c.op_type  # int8, dequantized for the CAM
        click.echo(f"{mark} {c.name:<{width}}  {op:<20} {shape:<24} {c.layout:<16} {'yes' if c.dominates else 'no'}")
    if not show_all:
        hidden = len(found) - len(rows)
        if hidden:
            click.echo(f"({hidden} tensors that some path bypasses are hidden; --all shows them)")


EXAMPLES_EXPLAIN = """
\b
Examples:
  onnx-gradcam explain models/demo.onnx models/samples/star.png
  onnx-gradcam explain resnet50.gradcam.onnx photos/ -o maps --top-k 3 --labels imagenet.txt
  onnx-gradcam explain model.onnx 'shots/**/*.jpg' --class tabby --labels labels.txt --colormap turbo
  onnx-gradcam explain tf_model.onnx img.png --layout nhwc --preprocess symmetric --bgr
  onnx-gradcam explain filetype.onnx samples/ --bytes 2048 --pad 0    # a byte model, raw files
  onnx-gradcam explain model.onnx x0.npy x1.npy                       # arrays: the model's input itself
"""


@main.command("explain", epilog=EXAMPLES_EXPLAIN)
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "-o",
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("gradcam-out"),
    show_default=True,
    help="Everything is written here, nowhere else.",
)
@click.option(
    "--preprocess",
    type=click.Choice(PRESET_NAMES),
    help="Normalisation preset (default: recorded by prepare, else imagenet).",
)
@click.option("--mean", help="Per-channel mean of pixels/255, e.g. 0.5,0.5,0.5 (with --std).")
@click.option("--std", help="Per-channel std of pixels/255, e.g. 0.5,0.5,0.5 (with --mean).")
@click.option("--size", help="Network input size HxW (height x width) or S for SxS (default: the model's fixed size).")
@click.option(
    "--layout", type=click.Choice(["nchw", "nhwc"]), help="Input layout (default: detected from the input shape)."
)
@click.option("--bgr", is_flag=True, help="Feed channels in BGR order.")
@click.option("--class", "target", help="Class to explain: an index, or a name with --labels (default: top-1).")
@click.option(
    "--labels",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Text file, one class name per line (default: MODEL.labels.txt or labels.txt beside MODEL, if it names every class).",
)
@click.option("--top-k", type=click.IntRange(1, 1000), help="Write one overlay per class among the K best.")
@click.option(
    "--region",
    help="Models prepared with --target seed: explain --class K summed over 'all', a mask PNG, or x0,y0,x1,y1 in image pixels.",
)
@click.option(
    "--box-index",
    type=click.IntRange(0),
    help="Models prepared with --target seed, detection heads [N, boxes, 5 + classes]: explain box I's --class score.",
)
@click.option("--method", help="Which prepared method to draw (default: the first).")
@click.option(
    "--colormap", type=click.Choice(COLORMAP_NAMES), default="jet", show_default=True, help="Colours of the heat map."
)
@click.option(
    "--alpha",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Weight of the heat map in the overlay.",
)
@click.option(
    "--upsample",
    type=click.Choice(RESAMPLE_NAMES),
    default="bilinear",
    show_default=True,
    help="How the map is resized to the original image.",
)
@click.option(
    "--batch-size", type=click.IntRange(1, 4096), default=8, show_default=True, help="Images per onnxruntime run."
)
@DEVICE_OPTION
@THREADS_OPTION
@click.option(
    "--bytes",
    "byte_count",
    type=click.IntRange(1),
    help="Byte models (integer input [N, T]): read the first N bytes of every input file (raw, whatever its "
    "suffix), padded at the end to the model's length T (to N where T is dynamic).",
)
@click.option(
    "--pad",
    type=click.IntRange(0),
    help="With --bytes: the id that pads a file shorter than the model's length (default 0).",
)
@click.option(
    "--no-verify",
    is_flag=True,
    help="A plain MODEL is prepared in memory: skip prepare's self-check of the result (see `prepare --help`).",
)
@click.option(
    "--format",
    "image_format",
    type=click.Choice(FORMAT_NAMES),
    default="png",
    show_default=True,
    help="Overlay files: png (lossless), jpg or webp (much faster to encode, with --quality).",
)
@click.option("--quality", type=click.IntRange(1, 100), default=90, show_default=True, help="jpg and webp quality.")
@click.option("--no-overlay", is_flag=True, help="Write the maps (.npy) and predictions only.")
@click.option(
    "--save-raw/--no-save-raw", default=True, show_default=True, help="Write each raw map (feature resolution) as .npy."
)
@click.option(
    "--resume",
    is_flag=True,
    help="Skip inputs that an earlier, interrupted run into the same folder finished (predictions.jsonl, the "
    "journal every run appends to, names them); another model or other options than that run's are refused.",
)
@click.option(
    "--output-format",
    type=click.Choice(["files", "parquet"]),
    default="files",
    show_default=True,
    help="files: overlays, .npy maps and predictions.json; parquet: one predictions.parquet of predictions, "
    "maps, raw maps and overlay bytes (needs pyarrow: the parquet extra).",
)
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[ADDRESS]",
    help="Run on a Ray cluster (the ray extra): ADDRESS ('auto', host:port, ray://...) or, alone, a local one. "
    "INPUTS may then be URIs Ray reads (s3://, gs://, file://); -o must be a folder every node sees.",
)
@click.option(
    "--workers", type=click.IntRange(1), default=1, show_default=True, help="With --ray: actors, one session each."
)
def explain_cmd(
    model: Path,
    inputs: tuple[str, ...],
    output_dir: Path,
    preprocess: str | None,
    mean: str | None,
    std: str | None,
    size: str | None,
    layout: str | None,
    bgr: bool,
    target: str | None,
    labels: Path | None,
    top_k: int | None,
    region: str | None,
    box_index: int | None,
    method: str | None,
    colormap: str,
    alpha: float,
    upsample: str,
    batch_size: int,
    device: str,
    threads: int | None,
    byte_count: int | None,
    pad: int | None,
    no_verify: bool,
    image_format: str,
    quality: int,
    no_overlay: bool,
    save_raw: bool,
    resume: bool,
    output_format: str,
    ray_address: str | None,
    workers: int,
) -> None:
    """Explain images (files, folders, globs) with MODEL, prepared or plain.

    Per image it writes an overlay (PNG, or --format) at the image's own size and the map as .npy; one
    predictions.json lists file, class, label, score, probability, feature layer and method, in the
    inputs' order. Folders run as a pipeline (reading, the model and writing overlap; memory stays flat);
    predictions.jsonl records each finished input, so an interrupted run continues with --resume.
    An unreadable image is reported and skipped; the exit code is then 1. Any model also takes
    .npy files holding its input itself (one sample, with or without the batch axis). Models of
    1-D signals ([N, C, T] inputs) take .npy or .csv files and get a plot of the signal with its
    map. Models of integer ids ([N, T]: tokens, bytes) take .npy files, or raw files with --bytes,
    and get a PNG of the ids (bytes in hex and as characters) with the map beneath them.
    Models prepared with --target seed explain --class over --region, or a detection --box-index.
    """
    from .explain.explainer import Explainer, read_labels
    from .explain.images import collect_inputs
    from .explain.pipeline import Job, Reader, RenderOptions, SeedSpec, explain_files
    from .explain.preprocess import parse_size

    try:
        label_list = read_labels(labels) if labels else None
        chosen = _preprocess_from_flags(preprocess, mean, std, bgr)
        options = RenderOptions(colormap, alpha, upsample, image_format, quality, not no_overlay, save_raw)
        explainer = Explainer(
            model,
            device=device,
            preprocess=chosen,
            batch_size=batch_size,
            threads=threads,
            labels=label_list,
            size=parse_size(size),
            layout=layout,
            verify=not no_verify,
            spin=False,  # the session's threads sleep between batches: the reading and writing threads need the cores
        )
        if explainer.prepared_in_memory:
            click.echo(
                f"note: {model} is not prepared; preparing it in memory with the defaults "
                f"(feature layer {explainer.feature_layer})",
                err=True,
            )
        if explainer.session_info.note:
            click.echo(explainer.session_info.note, err=True)
        if labels is None:
            _adopt_labels_beside(explainer, model)
        if target is not None:
            _check_class(explainer, target)  # fail before any work on a bad --class
        if top_k and explainer.num_classes is not None and top_k > explainer.num_classes:
            click.echo(
                f"note: the model has {explainer.num_classes} classes; --top-k {top_k} explains all of them", err=True
            )
        job = Job(target, top_k, method, SeedSpec(explainer, target, region, box_index))
        reader = Reader(explainer, byte_count, pad)
        if ray_address is not None:
            ray_options = (ray_address, workers, batch_size, threads, device, resume, output_format)
            _explain_on_ray(explainer, reader, job, options, inputs, output_dir, *ray_options)
            return
        files, problems = collect_inputs(inputs, reader.suffixes, exclude=output_dir)
        if not files:
            why = (
                f" ({problems[0]}{f'; and {len(problems) - 1} more' if len(problems) > 1 else ''})" if problems else ""
            )
            raise _Failure(f"no inputs to explain{why}: to fix this, pass {reader.what}, folders or globs")
        for p in problems:
            click.echo(f"skipped: {p}", err=True)
        _make_dir(output_dir)
        with click.progressbar(length=len(files), label="explaining", file=sys.stderr, hidden=len(files) <= 1) as bar:
            summary = explain_files(
                explainer,
                reader,
                files,
                output_dir,
                job,
                options,
                batch_size=batch_size,
                resume=resume,
                output_format=output_format,
                progress=bar.update,
                skipped=lambda message: click.echo(f"\nskipped: {message}", err=True),
            )
    except OnnxGradCamError as err:
        raise _fail(err) from None
    except KeyboardInterrupt:
        click.echo("\ninterrupted: to finish the run, repeat the command with --resume", err=True)
        sys.exit(130)
    resumed = f" ({summary.resumed} from an earlier run)" if summary.resumed else ""
    click.echo(
        f"explained {summary.explained} of {len(files)} {reader.noun}{resumed}; wrote {output_dir}",
        err=True,
    )
    if summary.failed or problems:
        sys.exit(1)


def _explain_on_ray(
    explainer: Explainer,
    reader: Reader,
    job: Job,
    options: RenderOptions,
    inputs: tuple[str, ...],
    output_dir: Path,
    address: str,
    workers: int,
    batch_size: int,
    threads: int | None,
    device: str,
    resume: bool,
    output_format: str,
) -> None:
    """`explain --ray`: the same files as without it, written by the workers (onnx_gradcam/ray.py)."""
    if (job.seeds is not None and job.seeds.active) or reader.noun != "images" or reader.byte_count is not None:
        raise _Failure("--ray explains images with class targets: to fix this, leave out --ray for this model")
    if output_format != "files":
        raise _Failure(
            "--ray writes files: to fix this, leave out --output-format parquet, or write Parquet from Python with "
            "onnx_gradcam.ray.explain_dataset(...).write_parquet(...)"
        )
    try:
        from . import ray as on_ray
    except ImportError as exc:
        raise _Failure(f"--ray needs the ray extra ({exc}): to fix this, pip install 'onnx-gradcam[ray]'") from None
    explainer.checked_method(job.method)
    listed = on_ray.list_inputs(inputs, exclude=output_dir)
    if not listed.paths:
        why = f" ({listed.problems[0]})" if listed.problems else ""
        raise _Failure(f"no inputs to explain{why}: to fix this, pass image files, folders, globs or URIs")
    for p in listed.problems:
        click.echo(f"skipped: {p}", err=True)
    _make_dir(output_dir)
    on_ray.connect(address or None, workers, float(threads or 1))
    click.echo(f"explaining {len(listed.paths)} images on Ray with {workers} workers", err=True)
    summary = on_ray.explain_files(
        explainer,
        listed,
        output_dir,
        job,
        options,
        batch_size=batch_size,
        threads=threads or 1,
        device=device,
        workers=workers,
        num_cpus=float(threads or 1),
        num_gpus=1 if device == "cuda" else None,
        resume=resume,
    )
    for line in summary.failed:
        click.echo(f"skipped: {line}", err=True)
    resumed = f" ({summary.resumed} from an earlier run)" if summary.resumed else ""
    click.echo(f"explained {summary.explained} of {len(listed.paths)} images{resumed}; wrote {output_dir}", err=True)
    if summary.failed or listed.problems:
        sys.exit(1)


def _adopt_labels_beside(explainer: Explainer, model: Path) -> None:
    """Use MODEL.labels.txt or labels.txt beside the model when it names every class."""
    from .explain.explainer import labels_beside, read_labels

    found = labels_beside(model)
    if found is None or explainer.num_classes is None:
        return
    try:
        names = read_labels(found)
    except OnnxGradCamError:
        return
    if len(names) == explainer.num_classes:
        explainer.labels = names
        click.echo(f"note: class names from {found} (--labels FILE to use others)", err=True)


def _check_class(explainer: Explainer, target: str) -> None:
    cls = explainer.resolve_target(target)
    if cls < 0:
        raise _Failure(
            f"--class {target} is negative: to fix this, give a class index >= 0, or leave out --class for the top-1 class"
        )
    if explainer.num_classes is not None and cls >= explainer.num_classes:
        raise _Failure(
            f"--class {cls} is out of range: the model has {explainer.num_classes} classes "
            f"(0..{explainer.num_classes - 1}); to fix this, give an index in that range"
        )


def _make_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _Failure(
            f"cannot create the output folder {folder} ({exc.strerror or exc}): to fix this, choose another -o folder"
        ) from None


def _preprocess_from_flags(preset: str | None, mean: str | None, std: str | None, bgr: bool) -> Preprocess | None:
    from .surgery.metadata import PRESETS, Preprocess

    if (mean is None) != (std is None):
        raise _Failure(
            "--mean and --std go together: to fix this, give both (e.g. --mean 0.5,0.5,0.5 --std 0.5,0.5,0.5)"
        )
    if mean is not None and std is not None:
        if preset:
            raise _Failure("--preprocess and --mean/--std exclude each other: to fix this, give one of them")
        m, s = _floats(mean, "--mean"), _floats(std, "--std")
        if len(m) != len(s) or any(v <= 0 for v in s):
            raise _Failure("--mean and --std need the same number of values and positive std")
        return Preprocess(tuple(m), tuple(s), bgr)
    if preset:
        p = PRESETS[preset]
        return Preprocess(p.mean, p.std, bgr)
    if bgr:
        return Preprocess(PRESETS["imagenet"].mean, PRESETS["imagenet"].std, True)
    return None


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise _Failure(f"{flag} {text!r} is not a list of numbers: to fix this, write e.g. 0.5,0.5,0.5") from None


EXAMPLES_EVALUATE = """
\b
Examples:
  onnx-gradcam evaluate models/demo.onnx models/samples/ --boxes models/demo_boxes.json -o eval
  onnx-gradcam evaluate resnet50.onnx val/ --method gradcam --method gradcam++ --metric deletion --metric road
  onnx-gradcam evaluate model.onnx imgs/ --layer /layer3/layer3.5/relu_2/Relu_output_0 --layer /layer4/...
"""


METRICS_EVALUATE = "\n\b\nMetrics (--metric NAME):\n" + "\n".join(
    f"  {name:<21} {summary}" for name, summary in METRIC_SUMMARIES
)


@main.command("evaluate", epilog=METRICS_EVALUATE + "\n" + EXAMPLES_EVALUATE)
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("images", nargs=-1, required=True)
@click.option(
    "--boxes",
    type=click.Path(dir_okay=False, path_type=Path),
    help='JSON {"name.png": {"class": label, "box": [x0, y0, x1, y1]}} (or "boxes": [[...], ...]), in image '
    "pixels, keyed by file name, as models/demo_boxes.json; needed by the box metrics, and its classes by "
    "localisation.",
)
@click.option(
    "--method",
    "methods",
    multiple=True,
    type=click.Choice(list(METHOD_NAMES)),
    help="CAM method; repeat for several (default: gradcam; for a prepared MODEL, its methods).",
)
@click.option(
    "--layer",
    "layers",
    multiple=True,
    help="Feature layer (tensor or node); repeat for several, each evaluated apart (default: prepare's choice).",
)
@click.option(
    "--metric",
    "metric_names",
    multiple=True,
    type=click.Choice([name for name, _ in METRIC_SUMMARIES]),
    help="Metric; repeat for several (default: all that the inputs allow: the box metrics need --boxes, "
    "localisation the boxes file's classes too). Listed below.",
)
@click.option(
    "-o",
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("evaluate-out"),
    show_default=True,
    help="metrics.json and report.html are written here (both or neither).",
)
@click.option(
    "--labels",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Class names, one per line (default: MODEL.labels.txt or labels.txt beside MODEL).",
)
@click.option("--no-report", is_flag=True, help="Write metrics.json only (report.html needs the report extra).")
@click.option(
    "--batch-size", type=click.IntRange(1, 4096), default=32, show_default=True, help="Inputs per onnxruntime run."
)
@DEVICE_OPTION
@THREADS_OPTION
@click.option("--no-verify", is_flag=True, help="A plain MODEL is prepared in memory: skip prepare's self-check.")
def evaluate_cmd(
    model: Path,
    images: tuple[str, ...],
    boxes: Path | None,
    methods: tuple[str, ...],
    layers: tuple[str, ...],
    metric_names: tuple[str, ...],
    output_dir: Path,
    labels: Path | None,
    no_report: bool,
    batch_size: int,
    device: str,
    threads: int | None,
    no_verify: bool,
) -> None:
    """Measure how faithful and how well-localised MODEL's maps of IMAGES are.

    Each image is explained for its top-1 class with every --method at every --layer; the maps are
    scored by deletion/insertion, Average Drop, confidence change, ROAD, the pointing games, the
    Grad-CAM paper's localisation and the cascading-randomisation sanity check, each with its
    reference's defaults, every choice recorded. Writes metrics.json and a self-contained
    report.html (pip install 'onnx-gradcam[evaluate]': scipy and qdldl for ROAD, matplotlib for the report).
    On any error nothing is written.
    """
    from .evaluation.run import evaluate
    from .explain.images import IMAGE_SUFFIXES, collect_inputs

    files, problems = collect_inputs(images, IMAGE_SUFFIXES, exclude=output_dir)
    if problems:
        raise _Failure(f"{problems[0]}: to fix this, pass image files, folders or globs")
    try:
        result = evaluate(
            model,
            files,
            boxes=boxes,
            methods=list(methods) or None,
            layers=list(layers) or None,
            metrics=list(metric_names) or None,
            out_dir=output_dir,
            batch_size=batch_size,
            device=device,
            threads=threads,
            labels=labels,
            report=not no_report,
            verify=not no_verify,
            progress=lambda msg: click.echo(f"  {msg}", err=True),
        )
    except OnnxGradCamError as err:
        raise _fail(err) from None
    for run in result.runs:
        values = ", ".join(f"{name} {m.value:.4g}" for name, m in run.metrics.items())
        click.echo(f"{run.method} @ {run.layer}: {values}")
    for f in result.files:
        click.echo(f"wrote {f}")


EXAMPLES_SERVE = """
\b
Examples:
  onnx-gradcam serve models/demo.onnx                     # http://127.0.0.1:8000/v2/models/demo
  onnx-gradcam serve models/ --host 0.0.0.0 --port 8080 --max-batch 16 --max-delay-ms 2
  curl -s -F image=@models/samples/star.png http://127.0.0.1:8000/v2/models/demo/explain
"""


@main.command("serve", epilog=EXAMPLES_SERVE)
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port to listen on.")
@click.option(
    "--max-batch",
    type=click.IntRange(1, 4096),
    default=8,
    show_default=True,
    help="Most samples per request and per onnxruntime run.",
)
@click.option(
    "--max-delay-ms",
    type=click.FloatRange(0),
    default=5.0,
    show_default=True,
    help="How long a request waits for others to share its run.",
)
@click.option(
    "--max-body-mb",
    type=click.FloatRange(0, min_open=True),
    default=32.0,
    show_default=True,
    help="Largest request body.",
)
@click.option(
    "--max-pixels",
    type=click.IntRange(1),
    default=40_000_000,
    show_default=True,
    help="Largest image (width x height), refused before it is decoded.",
)
@click.option(
    "--timeout-s",
    type=click.FloatRange(0, min_open=True),
    default=30.0,
    show_default=True,
    help="Longest a request may take, queueing included (then 504).",
)
@DEVICE_OPTION
@click.option(
    "--threads", type=click.IntRange(1, 1024), help="onnxruntime intra-op threads per model (default: all cores)."
)
@click.option("--no-verify", is_flag=True, help="Plain models are prepared at start-up: skip prepare's self-check.")
def serve_cmd(
    models: tuple[Path, ...],
    host: str,
    port: int,
    max_batch: int,
    max_delay_ms: float,
    max_body_mb: float,
    max_pixels: int,
    timeout_s: float,
    device: str,
    threads: int | None,
    no_verify: bool,
) -> None:
    """Serve MODELS (prepared or plain .onnx files, or folders of them) over HTTP.

    It speaks the Open Inference Protocol (KServe V2 REST, as Triton does, binary tensors
    included: tritonclient.http works unmodified) at /v2, and explains images at
    POST /v2/models/NAME/explain and POST /v1/models/NAME:explain. A model's NAME is its file
    stem. Requests arriving within --max-delay-ms share one onnxruntime run, each sample with its
    own class. SIGTERM or Ctrl-C: in-flight requests finish, then the server exits.
    Needs the serve extra: pip install 'onnx-gradcam[serve]'.
    """
    try:
        from .serve import ServeConfig, load_models, run
    except ImportError as exc:
        raise _Failure(
            f"serving needs the serve extra ({exc}): to fix this, pip install 'onnx-gradcam[serve]'"
        ) from None
    config = ServeConfig(
        max_batch=max_batch,
        max_delay_ms=max_delay_ms,
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        max_pixels=max_pixels,
        timeout_s=timeout_s,
    )
    try:
        served = load_models(models, device=device, threads=threads, verify=not no_verify)
    except OnnxGradCamError as err:
        raise _fail(err) from None
    notes = {m.explainer.session_info.note for m in served.values()} - {""}
    for note in sorted(notes):
        click.echo(note, err=True)
    for name, m in served.items():
        how = "prepared at start-up" if m.explainer.prepared_in_memory else "prepared"
        click.echo(
            f"serving {name} ({m.path}, {how}; feature layer {m.explainer.feature_layer}; {m.explainer.provider})",
            err=True,
        )
    run(served, host, port, config)


if __name__ == "__main__":
    main()
