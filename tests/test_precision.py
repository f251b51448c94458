"""bfloat16 and float16 end to end against diffusers in float32; the float16 VAE never overflows.

Bounds come from each format's unit roundoff u (half an ulp of 1): bfloat16 keeps 8
significant bits, u = 2^-8 ~ 3.9e-3; float16 keeps 11, u = 2^-11 ~ 4.9e-4. A low-precision
forward rounds the stored weights (relative u each), the activations entering every
matmul/convolution (u) and its output (u); the sums themselves accumulate in float32.
GroupNorm/LayerNorm statistics, the softmax, the time embedding, guidance and the sampler
run in float32, so errors do not compound through them. Through a network of depth L the
rounding errors add up roughly like sqrt(L) independent terms of a few u, relative to the
output's scale; each bound below is stated in units of u with the measured value beside it
(measured on the CPU here, tiny model), so the same test scales from float16 to bfloat16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import parity_helpers as ph
from tiny import TINY_VAE, nchw, randomise

U = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}
DTYPES = ("bfloat16", "float16")
H, W = 64, 48  # latents 8 x 6
PROMPTS = ["a photo of a cat", "a red car on a street"]


@pytest.fixture(scope="module")
def low_pipes(tiny_folder):
    from sd_jax import StableDiffusion

    return {dtype: StableDiffusion.from_pretrained(tiny_folder, dtype=dtype) for dtype in DTYPES}


# ------------------------------------------------------------------ models: eps, decode, encode
@pytest.mark.parametrize("dtype", DTYPES)
def test_models_close_to_diffusers_fp32(low_pipes, tiny_pipe, tiny_reference, dtype):
    x = ph.inputs()
    want = ph.reference(tiny_reference, tiny_pipe.tokenize(ph.PROMPTS), x)
    got = ph.ours(low_pipes[dtype], x, text_emb=want["text"])  # the UNet on the same float32 text
    errors = {k: ph.max_rel_error(got[k], want[k]) for k in want}
    # Measured (max |err| / max |ref|, in units of u), bfloat16 | float16:
    #   text 1.5u | 1.7u, unet 5.4u | 5.2u, decode 7.9u | 3.4u, encode 9.3u | 2.6u.
    # float16 decodes/encodes in float32 from float16 weights (force_upcast); what remains
    # is the weights' rounding and the pipeline's float16 cast of its input. The VAE is the
    # deepest path (~25 rounding points in the tiny model: sqrt(25) x ~2u ~ 10u). Bound 16u,
    # the same for both formats; a float32 op done in low precision (softmax, GroupNorm
    # statistics, time embedding) costs far more (see the float32-state tests below).
    bound = 16 * U[dtype]
    assert all(e <= bound for e in errors.values()), (dtype, bound, errors)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pipeline_close_to_diffusers_fp32(low_pipes, tiny_reference, dtype):
    from test_pipeline import diffusers_scheduler

    latents = np.random.default_rng(0).standard_normal((2, H // 8, W // 8, 4)).astype(np.float32)
    ref = tiny_reference
    ref.scheduler = diffusers_scheduler("dpm++2m", ref.folder_scheduler_config)
    want = ref(PROMPTS, negative_prompt=["blurry"] * 2, height=H, width=W, num_inference_steps=6,
               guidance_scale=7.5, latents=nchw(latents), output_type="np").images
    got = low_pipes[dtype].generate(PROMPTS, negative_prompt="blurry", height=H, width=W, num_inference_steps=6,
                                    guidance_scale=7.5, scheduler="dpm++2m", seed=[1, 2], latents=latents).array
    diff = np.abs(got - want)  # images in [0, 1]
    # Guidance multiplies the eps difference by 7.5 and 6 solver steps carry it on, then the
    # VAE adds its own. Measured mean | max, in units of u: bfloat16 1.6u | 13.7u (6.2e-3 |
    # 5.4e-2), float16 1.4u | 13.0u (6.8e-4 | 6.3e-3). Bounds: mean 4u, max 28u (about
    # twice the measured; for bfloat16 a max of 0.11 of the pixel range, 28 of 255 levels).
    u = U[dtype]
    assert np.isfinite(got).all()
    assert diff.mean() <= 4 * u and diff.max() <= 28 * u, (dtype, float(diff.mean()), float(diff.max()))


# ------------------------------------------------------------------ float32 state
@pytest.mark.parametrize("dtype", DTYPES)
def test_guidance_and_sampler_state_stay_float32(low_pipes, dtype):
    from sd_jax import sampling
    from sd_jax.schedulers import get_scheduler

    pipe = low_pipes[dtype]
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    cond, uncond = (jnp.asarray(rng.standard_normal((2, 77, 32)), jnp.float32) for _ in range(2))
    guidance = jnp.asarray([7.5, 3.0], jnp.float32)
    t = jnp.asarray(500)
    @jax.jit
    def guided_and_by_hand(params):
        eps = sampling.guided_eps(pipe.unet, params, x, t, cond, uncond, guidance)
        # The UNet's own low-precision output (the same call: one UNet in the compiled graph),
        # then CFG by hand in float32.
        raw = pipe.unet.apply({"params": params}, jnp.concatenate([x, x]).astype(pipe.unet.dtype),
                              jnp.asarray([500] * 4), jnp.concatenate([uncond, cond]))
        eps_u, eps_c = jnp.split(raw.astype(jnp.float32), 2)
        return eps, raw.dtype == jnp.dtype(dtype), eps_u + guidance[:, None, None, None] * (eps_c - eps_u)

    eps, raw_is_low, by_hand = guided_and_by_hand(pipe.params["unet"])
    assert eps.dtype == jnp.float32 and raw_is_low
    # Float32 CFG agrees to float32 rounding; CFG in the compute dtype would round
    # eps_u + s * (eps_c - eps_u) to 8 / 11 bits: errors of ~u x 7.5 x |eps| (>= 3e-3 x scale).
    scale = float(jnp.abs(by_hand).max())
    assert float(jnp.abs(eps - by_hand).max()) <= 1e-5 * scale

    sched = get_scheduler("dpm++2m")
    state = sched.create(pipe.noise_schedule(), 4, (2, 8, 8, 4))
    jaxpr = jax.make_jaxpr(lambda p, s, x: sampling.denoise(pipe.unet, sched, "txt2img", p, s, x, cond, uncond,
                                                            guidance, sampling.seed_keys([0, 1]), {}))(
        pipe.params["unet"], state, x)
    loops = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "while"]
    assert loops, "the denoising loop is a while loop"
    carried = [v.aval.dtype for v in loops[0].outvars]  # latents and every solver-state array
    floats = [d for d in carried if jnp.issubdtype(d, jnp.floating)]
    assert floats and all(d == jnp.float32 for d in floats), carried


@pytest.mark.parametrize("dtype", DTYPES)
def test_time_embedding_stays_float32(low_pipes, tiny_pipe, dtype):
    pipe = low_pipes[dtype]
    t = jnp.asarray([10, 981])

    @jax.jit
    def time_embedding(unet, params):  # the output of the UNet's time_embedding module
        x, emb = jnp.zeros((2, 8, 8, 4), unet.dtype), jnp.zeros((2, 77, 32), unet.dtype)
        _, inter = unet.apply({"params": params}, x, t, emb, mutable=["intermediates"],
                              capture_intermediates=lambda mdl, _: mdl.name == "time_embedding")
        return inter["intermediates"]["time_embedding"]["__call__"][0]

    time_embedding = jax.jit(time_embedding.__wrapped__, static_argnums=0)
    got = time_embedding(pipe.unet, pipe.params["unet"])
    assert got.dtype == jnp.float32
    # The float32 model's time embedding from the same (low-precision-stored) weights: equal
    # up to float32 rounding. Computed in the compute dtype it would be off by ~u (>= 5e-4).
    weights = jax.tree.map(lambda a: a.astype(jnp.float32), pipe.params["unet"])
    np.testing.assert_allclose(got, time_embedding(tiny_pipe.unet, weights), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ float16 VAE overflow
GAIN = 1e5  # makes the residual stream of encoder and decoder outgrow float16 (max 65504)


@pytest.fixture(scope="module")
def loud_vae():
    """A tiny diffusers VAE whose conv_in layers have a large gain, and its sd_jax float32 parameters.

    A trained SD VAE's decoder carries activations past 65504 in its residual stream for
    ordinary latents (hence diffusers' ``force_upcast``); here conv_in x GAIN does the same
    on a tiny random VAE: the stream after conv_in is ~1e5 while every GroupNorm still
    renormalises what the convolutions see, so the float32 image is an ordinary image.
    """
    from diffusers import AutoencoderKL as TorchVAE

    from sd_jax.convert import core
    from sd_jax.models.vae import AutoencoderKL, VAEConfig

    vae = randomise(TorchVAE(**TINY_VAE), 1)
    with torch.no_grad():
        for conv in (vae.decoder.conv_in, vae.encoder.conv_in):
            conv.weight.mul_(GAIN)
            conv.bias.mul_(GAIN)
    config = VAEConfig.from_diffusers(dict(vae.config))
    shapes = jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    params, _ = core.load_state_dict(shapes, {k: v.numpy() for k, v in vae.state_dict().items()}, what="vae")
    return vae, config, params


def _apply(config, params, dtype, method, x, force_upcast=True):
    from sd_jax.models.vae import AutoencoderKL

    model = AutoencoderKL(config, dtype=dtype, param_dtype=dtype, force_upcast=force_upcast)
    stored = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    return model.apply({"params": stored}, jnp.asarray(x), method=getattr(AutoencoderKL, method))


def _round_weights_fp16(vae):
    """A copy of a torch VAE with float16-rounded weights, computing in float32 (diffusers' upcast_vae)."""
    import copy

    out = copy.deepcopy(vae)
    with torch.no_grad():
        for p in out.parameters():
            p.copy_(p.half().float())
    return out


def test_fp16_decode_never_overflows(loud_vae):
    vae, config, params = loud_vae
    latents = np.random.default_rng(0).standard_normal((2, 8, 6, 4)).astype(np.float32) / 0.18215
    with torch.no_grad():
        want = vae.decode(nchw(latents)).sample.permute(0, 2, 3, 1).numpy()
        upcast = _round_weights_fp16(vae).decode(nchw(latents)).sample.permute(0, 2, 3, 1).numpy()
    plain = np.asarray(_apply(config, params, jnp.float16, "decode", latents, force_upcast=False))
    assert not np.isfinite(plain).all(), "the test's premise: a plain float16 decoder overflows here"
    got = np.asarray(_apply(config, params, jnp.float16, "decode", latents))
    assert got.dtype == np.float32 and np.isfinite(got).all()
    # diffusers' force_upcast: float16-stored weights, float32 compute. Same arithmetic: float32 agreement.
    assert ph.max_rel_error(got, upcast) <= 1e-5
    # Against the exact float32 weights: only the weights' float16 rounding (u each) remains.
    # Measured 1.1e-4 (0.2u); bound 4u.
    assert ph.max_rel_error(got, want) <= 4 * U["float16"]
    assert np.abs(want).max() < 10  # an ordinary image scale: the stream, not the output, is large


def test_fp16_encode_never_overflows(loud_vae):
    vae, config, params = loud_vae
    images = np.random.default_rng(1).uniform(-1, 1, (2, 64, 48, 3)).astype(np.float32)
    with torch.no_grad():
        want = vae.encode(nchw(images)).latent_dist.mean.permute(0, 2, 3, 1).numpy()
    plain, _ = _apply(config, params, jnp.float16, "encode", images, force_upcast=False)
    assert not np.isfinite(np.asarray(plain)).all(), "the test's premise: a plain float16 encoder overflows here"
    mean, logvar = _apply(config, params, jnp.float16, "encode", images)
    assert mean.dtype == jnp.float32 and np.isfinite(np.asarray(mean)).all() and np.isfinite(np.asarray(logvar)).all()
    assert ph.max_rel_error(np.asarray(mean), want) <= 4 * U["float16"]


def test_upcast_applies_to_float16_only(loud_vae):
    from sd_jax.models.vae import AutoencoderKL

    _, config, _ = loud_vae
    assert AutoencoderKL(config, dtype=jnp.float16).compute_dtype == jnp.float32
    assert AutoencoderKL(config, dtype=jnp.float16, force_upcast=False).compute_dtype == jnp.float16
    assert AutoencoderKL(config, dtype=jnp.bfloat16).compute_dtype == jnp.bfloat16  # float32's exponent range
    assert AutoencoderKL(config).compute_dtype == jnp.float32


# ------------------------------------------------------------------ full size (slow)
@pytest.fixture(scope="module")
def full_folder(tmp_path_factory):
    """SD v1.4's architecture with random weights as a diffusers folder (~4.3 GB; bench/common.py)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from common import write_random_sd_v14

    folder = tmp_path_factory.mktemp("sd_v14_random")
    write_random_sd_v14(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_full_size_close_to_diffusers_fp32(full_folder, dtype):
    # The full v1.4 UNet is ~6x deeper than the tiny one (16 transformer blocks, 22 ResNet blocks,
    # ~150 rounding points on the deepest path): sqrt(150) x ~2u ~ 25u if the roundings are
    # independent, so the bounds are 32u for eps and the decoded image, and for 4 guided DPM++
    # steps at 256^2 (latents 32 x 32, to keep the CPU run in minutes) mean 8u, max 64u.
    # Measured here, bfloat16: text 2.1u, eps 3.6u, decode 8.1u (the image part not yet run here).
    from sd_jax import StableDiffusion
    from test_pipeline import diffusers_scheduler
    from tiny import load_reference

    ref = load_reference(full_folder)
    pipe = StableDiffusion.from_pretrained(full_folder, dtype=dtype)
    x = ph.inputs(hw=(32, 32))
    want = ph.reference(ref, pipe.tokenize(ph.PROMPTS), x)
    u = U[dtype]
    got = ph.ours(pipe, x, text_emb=want["text"])
    errors = {k: ph.max_rel_error(got[k], want[k]) for k in ("text", "unet", "decode")}
    print(f"{dtype} full-size errors in units of u: { {k: round(e / u, 2) for k, e in errors.items()} }")
    assert all(e <= 32 * u for e in errors.values()), (dtype, errors)

    latents = np.random.default_rng(0).standard_normal((1, 32, 32, 4)).astype(np.float32)
    ref.scheduler = diffusers_scheduler("dpm++2m", dict(ref.scheduler.config))
    image = ref(PROMPTS[0], height=256, width=256, num_inference_steps=4, guidance_scale=7.5,
                latents=nchw(latents), output_type="np").images
    ours = pipe.generate(PROMPTS[0], height=256, width=256, num_inference_steps=4, guidance_scale=7.5,
                         scheduler="dpm++2m", latents=latents).array
    diff = np.abs(ours - image)
    print(f"{dtype} full-size 256^2 image: mean {diff.mean() / u:.2f}u, max {diff.max() / u:.2f}u")
    assert np.isfinite(ours).all()
    assert diff.mean() <= 8 * u and diff.max() <= 64 * u, (dtype, float(diff.mean()), float(diff.max()))
