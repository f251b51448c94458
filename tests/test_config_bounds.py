"""Bounded time and memory for any config a user or a stranger can hand sd_jax (issue 11), and the
one way to override a recipe value (issue 10).

- YAML recipes and ``--set`` values: alias expansion ("billion laughs"), nesting, size, huge ints;
  every error echoes at most a short prefix of the value.
- Model and schedule configs: sizes past :mod:`sd_jax.limits` bounds, non-finite values and a
  schedule whose σ overflows are refused in ``__post_init__``, naming the field and the range;
  every real SD 1.x/2.x (and SDXL-sized) config still passes.
- :func:`apply_overrides` semantics; the learning-rate schedules are built once.
"""

from __future__ import annotations

import math
import time

import pytest

from sd_jax import limits
from sd_jax.dreambooth.config import ConfigError, TrainConfig, apply_overrides, load_config

CONCEPT = {"instance_dir": "dog", "instance_prompt": "a photo of sks dog"}
MAX_MESSAGE = 400  # an error message that echoes a bounded prefix of the value stays under this


BILLION_LAUGHS = (  # 342 bytes (the had 383): 9^9 (387 million) "lol"s once expanded
    'description: [&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"],\n'
    ' &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b],\n'
    ' &d [*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d],\n'
    ' &f [*e,*e,*e,*e,*e,*e,*e,*e,*e], &g [*f,*f,*f,*f,*f,*f,*f,*f,*f],\n'
    ' &h [*g,*g,*g,*g,*g,*g,*g,*g,*g], &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]]\n'
)


def _recipe(tmp_path, text: str, name: str = "recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _refused(fn, match: str, seconds: float = 10.0) -> str:
    """fn() raises ConfigError matching ``match``, fast, with a short message; returns the message."""
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=match) as err:
        fn()
    assert time.perf_counter() - start < seconds
    message = str(err.value)
    assert len(message) < MAX_MESSAGE, message[:MAX_MESSAGE]
    return message


# ------------------------------------------------------------------------------ YAML recipes

def test_billion_laughs_recipe_is_refused_while_read(tmp_path):
    assert len(BILLION_LAUGHS.encode()) < 400
    path = _recipe(tmp_path, BILLION_LAUGHS)
    _refused(lambda: load_config(path, require_runnable=False), r"refused: more than 100000 values once aliases")


def test_alias_expansion_echo_is_bounded(tmp_path):
    # 6 levels (531441 "lol"s): read quickly even without a budget, then echoed whole into the
    # error message before the fix (~37 MB); now refused while it is read, with a short message.
    six_levels = "".join(BILLION_LAUGHS.splitlines(keepends=True)[:3]) + " &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]]\n"
    path = _recipe(tmp_path, six_levels)
    _refused(lambda: load_config(path, require_runnable=False), "aliases")


def test_recursive_alias_is_refused(tmp_path):
    path = _recipe(tmp_path, "logging:\n  validation_prompts: &a [x, *a]\n")
    _refused(lambda: load_config(path, require_runnable=False), "refers to a value that contains it")


def test_aliases_within_the_budget_work(tmp_path):
    path = _recipe(tmp_path, "model: m\n"
                             "concepts:\n"
                             "  - &one {instance_dir: dog, instance_prompt: a sks dog, class_prompt: a dog}\n"
                             "  - {<<: *one, instance_dir: dog2}\n")
    cfg = load_config(path)
    assert [c.instance_dir for c in cfg.concepts] == ["dog", "dog2"]
    assert cfg.concepts[1].class_prompt == "a dog"


@pytest.mark.parametrize("depth", [65, 5000])
def test_deep_nesting_is_refused(tmp_path, depth):
    path = _recipe(tmp_path, "description: " + "[" * depth + "]" * depth + "\n")
    _refused(lambda: load_config(path, require_runnable=False), "nested more than 64 levels deep|maximum nesting")
    depth = min(depth, 300)  # indented: 5000 levels would be 25 MB (refused for its size)
    block = "".join(f"{'  ' * i}k{i}:\n" for i in range(depth)) + "  " * depth + "leaf\n"
    path = _recipe(tmp_path, block, "block.yaml")
    _refused(lambda: load_config(path, require_runnable=False), "nested more than 64 levels deep")


def test_recipe_size_is_checked_before_reading(tmp_path):
    path = _recipe(tmp_path, "description: " + "x" * (limits.MAX_DOCUMENT_BYTES + 10) + "\n")
    _refused(lambda: load_config(path, require_runnable=False), r"bytes; at most 1048576 are read")


