"""The notebooks run headless, top to bottom, on a tiny random model; an error in any cell fails the test.

Each notebook reads its settings with ``sd_jax.notebook.setting`` (``SD_JAX_MODEL``,
``SD_JAX_STEPS``, ...). The harness starts a Jupyter kernel on this interpreter
(a kernelspec written to a temporary folder on ``JUPYTER_PATH``, so nothing is
registered globally), runs every cell with nbclient in a temporary working
folder, then checks the files the notebook must have written and the text its
outputs must show. To add a notebook, add a :class:`NotebookCase` to ``CASES``
(``test_every_notebook_has_a_case`` fails until you do).

The helpers of ``sd_jax.notebook`` are tested here too (no kernel needed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sd_jax import notebook
from step_harness import FAST_COMPILE_XLA_FLAGS

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
KERNEL_NAME = "sd-jax-test"
KERNEL_DEVICES = 2          # host CPU devices the kernel's JAX sees: the batch is split over them
CELL_TIMEOUT_S = 600        # per cell; a whole notebook takes well under a minute on 2 CPU cores
SMALL = {"SD_JAX_HEIGHT": "32", "SD_JAX_WIDTH": "32", "SD_JAX_STEPS": "2", "SD_JAX_DTYPE": "float32"}
KEEP_ENV = ("SD_JAX_COMPILATION_CACHE", "SD_JAX_XLA_CPU_DEFAULTS")  # other SD_JAX_* of the caller are dropped
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
HOSTED_ENV = tuple(var for _, var in notebook.HOSTED_ENV_VARS)      # never run the install cell in a test


@dataclasses.dataclass(frozen=True)
class NotebookCase:
    """One notebook run: ``notebooks/<name>.ipynb`` with the environment ``env(fixtures)``.

    ``fixtures``: names of pytest fixtures whose values ``env`` receives (a dict).
    ``outputs``: glob patterns, relative to the run folder, each of which must match a file.
    ``shows``: text that must appear in the cells' outputs (printed or displayed).
    """

    name: str
    env: Callable[[Mapping[str, Any]], dict[str, str]]
    fixtures: tuple[str, ...] = ("tiny_folder",)
    outputs: tuple[str, ...] = ()
    shows: tuple[str, ...] = ()


CASES = [
    NotebookCase(
        "generate",
        env=lambda fx: {"SD_JAX_MODEL": str(fx["tiny_folder"]), **SMALL, "SD_JAX_SEED": "7",
                        "SD_JAX_SCHEDULER": "ddim", "SD_JAX_OUTDIR": "outputs"},
        outputs=("outputs/00000-7.png", "outputs/00001-8.png", "outputs/grid-00000.png", "sd_jax-outputs.zip"),
        shows=("backend: CPU: 2 x cpu", "seed 7", "seed 8", "ddim, 2 steps"),
    ),
    NotebookCase(
        "dreambooth",
        env=lambda fx: {"SD_JAX_MODEL": str(fx["tiny_folder"]), "SD_JAX_INSTANCE_DIR": str(fx["instance_dir"]),
                        **SMALL, "SD_JAX_TRAIN_STEPS": "2", "SD_JAX_RESOLUTION": "32", "SD_JAX_CLASS_IMAGES": "2",
                        "SD_JAX_CLASS_STEPS": "2", "SD_JAX_SAMPLE_EVERY": "2", "SD_JAX_OUTDIR": "db-out",
                        "SD_JAX_TENSORBOARD": "0"},  # never start a TensorBoard server from a test
        fixtures=("tiny_folder", "instance_dir"),
        outputs=("db-out/final/model_index.json", "db-out/model.safetensors", "db-out/class_images/concept_0/*.png",
                 "db-out/samples/step000002-*.png", "db-out/samples/before/00000-0.png",
                 "db-out/samples/after/00002-2.png", "db-out/logs/**/events.out.tfevents.*", "dreambooth-model.zip"),
        shows=("backend: CPU: 2 x cpu", "configs/dreambooth/unet.yaml (diffusers-style", "3 image(s) in",
               "subject-2.png", "seed 2: a photo of dog", "before, seed 0: a photo of sks dog",
               "after, seed 1: a photo of sks dog on the beach", "TensorBoard logs:", "2 steps, final loss"),
    ),
]


# ----------------------------------------------------------------------------- harness


class NotebookFailed(AssertionError):
    """A cell raised: the message holds the notebook, the cell number, its source and the error."""


def _kernelspec(folder: Path) -> Path:
    """Write a kernelspec that starts ipykernel on this interpreter; returns the folder for JUPYTER_PATH."""
    spec = folder / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "sd_jax tests", "language": "python"}))
    return folder


def kernel_env(overrides: Mapping[str, str]) -> dict[str, str]:
    """This process's environment, cleaned for a reproducible kernel, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items()
           if k not in HOSTED_ENV and (not k.startswith("SD_JAX_") or k in KEEP_ENV)}
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    # XLA's backend at -O0 (step_harness.COMPILER_OPTIONS): the same programs, compiled in half the time
    env["XLA_FLAGS"] = " ".join([*flags.split(), f"--xla_force_host_platform_device_count={KERNEL_DEVICES}",
                                 FAST_COMPILE_XLA_FLAGS])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))  # this checkout's sd_jax
    env.setdefault("SD_JAX_COMPILATION_CACHE", "0")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["JAX_PLATFORMS"] = "cpu"  # the same run on every machine (the backend line is checked)
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"  # quiets ipykernel's debugger warning
    env.update(overrides)
    return env


