"""Helpers the notebooks call: what runtime this is, settings from the environment, images inline, saving.

    from sd_jax import notebook
    print(notebook.describe_runtime())                        # TPU / GPU (name, memory) / CPU, devices, versions
    MODEL = notebook.setting("SD_JAX_MODEL", "CompVis/stable-diffusion-v1-4")
    notebook.show_images(result)                              # a GenerationResult: inline grid, seed under each
    notebook.save_images(result, "outputs", model=MODEL, dtype="bfloat16")   # sd_jax.outputs, as generate.py

Every notebook value a headless run may change is read with :func:`setting`, so
the test suite runs the notebooks top to bottom on a tiny model by setting
environment variables (``SD_JAX_MODEL``, ``SD_JAX_STEPS``, ...). IPython is
optional: outside a notebook :func:`show_images` prints one line per image.
"""

from __future__ import annotations

import base64
import dataclasses
import glob
import io
import os
import platform
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HOSTED_ENV_VARS = (("Colab", "COLAB_RELEASE_TAG"), ("Kaggle", "KAGGLE_KERNEL_RUN_TYPE"))
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


# ----------------------------------------------------------------------------- settings


def setting(name: str, default: Any) -> Any:
    """The environment variable ``name`` converted to the type of ``default``, or ``default`` when unset.

    int, float and bool defaults parse the text (bool: 1/0, true/false, yes/no,
    on/off); str and None defaults return it as is (an empty string included).
    A value that does not parse is an error naming the variable.
    """
    raw = os.environ.get(name)
    if raw is None:
        return default
    text = raw.strip()
    kind = type(default)
    try:
        if kind is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a valid {kind.__name__} "
                         f"(default {default!r})") from None
    return raw


# ----------------------------------------------------------------------------- runtime


@dataclasses.dataclass(frozen=True)
class RuntimeInfo:
    """What JAX found: backend, devices, memory, host and versions."""

    platform: str                  # "tpu" | "gpu" | "cpu"
    device_kind: str               # e.g. "TPU v5 lite", "NVIDIA A100-SXM4-40GB", "cpu"
    local_devices: int
    global_devices: int
    processes: int
    memory_bytes: int | None       # per device, where the backend reports it
    compute_capability: str | None  # CUDA GPUs
    hosted: str                    # "Colab" | "Kaggle" | "local"
    jax_version: str
    jaxlib_version: str
    hint: str                      # what to do when an attached accelerator is not used ("" when nothing)


def hosted_environment() -> str:
    """'Colab', 'Kaggle' or 'local', from the variables those services set."""
    return next((name for name, var in HOSTED_ENV_VARS if os.environ.get(var)), "local")


def _attached_accelerator() -> str | None:
    """'tpu' or 'gpu' when the machine has one (device files / nvidia-smi), whatever JAX uses."""
    if glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*") or os.environ.get("TPU_NAME"):
        return "tpu"
    if glob.glob("/dev/nvidia[0-9]*") or shutil.which("nvidia-smi"):
        return "gpu"
    return None


def jax_install_command(accelerator: str | None) -> str:
    """The pip command that installs JAX for ``accelerator`` ('tpu', 'gpu' or None for CPU)."""
    extra = {"tpu": "tpu", "gpu": "cuda12"}.get(accelerator or "", "cpu")
    return f'pip install -U "jax[{extra}]"'


def runtime_info() -> RuntimeInfo:
    """Inspect JAX's devices (this initialises the backend)."""
    import jax
    import jaxlib

    devices = jax.local_devices()
    first = devices[0]
    memory = None
    try:
        stats = first.memory_stats() or {}
        memory = int(stats["bytes_limit"]) if "bytes_limit" in stats else None
    except Exception:  # CPU and some plugins report no memory statistics
        memory = None
    attached = _attached_accelerator()
    hint = ""
    if first.platform == "cpu":
        if attached is not None:
            hint = (f"a {attached.upper()} is attached but JAX only sees the CPU: run "
                    f"`{jax_install_command(attached)}` and restart the runtime")
        else:
            hint = ("no accelerator: a 512x512 image takes minutes on a CPU; on Colab pick Runtime > Change runtime "
                    "type > TPU or GPU, on Kaggle Settings > Accelerator")
    return RuntimeInfo(platform=first.platform, device_kind=str(first.device_kind), local_devices=len(devices),
                       global_devices=jax.device_count(), processes=jax.process_count(), memory_bytes=memory,
                       compute_capability=getattr(first, "compute_capability", None), hosted=hosted_environment(),
                       jax_version=jax.__version__, jaxlib_version=jaxlib.__version__, hint=hint)


