"""The Flax UNet2DConditionModel against diffusers' PyTorch UNet2DConditionModel.

Fast: tiny random configs (fp32 and bf16 parity, attention kernels inside the
model, remat), full-size key coverage on the meta device (v1.4, SD 2.x,
inpainting), strict-loading errors, config validation.
Slow (`pytest -m slow tests/test_unet.py`): the full-size v1.4 UNet, random weights.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sd_jax.convert.core import (WeightMismatchError, flatten_tree, flax_path_to_torch_name,  # noqa: E402
                                 load_state_dict)
from sd_jax.models import attention as attention_mod  # noqa: E402
from sd_jax.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from step_harness import COMPILER_OPTIONS  # noqa: E402

# The config.json of CompVis/stable-diffusion-v1-4/unet, verbatim.
V14_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.2.2",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
V14_PARAMS = 859_520_964
# stabilityai/stable-diffusion-2-1/unet/config.json (the keys that differ from v1.4, plus its extras).
SD2_CONFIG = {**V14_CONFIG, "_diffusers_version": "0.10.0.dev0", "attention_head_dim": [5, 10, 20, 20],
              "cross_attention_dim": 1024, "use_linear_projection": True, "upcast_attention": True,
              "sample_size": 96, "dual_cross_attention": False, "num_class_embeds": None,
              "only_cross_attention": False, "class_embed_type": None, "resnet_time_scale_shift": "default"}
# runwayml/stable-diffusion-inpainting: masked-image latents and the mask are concatenated to the input.
INPAINT_CONFIG = {**V14_CONFIG, "in_channels": 9}

_TINY_BASE = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8)
# name -> (diffusers kwargs, latent (H, W), text length, timesteps of the batch of 2)
TINY = {
    "1layer-int-heads": (dict(_TINY_BASE, layers_per_block=1, attention_head_dim=2, cross_attention_dim=16),
                         (16, 16), 7, np.array([10, 981])),
    "3layers-tuple-heads-linear-upcast-inpaint-16x24": (
        dict(_TINY_BASE, layers_per_block=3, attention_head_dim=(2, 4), use_linear_projection=True,
             upcast_attention=True, in_channels=9, out_channels=5, norm_num_groups=16, cross_attention_dim=32,
             transformer_layers_per_block=2),
        (16, 24), 5, np.array([0.5, 750.25], np.float32)),
    "3levels-tuple-layers-only-cross-centered-pad0-flip": (
        dict(block_out_channels=(16, 32, 32), layers_per_block=(1, 2, 3), attention_head_dim=(1, 2, 4),
             transformer_layers_per_block=(1, 2, 1),
             down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
             only_cross_attention=(True, False, False), center_input_sample=True, downsample_padding=0,
             flip_sin_to_cos=False, freq_shift=1, norm_num_groups=8, cross_attention_dim=24),
        (16, 16), 3, np.array(321)),  # one scalar timestep for the whole batch
}
# Latents not divisible by 2^levels (e.g. a 520x456 image): diffusers upsamples to each skip's size.
TINY["1layer-odd-13x10"] = (TINY["1layer-int-heads"][0], (13, 10), 7, np.array([10, 981]))
TINY["3levels-pad0-odd-11x14"] = (TINY["3levels-tuple-layers-only-cross-centered-pad0-flip"][0], (11, 14), 3,
                                  np.array([5, 600]))
BATCH = 2


def fp32_bound(ref: np.ndarray) -> float:
    """The float32 parity bound: 1e-4 relative to the reference's magnitude (at least 1)."""
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


