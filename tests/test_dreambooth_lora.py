"""LoRA Dreambooth: config, adapters, the train step (only adapters move, step 0 is the base model,
the loss falls, sharded = single device, exact resume) and the trainer's files loaded by diffusers.

The step tests share one compiled step on the one-block UNet of ``step_harness`` (LoRA on every
target group, so attention, proj_in/out, feed-forward and 3x3 convolutions are all exercised);
batches carry their timesteps and noise, so every test feeds the same compiled function.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import step_harness as H

from sd_jax.convert.core import flatten_tree
from sd_jax.dreambooth import lora
from sd_jax.dreambooth.config import ConfigError, TrainConfig, load_config

ALL_TARGETS = ["attention", "proj", "ff", "conv"]
RANK, ALPHA = 4, 2.0  # alpha != rank: the scale alpha / rank must reach every consumer


# ------------------------------------------------------------------------------ config

@pytest.mark.parametrize("d, match", [
    ({"lora": {"rank": 0}}, r"lora.rank=0 is not valid: expected an integer in \[1, 1024\]"),
    ({"lora": {"rank": 5000}}, r"lora.rank=5000"),
    ({"lora": {"rank": 2.5}}, r"lora.rank=2.5"),
    ({"lora": {"alpha": 0}}, r"lora.alpha=0 is not valid.*> 0"),
    ({"lora": {"alpha": "big"}}, r"lora.alpha='big'.*expected a finite number"),
    ({"lora": {"alpha": 1e9}}, r"lora.alpha=1000000000.0.*<= 65536"),
    ({"lora": {"targets": ["attn"]}}, r"lora.targets='attn'.*'attention', 'proj', 'ff', 'conv'"),
    ({"lora": {"targets": []}}, r"lora.targets=\(\).*non-empty list"),
    ({"lora": {"targets": "attention"}}, r"lora.targets='attention'.*list"),
    ({"lora": {"targets": ["ff", "ff"]}}, r"lora.targets.*at most once"),
    ({"lora": {"text_encoder_targets": ["fc1"]}}, r"lora.text_encoder_targets='fc1'.*'attention', 'mlp'"),
    ({"lora": {"enabled": True, "base_dtype": "float16"}}, r"lora.base_dtype='float16'.*'float32', 'bfloat16'"),
    ({"lora": {"base_dtype": "bfloat16"}}, r"lora.base_dtype='bfloat16'.*lora.enabled=true"),
    ({"lora": {"enabled": "yes"}}, r"lora.enabled='yes'.*true or false"),
    ({"lora": {"rnak": 4}}, r"unknown config key 'lora.rnak'; did you mean 'lora.rank'"),
    ({"checkpoint": {"merge_lora": True}}, r"checkpoint.merge_lora=True.*lora.enabled=true"),
])
def test_lora_config_errors_name_the_key(d, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(d)


def test_lora_config_defaults_recipe_and_flags(tmp_path):
    lo = TrainConfig().lora
    assert (lo.enabled, lo.rank, lo.alpha, lo.scale, lo.targets, lo.base_dtype) == (
        False, 4, None, 1.0, ("attention",), "float32")
    cfg = TrainConfig.from_dict({"lora": {"enabled": True, "rank": 8, "alpha": 4, "targets": ["attention", "conv"]}})
    assert cfg.lora.scale == 0.5 and TrainConfig.from_dict(cfg.to_dict()) == cfg
    recipe = load_config("configs/dreambooth/lora.yaml", require_runnable=False)
    assert recipe.lora.enabled and recipe.lora.rank == 4 and recipe.lora.base_dtype == "bfloat16"

    from sd_jax.cli.train import build_parser, config_from_args

    base = ["--model", "m", "--instance-dir", str(tmp_path), "--instance-prompt", "a sks dog"]
    parse = lambda *extra: config_from_args(build_parser().parse_args(base + list(extra)))  # noqa: E731
    assert not parse().lora.enabled
    on = parse("--lora-rank", "8", "--lora-alpha", "16", "--merge")  # rank/alpha imply --lora
    assert on.lora.enabled and on.lora.rank == 8 and on.lora.scale == 2.0 and on.checkpoint.merge_lora
    assert parse("--lora").lora.rank == 4
    with pytest.raises(ConfigError, match="checkpoint.merge_lora"):
        parse("--merge")
    with pytest.raises(ConfigError, match="lora.rank=0"):
        parse("--lora-rank", "0")
    helptext = " ".join(build_parser().format_help().split())
    assert "--lora-rank R rank of the LoRA adapters (implies --lora) (default: 4)" in helptext
    assert "(default: the rank)" in helptext


# ------------------------------------------------------------------------------ adapters

def _config(**lora_over):
    return H.train_config(lora={"enabled": True, "rank": RANK, "alpha": ALPHA, "targets": ALL_TARGETS,
                                **lora_over})


def test_targets_init_and_torch_layout():
    params = H.params()
    names = lambda groups: [lora.module_name("unet", p) for p in lora.target_paths("unet", params["unet"], groups)]  # noqa: E731
    attention = names(("attention",))
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in attention
    assert "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0" in attention
    assert all(n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") for n in attention)
    blocks = [n for n in flatten_tree(params["unet"]) if n[-2:] == ("norm1", "scale") and "transformer_blocks_0" in n]
    assert len(blocks) == 4 and len(attention) == 8 * 4  # 4 transformer blocks x 2 attentions x 4 projections
    assert {n.split(".")[-1] for n in names(("proj",))} == {"proj_in", "proj_out"}
    assert {".".join(n.split(".")[-3:]) for n in names(("ff",))} == {"net.0.proj", "ff.net.2"}
    conv = names(("conv",))
    assert "down_blocks.0.resnets.0.conv1" in conv and not any("time_emb_proj" in n or n == "conv_in" for n in conv)

    adapters, frozen = lora.split_params(params, _config())
    flat = flatten_tree(adapters["unet"])
    for path, down in flat.items():
        if path[-1] != "down":
            continue
        up, kernel = flat[path[:-1] + ("up",)], flatten_tree(params["unet"])[path[:-1] + ("kernel",)]
        bound = 1 / math.sqrt(np.prod(kernel.shape[:-1]))  # kaiming-uniform(a=sqrt(5)), as kohya and PEFT
        assert down.shape == kernel.shape[:-1] + (RANK,) and down.dtype == np.float32
        assert np.abs(down).max() <= bound and np.abs(down).max() > 0.5 * bound
        assert up.shape == (1,) * (kernel.ndim - 2) + (RANK, kernel.shape[-1]) and not up.any()
    assert frozen["unet"] is params["unet"]  # float32 base: the starting weights themselves
    # bf16 base storage, and the same adapters for the same seed (every process draws the same)
    again, frozen16 = lora.split_params(params, _config(base_dtype="bfloat16"))
    jax.tree.map(np.testing.assert_array_equal, again, adapters)
    assert {x.dtype for x in jax.tree.leaves(frozen16["unet"])} == {np.dtype(jnp.bfloat16)}
    with pytest.raises(ValueError, match=r"lora targets \['attention'\] match no layer of the unet"):
        lora.init_adapters("unet", {"conv_in": {"kernel": np.zeros((3, 3, 4, 8))}}, ("attention",), 4, 0)


def test_merge_equals_the_torch_layout_delta():
    """K + (alpha/r) down @ up in Flax layout = the PyTorch weight + LoraLayer.delta (what the files say)."""
    from sd_jax.convert.core import export_state_dict

    params = H.params()
    cfg = _config()
    adapters, _ = lora.split_params(params, cfg)
    rng = np.random.default_rng(1)
    adapters = jax.tree.map(lambda x: x + rng.standard_normal(x.shape).astype(np.float32) * 0.1, adapters)
    merged = lora.merged_params(params, adapters, cfg)["unet"]
    layers = lora.to_lora_adapter(adapters, cfg)["unet"]
    base_t, merged_t = export_state_dict(params["unet"]), export_state_dict(merged)
    assert len(layers) == len([p for p in flatten_tree(adapters["unet"]) if p[-1] == "down"])
    for name, layer in layers.items():
        assert layer.alpha == ALPHA and layer.rank == RANK
        np.testing.assert_allclose(merged_t[name + ".weight"], base_t[name + ".weight"] + layer.delta(),
                                   rtol=1e-5, atol=1e-6)
    untouched = [k for k in base_t if k.removesuffix(".weight") not in layers]
    assert untouched and all(np.array_equal(merged_t[k], base_t[k]) for k in untouched)


def test_zero_up_is_the_base_model_exactly():
    """At initialisation (up = 0) the merged weights are the base's bit for bit, so the UNet's output is."""
    params = H.params()
    adapters, frozen = lora.split_params(params, _config())
    merged = lora.merge(frozen["unet"], adapters["unet"], ALPHA / RANK)
    jax.tree.map(np.testing.assert_array_equal, merged, params["unet"])
    apply = jax.jit(H.models().unet.apply)  # one compile for both
    x = np.random.default_rng(0).standard_normal((2, *H.LATENT)).astype(np.float32)
    t, ctx = np.array([10, 900], np.int32), np.random.default_rng(1).standard_normal((2, *H.TEXT)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(apply({"params": merged}, x, t, ctx)),
                                  np.asarray(apply({"params": params["unet"]}, x, t, ctx)))


# ------------------------------------------------------------------------------ the step

def _batch(step: int, fixed: bool = False) -> dict[str, np.ndarray]:
    """The harness batch with its randomness given (``fixed``: update 0's, whatever the step)."""
    s = 0 if fixed else step
    b = H.batch(s)
    rng = np.random.default_rng(500 + s)
    b["timesteps"] = rng.integers(0, 1000, (H.ROWS,)).astype(np.int32)
    b["noise"] = rng.standard_normal((H.ROWS, *H.LATENT)).astype(np.float32)
    b["latent_noise"] = rng.standard_normal((H.ROWS, *H.LATENT)).astype(np.float32)
    return b


@functools.cache
def _compiled(mesh, base_dtype: str = "float32"):
    from sd_jax.dreambooth.optim import make_optimizer
    from sd_jax.dreambooth.step import abstract_train_state, make_train_step, place_frozen

    cfg = _config(base_dtype=base_dtype)
    adapters, frozen = lora.split_params(H.params(), cfg)
    optimizer = make_optimizer(cfg, adapters)
    frozen = place_frozen(frozen, mesh, cfg)
    step = make_train_step(H.models(), cfg, optimizer, mesh, abstract_train_state(adapters, optimizer, mesh, cfg),
                           frozen)
    return cfg, optimizer, frozen, step


def _fresh(mesh, base_dtype: str = "float32"):
    from sd_jax.dreambooth.step import init_train_state

    cfg, optimizer, frozen, step = _compiled(mesh, base_dtype)
    return init_train_state(lora.split_params(H.params(), cfg)[0], optimizer, mesh, cfg), frozen, step


def _single():
    from sd_jax.sharding import make_mesh

    return make_mesh(devices=jax.devices()[:1])


def _host(tree):
    return jax.tree.map(np.asarray, tree)


def test_step_trains_only_the_adapters_and_the_loss_falls():
    """The state holds adapters only (float32, Adam moments of their shapes); the frozen base stays bit
    for bit; every up leaves zero; and on one repeated batch the loss falls (the adapters fit it)."""
    from sd_jax.sharding import host_local_batch_to_global

    mesh = _single()
    state, frozen, step = _fresh(mesh)
    base_before = _host(frozen)
    shapes = jax.tree.map(np.shape, lora.split_params(H.params(), _config())[0])
    assert jax.tree.map(np.shape, state.params) == shapes
    assert jax.tree.map(np.shape, state.opt_state.mu) == shapes and jax.tree.map(np.shape, state.ema) == shapes
    assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state.mu))} == {np.dtype(np.float32)}
    losses = []
    for s in range(8):
        state, m = step(state, frozen, host_local_batch_to_global(_batch(s, fixed=True), mesh))
        assert m["finite"] == 1.0
        losses.append(float(m["loss"]))
    jax.tree.map(np.testing.assert_array_equal, _host(frozen), base_before)
    ups = [x for p, x in flatten_tree(_host(state.params)["unet"]).items() if p[-1] == "up"]
    assert all(np.abs(u).max() > 0 for u in ups)
    # The same batch and noise every update: the loss falls at every one of them (measured: 2.279 -> 2.215
    # over 8 updates at lr 1e-3, the harness's rate; Adam moves each adapter weight ~lr per update).
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.985 * losses[0], losses


