"""Dreambooth config, loss, optimizer and train step.

- the run config: validation, YAML + overrides, round trip;
- the loss pieces against their formulas and PyTorch;
- loss and gradients against diffusers/transformers (PyTorch) on the tiny model: VAE
  encoding, a trained text encoder and prior preservation, as diffusers' train_dreambooth.py;
- the optimizer: schedules (against diffusers' get_scheduler), the text encoder frozen
  after N updates, EMA;
- the step: gradient accumulation k x b == 1 x kb, bf16 mixed precision (+ remat) with
  float32 masters, a non-finite update skipped.
The sharded step and the two-process run are in test_sharding.py / test_multiprocess.py.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import step_harness as H

from sd_jax.dreambooth import loss as L
from sd_jax.dreambooth.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    load_config,
)
from sd_jax.dreambooth.optim import (
    ema_update,
    lr_schedule,
    lr_schedules,
    make_optimizer,
)

torch = pytest.importorskip("torch")


# ------------------------------------------------------------------------------ config

CONCEPT = {"instance_dir": "dog", "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog"}


def test_config_defaults_round_trip_json():
    cfg = TrainConfig.from_dict({"model": "some/model", "concepts": [CONCEPT],
                                 "logging": {"validation_prompts": ["a", "b"]}})
    assert cfg.model.path == "some/model" and cfg.optim.weight_decay == 0.01 and cfg.optim.max_grad_norm == 1.0
    assert cfg.train.prior_loss_weight == 1.0 and cfg.mesh.data == -1 and cfg.mesh.fsdp == 1
    assert cfg.with_prior_preservation and cfg.text_encoder_lr == cfg.optim.learning_rate
    d = json.loads(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_dict(d) == cfg
    assert cfg.class_dir(0).as_posix() == "dreambooth-output/class_images/concept_0"
    no_prior = TrainConfig.from_dict({"concepts": [{**CONCEPT, "class_prompt": None}]})
    assert not no_prior.with_prior_preservation
    assert not TrainConfig.from_dict({"concepts": [CONCEPT], "train": {"prior_loss_weight": 0}}).with_prior_preservation


@pytest.mark.parametrize("d, match", [
    ({"optim": {"lr_schedule": "cosin"}}, r"optim.lr_schedule='cosin' is not valid: choose one of 'constant'"),
    ({"data": {"resolution": 500}}, r"data.resolution=500.*multiple of 8"),
    ({"optim": {"learning_rate": 0}}, r"optim.learning_rate=0.0.*> 0"),
    ({"optim": {"ema_decay": 1.0}}, r"optim.ema_decay=1.0"),
    ({"optim": {"warmup_steps": 10}}, r"optim.warmup_steps=10.*use lr_schedule='warmup'"),
    ({"optim": {"lr_schedule": "cosine", "warmup_steps": 900}}, r"warmup_steps=900.*max_train_steps=800"),
    ({"train": {"mixed_precision": "fp16"}}, r"train.mixed_precision='fp16'.*'float32', 'bfloat16'"),
    ({"train": {"text_encoder_steps": 5}}, r"text_encoder_steps=5.*train_text_encoder=true"),
    ({"train": {"train_batch_size": "2"}}, r"train.train_batch_size='2'.*integer"),
    ({"train": {"remat": 1}}, r"train.remat=1.*true or false"),
    ({"mesh": {"data": -1, "fsdp": -1}}, r"at most one of mesh.data and mesh.fsdp"),
    ({"optim": {"learning_rte": 1e-6}}, r"unknown config key 'optim.learning_rte'; did you mean 'optim.learning_rate'"),
    ({"trian": {}}, r"unknown config key 'trian'; did you mean 'train'"),
    ({"concepts": [{"instance_dir": "d"}]}, r"concepts\[0\] lacks instance_prompt"),
    ({"concepts": [{**CONCEPT, "num_class_images": -1}]}, r"concepts\[0\].num_class_images=-1"),
    ({"concepts": [CONCEPT, {**CONCEPT, "class_prompt": None}]}, r"every concept has a class_prompt or none"),
    ({"seed": -1}, r"seed=-1"),
])
def test_config_errors_name_the_value(d, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(d)


def test_load_config_yaml_and_overrides(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: base/model\n"
                      "optim:\n  learning_rate: 1e-6\n  lr_schedule: warmup\n  warmup_steps: 10\n"
                      "train:\n  train_text_encoder: true\n"
                      "concepts:\n  - {instance_dir: dog, instance_prompt: a photo of sks dog}\n")
    cfg = load_config(recipe, {"optim.learning_rate": 2e-6, "train": {"max_train_steps": 50},
                               "output_dir": "out", "seed": None})
    assert cfg.optim.learning_rate == 2e-6 and cfg.optim.lr_schedule == "warmup"
    assert cfg.train.max_train_steps == 50 and cfg.train.train_text_encoder and cfg.output_dir == "out"
    assert cfg.model.path == "base/model" and cfg.seed == 0
    # YAML 1.1 reads "1e-6" as a string; float fields take it anyway.
    assert load_config(recipe).optim.learning_rate == 1e-6
    sets = apply_overrides({}, ["optim.learning_rate=3e-6", "train.remat=true", "mesh.fsdp=2",
                               "logging.validation_prompts=[a dog, a cat]", "concepts=[]"])
    assert sets == {"optim": {"learning_rate": 3e-6}, "train": {"remat": True}, "mesh": {"fsdp": 2},
                    "logging": {"validation_prompts": ["a dog", "a cat"]}, "concepts": []}
    renamed = apply_overrides({"concepts": [dict(CONCEPT)]}, ["concepts.0.instance_prompt=a sks cat"])
    assert renamed["concepts"][0]["instance_prompt"] == "a sks cat"
    with pytest.raises(ConfigError, match="no model|model.path"):
        load_config(None, {"concepts": [CONCEPT]})
    with pytest.raises(ConfigError, match="at least one concept"):
        load_config(None, {"model": "m"})
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["optim.learning_rate"])
    with pytest.raises(ConfigError, match=r"'concepts.3' is not an index"):
        apply_overrides({"concepts": []}, ["concepts.3.instance_prompt=x"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")


# ------------------------------------------------------------------------------ loss pieces

def test_diffusion_and_dreambooth_loss():
    rng = np.random.default_rng(0)
    pred, target = rng.standard_normal((2, 6, 4, 4, 3)).astype(np.float32)
    want = torch.nn.functional.mse_loss(torch.from_numpy(pred), torch.from_numpy(target)).item()
    assert float(L.diffusion_loss(pred, target)) == pytest.approx(want, rel=1e-6)
    w = rng.uniform(0.5, 2, 6).astype(np.float32)
    per = ((pred - target) ** 2).reshape(6, -1).mean(1)
    assert float(L.diffusion_loss(pred, target, w)) == pytest.approx((per * w).mean(), rel=1e-6)
    mask = np.array([0, 0, 1, 1, 0, 1], np.float32)
    total, parts = L.dreambooth_loss(pred, target, mask, 0.5)
    assert float(parts["instance_loss"]) == pytest.approx(per[mask == 0].mean(), rel=1e-6)
    assert float(parts["prior_loss"]) == pytest.approx(per[mask == 1].mean(), rel=1e-6)
    assert float(total) == pytest.approx(per[mask == 0].mean() + 0.5 * per[mask == 1].mean(), rel=1e-6)
    valid = np.array([1, 0, 1, 1, 1, 0], np.float32)  # padding rows do not count
    _, parts = L.dreambooth_loss(pred, target, mask, 1.0, weights=w, valid=valid)
    sel_i, sel_p = (mask == 0) & (valid == 1), (mask == 1) & (valid == 1)
    assert float(parts["instance_loss"]) == pytest.approx((per * w)[sel_i].mean(), rel=1e-6)
    assert float(parts["prior_loss"]) == pytest.approx((per * w)[sel_p].mean(), rel=1e-6)
    total, parts = L.dreambooth_loss(pred, target)  # no prior rows: prior loss 0, not NaN
    assert float(parts["prior_loss"]) == 0.0 and float(total) == pytest.approx(per.mean(), rel=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_diffusers(prediction_type):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr
    from tiny import V14_SCHEDULER

    from sd_jax.schedulers import NoiseScheduleConfig, alphas_cumprod

    sched = DDPMScheduler.from_config(V14_SCHEDULER)
    t = np.array([0, 1, 10, 250, 500, 999])
    snr = compute_snr(sched, torch.from_numpy(t))
    gamma = 5.0
    w = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]  # train_dreambooth.py
    w = w / snr if prediction_type == "epsilon" else w / (snr + 1)
    got = L.min_snr_weights(alphas_cumprod(NoiseScheduleConfig.sd_v1()), jnp.asarray(t), gamma, prediction_type)
    np.testing.assert_allclose(np.asarray(got), w.numpy(), rtol=1e-5)


def test_noise_offset_is_per_example_and_channel():
    key = jax.random.key(3)
    base = L.noise_with_offset(key, (16, 8, 8, 4), 0.0)
    shifted = L.noise_with_offset(key, (16, 8, 8, 4), 0.1)
    diff = np.asarray(shifted - base)  # (B, H, W, C): constant over H, W
    np.testing.assert_allclose(diff, np.broadcast_to(diff[:, :1, :1, :], diff.shape), atol=1e-6)
    assert 0.02 < np.abs(diff[:, 0, 0, :]).mean() < 0.2 and abs(float(base.std()) - 1) < 0.05


# ---------------------------------------------------------------------- PyTorch parity

def _torch_reference(folder, batch, prior_loss_weight):
    """diffusers' train_dreambooth.py loss with prior preservation, and its gradients."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from tiny import nchw
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet").train()
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    text = CLIPTextModel.from_pretrained(folder / "text_encoder").train()
    sched = DDPMScheduler.from_pretrained(folder / "scheduler")
    with torch.no_grad():
        posterior = vae.encode(nchw(batch["pixel_values"])).latent_dist
        latents = (posterior.mean + posterior.std * nchw(batch["latent_noise"])) * vae.config.scaling_factor
    noise, t = nchw(batch["noise"]), torch.from_numpy(np.asarray(batch["timesteps"], np.int64))
    noisy = sched.add_noise(latents, noise, t)
    emb = text(torch.from_numpy(np.asarray(batch["input_ids"], np.int64)))[0]
    pred = unet(noisy, t, emb, return_dict=False)[0]
    pred, pred_prior = torch.chunk(pred, 2, dim=0)
    target, target_prior = torch.chunk(noise, 2, dim=0)
    instance = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")
    prior = torch.nn.functional.mse_loss(pred_prior.float(), target_prior.float(), reduction="mean")
    loss = instance + prior_loss_weight * prior
    loss.backward()
    grad = lambda p: p.grad.numpy() if p.grad is not None else np.zeros(tuple(p.shape), np.float32)  # noqa: E731
    grads = {"unet": {k: grad(p) for k, p in unet.named_parameters()},
             "text_encoder": {k.removeprefix("text_model."): grad(p) for k, p in text.named_parameters()}}
    return {"loss": loss.item(), "instance_loss": instance.item(), "prior_loss": prior.item()}, grads