def describe_runtime(info: RuntimeInfo | None = None) -> str:
    """A few lines saying which accelerator JAX uses, how many devices, and the versions."""
    from sd_jax import __version__

    info = info or runtime_info()
    name = {"tpu": "TPU", "gpu": "GPU", "cpu": "CPU"}.get(info.platform, info.platform.upper())
    device = f"{info.local_devices} x {info.device_kind}"
    if info.memory_bytes:
        device += f" ({info.memory_bytes / 2**30:.1f} GiB each)"
    if info.compute_capability:
        device += f", compute capability {info.compute_capability}"
    if info.platform == "cpu":
        device += f", {os.cpu_count()} CPU cores"
    lines = [f"runtime: {info.hosted}", f"backend: {name}: {device}"]
    if info.processes > 1:
        lines.append(f"hosts: {info.processes} processes, {info.global_devices} devices in all")
    lines.append(f"versions: jax {info.jax_version} (jaxlib {info.jaxlib_version}), sd_jax {__version__}, "
                 f"Python {platform.python_version()}")
    if info.hint:
        lines.append(f"note: {info.hint}")
    return "\n".join(lines)


def default_dtype(info: RuntimeInfo | None = None) -> str:
    """The compute dtype for this runtime: bfloat16 on TPU and on GPUs from Ampere on, float16 on older
    GPUs (no fast bfloat16), float32 on CPU."""
    info = info or runtime_info()
    if info.platform == "tpu":
        return "bfloat16"
    if info.platform == "gpu":
        try:
            major = int(str(info.compute_capability).split(".")[0])
        except ValueError:
            return "bfloat16"  # ROCm and other GPUs report no CUDA compute capability
        return "bfloat16" if major >= 8 else "float16"
    return "float32"


# ----------------------------------------------------------------------------- showing images


def _ipython_shell() -> Any:
    """The running IPython shell, or None (plain Python, or IPython not installed)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def _png_data_uri(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _html_escape(text: str) -> str:
    import html

    return html.escape(str(text), quote=True)


def result_captions(result: Any) -> list[str]:
    """One caption per image of a GenerationResult: its seed, its prompt when the prompts differ, and a
    note when the safety checker flagged it."""
    several = len(set(result.prompts)) > 1
    captions = []
    for i, seed in enumerate(result.seeds):
        text = f"seed {seed}"
        if several:
            text += f": {result.prompts[i]}"
        if result.nsfw and result.nsfw[i]:
            text += " (flagged by the safety checker)"
        captions.append(text)
    return captions


def result_title(result: Any) -> str:
    """One line naming a GenerationResult's settings."""
    prompts = list(dict.fromkeys(result.prompts))
    title = " | ".join(prompts)
    negatives = [n for n in dict.fromkeys(result.negative_prompts) if n]
    if negatives:
        title += f" (negative: {' | '.join(negatives)})"
    scales = sorted(set(result.guidance_scales))
    return (f"{title}; {result.scheduler}, {result.num_inference_steps} steps, guidance "
            f"{', '.join(f'{g:g}' for g in scales)}, {result.width}x{result.height}")


def images_html(images: Sequence[Any], captions: Sequence[str], title: str = "", size: int = 256) -> str:
    """HTML of images in a wrapping grid, each ``size`` pixels wide with its caption underneath."""
    figures = []
    for image, caption in zip(images, captions):
        w, h = image.size
        height = round(size * h / w)
        style = "image-rendering:pixelated;" if w < size else ""
        figures.append(
            f'<figure style="margin:0;text-align:center"><img src="{_png_data_uri(image)}" width="{size}" '
            f'height="{height}" style="{style}" alt="{_html_escape(caption)}"/>'
            f'<figcaption style="font-size:12px">{_html_escape(caption)}</figcaption></figure>')
    header = f'<div style="margin-bottom:4px">{_html_escape(title)}</div>' if title else ""
    return (f'<div style="font-family:sans-serif">{header}'
            f'<div style="display:flex;flex-wrap:wrap;gap:8px">{"".join(figures)}</div></div>')


