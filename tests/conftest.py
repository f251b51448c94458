"""Test setup: 8 host devices for sharding tests, full float32 precision for parity.

Where the tests run. By default on 8 CPU devices, created explicitly, on any host: on a
GPU or TPU machine ``JAX_PLATFORMS=cpu`` is set here (and inherited by the subprocess
tests), because the sharding, checkpoint and multi-device tests need 8 devices and the
parity tolerances are float32 ones. To run the suite on the accelerator instead, set
``SD_JAX_TEST_PLATFORMS`` (e.g. ``cuda`` or ``tpu``; it becomes ``JAX_PLATFORMS``): tests
marked ``needs_8_devices`` then skip, saying why, when the default backend has fewer.
The accelerator kernels themselves are covered by tests/test_pallas_interpret.py (TPU
interpret mode) and bench/accelerator.py (cuDNN, executed on the GPU).
"""
import os

# Must happen before JAX initialises its backend.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = os.environ.get("SD_JAX_TEST_PLATFORMS", "cpu")
os.environ.setdefault("SD_JAX_COMPILATION_CACHE", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

HOST_DEVICES = 8


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_8_devices: uses the default backend's first 8 devices "
                                       "(skipped with a reason when it has fewer)")


def pytest_collection_modifyitems(config, items):
    """Skip, with the reason, the 8-device tests where the default backend has fewer devices."""
    if not any(item.get_closest_marker("needs_8_devices") for item in items):
        return
    count = jax.device_count()
    if count >= HOST_DEVICES:
        return
    skip = pytest.mark.skip(reason=f"needs {HOST_DEVICES} devices; the {jax.default_backend()} backend has {count} "
                                   "(unset SD_JAX_TEST_PLATFORMS to run on 8 CPU devices)")
    for item in items:
        if item.get_closest_marker("needs_8_devices"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny random SD model as a diffusers folder (4-channel UNet)."""
    from tiny import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_inpaint_folder(tmp_path_factory):
    """A tiny random inpainting model (9-channel UNet) as a diffusers folder."""
    from tiny import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd_inpaint"), seed=3, in_channels=9)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_folder):
    """sd_jax's pipeline on the tiny folder (float32)."""
    from sd_jax import StableDiffusion

    return StableDiffusion.from_pretrained(tiny_folder)


@pytest.fixture(scope="session")
def tiny_reference(tiny_folder):
    """diffusers' StableDiffusionPipeline on the tiny folder, with the folder's scheduler config kept."""
    from tiny import load_reference

    ref = load_reference(tiny_folder)
    ref.folder_scheduler_config = dict(ref.scheduler.config)
    return ref


@pytest.fixture(scope="session")
def parity_folder(tmp_path_factory):
    """The whole-pipeline parity model (tiny.make_tiny_sd(parity=True)): solvers and init images show."""
    from tiny import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("parity_sd"), parity=True)


@pytest.fixture(scope="session")
def parity_pipe(parity_folder):
    """sd_jax's pipeline on the parity model (float32)."""
    from sd_jax import StableDiffusion

    return StableDiffusion.from_pretrained(parity_folder)


@pytest.fixture(scope="session")
def parity_reference(parity_folder):
    """diffusers' pipeline on the parity model, with the folder's scheduler config file kept (a loaded
    PNDMScheduler reports clip_sample=False whatever the file says)."""
    from tiny import load_reference, read_json

    ref = load_reference(parity_folder)
    ref.folder_scheduler_config = read_json(parity_folder / "scheduler" / "scheduler_config.json")
    return ref