def test_huge_integer_is_one_config_error(tmp_path):
    path = _recipe(tmp_path, "seed: " + "7" * 5000 + "\n")
    _refused(lambda: load_config(path, require_runnable=False), "has a value Python cannot read")


@pytest.mark.parametrize("text, match", [
    ("seed: " + "x" * 100_000 + "\n", r"seed='x{10,80}\.\.\. is not valid"),
    ("? " + "k" * 100_000 + "\n: 1\n", "unknown config key 'kkk"),
    ("concepts: " + "y" * 100_000 + "\n", "concepts='yyy"),
    ("optim: " + "z" * 100_000 + "\n", "optim must be a mapping, got 'zzz"),
    ("logging:\n  validation_prompts: [[" + "1, " * 5000 + "1]]\n", "validation_prompts"),
])
def test_error_messages_echo_a_short_prefix(tmp_path, text, match):
    path = _recipe(tmp_path, text)
    _refused(lambda: load_config(path, require_runnable=False), match)


# ------------------------------------------------------------------------------ --set values

@pytest.mark.parametrize("item, match", [
    ("description=" + BILLION_LAUGHS.split(": ", 1)[1].replace("\n", ""), "aliases"),
    ("description=" + "[" * 100 + "]" * 100, "nested more than 64"),
    ("description=" + "[" * 5000 + "]" * 5000, "nest"),
    ("seed=" + "9" * 5000, "cannot read"),
    ("x" * 100_000 + "=1", "unknown config key 'xxx"),
    ("a" * 100_000, "expected key=value"),
    ("logging.validation_prompts.0.x=1", "holds"),
], ids=["billion-laughs", "nested-100", "nested-5000", "huge-int", "huge-key", "no-equals", "into-a-string"])
def test_set_values_are_bounded(item, match):
    def apply():
        return TrainConfig.from_dict(apply_overrides({"logging": {"validation_prompts": ["p"]}}, [item],
                                                     what="--set"))
    message = _refused(apply, match)
    assert message.startswith("--set") or "config key" in message


# ------------------------------------------------------------------------- run-config bounds

@pytest.mark.parametrize("key, value, match", [
    ("train.max_train_steps", 2**31, r"train.max_train_steps=2147483648 is not valid: expected an integer in "
                                     r"\[1, 2147483647\]"),
    ("data.resolution", 800_000, r"data.resolution=800000 .*\[8, 8192\]"),
    ("train.train_batch_size", 10**9, r"\[1, 65536\]"),
    ("concepts.0.num_class_images", 10**12, r"num_class_images=1000000000000 .*\[0, 1000000\]"),
    ("class_images.num_inference_steps", 10**9, r"\[1, 10000\]"),
    ("class_images.seed", 2**40, r"\[0, 4294967295\]"),
    ("checkpoint.keep", 10**9, r"\[1, 10000\]"),
])
def test_run_config_sizes_have_upper_bounds(key, value, match):
    _refused(lambda: load_config(None, {"model": "m", "concepts": [CONCEPT], key: value}), match)


# ----------------------------------------------------------------------- the one override path

def test_apply_overrides_mappings_dotted_keys_and_strings(tmp_path):
    recipe = _recipe(tmp_path, "model: base/model\noptim: {learning_rate: 1e-6, lr_schedule: warmup}\n"
                               "concepts:\n  - {instance_dir: dog, instance_prompt: a sks dog}\n")
    # the recipe's `model: path` shorthand keeps its path when another model key is overridden
    cfg = load_config(recipe, {"model.variant": "fp16", "optim": {"warmup_steps": 5}})
    assert (cfg.model.path, cfg.model.variant) == ("base/model", "fp16")
    assert (cfg.optim.learning_rate, cfg.optim.lr_schedule, cfg.optim.warmup_steps) == (1e-6, "warmup", 5)
    # `model: path` as an override sets only model.path
    cfg = load_config(recipe, {"model.variant": "fp16", "model": "other"})
    assert (cfg.model.path, cfg.model.variant) == ("other", "fp16")
    # a mapping value sets the keys it holds, given as a dict or as a --set YAML value
    base = {"optim": {"learning_rate": 1e-6, "lr_schedule": "warmup"}}
    by_dict = apply_overrides(base, {"optim": {"warmup_steps": 3}})
    by_set = apply_overrides(base, ["optim={warmup_steps: 3}"], what="--set")
    assert by_dict == by_set == {"optim": {"learning_rate": 1e-6, "lr_schedule": "warmup", "warmup_steps": 3}}
    assert base == {"optim": {"learning_rate": 1e-6, "lr_schedule": "warmup"}}  # a copy is returned
    # a list replaces; list entries by index
    out = apply_overrides({"concepts": [dict(CONCEPT)]}, {"concepts.0.instance_prompt": "a sks cat"})
    assert out["concepts"][0]["instance_prompt"] == "a sks cat"
    assert apply_overrides(out, ["concepts=[]"])["concepts"] == []
    with pytest.raises(ConfigError, match=r"^--set 'concepts.3.x=1': 'concepts.3' is not an index of a list of 1"):
        apply_overrides(out, ["concepts.3.x=1"], what="--set")
    with pytest.raises(ConfigError, match="bad key"):
        apply_overrides({}, {"optim..learning_rate": 1})
    for index in ("²", "9" * 5000, "-1"):
        with pytest.raises(ConfigError, match="is not an index of a list of 1"):
            apply_overrides(out, {f"concepts.{index}.x": 1})