def test_loss_and_gradients_match_pytorch(tiny_folder, tiny_pipe):
    """VAE-encoded pixels, the text encoder training, prior preservation (λ = 0.7): the loss parts
    and the gradient of every UNet and text-encoder weight equal diffusers/transformers'."""
    from parity_helpers import assert_each_close

    from sd_jax.convert.core import export_state_dict
    from sd_jax.dreambooth.step import StepModels, make_loss_fn, split_params

    cfg = TrainConfig.from_dict({"concepts": [CONCEPT], "data": {"resolution": 32, "cache_latents": False},
                                 "train": {"train_text_encoder": True, "prior_loss_weight": 0.7}})
    rng = np.random.default_rng(0)
    ids = tiny_pipe.tokenize(["a photo of sks dog", "a sks dog on the moon", "a photo of dog", "a dog"])
    batch = {"pixel_values": rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32), "input_ids": ids,
             "prior_mask": np.array([0, 0, 1, 1], np.float32), "timesteps": np.array([10, 500, 999, 250], np.int32),
             "noise": rng.standard_normal((4, 4, 4, 4)).astype(np.float32),
             "latent_noise": rng.standard_normal((4, 4, 4, 4)).astype(np.float32)}
    models = StepModels.from_pipeline(tiny_pipe, cfg)
    trainable, frozen = split_params(tiny_pipe.params, cfg)
    assert sorted(trainable) == ["text_encoder", "unet"] and sorted(frozen) == ["vae"]
    args = (trainable, frozen, {k: jnp.asarray(v) for k, v in batch.items()})
    grad_fn = jax.jit(jax.value_and_grad(make_loss_fn(models, cfg), has_aux=True))  # at -O0, as the harness's steps
    (loss, parts), grads = grad_fn.lower(*args).compile(compiler_options=H.COMPILER_OPTIONS)(*args)

    want, want_grads = _torch_reference(tiny_folder, batch, 0.7)
    assert float(loss) == pytest.approx(want["loss"], rel=1e-5)
    assert float(parts["instance_loss"]) == pytest.approx(want["instance_loss"], rel=1e-5)
    assert float(parts["prior_loss"]) == pytest.approx(want["prior_loss"], rel=1e-5)
    for group in ("unet", "text_encoder"):
        # Every weight's gradient at its own scale. The attention key biases' gradients are zero up to
        # rounding (softmax ignores a constant added to a row of scores): atol, 1e-6 of the largest.
        want_group = want_grads[group]
        atol = 1e-6 * max(np.abs(g).max() for g in want_group.values())
        assert_each_close(export_state_dict(grads[group]), want_group, f"{group} gradients", rel=1e-4, atol=atol)
    token = export_state_dict(grads["text_encoder"])["embeddings.token_embedding.weight"]
    assert np.abs(token).max() > 0  # the text encoder really receives gradient