def run_notebook(path: Path, env: Mapping[str, str], workdir: Path) -> Any:
    """Execute every cell of ``path`` in a fresh kernel with ``env``, in ``workdir``; returns the executed notebook.

    Raises :class:`NotebookFailed` naming the first failing cell, its source and its error.
    """
    import nbformat
    from nbclient import NotebookClient, exceptions

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT_S, startup_timeout=120,
                            resources={"metadata": {"path": str(workdir)}})
    try:
        client.execute(env=dict(env))
    except (exceptions.CellExecutionError, exceptions.CellTimeoutError, exceptions.DeadKernelError) as err:
        index = _failed_cell(nb)
        where = f"cell {index}" if index is not None else "a cell"
        message = ANSI_ESCAPE.sub("", str(err))  # IPython colours its tracebacks
        raise NotebookFailed(f"{path.name}: {where} failed\n{message}") from None
    return nb


def _failed_cell(nb: Any) -> int | None:
    """Index of the first code cell with an error output (or the last one that ran)."""
    last = None
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if any(out.get("output_type") == "error" for out in cell.get("outputs", [])):
            return i
        if cell.get("execution_count") is not None:
            last = i
    return last


def output_text(nb: Any) -> str:
    """All printed and displayed text of an executed notebook (streams, text/plain, text/html)."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            for mime in ("text/plain", "text/html"):
                value = out.get("data", {}).get(mime)
                if value:
                    parts.append(value if isinstance(value, str) else "".join(value))
    return "\n".join(parts)


@pytest.fixture
def jupyter_kernel(tmp_path_factory, monkeypatch):
    """A kernelspec for this interpreter on JUPYTER_PATH; skips when the notebook packages are missing."""
    for module in ("nbclient", "nbformat", "ipykernel"):
        pytest.importorskip(module, reason=f"{module} is not installed: pip install -e '.[test]' to run the notebooks")
    folder = _kernelspec(tmp_path_factory.mktemp("jupyter"))
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, [str(folder), os.environ.get("JUPYTER_PATH")])))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(folder / "runtime"))  # connection files
    monkeypatch.setenv("IPYTHONDIR", str(folder / "ipython"))  # no user profile or startup scripts
    return KERNEL_NAME


@pytest.fixture
def instance_dir(tmp_path_factory) -> Path:
    """A few small instance images (for the Dreambooth notebook)."""
    folder = tmp_path_factory.mktemp("instance")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(folder / f"subject-{i}.png")
    return folder


# ----------------------------------------------------------------------------- notebook tests


def test_every_notebook_has_a_case():
    assert {p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")} <= {c.name for c in CASES}, (
        "add a NotebookCase to tests/test_notebooks.py CASES for each notebook")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_notebook_runs_top_to_bottom(case, jupyter_kernel, request, tmp_path):
    fixtures = {name: request.getfixturevalue(name) for name in case.fixtures}
    nb = run_notebook(NOTEBOOK_DIR / f"{case.name}.ipynb", kernel_env(case.env(fixtures)), tmp_path)
    missing = [pattern for pattern in case.outputs if not list(tmp_path.glob(pattern))]
    assert not missing, f"{case.name}.ipynb wrote no {missing}; the run folder holds {sorted(os.listdir(tmp_path))}"
    text = output_text(nb)
    absent = [needle for needle in case.shows if needle not in text]
    assert not absent, f"{case.name}.ipynb's outputs lack {absent}:\n{text[:4000]}"
    if case.name == "generate":
        with Image.open(tmp_path / "outputs" / "00001-8.png") as img:
            meta = dict(img.text)
            assert img.size == (32, 32)
        assert (meta["seed"], meta["steps"], meta["scheduler"], meta["model"]) == (
            "8", "2", "ddim", str(fixtures["tiny_folder"]))


def test_a_failing_cell_fails_with_its_source(jupyter_kernel, tmp_path):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    path = tmp_path / "broken.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell("x = 1"), new_code_cell("y = x / 0  # boom")]), path)
    with pytest.raises(NotebookFailed) as info:
        run_notebook(path, kernel_env({}), tmp_path)
    message = str(info.value)
    assert "broken.ipynb: cell 1 failed" in message
    assert "y = x / 0  # boom" in message and "ZeroDivisionError" in message


# ----------------------------------------------------------------------------- sd_jax.notebook helpers


def test_setting_reads_and_converts_environment(monkeypatch):
    monkeypatch.delenv("SD_JAX_T", raising=False)
    assert notebook.setting("SD_JAX_T", 5) == 5
    for raw, default, want in (("12", 0, 12), ("0.5", 1.0, 0.5), ("7", 1.0, 7.0), ("off", True, False),
                               ("YES", False, True), ("", "x", ""), ("a/b", None, "a/b")):
        monkeypatch.setenv("SD_JAX_T", raw)
        value = notebook.setting("SD_JAX_T", default)
        assert value == want and type(value) is type(want), (raw, default, value)
    monkeypatch.setenv("SD_JAX_T", "2.5")
    with pytest.raises(ValueError, match=r"SD_JAX_T='2.5' is not a valid int"):
        notebook.setting("SD_JAX_T", 3)
    monkeypatch.setenv("SD_JAX_T", "maybe")
    with pytest.raises(ValueError, match="SD_JAX_T='maybe' is not a valid bool"):
        notebook.setting("SD_JAX_T", False)


def test_describe_runtime(monkeypatch):
    for var in notebook.HOSTED_ENV_VARS:
        monkeypatch.delenv(var[1], raising=False)
    import jax

    info = notebook.runtime_info()
    assert info.platform == jax.default_backend() and info.local_devices == jax.local_device_count()
    text = notebook.describe_runtime(info)
    assert text.startswith("runtime: local\n")
    assert f": {jax.local_device_count()} x {jax.devices()[0].device_kind}" in text
    assert f"jax {jax.__version__}" in text
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    assert notebook.describe_runtime(info).startswith("runtime: local")  # info was taken before
    assert notebook.hosted_environment() == "Kaggle"


def test_default_dtype_and_install_hint():
    base = notebook.RuntimeInfo("cpu", "cpu", 1, 1, 1, None, None, "local", "0", "0", "")
    assert notebook.default_dtype(base) == "float32"
    assert notebook.default_dtype(dataclasses.replace(base, platform="tpu")) == "bfloat16"
    gpu = dataclasses.replace(base, platform="gpu", memory_bytes=16 * 2**30)
    assert notebook.default_dtype(dataclasses.replace(gpu, compute_capability="7.5")) == "float16"
    assert notebook.default_dtype(dataclasses.replace(gpu, compute_capability="9.0")) == "bfloat16"
    assert notebook.jax_install_command("gpu") == 'pip install -U "jax[cuda12]"'
    text = notebook.describe_runtime(dataclasses.replace(gpu, device_kind="Tesla T4", compute_capability="7.5",
                                                         hint="do this"))
    assert "backend: GPU: 1 x Tesla T4 (16.0 GiB each), compute capability 7.5" in text
    assert text.endswith("note: do this")


def _result(seeds=(3, 4), prompts=("a cat", "a cat"), nsfw=None):
    from sd_jax.pipeline import GenerationResult

    arr = np.random.default_rng(0).random((len(seeds), 16, 24, 3)).astype(np.float32)
    from sd_jax.images import to_pil

    return GenerationResult(images=to_pil(arr), array=arr, seeds=list(seeds), prompts=list(prompts),
                            negative_prompts=["blurry"] * len(seeds), guidance_scales=[7.5] * len(seeds),
                            scheduler="ddim", num_inference_steps=2, height=16, width=24, nsfw=nsfw)


def test_show_images_outside_ipython_prints_seeds(capsys):
    notebook.show_images(_result(nsfw=[False, True]))
    out = capsys.readouterr().out
    assert "a cat (negative: blurry); ddim, 2 steps, guidance 7.5, 24x16" in out
    assert "seed 3: 24x16 image" in out and "seed 4 (flagged by the safety checker): 24x16 image" in out
    with pytest.raises(ValueError, match="1 captions for 2 images"):
        notebook.show_images(_result().images, captions=["x"])


def test_images_html_has_every_image_and_caption():
    result = _result(prompts=("a cat", "a <dog>"))
    html = notebook.images_html(result.images, notebook.result_captions(result), "t & t", size=48)
    assert html.count("data:image/png;base64,") == 2 and 'width="48" height="32"' in html
    assert "seed 3: a cat" in html and "seed 4: a &lt;dog&gt;" in html and "t &amp; t" in html


def test_save_images_writes_numbered_pngs_with_metadata(tmp_path):
    from sd_jax.outputs import image_metadata

    (tmp_path / "00004-mine.txt").write_text("keep")
    paths = notebook.save_images(_result(), tmp_path, model="m/odel", dtype="float32", grid=True)
    assert [p.name for p in paths] == ["00005-3.png", "00006-4.png", "grid-00000.png"]
    with Image.open(paths[1]) as img:
        meta = dict(img.text)
    assert (meta["seed"], meta["prompt"], meta["negative_prompt"], meta["model"]) == ("4", "a cat", "blurry", "m/odel")
    assert (meta["steps"], meta["scheduler"], meta["guidance_scale"], meta["width"]) == ("2", "ddim", "7.5", "24")
    cli_keys = set(image_metadata(_result(), 0, model="m", dtype="float32"))
    assert set(meta) == cli_keys  # the one schema generate.py writes too (A1111 infotext under "parameters")
    with Image.open(paths[2]) as img:
        assert img.size == (48, 16) and img.text["seeds"] == "3 4"
    again = notebook.save_images(_result(seeds=(9,), prompts=("x",)), tmp_path, model="m", dtype="float32")
    assert [p.name for p in again] == ["00007-9.png"]


def test_download_outside_a_notebook_zips_several_files(tmp_path, monkeypatch, capsys):
    for var in notebook.HOSTED_ENV_VARS:
        monkeypatch.delenv(var[1], raising=False)
    monkeypatch.chdir(tmp_path)
    paths = notebook.save_images(_result(), tmp_path / "out", model="m", dtype="float32")
    notebook.download(paths)
    import zipfile

    assert sorted(zipfile.ZipFile("sd_jax-outputs.zip").namelist()) == ["00000-3.png", "00001-4.png"]
    assert "files: sd_jax-outputs.zip" in capsys.readouterr().out
    notebook.download(paths[:1])
    assert f"files: {paths[0]}" in capsys.readouterr().out


def test_dreambooth_config_finds_the_recipe_or_falls_back(tmp_path, monkeypatch, capsys):
    from sd_jax.dreambooth.config import ConfigError

    monkeypatch.chdir(tmp_path)  # no configs/ in the working folder: the packaged recipes are found
    over = {"model.path": "m", "concepts": [{"instance_dir": "d", "instance_prompt": "a sks dog"}],
            "train.max_train_steps": 7}
    assert notebook.find_recipe("unet") == notebook.find_recipe("configs/dreambooth/unet.yaml") == (
        notebook.PACKAGED_RECIPES / "unet.yaml")
    assert (ROOT / "configs" / "dreambooth" / "unet.yaml").resolve() == notebook.PACKAGED_RECIPES / "unet.yaml"
    cfg = notebook.dreambooth_config("configs/dreambooth/low_memory.yaml", over)
    assert cfg.train.remat and cfg.train.max_train_steps == 7 and cfg.concepts[0].instance_prompt == "a sks dog"
    assert "low_memory.yaml (low-memory UNet" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="recipe 'mine.yaml' not found"):
        notebook.dreambooth_config("mine.yaml", over)


def test_upload_images_outside_colab_lists_or_explains(tmp_path, monkeypatch, capsys):
    for var in notebook.HOSTED_ENV_VARS:
        monkeypatch.delenv(var[1], raising=False)
    folder = tmp_path / "photos"
    assert notebook.upload_images(folder) == [] and folder.is_dir()
    assert "no images in" in capsys.readouterr().out
    Image.new("RGB", (8, 8)).save(folder / "b.png")
    Image.new("RGB", (8, 8)).save(folder / "a.jpg")
    assert [p.name for p in notebook.upload_images(folder)] == ["a.jpg", "b.png"]
    assert "2 image(s) in" in capsys.readouterr().out


def test_tensorboard_without_the_package_says_how(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    notebook.tensorboard(tmp_path / "logs")
    out = capsys.readouterr().out
    assert f"tensorboard --logdir {tmp_path / 'logs'}" in out
    assert not (tmp_path / "logs").exists()  # the trainer creates its own output folder (it refuses others' files)
    assert "not installed" in out


def test_show_comparison_pairs_images(capsys):
    notebook.show_comparison(_result(), _result())
    out = capsys.readouterr().out
    assert "seed 3: a cat: before 24x16, after 24x16" in out and "seed 4" in out
    with pytest.raises(ValueError, match="same prompts and seeds"):
        notebook.show_comparison(_result(), _result(seeds=(5, 6)))


# ----------------------------------------------------------------------------- the install cell


def _install_cell(name: str) -> str:
    """The install cell's code with IPython syntax (``%pip``) turned into Python calls."""
    import nbformat

    pytest.importorskip("IPython")
    from IPython.core.inputtransformer2 import TransformerManager

    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    source = next(c.source for c in nb.cells if c.cell_type == "code" and "SD_JAX_SOURCE" in c.source)
    return TransformerManager().transform_cell(source)