def test_lr_schedules_are_built_once(monkeypatch):
    """make_optimizer builds the schedules; the train step (and the trainer) read optimizer.schedules."""
    import jax

    import step_harness as H
    from sd_jax.dreambooth import optim
    from sd_jax.dreambooth.step import abstract_train_state, make_train_step
    from sd_jax.sharding import make_mesh

    calls = []
    real = optim.lr_schedules
    monkeypatch.setattr(optim, "lr_schedules", lambda config: calls.append(config) or real(config))
    config = H.train_config(optim={"lr_schedule": "cosine", "warmup_steps": 2})
    optimizer = optim.make_optimizer(config, H.params())
    assert set(optimizer.schedules) == {"unet"}
    assert float(optimizer.schedules["unet"](1)) == pytest.approx(config.optim.learning_rate / 2)
    mesh = make_mesh(devices=jax.devices()[:1])
    make_train_step(H.models(), config, optimizer, mesh, abstract_train_state(H.params(), optimizer, mesh, config), {})
    assert len(calls) == 1


# ------------------------------------------------------------------------- model configs

def _unet(**kw):
    from sd_jax.models.unet import UNetConfig
    return UNetConfig(**kw)


def _vae(**kw):
    from sd_jax.models.vae import VAEConfig
    return VAEConfig(**kw)


def _clip(**kw):
    from sd_jax.models.clip import CLIPTextConfig
    return CLIPTextConfig(**kw)


def _schedule(**kw):
    from sd_jax.schedulers.schedule import NoiseScheduleConfig
    return NoiseScheduleConfig(**kw)


@pytest.mark.parametrize("make, match", [
    (lambda: _clip(num_hidden_layers=10**6), r"CLIPTextConfig.num_hidden_layers=1000000 is not valid; "
                                             r"expected an integer in \[1, 128\]"),
    (lambda: _clip(max_position_embeddings=10**9), r"max_position_embeddings=1000000000 .*\[1, 8192\]"),
    (lambda: _clip(vocab_size=10**12), r"vocab_size=1000000000000 .*\[1, 1048576\]"),
    (lambda: _clip(layer_norm_eps=math.nan), r"layer_norm_eps=nan .*finite"),
    (lambda: _unet(block_out_channels=(320 * 3 * 10**8,) * 4), r"UNetConfig.block_out_channels=96000000000 .*"
                                                                r"\[1, 8192\]"),
    (lambda: _unet(block_out_channels=(32,) * 100, down_block_types=("DownBlock2D",) * 100,
                   up_block_types=("UpBlock2D",) * 100), r"block_out_channels=\(32, 32, .*1 to 8 channel"),
    (lambda: _unet(num_attention_heads=0), r"num_attention_heads=0 .*\[1, 256\]"),
    (lambda: _unet(layers_per_block=10**6), r"layers_per_block=1000000"),
    (lambda: _unet(transformer_layers_per_block=10**4), r"transformer_layers_per_block=10000 .*\[1, 64\]"),
    (lambda: _unet(norm_eps=math.inf), r"norm_eps=inf"),
    (lambda: _unet(dropout=math.nan), r"dropout=nan"),
    (lambda: _unet(sample_size=10**9), r"sample_size=1000000000"),
    (lambda: _unet(in_channels=10**6), r"in_channels=1000000 .*\[1, 64\]"),
    (lambda: _vae(scaling_factor=math.nan), r"VAEConfig.scaling_factor=nan is not valid; expected a finite number "
                                            r"in \(0, 100\]"),
    (lambda: _vae(scaling_factor=math.inf), r"scaling_factor=inf"),
    (lambda: _vae(block_out_channels=(128 * 10**6,)), r"block_out_channels=128000000 .*\[1, 8192\]"),
    (lambda: _vae(latent_channels=10**5), r"latent_channels=100000"),
    (lambda: _schedule(num_train_timesteps=10**12), r"num_train_timesteps=1000000000000 is not valid; "
                                                    r"expected an integer in \[2, 100000\]"),
    (lambda: _schedule(num_train_timesteps=3 * 10**8), r"num_train_timesteps=300000000"),
    # within the size bound, SD's betas over 20000 steps leave ᾱ_T = 0 in float32: σ is infinite
    (lambda: _schedule(num_train_timesteps=20000), r"num_train_timesteps=20000 .*σ_max inf"),
    (lambda: _schedule(beta_end=math.nan), r"beta_end=nan"),
    (lambda: _schedule(trained_betas=(0.5,) * 3), r"num_train_timesteps=1000 values"),
    (lambda: _schedule(steps_offset=10**9), r"steps_offset=1000000000"),
    (lambda: _schedule(prediction_type="e" * 10**6), r"prediction_type='e{10,80}\.\.\. is not supported"),
])
def test_model_and_schedule_configs_are_bounded(make, match):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=match) as err:
        make()
    assert time.perf_counter() - start < 1.0 and len(str(err.value)) < MAX_MESSAGE