def show_images(images: Any, captions: Sequence[str] | None = None, title: str | None = None,
                size: int = 256) -> None:
    """Show images inline, each with a caption: a GenerationResult (captions: seeds), or PIL images / paths.

    In a notebook the images appear as one HTML grid; elsewhere one text line is
    printed per image.
    """
    from sd_jax import images as imageio

    if hasattr(images, "seeds") and hasattr(images, "images"):
        captions = captions if captions is not None else result_captions(images)
        title = title if title is not None else result_title(images)
        images = images.images
    images = [imageio.to_rgb(imageio.open_image(im)) if isinstance(im, (str, Path)) else im for im in images]
    if not images:
        raise ValueError("show_images got no images")
    captions = list(captions) if captions is not None else [f"image {i}" for i in range(len(images))]
    if len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    if _ipython_shell() is None:
        if title:
            print(title)
        for image, caption in zip(images, captions):
            print(f"{caption}: {image.size[0]}x{image.size[1]} image")
        return
    from IPython.display import HTML, display

    display(HTML(images_html(images, captions, title or "", size)))


# ----------------------------------------------------------------------------- saving


def save_images(result: Any, outdir: str | Path, model: str, dtype: str, grid: bool = False) -> list[Path]:
    """Write a GenerationResult as ``OUTDIR/NNNNN-SEED.png`` with its generation parameters as PNG text
    (the writer and metadata generate.py uses, :mod:`sd_jax.outputs`); ``grid`` also writes
    ``grid-NNNNN.png``. Numbering continues after the highest number in ``outdir``. Returns the paths."""
    from sd_jax.outputs import save_result

    return save_result(result, outdir, model=model, dtype=dtype, grid=grid)