def randomise_(module, seed: int) -> None:
    """Overwrite every parameter with seeded random values (diffusers leaves none at 0 or 1 then)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.2 * noise)
            else:  # conv (O, I, kh, kw) or linear (O, I): unit-variance activations
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))


def numpy_state(module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def abstract_params(cfg: UNetConfig, **kwargs):
    """Parameter shapes of our model (traced at a small input; shapes do not depend on H, W)."""
    model = UNet2DConditionModel(cfg, **kwargs)
    side = 2 ** (cfg.num_blocks - 1)
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, side, side, cfg.in_channels)),
                          jnp.zeros((1,)), jnp.zeros((1, 1, cfg.cross_attention_dim)))["params"]


@functools.lru_cache(maxsize=None)
def tiny_setup(name: str):
    """(our config, diffusers model, our float32 params, inputs NHWC, reference output NHWC)."""
    kwargs, (h, w), text_len, timesteps = TINY[name]
    ref = diffusers.UNet2DConditionModel(**kwargs).eval()
    randomise_(ref, seed=sum(map(ord, name)))
    cfg = UNetConfig.from_diffusers(dict(ref.config))  # every key today's diffusers writes
    params, skipped = load_state_dict(abstract_params(cfg), numpy_state(ref), what="UNet")
    assert skipped == []
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((BATCH, h, w, cfg.in_channels), dtype=np.float32)
    context = rng.standard_normal((BATCH, text_len, cfg.cross_attention_dim), dtype=np.float32)
    with torch.no_grad():
        out = ref(torch.from_numpy(sample).permute(0, 3, 1, 2), torch.from_numpy(timesteps),
                  torch.from_numpy(context)).sample
    expected = out.permute(0, 2, 3, 1).numpy()
    return cfg, ref, params, (sample, timesteps, context), expected


@functools.lru_cache(maxsize=None)
def jitted(cfg: UNetConfig, dtype: str = "float32", attention: str = "auto", remat: bool = False):
    model = UNet2DConditionModel(cfg, dtype=jnp.dtype(dtype), attention=attention, remat=remat)
    return jax.jit(model.apply)


@pytest.mark.parametrize("name", list(TINY))
def test_parity_fp32(name):
    cfg, _, params, inputs, expected = tiny_setup(name)
    out = jitted(cfg)({"params": params}, *inputs)
    assert out.dtype == jnp.float32 and out.shape == expected.shape
    err = float(np.abs(np.asarray(out) - expected).max())
    assert err <= fp32_bound(expected), (name, err, np.abs(expected).max())


# bfloat16 compute (parameters stored in float32, cast per layer) against the float32
# reference. bf16 keeps 8 significant bits: unit roundoff u = 2**-8 = 3.9e-3. The input, the
# weights and every conv/Dense/norm/attention/GEGLU/residual output are rounded once
# (products accumulate in float32; norm statistics and softmax are float32): N ~ 150
# roundings along the deepest path of these tiny UNets. Independent roundings (each
# uniform in [-u, u], std u/sqrt(3)) add in quadrature, so even if each reached the output
# at full gain the RMS error would be about sqrt(N/3) * u ~ 7u; the max over the ~10^3
# outputs is a few RMS. Bounds: RMS <= 8u relative to max(1, rms(ref)), max <= 16u relative
# to max(1, max|ref|). Measured on this CPU (seeded): RMS 2.2u-2.7u, max 2.9u-4.0u
# (bf16 max abs error 0.029-0.037 at max|ref| 2.3-2.5), margins >= 3x. A wrong mapping,
# layout or a missing path gives errors of order 100% of the output (~256u).
U_BF16 = 2.0 ** -8


@pytest.mark.parametrize("name", list(TINY)[:2])
def test_parity_bf16(name):
    cfg, _, params, inputs, expected = tiny_setup(name)
    out = jitted(cfg, "bfloat16")({"params": params}, *inputs)
    assert out.dtype == jnp.bfloat16  # the output is in the compute dtype
    diff = np.asarray(out, np.float32) - expected
    max_err, rms_err = float(np.abs(diff).max()), float(np.sqrt(np.mean(diff ** 2)))
    assert max_err <= 16 * U_BF16 * max(1.0, float(np.abs(expected).max())), (max_err / U_BF16)
    assert rms_err <= 8 * U_BF16 * max(1.0, float(np.sqrt(np.mean(expected ** 2)))), (rms_err / U_BF16)


# One level (no down/upsampling), for tests that compare our model with itself: fewer ops, fast compiles.
ONE_LEVEL = UNetConfig(block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                       up_block_types=("CrossAttnUpBlock2D",), layers_per_block=1, num_attention_heads=2,
                       cross_attention_dim=16, norm_num_groups=8)


def random_params(cfg: UNetConfig, seed: int):
    """Seeded random parameters in our layout (as :func:`randomise_`), without compiling ``init``."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape, dtype=np.float32)
        if path[-1].key == "scale":
            return 1.0 + 0.2 * noise
        if path[-1].key == "bias":
            return 0.2 * noise
        return noise / np.sqrt(np.prod(leaf.shape[:-1]))  # kernel (..., in, out)

    return jax.tree_util.tree_map_with_path(draw, abstract_params(cfg))


def one_level_inputs(h: int, w: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((BATCH, h, w, 4), dtype=np.float32), np.array([3, 999]),
            rng.standard_normal((BATCH, 11, 16), dtype=np.float32))


def test_attention_kernels_agree_inside_the_model():
    """naive / blocked / xla give one answer at a size where blocked attention really blocks."""
    h, w = 24, 40  # 960 self-attention tokens
    tokens = h * w
    assert tokens > attention_mod.KEY_BLOCK > attention_mod.QUERY_BLOCK
    assert tokens % attention_mod.QUERY_BLOCK and tokens % attention_mod.KEY_BLOCK  # ragged last blocks
    params, inputs = random_params(ONE_LEVEL, seed=7), one_level_inputs(h, w)
    outs = {impl: np.asarray(jitted(ONE_LEVEL, attention=impl)({"params": params}, *inputs))
            for impl in ("naive", "blocked", "xla")}
    for impl in ("blocked", "xla"):
        err = float(np.abs(outs[impl] - outs["naive"]).max())
        assert err <= 1e-5 * max(1.0, float(np.abs(outs["naive"]).max())), (impl, err)