@pytest.mark.slow  # a second compile (~1 min on 2 busy cores)
def test_bf16_base_step_is_close_to_float32():
    """Frozen weights stored in bfloat16: the base stays bfloat16 on the device, the adapters and their Adam
    state float32, and the first update's loss within bf16 storage rounding of the float32 base's."""
    from sd_jax.sharding import host_local_batch_to_global

    mesh = _single()
    state32, frozen32, step32 = _fresh(mesh)
    state16, frozen16, step16 = _fresh(mesh, "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(frozen16)} == {np.dtype(jnp.bfloat16)}
    state_dtypes = {x.dtype for x in jax.tree.leaves((state16.params, state16.opt_state))}
    assert state_dtypes <= {np.dtype(np.float32), np.dtype(np.int32)}
    batch = host_local_batch_to_global(_batch(0), mesh)
    _, m32 = step32(state32, frozen32, batch)
    _, m16 = step16(state16, frozen16, batch)
    # bf16 weights carry a relative rounding error of 2^-9; through ~20 layers the loss moves < 1%.
    assert float(m16["loss"]) == pytest.approx(float(m32["loss"]), rel=1e-2)
    assert float(m16["loss"]) != float(m32["loss"])  # the bf16 base really was used


def test_checkpoint_resume_is_exact(tmp_path):
    """4 updates straight = 2 updates, an Orbax checkpoint, a restore into the abstract state, 2 more:
    adapters, Adam moments, EMA, step and rng bit for bit."""
    from sd_jax.dreambooth.checkpoint import Checkpointer
    from sd_jax.dreambooth.step import abstract_train_state
    from sd_jax.sharding import host_local_batch_to_global

    mesh = _single()
    cfg, optimizer, _, _ = _compiled(mesh)
    state, frozen, step = _fresh(mesh)
    for s in range(4):
        state, _ = step(state, frozen, host_local_batch_to_global(_batch(s), mesh))
    straight = _host(state)

    state, frozen, step = _fresh(mesh)
    for s in range(2):
        state, _ = step(state, frozen, host_local_batch_to_global(_batch(s), mesh))
    with Checkpointer(tmp_path / "ckpt", keep=1, async_save=False) as ckpt:
        ckpt.save(2, state, {"data_position": 2})
        del state
        target = abstract_train_state(lora.split_params(H.params(), cfg)[0], optimizer, mesh, cfg)
        state, meta = ckpt.restore(2, target)
    assert meta["data_position"] == 2 and int(state.step) == 2
    for s in range(2, 4):
        state, _ = step(state, frozen, host_local_batch_to_global(_batch(s), mesh))
    jax.tree.map(np.testing.assert_array_equal, _host(state), straight)


@pytest.mark.slow  # a second compile (~1 min on 2 busy cores); tests/test_sharding.py covers the mesh code
@pytest.mark.needs_8_devices
def test_sharded_lora_step_equals_single_device():
    """2 updates on a data=4 x fsdp=2 mesh (the frozen base and the larger adapters split over fsdp, the
    batch over all 8) equal the single-device updates."""
    from jax.sharding import PartitionSpec as P

    from sd_jax.sharding import host_local_batch_to_global, make_mesh

    results = []
    for mesh in (_single(), make_mesh(4, 2)):
        state, frozen, step = _fresh(mesh)
        metrics = []
        for s in range(2):
            state, m = step(state, frozen, host_local_batch_to_global(_batch(s), mesh))
            metrics.append(float(m["loss"]))
        results.append((_host(state.params), metrics, state, frozen))
    (want, want_m, _, _), (got, got_m, state, frozen) = results
    assert got_m == pytest.approx(want_m, rel=1e-5)
    # Each adapter at its own scale. The up weights are two Adam steps from zero (~2 lr), made of the
    # gradients of the merged kernels, whose float32 reductions run in another order on 8 devices: measured
    # 1.2e-5 of their scale at most (the downs, random, 1e-7); 5e-5 leaves a margin, a wrong shard is O(1).
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        err = np.abs(g - w).max() / np.abs(w).max()
        assert err <= 5e-5, f"{jax.tree_util.keystr(path)}: max |diff| = {err:.2e} of its scale"
    conv = frozen["unet"]["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]
    assert conv.sharding.spec == P(None, None, None, "fsdp")  # the base is split
    down = state.params["unet"]["down_blocks_0"]["resnets_0"]["conv1"]["down"]  # (3, 3, 32, 4): 1152 elements
    assert down.sharding.spec == P(None, None, "fsdp")


def _outputs(unet, unet_params, text_encoder, te_params, x, t, ctx, ids):
    """(UNet eps NCHW, text encoder hidden states) of sd_jax modules."""
    eps = np.asarray(jax.jit(unet.apply)({"params": unet_params}, x, t, ctx)).transpose(0, 3, 1, 2)
    return eps, np.asarray(jax.jit(text_encoder.apply)({"params": te_params}, ids))


def _reference_outputs(ref, x, t, ctx, ids):
    import torch
    from tiny import nchw

    with torch.no_grad():
        eps = ref.unet(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
        return eps, ref.text_encoder(torch.from_numpy(ids.astype(np.int64)))[0].numpy()


def test_saved_files_load_in_diffusers(tiny_folder, tiny_pipe, tmp_path):
    """Adapters on every target group (UNet and text encoder, 3x3 convolutions included), written by
    save_adapters: the PEFT file, loaded by diffusers' load_lora_weights into the starting model, gives the
    UNet and text encoder outputs of sd_jax's merged weights to 1e-4 of their scale; the kohya file holds
    the same weight changes."""
    from tiny import load_reference

    from sd_jax.lora import read_lora

    cfg = TrainConfig.from_dict({"train": {"train_text_encoder": True},
                                 "lora": {"enabled": True, "rank": RANK, "alpha": ALPHA, "targets": ALL_TARGETS}})
    adapters, _ = lora.split_params(tiny_pipe.params, cfg)
    rng = np.random.default_rng(2)  # trained-like adapters: up no longer zero
    adapters = jax.tree.map(lambda a: (rng.standard_normal(a.shape) * 0.2).astype(np.float32) if not a.any() else a,
                            adapters)
    paths = lora.save_adapters(adapters, tmp_path, cfg, steps=7)
    assert [p.name for p in paths] == [lora.PEFT_FILE, lora.KOHYA_FILE]
    peft, _ = read_lora(paths[0])
    kohya, meta = read_lora(paths[1])
    assert peft["unet"].keys() == kohya["unet"].keys() and "down_blocks.0.resnets.0.conv1" in peft["unet"]
    assert "text_model.encoder.layers.1.mlp.fc2" in peft["text_encoder"]
    for component in peft:
        for name, layer in peft[component].items():
            np.testing.assert_allclose(layer.delta(), kohya[component][name].delta(), rtol=1e-6, atol=1e-9)
    assert meta["ss_network_dim"] == str(RANK) and float(meta["ss_network_alpha"]) == ALPHA and meta["ss_steps"] == "7"

    merged = lora.merged_params(tiny_pipe.params, adapters, cfg)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([50, 700], np.int32)
    ids = tiny_pipe.tokenize(["a photo of sks dog", "a dog"])
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    ref = load_reference(tiny_folder)
    before = _reference_outputs(ref, x, t, ctx, ids)
    ref.load_lora_weights(tmp_path, weight_name=lora.PEFT_FILE)
    want = _reference_outputs(ref, x, t, ctx, ids)
    got = _outputs(tiny_pipe.unet, merged["unet"], tiny_pipe.text_encoder, merged["text_encoder"], x, t, ctx, ids)
    for name, g, w, b in zip(("unet", "text encoder"), got, want, before):
        scale = np.abs(w).max()
        assert np.abs(g - w).max() <= 1e-4 * scale, name
        assert np.abs(w - b).max() > 1e-2 * scale, f"{name}: the LoRA must change the output to test it"


# ------------------------------------------------------------------------------ the trainer

def _pngs(folder, n, color, seed=0):
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = np.full((40, 40, 3), 128, np.uint8)
        x, y = rng.integers(2, 14, size=2)
        img[y:y + 20, x:x + 20] = color
        Image.fromarray(img).save(folder / f"{i}.png")
    return folder


@pytest.mark.slow  # ~1-5 min: the train step and sampler compiles of the tiny model; the files: test above
def test_lora_run_files_load_in_diffusers(tiny_folder, tmp_path):
    """A LoRA run through the trainer on 8 devices (UNet attention + conv adapters, text-encoder adapters,
    prior preservation, samples, checkpoints, TensorBoard, --merge): final/ holds the PEFT
    and kohya files, which agree, are small, and which diffusers' load_lora_weights applies to the starting
    model with the UNet and text encoder outputs of sd_jax's merged model (final/, a diffusers folder) to
    1e-4 of their scale."""
    import torch
    from tiny import load_reference, nchw

    from sd_jax import StableDiffusion
    from sd_jax.dreambooth.trainer import train
    from sd_jax.lora import read_lora

    out = tmp_path / "run"
    cfg = load_config(None, {
        "model.path": str(tiny_folder), "output_dir": str(out), "seed": 3,
        "concepts": [{"instance_dir": str(_pngs(tmp_path / "sks", 3, (220, 30, 30))),
                      "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog",
                      "class_dir": str(_pngs(tmp_path / "dog", 2, (30, 30, 220), seed=1)), "num_class_images": 2}],
        "data.resolution": 32, "train.max_train_steps": 2, "train.train_text_encoder": True,
        "lora": {"enabled": True, "rank": RANK, "alpha": ALPHA, "targets": ["attention", "conv"]},
        "optim.learning_rate": 1e-2, "checkpoint.every": 1, "checkpoint.merge_lora": True,
        "logging.log_every": 1, "logging.sample_every": 2, "logging.sample_steps": 2})
    result = train(cfg, progress=False)
    final = out / "final"
    assert result.final_dir == final and result.steps == 2 and math.isfinite(result.final_loss)
    assert list((out / "logs").rglob("events.out.tfevents.*")) and len(list((out / "samples").glob("*.png"))) == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
    peft, kohya = final / lora.PEFT_FILE, final / lora.KOHYA_FILE
    unet_file = final / "unet" / "diffusion_pytorch_model.safetensors"
    assert (final / "model_index.json").is_file() and peft.stat().st_size < 0.25 * unet_file.stat().st_size

    # The two formats hold the same layers and weight changes.
    a, _ = read_lora(peft)
    b, meta = read_lora(kohya)
    assert a.keys() == b.keys() == {"unet", "text_encoder"}
    assert "text_model.encoder.layers.0.self_attn.q_proj" in a["text_encoder"]
    assert "text_model.encoder.layers.1.mlp.fc2" in a["text_encoder"]  # the default text targets: attention, mlp
    assert "down_blocks.0.resnets.0.conv1" in a["unet"] and a["unet"]["down_blocks.0.resnets.0.conv1"].down.ndim == 4
    for component in a:
        assert a[component].keys() == b[component].keys()
        for name, layer in a[component].items():
            np.testing.assert_allclose(layer.delta(), b[component][name].delta(), rtol=1e-6, atol=1e-9)
    assert meta["ss_network_dim"] == str(RANK) and meta["ss_steps"] == "2"
    assert float(meta["ss_network_alpha"]) == ALPHA

    # diffusers: the starting model + the PEFT file vs sd_jax's merged model.
    merged = StableDiffusion.from_pretrained(final)
    ref = load_reference(tiny_folder)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([50, 700], np.int32)
    ids = merged.tokenize(["a photo of sks dog", "a dog"])
    with torch.no_grad():
        te_before = ref.text_encoder(torch.from_numpy(ids.astype(np.int64)))[0].numpy()
        ctx = rng.standard_normal(te_before.shape).astype(np.float32)
        unet_before = ref.unet(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
        ref.load_lora_weights(final, weight_name=lora.PEFT_FILE)
        te_after = ref.text_encoder(torch.from_numpy(ids.astype(np.int64)))[0].numpy()
        unet_after = ref.unet(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
    ours_te = np.asarray(merged.text_encoder.apply({"params": merged.params["text_encoder"]}, ids))
    ours_unet = np.asarray(merged.unet.apply({"params": merged.params["unet"]}, x, t, ctx)).transpose(0, 3, 1, 2)
    for name, ours, want, before in (("text encoder", ours_te, te_after, te_before),
                                     ("unet", ours_unet, unet_after, unet_before)):
        scale = np.abs(want).max()
        assert np.abs(ours - want).max() <= 1e-4 * scale, name
        assert np.abs(want - before).max() > 1e-2 * scale, f"{name}: the LoRA must change the output to test it"


@pytest.mark.slow  # ~5 min: a starting model is trained first, then the LoRA (test_dreambooth_learns.py's setup)
def test_lora_learns_the_subject_and_keeps_the_class(tmp_path):
    """LoRA Dreambooth learns the subject over a starting model that knows the class, as a real one does.

    tests/test_dreambooth_learns.py's subject (red square, "a photo of sks dog") and class (blue square,
    "a photo of dog"). The tiny model is random, not a denoiser, and a low-rank update cannot make a
    random UNet one (measured: rank 16 everywhere moves instance samples only from 13.7 to 2.9 RMS from
    the subject, with the prompts inseparable). So the starting model is made as real checkpoints are
    made: a full fine-tune on the class images and prompt (1500 updates). It draws the class for both
    prompts. Then the LoRA of lora.yaml (rank 4 on the UNet attention, the base frozen in bfloat16), at
    lr 3e-3, trains through the CLI with prior preservation, --merge and samples.

    Measured on this machine: the starting model's samples are 0.75 from blue and 1.22 from red for
    both prompts (0.008 RMS apart). After the LoRA, instance samples are 0.99 from red and 1.28 from
    blue, class samples 1.10 from red and 0.74 from blue, and the per-seed difference (instance - class)
    points along (red - blue) with cosine 0.94 (the full fine-tune from the random model: 0.67 / 1.23 and
    1.03 / 0.79, cosine 0.96). The loss falls 0.77 -> 0.33 (means of the first and last 100 updates).
    Rank 8 on attention, proj and feed-forward: 0.94 / 1.42 and 1.11 / 0.65, cosine 0.96. Bounds keep
    >= 2x margins; adapters that ignored the prompt, or paired it with the wrong images, fail them."""
    import json

    from test_dreambooth_learns import CLASS, INSTANCE, distances, subject_and_class, train_cli

    from sd_jax import StableDiffusion

    folder, instance_dir, class_dir, red, blue, gap = subject_and_class(tmp_path)
    train_cli(folder, tmp_path / "base", class_dir, CLASS, 1500, 1e-3, "--set", "logging.sample_every=0",
              "--set", "logging.log_every=500")
    base = tmp_path / "base" / "final"
    before = distances(StableDiffusion.from_pretrained(base), red, blue)
    # The starting model draws the class for both prompts: nearer blue than red, and the prompts' samples
    # differ by ~1% of their distance to the subject.
    for prompt in ("instance", "class"):
        assert before[f"{prompt}_to_red"] - before[f"{prompt}_to_blue"] > 0.2, before
    assert before["diff_rms"] < 0.05 * before["instance_to_red"], before

    out = tmp_path / "run"
    train_cli(base, out, instance_dir, INSTANCE, 1000, 3e-3, "--lora", "--set", "lora.base_dtype=bfloat16", "--merge",
              "--sample-every", "1000", "--set", "logging.sample_steps=4", "--set", "logging.log_every=1",
              class_dir=class_dir)
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    losses = np.array([r["train/loss"] for r in rows])
    first, last = losses[:100].mean(), losses[-100:].mean()  # each update draws its own timesteps: average
    after = distances(StableDiffusion.from_pretrained(out / "final"), red, blue)
    report = f"loss {first:.4f} -> {last:.4f}\nbefore {before}\nafter {after}"
    print(report)  # pytest -rP shows the figures
    assert len(list((out / "samples").glob("step001000-*.png"))) == 1, report  # instance prompt, merged weights
    assert len(losses) == 1000 and last < 0.7 * first, report
    # After: instance samples moved to the subject (nearer it than to the class images) ...
    assert after["instance_to_red"] < before["instance_to_red"] - 0.1, report
    assert after["instance_to_blue"] - after["instance_to_red"] > 0.14, report
    # ... while class samples stay nearer the class images, farther from the subject than instance samples.
    assert after["class_to_red"] - after["class_to_blue"] > 0.18, report
    assert after["class_to_red"] - after["instance_to_red"] > 0.055, report
    # Per seed, what the instance prompt changes points from the class images to the subject.
    assert after["cosine"] > 0.6 and after["diff_rms"] > 0.25 * gap, report


def test_resume_of_a_run_written_before_the_lora_section(tmp_path):
    """A run whose config.json predates the lora section resumes (the section compares as its default); a
    LoRA config on a full fine-tune's checkpoints is refused, naming the section."""
    import json

    from sd_jax.dreambooth.trainer import RunPaths, _check_output_dir

    cfg = TrainConfig.from_dict({"model": "m", "output_dir": str(tmp_path),
                                 "concepts": [{"instance_dir": "d", "instance_prompt": "a sks dog"}]})
    (tmp_path / "checkpoints" / "2").mkdir(parents=True)
    old = cfg.to_dict()
    del old["lora"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert _check_output_dir(RunPaths(tmp_path), cfg, None) == 2
    lora_cfg = TrainConfig.from_dict({**cfg.to_dict(), "lora": {"enabled": True}})
    with pytest.raises(ValueError, match="sections differ: lora"):
        _check_output_dir(RunPaths(tmp_path), lora_cfg, None)
