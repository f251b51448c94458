"""sd_jax: Stable Diffusion v1.x sampling and Dreambooth fine-tuning in JAX/Flax."""

from sd_jax import _runtime

_runtime.configure_xla_cpu()
_runtime.configure_compilation_cache()

__all__ = ["StableDiffusion"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """Import the pipeline lazily, so ``import sd_jax.models`` stays light."""
    if name == "StableDiffusion":
        from sd_jax.pipeline import StableDiffusion

        return StableDiffusion
    raise AttributeError(f"module 'sd_jax' has no attribute {name!r}")