def download(paths: Sequence[str | Path], archive: str | Path = "sd_jax-outputs.zip") -> None:
    """Offer files for download: on Colab the browser downloads them, on Kaggle and in Jupyter a link is
    shown, elsewhere the path is printed. Several files (or a folder) go into one zip, ``archive``."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("download got no files")
    target = paths[0]
    if len(paths) > 1 or paths[0].is_dir():
        import zipfile

        target = Path(archive)
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in paths:
                files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
                for f in files:  # a file under its name, a folder's files under the folder's name
                    zf.write(f, f.relative_to(p.parent))
    if hosted_environment() == "Colab":
        from google.colab import files  # type: ignore[import-not-found]

        files.download(str(target))
    elif _ipython_shell() is not None:
        from IPython.display import FileLink, display

        display(FileLink(os.path.relpath(target)))
    else:
        print(f"files: {target}")


# ----------------------------------------------------------------------------- Dreambooth

PACKAGED_RECIPES = Path(__file__).resolve().parent / "configs" / "dreambooth"  # package data (configs/ links here)


def recipe_dirs() -> list[Path]:
    """Where recipes are looked for: ``configs/dreambooth`` in the working folder, then the packaged recipes."""
    return list(dict.fromkeys([Path("configs/dreambooth"), PACKAGED_RECIPES]))


def find_recipe(recipe: str | Path) -> Path | None:
    """The YAML file of ``recipe``: a path (as given, or relative to the repository next to the package) or a
    name from configs/dreambooth/ (``unet``, ``low_memory``, ``original``). None when no file is found."""
    path = Path(recipe)
    candidates = [path]
    if path.suffix in (".yaml", ".yml"):
        candidates.append(PACKAGED_RECIPES / path.name)  # "configs/dreambooth/unet.yaml" without a clone
    elif len(path.parts) == 1:
        candidates += [folder / f"{path.name}.yaml" for folder in recipe_dirs()]
    return next((c for c in candidates if c.is_file()), None)


def dreambooth_config(recipe: str | Path | None, overrides: dict[str, Any] | None = None) -> Any:
    """A validated Dreambooth TrainConfig: the recipe (see :func:`find_recipe`; the recipes are package data,
    so a pip install finds them too) plus ``overrides`` (dotted keys, as ``load_config``). Prints which recipe
    was used."""
    from sd_jax.dreambooth.config import ConfigError, load_config

    overrides = dict(overrides or {})
    if recipe is None or str(recipe) == "":
        config = load_config(None, overrides)
        print("recipe: none (TrainConfig defaults)")
        return config
    path = find_recipe(recipe)
    if path is not None:
        config = load_config(path, overrides)
        print(f"recipe: {path}" + (f" ({config.description})" if config.description else ""))
        return config
    names = sorted(p.stem for p in PACKAGED_RECIPES.glob("*.yaml"))
    raise ConfigError(f"recipe {str(recipe)!r} not found (looked in {', '.join(map(str, recipe_dirs()))}); "
                      f"give a YAML path or one of {', '.join(names)}")


def upload_images(folder: str | Path) -> list[Path]:
    """The images in ``folder`` (created if missing). When it holds none: on Colab an upload button appears
    and the chosen files go into it; elsewhere the message says how to fill it. Returns the image paths."""
    from sd_jax.dreambooth.data import list_images

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = list_images(folder)
    if not images and hosted_environment() == "Colab":
        from google.colab import files  # type: ignore[import-not-found]

        print(f"choose the photos of your subject; they go into {folder}")
        cwd = os.getcwd()
        os.chdir(folder)  # files.upload() writes into the working folder
        try:
            uploaded = files.upload() or {}
        finally:
            os.chdir(cwd)
        for name, data in uploaded.items():
            target = folder / Path(name).name
            if not target.is_file():
                target.write_bytes(data)
        images = list_images(folder)
    if images:
        print(f"{len(images)} image(s) in {folder}")
    else:
        where = {"Kaggle": "add a dataset with the photos (Add Input) and set INSTANCE_DIR to its folder under "
                           "/kaggle/input/, or upload them into this folder",
                 "Colab": "rerun this cell and choose files, or mount Google Drive and set INSTANCE_DIR to a "
                          "folder there"}.get(hosted_environment(), "copy the photos into it, or set INSTANCE_DIR "
                                                                     "(SD_JAX_INSTANCE_DIR) to their folder")
        print(f"no images in {folder}: {where}; 3 to 10 photos of the subject (.jpg, .png, .webp) work best")
    return images


def tensorboard(logdir: str | Path, inline: bool = True) -> None:
    """TensorBoard inline on ``logdir`` (``%load_ext tensorboard`` + ``%tensorboard --logdir``) when the
    tensorboard package is installed and this is a notebook; otherwise print how to view the logs."""
    import importlib.util

    logdir = Path(logdir)  # not created here: the trainer makes its output folder (TensorBoard waits for it)
    shell = _ipython_shell()
    installed = importlib.util.find_spec("tensorboard") is not None
    if inline and installed and shell is not None:
        shell.run_line_magic("load_ext", "tensorboard")
        shell.run_line_magic("tensorboard", f'--logdir "{logdir}"')
        return
    why = ("inline TensorBoard is switched off" if not inline else
           "the tensorboard package is not installed (`pip install tensorboard`, then rerun this cell)"
           if not installed else "this is not a notebook")
    print(f"TensorBoard logs: {logdir}\n{why}; to view them: `tensorboard --logdir {logdir}` "
          f"(or in a notebook: %load_ext tensorboard, then %tensorboard --logdir {logdir}); the trainer also "
          f"writes the scalars as JSON lines to {logdir / 'metrics.jsonl'}")


def show_comparison(before: Any, after: Any, labels: Sequence[str] = ("before", "after"), size: int = 256) -> None:
    """Two GenerationResults of the same prompts and seeds side by side: one row per image, ``labels`` over
    the columns (outside a notebook one text line per pair)."""
    if len(before.images) != len(after.images):
        raise ValueError(f"{len(before.images)} images before and {len(after.images)} after")
    if list(before.seeds) != list(after.seeds) or list(before.prompts) != list(after.prompts):
        raise ValueError("the two results must have the same prompts and seeds")
    rows = [(f"seed {seed}: {prompt}", b, a)
            for seed, prompt, b, a in zip(before.seeds, before.prompts, before.images, after.images)]
    if _ipython_shell() is None:
        for caption, b, a in rows:
            print(f"{caption}: {labels[0]} {b.size[0]}x{b.size[1]}, {labels[1]} {a.size[0]}x{a.size[1]}")
        return
    from IPython.display import HTML, display

    html = "".join(images_html([b, a], [f"{labels[0]}, {caption}", f"{labels[1]}, {caption}"], size=size)
                   for caption, b, a in rows)
    display(HTML(f'<div style="display:flex;flex-direction:column;gap:8px">{html}</div>'))
