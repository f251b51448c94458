"""Full-size SD v1.4 UNet forward: sd_jax against diffusers (PyTorch), side by side.

Random weights (speed does not depend on their values), batch 2 (CFG),
64x64 latents (512x512 images) and 32x32. Calls alternate between the two
implementations after one warm-up each; medians and the ratio sd_jax /
diffusers are printed (< 1 means sd_jax is faster).

    python bench/unet.py [--repeats 3] [--sizes 64 32] [--bf16]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

import sd_jax  # noqa: E402,F401  (sets the XLA:CPU defaults before JAX starts)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from common import V14_UNET_CONFIG, alternate, machine, median, peak_rss_gib, table  # noqa: E402


def build(dtype: str):
    """The diffusers reference UNet and sd_jax's, with the same random weights."""
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    from sd_jax.convert import core
    from sd_jax.models.unet import UNet2DConditionModel, UNetConfig
    from sd_jax.pipeline import param_shapes

    torch.manual_seed(0)
    ref = TorchUNet(**V14_UNET_CONFIG).eval()
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    model = UNet2DConditionModel(UNetConfig.from_diffusers(V14_UNET_CONFIG), dtype=dt, param_dtype=dt)
    shapes = param_shapes(model, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1, 768)))
    params, _ = core.load_state_dict(shapes, state, what="UNet")
    del state
    return ref, model, jax.device_put(params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 32])
    parser.add_argument("--bf16", action="store_true", help="also time sd_jax with bfloat16 compute")
    args = parser.parse_args()
    import torch

    rows = []
    ref, model, params = build("float32")
    models = {"float32": (model, params)}
    if args.bf16:
        _, model16, _ = build("bfloat16")
        models["bfloat16"] = (model16, jax.tree.map(lambda p: p.astype(jnp.bfloat16), params))
    rng = np.random.default_rng(0)
    for size in args.sizes:
        x = rng.standard_normal((2, size, size, 4), dtype=np.float32)
        ctx = rng.standard_normal((2, 77, 768), dtype=np.float32)
        t = np.array([981, 981], np.int32)
        x_t, ctx_t, t_t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(ctx), torch.from_numpy(t)

        def run_torch():
            with torch.no_grad():
                return ref(x_t, t_t, ctx_t).sample

        fns = {"diffusers": run_torch}
        for name, (m, p) in models.items():
            fwd = jax.jit(lambda p, x, t, c, m=m: m.apply({"params": p}, x.astype(m.dtype), t, c.astype(m.dtype)))
            xj, cj, tj = jnp.asarray(x), jnp.asarray(ctx), jnp.asarray(t)
            fwd(p, xj, tj, cj).block_until_ready()  # compile
            fns[f"sd_jax {name}"] = lambda fwd=fwd, p=p, xj=xj, tj=tj, cj=cj: fwd(p, xj, tj, cj).block_until_ready()
        run_torch()  # warm-up
        times = alternate(fns, args.repeats)
        base = median(times["diffusers"])
        for name in fns:
            if name == "diffusers":
                continue
            rows.append((f"UNet batch 2, {size}x{size} latents, {name.split()[1]}",
                         f"{median(times[name]):.2f} s", f"{base:.2f} s (torch fp32)",
                         f"{median(times[name]) / base:.2f}"))
            print(rows[-1], flush=True)
    print()
    print(f"machine: {machine()}; torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; peak RSS {peak_rss_gib():.1f} GiB; "
          f"medians of {args.repeats} alternated calls after warm-up")
    print(table(rows))


if __name__ == "__main__":
    main()