def test_remat_same_names_outputs_and_gradients():
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
    assert shapes(abstract_params(ONE_LEVEL, remat=True)) == shapes(abstract_params(ONE_LEVEL))
    params, inputs = random_params(ONE_LEVEL, seed=3), one_level_inputs(8, 8)
    # remat really applies: one checkpoint per ResNet (1 down + 2 mid + 2 up) and per transformer
    # block (1 + 1 + 2).
    n_remat = lambda remat: len(re.findall(r"\b(?:remat\w*|checkpoint)\[", str(jax.make_jaxpr(
        UNet2DConditionModel(ONE_LEVEL, remat=remat).apply)({"params": params}, *inputs))))
    assert (n_remat(True), n_remat(False)) == (9, 0)

    def loss_and_grad(remat):  # compiled as step_harness compiles train steps (LLVM -O0: half the compile time)
        apply = UNet2DConditionModel(ONE_LEVEL, remat=remat).apply
        loss = lambda p: jnp.mean(apply({"params": p}, *inputs) ** 2)
        return jax.jit(jax.value_and_grad(loss)).lower(params).compile(compiler_options=COMPILER_OPTIONS)(params)

    (loss, grads), (loss_r, grads_r) = loss_and_grad(False), loss_and_grad(True)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    flat, flat_r = flatten_tree(grads), flatten_tree(grads_r)
    assert flat.keys() == flat_r.keys()
    for path, g in flat.items():
        np.testing.assert_allclose(flat_r[path], g, rtol=0, atol=1e-6 * max(1.0, float(np.abs(g).max())),
                                   err_msg="/".join(path))


def _torch_layout(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])  # (kh, kw, I, O) -> (O, I, kh, kw)
    if path[-1] == "kernel" and len(shape) == 2:
        return shape[::-1]
    return shape


def _meta_state(config: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """diffusers' full-size model on the meta device -> (its config, zero-stride arrays of its shapes)."""
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    zero = np.zeros((), np.float32)
    return dict(ref.config), {k: np.broadcast_to(zero, tuple(v.shape)) for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("config,expected_params", [(V14_CONFIG, V14_PARAMS), (SD2_CONFIG, None),
                                                    (INPAINT_CONFIG, V14_PARAMS + 5 * 9 * 320)],
                         ids=["v1.4", "sd2", "inpainting"])
def test_full_size_key_coverage(config, expected_params):
    full_config, state = _meta_state(config)
    cfg = UNetConfig.from_diffusers(config)
    assert UNetConfig.from_diffusers(full_config) == cfg  # diffusers' own complete dict reads the same
    assert UNetConfig.from_diffusers(cfg.to_diffusers()) == cfg
    _, exported = _meta_state(cfg.to_diffusers())  # diffusers builds the same model from our export
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in state.items()}
    target = abstract_params(cfg)
    ours = {flax_path_to_torch_name(path): _torch_layout(path, tuple(leaf.shape))
            for path, leaf in flatten_tree(target).items()}
    assert len(ours) == len(flatten_tree(target))  # no two of our parameters share a diffusers key
    assert sorted(ours) == sorted(state)
    assert {k: tuple(v.shape) for k, v in state.items()} == ours  # exact PyTorch shapes, both ways
    params, skipped = load_state_dict(target, state, what="UNet")  # the loader agrees (strict)
    assert skipped == []
    count = sum(int(np.prod(leaf.shape)) for leaf in flatten_tree(target).values())
    assert count == sum(int(np.prod(v.shape)) for v in state.values())
    if expected_params is not None:
        assert count == expected_params
    if config is V14_CONFIG:
        assert cfg == UNetConfig.sd_v1()
    if config is SD2_CONFIG:
        assert cfg == dataclasses.replace(UNetConfig.sd_v2(), upcast_attention=True)


def test_v2_weights_under_v1_config_are_refused():
    _, state = _meta_state(SD2_CONFIG)
    with pytest.raises(WeightMismatchError) as info:
        load_state_dict(abstract_params(UNetConfig.sd_v1()), state, what="UNet")
    message = str(info.value)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight" in message
    assert "(320, 1024)" in message and "(320, 768)" in message


SDXL_CONFIG = {
    **V14_CONFIG, "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048, "projection_class_embeddings_input_dim": 2816,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True, "sample_size": 128,
}


@pytest.mark.parametrize("changes,named", [
    (SDXL_CONFIG, ["addition_embed_type='text_time'", "projection_class_embeddings_input_dim=2816",
                   "addition_time_embed_dim=256"]),
    ({"act_fn": "gelu"}, ["act_fn='gelu'", "'silu'"]),
    ({"time_embedding_type": "fourier"}, ["time_embedding_type='fourier'", "'positional'"]),
    ({"class_embed_type": "timestep"}, ["class_embed_type='timestep'", "None"]),
    ({"resnet_time_scale_shift": "scale_shift"}, ["resnet_time_scale_shift='scale_shift'"]),
    ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, ["mid_block_type="]),
    ({"dual_cross_attention": True}, ["dual_cross_attention=True", "False"]),
    ({"mid_block_scale_factor": 2}, ["mid_block_scale_factor=2"]),
    ({"some_new_switch": 1}, ["some_new_switch=1", "unknown key"]),
    ({"cross_attention_dim": [768, 1024, 768, 768]}, ["cross_attention_dim"]),
    ({"down_block_types": ["AttnDownBlock2D"] * 4}, ["down_block_types", "CrossAttnDownBlock2D"]),
    ({"attention_head_dim": [8, 8]}, ["num_attention_heads=(8, 8)", "tuple of 4"]),
    ({"norm_num_groups": 24}, ["norm_num_groups=24", "divisor"]),
    ({"norm_num_groups": None}, ["norm_num_groups=None"]),
    ({"transformer_layers_per_block": [[1], [2], [3], [4]]}, ["transformer_layers_per_block"]),
    ({"downsample_padding": 2}, ["downsample_padding=2", "0 or 1"]),
])
def test_bad_diffusers_configs_are_refused(changes, named):
    with pytest.raises(ValueError) as info:
        UNetConfig.from_diffusers({**V14_CONFIG, **changes})
    for text in named:
        assert text in str(info.value), (text, str(info.value))