def _ldm_yaml(**unet_params):
    import copy

    from sd_jax.convert import compvis

    data = copy.deepcopy(compvis.V1_INFERENCE)
    data["model"]["params"]["unet_config"]["params"].update(unet_params)
    return compvis.configs_from_ldm_yaml(data, "v1-inference.yaml")


@pytest.mark.parametrize("params, match", [
    ({"channel_mult": [300000000]}, r"channel_mult=\[300000000\] is not valid"),
    ({"channel_mult": ["3e8"]}, r"channel_mult=\['3e8'\] is not valid"),
    ({"num_heads": -1, "num_head_channels": 0}, r"num_head_channels=0 is not valid"),
    ({"model_channels": 10**6}, r"model_channels=1000000 is not valid"),
])
def test_compvis_yaml_sizes_are_checked(params, match):
    with pytest.raises(ValueError, match=match):
        _ldm_yaml(**params)


def test_real_configs_pass():
    """SD 1.x, 2.x (heads 5..20, linear projections, upcast_attention, v-prediction), inpainting, the
    OpenCLIP-H tower, and SDXL-sized UNet/VAE/text configs stay well inside the bounds."""
    from sd_jax.convert import compvis
    from sd_jax.models.clip import CLIPTextConfig
    from sd_jax.models.unet import UNetConfig
    from sd_jax.models.vae import VAEConfig
    from sd_jax.schedulers.schedule import NoiseScheduleConfig

    UNetConfig.sd_v1(), VAEConfig.sd_v1(), CLIPTextConfig.sd_v1(), NoiseScheduleConfig.sd_v1()
    UNetConfig.from_diffusers({  # stabilityai/stable-diffusion-2-1 unet/config.json
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20],
        "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 1024,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "downsample_padding": 1,
        "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
        "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4, "sample_size": 96,
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "upcast_attention": True,
        "use_linear_projection": True})
    UNetConfig(in_channels=9)  # inpainting
    UNetConfig(block_out_channels=(320, 640, 1280), num_attention_heads=(5, 10, 20),  # SDXL-sized
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
               transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, sample_size=128)
    VAEConfig(scaling_factor=0.13025, sample_size=1024)
    CLIPTextConfig(**compvis.OPEN_CLIP_H_TEXT)
    CLIPTextConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120,
                   hidden_act="gelu")  # OpenCLIP bigG
    NoiseScheduleConfig.from_diffusers_config({"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear",
                                               "beta_start": 0.00085, "beta_end": 0.012,
                                               "prediction_type": "v_prediction", "steps_offset": 1})
    NoiseScheduleConfig(beta_schedule="squaredcos_cap_v2")  # σ_max 2e4
    NoiseScheduleConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    arch = _ldm_yaml(num_heads=-1, num_head_channels=64, use_linear_in_transformer=True, context_dim=1024)
    assert arch.unet.num_attention_heads == (5, 10, 20, 20)


def test_short_is_bounded_for_any_value():
    shared = ["lol"] * 9
    for _ in range(30):  # 9^30 leaves once unfolded
        shared = [shared] * 9
    start = time.perf_counter()
    for value in (shared, "x" * 10**7, 10**5000, {i: i for i in range(10**5)}, b"\0" * 10**6):
        assert len(limits.short(value)) <= limits.ECHO_CHARS
    assert time.perf_counter() - start < 0.5
    assert limits.short("abc") == "'abc'" and limits.short([1, 2]) == "[1, 2]"