class _Shell:
    """Records the magics a cell runs instead of running them."""

    def __init__(self):
        self.magics = []

    def run_line_magic(self, name, line, *args, **kwargs):
        self.magics.append((name, line))


def _run_install(name: str, monkeypatch, source: str | None, installed: bool) -> tuple[_Shell, str | None]:
    if source is None:
        monkeypatch.delenv("SD_JAX_SOURCE", raising=False)
    else:
        monkeypatch.setenv("SD_JAX_SOURCE", source)
    if not installed:
        monkeypatch.setitem(sys.modules, "sd_jax", None)  # `import sd_jax` raises ImportError
    shell = _Shell()
    try:
        exec(_install_cell(name), {"get_ipython": lambda: shell})
    except SystemExit as stop:
        return shell, str(stop)
    return shell, None


@pytest.mark.parametrize("name", ["generate", "dreambooth"])
def test_install_cell_installs_from_sd_jax_source_or_stops_with_one_instruction(name, monkeypatch, capsys):
    shell, stopped = _run_install(name, monkeypatch, source=None, installed=False)
    assert shell.magics == [] and stopped is not None
    assert "SD_JAX_SOURCE" in stopped and "python -m build" in stopped and "<owner>" not in stopped
    shell, stopped = _run_install(name, monkeypatch, source="/content/sd_jax", installed=False)
    assert stopped is None and len(shell.magics) == 1
    assert shell.magics[0][0] == "pip" and '"$SD_JAX_SOURCE"' in shell.magics[0][1]
    monkeypatch.delitem(sys.modules, "sd_jax")
    import sd_jax  # noqa: F401 - back in sys.modules

    shell, stopped = _run_install(name, monkeypatch, source=None, installed=True)
    assert stopped is None and shell.magics == [] and "using the installed sd_jax" in capsys.readouterr().out


def test_notebook_dtype_advice_matches_default_dtype():
    import nbformat

    gpu = notebook.RuntimeInfo("gpu", "Tesla T4", 1, 1, 1, 16 * 2**30, "7.5", "Colab", "0", "0", "")
    assert notebook.default_dtype(gpu) == "float16"
    assert notebook.default_dtype(dataclasses.replace(gpu, compute_capability="8.0")) == "bfloat16"
    for name in ("generate", "dreambooth"):
        nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
        text = " ".join(" ".join(c.source for c in nb.cells if c.cell_type == "markdown").split())
        assert "float16 on older GPUs (T4, P100, V100" in text, name
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert 'notebook.setting("SD_JAX_DTYPE", notebook.default_dtype())' in code, name