def test_gradient_comparison_holds_each_tensor_to_its_own_scale():
    """The comparison above fails a 10 % error in a tensor 1000x smaller than the largest one, and a
    missing or an extra tensor (it used to compare at the largest gradient's scale, over a subset)."""
    from parity_helpers import assert_each_close

    rng = np.random.default_rng(0)
    want = {"big": rng.standard_normal((8, 8)), "small": 1e-3 * rng.standard_normal(8)}
    assert_each_close({k: v * (1 + 1e-6) for k, v in want.items()}, want, "ok")
    with pytest.raises(AssertionError, match=r"1 tensors differ .*'small'"):  # atol as in the test above
        assert_each_close({**want, "small": want["small"] * 1.1}, want, "scaled", atol=1e-6 * np.abs(want["big"]).max())
    with pytest.raises(AssertionError, match=r"missing \['small'\]"):
        assert_each_close({"big": want["big"]}, want, "missing")
    with pytest.raises(AssertionError, match=r"unexpected \['extra'\]"):
        assert_each_close({**want, "extra": want["small"]}, want, "extra")


# ------------------------------------------------------------------------------ optimizer

@pytest.mark.parametrize("name, diffusers_name", [("constant", "constant"), ("warmup", "constant_with_warmup"),
                                                  ("cosine", "cosine"), ("linear", "linear")])
