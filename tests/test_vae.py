"""The Flax AutoencoderKL against diffusers' PyTorch AutoencoderKL (tiny random weights).

Fast: tiny configs (parity in fp32, bf16 and fp16, posterior sampling, CompVis 1x1-conv
attention weights, config validation, full-size key coverage on the meta device).
Slow (`pytest -m slow tests/test_vae.py`): the full-size VAE decoder, random weights.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sd_jax.convert.core import flatten_tree, flax_path_to_torch_name, load_state_dict  # noqa: E402
from sd_jax.models.vae import AutoencoderKL, VAEConfig, latent_dist_sample  # noqa: E402

# The config.json of CompVis/stable-diffusion-v1-4/vae, verbatim.
V14_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.2.2",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
VAE_PARAMS = 83_653_863

# name -> (config, model kwargs, image (H, W))
TINY = {
    "2lvl-1layer-32x32": (VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8),
                          {}, (32, 32)),
    "3lvl-2layers-32x48-remat": (VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=2,
                                           norm_num_groups=8), {"remat": True}, (32, 48)),
    "no-attention-no-quant": (VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                        mid_block_add_attention=False, use_quant_conv=False,
                                        use_post_quant_conv=False), {}, (16, 24)),
}
BATCH = 2


def fp32_bound(ref: np.ndarray) -> float:
    """The float32 parity bound: 1e-4 relative to the reference's magnitude (at least 1)."""
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