@pytest.mark.parametrize("kwargs,named", [
    (dict(block_out_channels=()), "block_out_channels"),
    (dict(layers_per_block=0), "layers_per_block=0"),
    (dict(num_attention_heads=(8, 8, 8)), "num_attention_heads"),
    (dict(num_attention_heads=400), "num_attention_heads=400"),
    (dict(up_block_types=("UpBlock2D",) * 3), "up_block_types"),
    (dict(in_channels=0), "in_channels=0"),
    (dict(dropout=1.0), "dropout=1.0"),
    (dict(use_linear_projection="yes"), "use_linear_projection='yes'"),
])
def test_bad_configs_are_refused(kwargs, named):
    with pytest.raises(ValueError, match="UNetConfig") as info:
        UNetConfig(**kwargs)
    assert named in str(info.value)


def test_config_lists_become_tuples_and_num_attention_heads_wins():
    cfg = UNetConfig.from_diffusers({**V14_CONFIG, "attention_head_dim": 64,
                                     "num_attention_heads": [5, 10, 20, 20]})
    assert cfg.num_attention_heads == (5, 10, 20, 20) and cfg.block_out_channels == (320, 640, 1280, 1280)
    hash(cfg)


def test_bad_inputs_are_refused():
    cfg, _, params, (sample, t, context), _ = tiny_setup("1layer-int-heads")
    model = UNet2DConditionModel(cfg)
    with pytest.raises(ValueError, match="in_channels=4"):
        model.apply({"params": params}, sample[..., :3], t, context)
    with pytest.raises(ValueError, match="cross_attention_dim=16"):
        model.apply({"params": params}, sample, t, context[..., :8])


@pytest.mark.slow
def test_full_size_v14_parity_fp32():
    """The full SD v1.4 UNet, random weights, batch 2 at 32x32 latents, float32."""
    ref = diffusers.UNet2DConditionModel(**{k: v for k, v in V14_CONFIG.items() if not k.startswith("_")})
    ref.eval()
    randomise_(ref, seed=14)
    cfg = UNetConfig.sd_v1()
    params, _ = load_state_dict(abstract_params(cfg), numpy_state(ref), what="UNet")
    params = jax.device_put(params)
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((BATCH, 32, 32, 4), dtype=np.float32)
    context = rng.standard_normal((BATCH, 77, 768), dtype=np.float32)
    t = np.array([1, 801])
    with torch.no_grad():
        expected = ref(torch.from_numpy(sample).permute(0, 3, 1, 2), torch.from_numpy(t),
                       torch.from_numpy(context)).sample.permute(0, 2, 3, 1).numpy()
    del ref
    out = np.asarray(jax.jit(UNet2DConditionModel(cfg).apply)({"params": params}, sample, t, context))
    err = float(np.abs(out - expected).max())
    print(f"full-size v1.4 fp32: max abs err {err:.3g}, max |ref| {np.abs(expected).max():.3g}")
    assert err <= fp32_bound(expected)