def test_schedules_match_diffusers(name, diffusers_name):
    from diffusers.optimization import get_scheduler

    total, warmup = 100, 0 if name == "constant" else 10
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    ref = get_scheduler(diffusers_name, opt, num_warmup_steps=warmup, num_training_steps=total)
    sched = lr_schedule(name, 2.0, total, warmup)
    for count in range(total + 1):  # the lr of update `count` (0-based)
        assert float(sched(count)) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-6), count
        opt.step()
        ref.step()
    if name == "cosine":
        assert float(sched(55)) == pytest.approx(1.0)  # halfway through the decay: half the peak


def _toy_params():
    rng = np.random.default_rng(1)
    return {"unet": {"a": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
                     "b": jnp.asarray(rng.standard_normal(5), jnp.float32)},
            "text_encoder": {"c": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32)}}


def test_text_encoder_frozen_after_n_updates():
    """Updates 0-1 move the text encoder; from update 2 on its weights stay exactly the same
    (AdamW's momentum and weight decay included) and its gradients no longer count in the clip."""
    import optax

    cfg = TrainConfig.from_dict({"train": {"train_text_encoder": True, "text_encoder_steps": 2},
                                 "optim": {"learning_rate": 0.1, "text_encoder_lr": 0.05, "max_grad_norm": 1.0,
                                           "weight_decay": 0.1}})
    assert [float(lr_schedules(cfg)["text_encoder"](c)) for c in range(4)] == pytest.approx([0.05, 0.05, 0, 0])

    def trajectory(te_grad_scale_after):
        params = _toy_params()
        opt = make_optimizer(cfg, params)
        state = opt.init(params)
        history = []
        for step in range(6):
            g = jax.tree.map(lambda p, s=step: jnp.full_like(p, 0.3) * (1 + s), params)
            if step >= 2:
                g["text_encoder"] = jax.tree.map(lambda x: x * te_grad_scale_after, g["text_encoder"])
            updates, state = opt.update(g, state, params)
            params = optax.apply_updates(params, updates)
            history.append(jax.tree.map(np.asarray, params))
        return history

    hist = trajectory(1.0)
    te = [h["text_encoder"]["c"] for h in hist]
    assert not np.array_equal(te[0], _toy_params()["text_encoder"]["c"]) and not np.array_equal(te[0], te[1])
    for later in te[2:]:
        np.testing.assert_array_equal(later, te[1])
    assert not np.array_equal(hist[-1]["unet"]["a"], hist[1]["unet"]["a"])
    # Frozen gradients do not count in the global norm: huge or zero, the UNet moves the same.
    for a, b in zip(trajectory(1e6), trajectory(0.0)):
        jax.tree.map(np.testing.assert_array_equal, a, b)