def randomise_(module, seed: int) -> None:
    """Overwrite every parameter with seeded random values, norms included (nothing stays 0/1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.2 * noise)
            else:  # conv (O, I, kh, kw) or linear (O, I): unit-variance activations
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(noise / np.sqrt(fan_in))


def numpy_state(module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


@functools.lru_cache(maxsize=None)
def tiny_setup(name: str):
    """(config, kwargs, (H, W), diffusers model, numpy state dict, our float32 params) for a TINY entry."""
    cfg, kwargs, hw = TINY[name]
    ref = diffusers.AutoencoderKL.from_config(cfg.to_diffusers()).eval()
    randomise_(ref, seed=sum(map(ord, name)))
    state = numpy_state(ref)
    model = AutoencoderKL(cfg, **kwargs)
    target = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *hw, cfg.in_channels)))["params"]
    params, skipped = load_state_dict(target, state, what="VAE")
    assert skipped == []
    return cfg, kwargs, hw, ref, state, params


@functools.lru_cache(maxsize=None)
def jitted(cfg: VAEConfig, kwargs: tuple, dtype: str, method: str):
    """One compiled encode/decode per (config, dtype): ``f(params, x)``."""
    model = AutoencoderKL(cfg, dtype=jnp.dtype(dtype), **dict(kwargs))
    return jax.jit(functools.partial(model.apply, method=getattr(AutoencoderKL, method)))


def run(name: str, method: str, params, x, dtype: str = "float32"):
    cfg, kwargs, *_ = tiny_setup(name)
    return jitted(cfg, tuple(sorted(kwargs.items())), dtype, method)({"params": params}, x)


def inputs(name: str, seed: int = 0):
    """(image NCHW torch, image NHWC numpy, latent NCHW torch, latent NHWC numpy)."""
    cfg, _, (h, w), *_ = tiny_setup(name)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((BATCH, cfg.in_channels, h, w), generator=gen) * 2 - 1
    f = cfg.downsample_factor
    z = torch.randn((BATCH, cfg.latent_channels, h // f, w // f), generator=gen)
    nhwc = lambda t: np.ascontiguousarray(t.numpy().transpose(0, 2, 3, 1))
    return x, nhwc(x), z, nhwc(z)


def nchw(a) -> np.ndarray:
    return np.asarray(a, np.float32).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("name", list(TINY))
def test_parity_fp32(name):
    cfg, _, _, ref, _, params = tiny_setup(name)
    x_t, x, z_t, z = inputs(name)
    with torch.no_grad():
        dist = ref.encode(x_t).latent_dist
        ref_mean, ref_logvar = dist.mean.numpy(), dist.logvar.numpy()
        ref_image = ref.decode(z_t).sample.numpy()
    mean, logvar = run(name, "encode", params, x)
    image = run(name, "decode", params, z)
    assert mean.dtype == logvar.dtype == image.dtype == jnp.float32
    assert mean.shape == logvar.shape == z.shape and image.shape == x.shape
    for ours, theirs in ((mean, ref_mean), (logvar, ref_logvar), (image, ref_image)):
        err = np.abs(nchw(ours) - theirs).max()
        assert err <= fp32_bound(theirs), (name, err, np.abs(theirs).max())


# Low-precision bounds, defended. A format with p significant bits (bf16: 8, fp16: 11)
# rounds a value v to within u|v|, unit roundoff u = 2**-p (bf16 3.9e-3, fp16 4.9e-4).
# Every conv, norm, SiLU and residual output is rounded once (products accumulate in
# float32), as are the weights and the input: some 40-70 roundings along the tiny
# encoder/decoder paths. Independent errors add in quadrature, so the RMS relative
# error is at most about sqrt(50) * u / sqrt(3) ~ 4u, and the max over a few thousand
# elements a few times the RMS. Bounds: RMS <= 6u (scale max(1, rms(ref))) and
# max <= 15u (scale max(1, max|ref|)). Measured on CPU, seeded, both formats alike
# (which confirms errors scale with u): RMS 1.5u-2.7u, max 2.8u-5.5u, i.e. bf16 max
# 1.1e-2..2.0e-2 and fp16 max 1.4e-3..2.7e-3. Margins >= 2x; a mapping or layout bug
# gives errors ~100%, and fp32 parity (1e-6) is checked separately above.
UNIT_ROUNDOFF = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}


@pytest.mark.parametrize("dtype", list(UNIT_ROUNDOFF))
@pytest.mark.parametrize("name", ["2lvl-1layer-32x32", "3lvl-2layers-32x48-remat"])
def test_parity_low_precision(name, dtype):
    cfg, _, _, ref, _, params = tiny_setup(name)
    x_t, x, z_t, z = inputs(name)
    with torch.no_grad():
        dist = ref.encode(x_t).latent_dist
        ref_mean, ref_logvar = dist.mean.numpy(), dist.logvar.numpy()
        ref_image = ref.decode(z_t).sample.numpy()
    mean, logvar = run(name, "encode", params, x, dtype=dtype)
    image = run(name, "decode", params, z, dtype=dtype)
    assert mean.dtype == image.dtype == jnp.float32  # outputs are returned in float32
    u = UNIT_ROUNDOFF[dtype]
    for ours, theirs in ((mean, ref_mean), (logvar, ref_logvar), (image, ref_image)):
        diff = nchw(ours) - theirs
        max_err, rms_err = float(np.abs(diff).max()), float(np.sqrt(np.mean(diff ** 2)))
        assert max_err <= 15 * u * max(1.0, float(np.abs(theirs).max())), (max_err, u)
        assert rms_err <= 6 * u * max(1.0, float(np.sqrt(np.mean(theirs ** 2)))), (rms_err, u)


def test_sampling_formula():
    """``__call__(x, key)`` decodes mean + exp(0.5 * logvar) * jax.random.normal(key, mean.shape, float32)."""
    name = "2lvl-1layer-32x32"
    cfg, _, _, _, _, params = tiny_setup(name)
    _, x, _, _ = inputs(name)
    model = AutoencoderKL(cfg)
    key = jax.random.key(42)
    mean, logvar = run(name, "encode", params, x)
    expected_z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, jnp.float32)
    np.testing.assert_array_equal(latent_dist_sample(mean, logvar, key), expected_z)
    assert not np.allclose(expected_z, mean)

    recon = jax.jit(model.apply)({"params": params}, x, key)
    np.testing.assert_allclose(recon, run(name, "decode", params, expected_z), rtol=0, atol=1e-5)
    recon_mean = jax.jit(model.apply)({"params": params}, x)
    np.testing.assert_allclose(recon_mean, run(name, "decode", params, mean), rtol=0, atol=1e-5)


def test_logvar_clamped():
    """An encoder biased far negative/positive gives logvar exactly -30 / 20 (diffusers' clamp)."""
    name = "2lvl-1layer-32x32"
    cfg, _, _, _, _, params = tiny_setup(name)
    _, x, _, _ = inputs(name)
    for shift, limit in ((-1e4, -30.0), (1e4, 20.0)):
        p = jax.tree.map(lambda a: a, params)
        bias = np.array(p["quant_conv"]["bias"])
        bias[cfg.latent_channels:] = shift
        p["quant_conv"]["bias"] = bias
        _, logvar = run(name, "encode", p, x)
        np.testing.assert_array_equal(logvar, limit)


def test_compvis_conv_attention_weights():
    """CompVis stores mid-block q/k/v/proj as (C, C, 1, 1) convs; they load to the same params."""
    name = "2lvl-1layer-32x32"
    cfg, _, (h, w), _, state, params = tiny_setup(name)
    conv_state = dict(state)
    reshaped = 0
    for key, value in state.items():
        if ".attentions.0." in key and key.endswith("weight") and value.ndim == 2:
            conv_state[key] = value.reshape(*value.shape, 1, 1)
            reshaped += 1
    assert reshaped == 8  # to_q, to_k, to_v, to_out.0 in the encoder and the decoder
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    conv_params, _ = load_state_dict(target, conv_state, what="VAE")
    jax.tree.map(np.testing.assert_array_equal, conv_params, params)
    _, x, _, z = inputs(name)
    np.testing.assert_array_equal(run(name, "decode", conv_params, z), run(name, "decode", params, z))
    np.testing.assert_array_equal(run(name, "encode", conv_params, x)[0], run(name, "encode", params, x)[0])


def test_full_size_keys_and_count():
    """diffusers' v1.4 VAE (meta device, no memory) and ours: a 1:1 key map with equal shapes."""
    cfg = VAEConfig.from_diffusers(V14_VAE_CONFIG)
    assert cfg == VAEConfig.sd_v1()
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL.from_config(V14_VAE_CONFIG)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ref.parameters()) == VAE_PARAMS

    target = jax.eval_shape(AutoencoderKL(cfg).init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
    flat = flatten_tree(target)
    assert sum(int(np.prod(s.shape)) for s in flat.values()) == VAE_PARAMS
    names = [flax_path_to_torch_name(path) for path in flat]
    assert len(set(names)) == len(names) == len(ref_shapes)
    assert set(names) == set(ref_shapes)

    zeros = {k: np.broadcast_to(np.zeros((), np.float32), s) for k, s in ref_shapes.items()}
    params, skipped = load_state_dict(target, zeros, what="VAE")  # strict: missing/extra/shape all raise
    assert skipped == []
    got = {"/".join(p): a.shape for p, a in flatten_tree(params).items()}
    assert got == {"/".join(p): s.shape for p, s in flat.items()}


def test_config_roundtrip_and_defaults():
    cfg = VAEConfig.sd_v1()
    assert cfg.block_out_channels == (128, 256, 512, 512) and cfg.layers_per_block == 2
    assert cfg.latent_channels == 4 and cfg.norm_num_groups == 32 and cfg.norm_eps == 1e-6
    assert cfg.scaling_factor == 0.18215 and cfg.downsample_factor == 8
    assert VAEConfig.from_diffusers(cfg.to_diffusers()) == cfg
    newer = dict(V14_VAE_CONFIG, _diffusers_version="0.30.0", force_upcast=True, scaling_factor=0.18215,
                 shift_factor=None, latents_mean=None, latents_std=None, use_quant_conv=True,
                 use_post_quant_conv=True, mid_block_add_attention=True, _name_or_path="x/vae")
    assert VAEConfig.from_diffusers(newer) == cfg
    cfg = VAEConfig.from_diffusers(dict(V14_VAE_CONFIG, mid_block_add_attention=False))
    assert cfg.mid_block_add_attention is False


@pytest.mark.parametrize("change, key", [
    ({"down_block_types": ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"]}, "down_block_types"),
    ({"up_block_types": ["UpDecoderBlock2D"] * 3}, "up_block_types"),
    ({"act_fn": "gelu"}, "act_fn"),
    ({"_class_name": "AutoencoderTiny"}, "_class_name"),
    ({"shift_factor": 0.1159}, "shift_factor"),
    ({"latents_mean": [0.0] * 4}, "latents_mean"),
    ({"norm_type": "spatial"}, "norm_type"),
    ({"block_out_channels": [128, 256, 500, 500]}, "block_out_channels"),
    ({"block_out_channels": 512}, "block_out_channels"),
    ({"sample_size": -1}, "sample_size"),
    ({"norm_num_groups": 0}, "norm_num_groups"),
    ({"layers_per_block": 0}, "layers_per_block"),
    ({"use_quant_conv": "yes"}, "use_quant_conv"),
    ({"scaling_factor": -1.0}, "scaling_factor"),
])
def test_bad_configs(change, key):
    with pytest.raises(ValueError, match=key):
        VAEConfig.from_diffusers(dict(V14_VAE_CONFIG, **change))


def test_bad_inputs():
    model = AutoencoderKL(VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8))
    with pytest.raises(ValueError, match="multiples of 2"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 15, 16, 3)))
    with pytest.raises(ValueError, match="channels-last"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3, 16, 16)))
    with pytest.raises(ValueError, match="attention"):
        jax.eval_shape(AutoencoderKL(model.config, attention="flash").init, jax.random.key(0),
                       jnp.zeros((1, 16, 16, 3)))


@pytest.mark.slow
def test_full_size_decode_parity():
    """The v1.4-sized VAE with random weights: decode a (2, 32, 32, 4) latent to 256x256, fp32 bound."""
    cfg = VAEConfig.sd_v1()
    ref = diffusers.AutoencoderKL.from_config(V14_VAE_CONFIG).eval()
    randomise_(ref, seed=1)
    model = AutoencoderKL(cfg)
    target = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
    params, _ = load_state_dict(target, numpy_state(ref), what="VAE")
    z_t = torch.randn((2, 4, 32, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_image = ref.decode(z_t).sample.numpy()
    image = jax.jit(functools.partial(model.apply, method=AutoencoderKL.decode))(
        {"params": params}, z_t.numpy().transpose(0, 2, 3, 1))
    assert image.shape == (2, 256, 256, 3)
    err = np.abs(nchw(image) - ref_image).max()
    assert err <= fp32_bound(ref_image), (err, np.abs(ref_image).max())