def _adamw64(params, grads_seq, lrs, b1, b2, eps, wd, max_norm):
    """AdamW + global-norm clipping in float64 numpy (Loshchilov & Hutter 2019, Alg. 2)."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    m = jax.tree.map(np.zeros_like, p)
    v = jax.tree.map(np.zeros_like, p)
    for t, grads in enumerate(grads_seq, start=1):
        g = jax.tree.map(lambda x: np.asarray(x, np.float64), grads)
        norm = np.sqrt(sum(np.sum(x ** 2) for x in jax.tree.leaves(g)))
        if max_norm is not None and norm >= max_norm:
            g = jax.tree.map(lambda x, c=max_norm / norm: x * c, g)
        m = jax.tree.map(lambda m_, g_: b1 * m_ + (1 - b1) * g_, m, g)
        v = jax.tree.map(lambda v_, g_: b2 * v_ + (1 - b2) * g_ ** 2, v, g)
        for group in p:
            lr = lrs[group](t - 1)
            bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
            p[group] = jax.tree.map(lambda p_, m_, v_, lr=lr, bc1=bc1, bc2=bc2: p_ - lr * (
                (m_ / bc1) / (np.sqrt(v_ / bc2) + eps) + wd * p_), p[group], m[group], v[group])
    return p


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_fused_adamw_equals_reference_adamw(max_grad_norm):
    """make_optimizer's one-pass AdamW == AdamW + clipping in float64, and == optax.chain(
    clip_by_global_norm, multi_transform(adamw)) up to optax's float32 bias correction (1 - 0.999^t
    loses ~5 digits to cancellation in the first updates: ~2e-5 of an update)."""
    import optax

    cfg = TrainConfig.from_dict({"train": {"train_text_encoder": True, "max_train_steps": 10},
                                 "optim": {"learning_rate": 0.1, "text_encoder_lr": 0.03, "lr_schedule": "cosine",
                                           "warmup_steps": 2, "max_grad_norm": max_grad_norm,
                                           "weight_decay": 0.05, "adam_beta1": 0.8, "adam_epsilon": 1e-6}})
    o, scheds = cfg.optim, lr_schedules(cfg)
    adamw = lambda s: optax.adamw(s, b1=o.adam_beta1, b2=o.adam_beta2, eps=o.adam_epsilon,
                                  weight_decay=o.weight_decay)
    groups = {"unet": "unet", "text_encoder": "text_encoder"}
    ref = optax.chain(*([optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []),
                      optax.multi_transform({g: adamw(scheds[g]) for g in groups}, groups))
    ours = make_optimizer(cfg, _toy_params())
    p_ref = p_ours = _toy_params()
    s_ref, s_ours = ref.init(p_ref), ours.init(p_ours)
    rng = np.random.default_rng(2)
    grads_seq = []
    for step in range(6):
        scale = [0.01, 3.0][step % 2]  # below and above the clip threshold
        g = jax.tree.map(lambda p, s=scale: jnp.asarray(rng.standard_normal(p.shape) * s, jnp.float32), p_ref)
        grads_seq.append(g)
        u_ref, s_ref = ref.update(g, s_ref, p_ref)
        u_ours, s_ours = ours.update(g, s_ours, p_ours)
        p_ref, p_ours = optax.apply_updates(p_ref, u_ref), optax.apply_updates(p_ours, u_ours)
    lrs = {g: (lambda c, g=g: float(scheds[g](c))) for g in groups}
    want = _adamw64(_toy_params(), grads_seq, lrs, o.adam_beta1, o.adam_beta2, o.adam_epsilon, o.weight_decay,
                    max_grad_norm)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2e-7), p_ours, want)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), p_ours, p_ref)


def test_nonfinite_update_is_a_no_op():
    """A NaN gradient, or finite=False, leaves weights, moments and count exactly as they were,
    the very first update included (no 0/0 bias correction)."""
    import optax

    cfg = TrainConfig.from_dict({"optim": {"learning_rate": 0.1}})
    params = {"unet": _toy_params()["unet"]}
    opt = make_optimizer(cfg, params)
    state = opt.init(params)
    nan_grads = jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(jnp.nan), params)
    updates, new_state = opt.update(nan_grads, state, params)
    jax.tree.map(lambda u: np.testing.assert_array_equal(u, 0.0), updates)
    jax.tree.map(np.testing.assert_array_equal, new_state, state)
    good = jax.tree.map(jnp.ones_like, params)
    _, state = opt.update(good, state, params)
    updates, new_state = opt.update(good, state, params, finite=jnp.bool_(False))  # e.g. a NaN loss
    jax.tree.map(lambda u: np.testing.assert_array_equal(u, 0.0), updates)
    jax.tree.map(np.testing.assert_array_equal, new_state, state)
    assert int(new_state.count) == 1
    applied = make_optimizer(TrainConfig.from_dict({"train": {"skip_nonfinite_updates": False}}), params)
    updates, _ = applied.update(nan_grads, applied.init(params), params)
    assert np.isnan(np.asarray(updates["unet"]["a"])).any()
    assert optax.global_norm(updates)  # (skip off: the NaN goes through)


def test_optimizer_groups_and_ema_update():
    cfg = TrainConfig.from_dict({"train": {"train_text_encoder": False}})
    with pytest.raises(ValueError, match="do not match train.train_text_encoder=False"):
        make_optimizer(cfg, _toy_params())
    ema = {"w": jnp.array([1.0, 2.0])}
    out = ema_update(ema, {"w": jnp.array([3.0, -2.0])}, 0.75)
    np.testing.assert_allclose(np.asarray(out["w"]), [0.75 * 1 + 0.25 * 3, 0.75 * 2 - 0.25 * 2])


# ------------------------------------------------------------------------------ the step

def _single_mesh():
    from sd_jax.sharding import make_mesh

    return make_mesh(devices=jax.devices()[:1])


def test_grad_accumulation_equals_big_batch():
    """2 micro-batches of 2+2 rows per update == 1 batch of 4+4 rows (same rows, same draws):
    losses, gradient norms, weights and EMA after 3 updates."""
    from sd_jax.dreambooth.step import draw_randomness

    want, want_metrics = H.reference_run()  # accum 1, 8 rows, the step's own draws
    ref_cfg = H.train_config()
    cfg = H.train_config(optim={"grad_accum_steps": 2})
    models = H.models()
    root = jax.random.wrap_key_data(jax.random.key_data(jax.random.key(cfg.seed)))

    def micro_batches(step):
        full = {k: jnp.asarray(v) for k, v in H.batch(step).items()}
        full = draw_randomness(jax.random.fold_in(root, step), full, models, ref_cfg)
        order = np.array([[0, 1, 4, 5], [2, 3, 6, 7]])  # each micro-batch: 2 instance + 2 class rows
        return {k: np.asarray(v)[order] for k, v in full.items()}

    got, metrics = H.run(_single_mesh(), cfg, batch_of=micro_batches)
    for g, w in zip(metrics, want_metrics):
        for k in ("loss", "instance_loss", "prior_loss", "grad_norm", "lr"):
            assert g[k] == pytest.approx(w[k], rel=1e-5), k
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        assert np.abs(g - w).max() <= 1e-5 * np.abs(w).max(), jax.tree_util.keystr(path)


def test_ema_and_nonfinite_update_skipped():
    """EMA after one update is d·p0 + (1-d)·p1; a NaN input gives finite = 0 and leaves weights,
    Adam state and EMA untouched (the step counter advances); the next good batch trains."""
    from sd_jax.sharding import host_local_batch_to_global

    mesh = _single_mesh()
    cfg = H.train_config()
    state, step_fn = H.setup(cfg, mesh)
    p0 = jax.tree.map(np.asarray, state.params)
    state, m = step_fn(state, {}, host_local_batch_to_global(H.batch(0), mesh))
    assert m["finite"] == 1.0
    p1 = jax.tree.map(np.asarray, state.params)
    jax.tree.map(lambda e, a, b: np.testing.assert_allclose(e, 0.9 * a + 0.1 * b, rtol=1e-6, atol=1e-7),
                 jax.tree.map(np.asarray, state.ema), p0, p1)
    before = jax.tree.map(np.asarray, (state.params, state.opt_state, state.ema))
    bad = H.batch(1)
    bad["latent_mean"][5, 0, 0, 0] = np.nan
    state, m = step_fn(state, {}, host_local_batch_to_global(bad, mesh))
    assert m["finite"] == 0.0 and math.isnan(float(m["loss"]))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, (state.params, state.opt_state,
                                                                          state.ema)), before)
    assert int(state.step) == 2
    state, m = step_fn(state, {}, host_local_batch_to_global(H.batch(2), mesh))
    assert m["finite"] == 1.0 and not np.array_equal(np.asarray(state.params["unet"]["conv_in"]["kernel"]),
                                                     before[0]["unet"]["conv_in"]["kernel"])


def test_bf16_mixed_precision_with_remat():
    """bf16 compute (+ remat): master weights and Adam state stay float32 and the loss is close to
    float32's. Bound: bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.002 per operation);
    the one-block UNet's ~20 layers of rounding errors, mostly independent, perturb the prediction
    by ~1% of its scale, and the MSE by about twice the relative error of the residual: 2%."""
    from sd_jax.sharding import host_local_batch_to_global

    _, want_metrics = H.reference_run()
    mesh = _single_mesh()
    state, step_fn = H.setup(H.train_config(train={"mixed_precision": "bfloat16", "remat": True}), mesh,
                             dtype="bfloat16", remat=True)
    p0 = jax.tree.map(np.asarray, state.params)
    state, m = step_fn(state, {}, host_local_batch_to_global(H.batch(0), mesh))
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(state.opt_state)} <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}
    want = want_metrics[0]["loss"]
    assert float(m["loss"]) != want  # it really ran in bf16
    assert float(m["loss"]) == pytest.approx(want, rel=2e-2)
    assert float(m["grad_norm"]) == pytest.approx(want_metrics[0]["grad_norm"], rel=5e-2)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params, p0)
    assert min(jax.tree.leaves(moved)) > 0  # float32 masters take updates smaller than bf16's spacing
