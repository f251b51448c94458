"""Step-by-step parity of sd_jax.schedulers against diffusers' PyTorch schedulers.

Each diffusers scheduler is built exactly as the pipeline parity tests will build it,
`DiffusersClass.from_config(SD v1.4 scheduler_config)`, and fed the same "model" as ours
(model_output_i = 0.1 * model_input_i + fixed_noise_i, so errors propagate); stochastic
solvers get the same N(0, I) draws (diffusers' `randn_tensor` is patched, ours gets `noise=`).
Tolerance for every compared array: max|ours - ref| <= 1e-5 * max(1, max|ref|).
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete

from sd_jax.schedulers import (
    SCHEDULER_NAMES,
    NoiseScheduleConfig,
    alphas_cumprod,
    get_scheduler,
    get_velocity,
    img2img_start,
    num_model_calls,
    pad_schedule,
    schedule_length,
    scheduler_name_for_config,
)
from sd_jax.schedulers import add_noise as train_add_noise
from sd_jax.schedulers import schedule

V14 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.2.2",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
DIFFUSERS = {
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++2m-karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "ddpm": (DDPMScheduler, {}),
}
# Modules whose step draws noise with randn_tensor and takes no explicit noise argument.
RANDN_MODULES = {"euler_a": scheduling_euler_ancestral_discrete, "ddpm": scheduling_ddpm}
SHAPE = (1, 4, 4, 4)  # 64 floats; the solvers are elementwise, so layout does not matter
STEP_COUNTS = (1, 2, 7, 50, 1000)
# Where diffusers itself cannot run the v1.4 config (our create raises ValueError instead).
DIFFUSERS_CANNOT = {
    ("ddim", 1000): "leading spacing + steps_offset=1 gives t=1000: IndexError in alphas_cumprod",
    ("pndm", 1000): "leading spacing + steps_offset=1 gives t=1000: IndexError in alphas_cumprod",
    ("ddpm", 1000): "leading spacing + steps_offset=1 gives t=1000: IndexError in alphas_cumprod",
    ("dpm++2m", 1000): "linspace timesteps repeat (500 twice): h = 0 and diffusers returns NaN",
}

_JIT = {}


def jitted(name):
    """One jax.jit per solver (recompiles only when the state's array shapes change)."""
    if name not in _JIT:
        s = get_scheduler(name)
        _JIT[name] = (jax.jit(s.step), jax.jit(s.scale_model_input))
    return _JIT[name]


def _noise(key, i, shape):
    """The N(0, I) draw of loop step i (stochastic solvers take it as noise=)."""
    return jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)


def denoise_loop(scheduler, state, sample, model_fn, key):
    """Reference loop (jittable with scheduler and model_fn static): indices start_index .. num_calls-1
    with lax.fori_loop (both bounds traced); model_fn(model_input, t, i); step i's noise from fold_in(key, i)."""
    def body(i, carry):
        x, st = carry
        out = model_fn(scheduler.scale_model_input(st, x, i), st.timesteps[i], i)
        return scheduler.step(st, out, i, x, noise=_noise(key, i, x.shape))

    return jax.lax.fori_loop(jnp.asarray(state.start_index, jnp.int32), state.num_calls, body, (sample, state))


def assert_close(ours, ref, what):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    assert np.all(np.isfinite(ref)), f"{what}: reference not finite"
    err = np.max(np.abs(ours - ref))
    tol = 1e-5 * max(1.0, np.max(np.abs(ref)))
    assert err <= tol, f"{what}: max abs err {err:.3g} > {tol:.3g}"


def make_pair(name, n, extra=None):
    """(diffusers scheduler after set_timesteps, our config) for the v1.4 config plus `extra`."""
    cls, kw = DIFFUSERS[name]
    conf = {**V14, **(extra or {})}
    ref = cls.from_config({**conf, **kw})
    ref.set_timesteps(n)
    return ref, NoiseScheduleConfig.from_diffusers_config(conf)


def run_parity(
    monkeypatch, name, n, extra=None, *, strength=1.0, seed=0, create_kw=None, ref_step_kw=None, timestep_atol=0.0
):
    ref, cfg = make_pair(name, n, extra)
    sched = get_scheduler(name)
    state = sched.create(cfg, n, SHAPE, strength=strength, **(create_kw or {}))
    step, scale = jitted(name)

    np.testing.assert_allclose(
        np.asarray(state.timesteps), ref.timesteps.numpy(), rtol=0, atol=timestep_atol, err_msg=f"{name} timesteps"
    )
    assert num_model_calls(state) == len(ref.timesteps)
    assert_close(sched.init_noise_sigma(state), float(ref.init_noise_sigma), f"{name} init_noise_sigma")

    rng = np.random.default_rng(seed)
    queued = []
    if name in RANDN_MODULES:
        monkeypatch.setattr(RANDN_MODULES[name], "randn_tensor", lambda *a, **k: torch.from_numpy(queued.pop(0)))

    start = int(state.start_index)
    timesteps = ref.timesteps
    if strength < 1.0:  # diffusers' StableDiffusionImg2ImgPipeline.get_timesteps
        init_timestep = min(int(n * strength), n)
        t_start = max(n - init_timestep, 0)
        assert start == t_start * ref.order
        timesteps = ref.timesteps[t_start * ref.order :]
        if hasattr(ref, "set_begin_index"):
            ref.set_begin_index(t_start * ref.order)
        x0 = rng.standard_normal(SHAPE).astype(np.float32)
        noise = rng.standard_normal(SHAPE).astype(np.float32)
        x_ref = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), timesteps[:1]).numpy()
        x = sched.add_noise_at(state, jnp.asarray(x0), jnp.asarray(noise))
        assert_close(x, x_ref, f"{name} img2img add_noise")
    else:
        x_ref = (rng.standard_normal(SHAPE).astype(np.float32) * float(ref.init_noise_sigma)).astype(np.float32)
        x = jnp.asarray(x_ref)

    for k, t in enumerate(timesteps):
        i = start + k
        xin_ref = ref.scale_model_input(torch.from_numpy(x_ref), t).numpy()
        xin = scale(state, x, i)
        assert_close(xin, xin_ref, f"{name} n={n} scale_model_input i={i}")
        fixed = rng.standard_normal(SHAPE).astype(np.float32)
        out_ref = (0.1 * xin_ref + fixed).astype(np.float32)
        out = 0.1 * xin + fixed
        z = rng.standard_normal(SHAPE).astype(np.float32)
        queued[:] = [z]
        kw = dict(ref_step_kw or {})
        if "variance_noise" in kw:
            kw["variance_noise"] = torch.from_numpy(z)
        x_ref = ref.step(torch.from_numpy(out_ref), t, torch.from_numpy(x_ref), **kw).prev_sample.numpy()
        x, state = step(state, out, i, x, noise=jnp.asarray(z))
        assert_close(x, x_ref, f"{name} n={n} prev_sample i={i}")
    return state


@pytest.mark.parametrize("name,n", list(itertools.product(SCHEDULER_NAMES, STEP_COUNTS)))
def test_parity_v14(monkeypatch, name, n):
    if (name, n) in DIFFUSERS_CANNOT:
        with pytest.raises(ValueError):
            get_scheduler(name).create(NoiseScheduleConfig.from_diffusers_config(V14), n, SHAPE)
        pytest.skip(f"diffusers cannot: {DIFFUSERS_CANNOT[name, n]} (sd_jax raises ValueError)")
    run_parity(monkeypatch, name, n)


@pytest.mark.parametrize("name", ["ddim", "pndm", "lms", "euler", "euler_a", "dpm++2m", "dpm++2m-karras", "ddpm"])
def test_parity_v_prediction(monkeypatch, name):
    run_parity(monkeypatch, name, 7, {"prediction_type": "v_prediction"}, seed=1)


@pytest.mark.parametrize("name", ["ddim", "lms", "euler", "dpm++2m", "ddpm"])
def test_parity_sample_prediction(monkeypatch, name):
    run_parity(monkeypatch, name, 7, {"prediction_type": "sample"}, seed=2)


@pytest.mark.parametrize(
    "name,spacing", list(itertools.product(SCHEDULER_NAMES, ["leading", "linspace", "trailing"]))
)
def test_parity_timestep_spacing(monkeypatch, name, spacing):
    run_parity(monkeypatch, name, 7, {"timestep_spacing": spacing}, seed=3)


@pytest.mark.parametrize("name", ["lms", "euler"])
@pytest.mark.parametrize("n", [2, 7, 50])
def test_parity_karras_sigmas_euler_lms(monkeypatch, name, n):
    # Karras timesteps are fractional here (log-σ interpolation): equal up to float rounding.
    run_parity(monkeypatch, name, n, {"use_karras_sigmas": True}, seed=4, timestep_atol=1e-4)


@pytest.mark.parametrize("n", [4, 7, 50])
def test_parity_pndm_with_prk_steps(monkeypatch, n):
    run_parity(monkeypatch, "pndm", n, {"skip_prk_steps": False}, seed=5)


def test_pndm_prk_needs_four_steps():
    cfg = NoiseScheduleConfig(skip_prk_steps=False)
    with pytest.raises(ValueError, match="num_inference_steps >= 4"):
        get_scheduler("pndm").create(cfg, 3, SHAPE)


@pytest.mark.parametrize("n", [2, 7, 50])
def test_parity_ddim_eta(monkeypatch, n):
    run_parity(
        monkeypatch, "ddim", n, seed=6, create_kw={"eta": 0.7}, ref_step_kw={"eta": 0.7, "variance_noise": None}
    )


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
@pytest.mark.parametrize("strength", [0.3, 0.75])
def test_parity_img2img(monkeypatch, name, strength):
    run_parity(monkeypatch, name, 10, strength=strength, seed=7)


def test_img2img_start_matches_get_timesteps():
    for n, strength in itertools.product([1, 7, 50], [0.05, 0.3, 0.5, 0.999, 1.0]):
        init_timestep = min(int(n * strength), n)
        if init_timestep < 1:
            with pytest.raises(ValueError, match="strength"):
                img2img_start(n, strength)
            continue
        assert img2img_start(n, strength) == max(n - init_timestep, 0)
    with pytest.raises(ValueError, match="strength=1.5"):
        img2img_start(50, 1.5)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_jit_fori_loop_matches_eager(name):
    sched = get_scheduler(name)
    cfg = NoiseScheduleConfig.sd_v1()
    key = jax.random.PRNGKey(3)
    fixed = jax.random.normal(jax.random.PRNGKey(4), (9,) + SHAPE)

    def model_fn(x_in, t, i):
        return 0.1 * x_in + fixed[i] + 1e-4 * t.astype(jnp.float32)

    loop = jax.jit(denoise_loop, static_argnums=(0, 3))
    compiled = []
    for strength in (1.0, 0.6):  # the same compiled loop serves txt2img and img2img
        state = sched.create(cfg, 7, SHAPE, strength=strength)
        x = jax.random.normal(jax.random.PRNGKey(5), SHAPE) * sched.init_noise_sigma(state)
        got, _ = loop(sched, state, x, model_fn, key)
        step, scale = jitted(name)
        for i in range(int(state.start_index), num_model_calls(state)):
            out = model_fn(scale(state, x, i), state.timesteps[i], i)
            x, state = step(state, out, i, x, noise=_noise(key, i, x.shape))
        assert_close(got, x, f"{name} jit loop vs eager (strength {strength})")
        compiled.append(loop._cache_size())
    assert compiled[0] == compiled[1], "a new strength must not recompile the loop"


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_padded_schedule_one_compile_for_every_step_count(name):
    """pad_schedule + the traced loop end: 1, 7 and 50 steps (and img2img) run one executable,
    each equal to the unpadded schedule run eagerly."""
    sched = get_scheduler(name)
    configs = [NoiseScheduleConfig.sd_v1()]
    if name == "pndm":  # the PRK start (n + 9 calls) goes through the same executable
        configs.append(NoiseScheduleConfig.from_diffusers_config({**V14, "skip_prk_steps": False}))
    key = jax.random.PRNGKey(3)

    def model_fn(x_in, t, i):
        return 0.1 * x_in + 0.05 * jnp.cos(i.astype(jnp.float32)) + 1e-4 * jnp.asarray(t, jnp.float32)

    # A fresh function object: jax.jit's cache is shared by every jit of the same function.
    loop = jax.jit(lambda *args: denoise_loop(*args), static_argnums=(0, 3))
    step, scale = jitted(name)
    for cfg in configs:
        for n, strength in ((1, 1.0), (7, 1.0), (50, 1.0), (50, 0.5)):
            if cfg.resolved("skip_prk_steps", False) is False and n < 4:
                continue
            state = sched.create(cfg, n, SHAPE, strength=strength)
            padded = pad_schedule(sched, state, schedule_length(cfg))
            assert padded.timesteps.shape[0] == schedule_length(cfg) == 1016
            x = jax.random.normal(jax.random.PRNGKey(5), SHAPE) * sched.init_noise_sigma(state)
            got, _ = loop(sched, padded, x, model_fn, key)
            for i in range(int(state.start_index), num_model_calls(state)):
                out = model_fn(scale(state, x, i), state.timesteps[i], jnp.int32(i))
                x, state = step(state, out, i, x, noise=_noise(key, i, x.shape))
            assert_close(got, x, f"{name} padded loop, {n} steps, strength {strength}")
    assert loop._cache_size() == len(configs), "a new step count must not recompile the loop"


def test_pad_schedule_refuses_shorter_length():
    sched = get_scheduler("ddim")
    state = sched.create(NoiseScheduleConfig.sd_v1(), 50, SHAPE)
    with pytest.raises(ValueError, match="50-call schedule to 10"):
        pad_schedule(sched, state, 10)


@pytest.mark.parametrize("name", ["euler", "euler_a", "dpm++2m", "dpm++2m-karras", "lms", "pndm", "ddim"])
@pytest.mark.parametrize("n", [1, 7, 50])
def test_bf16_model_output_stays_finite(name, n):
    sched = get_scheduler(name)
    state32 = state = sched.create(NoiseScheduleConfig.sd_v1(), n, SHAPE)
    key = jax.random.PRNGKey(0)
    x = (jax.random.normal(key, SHAPE) * sched.init_noise_sigma(state)).astype(jnp.bfloat16)
    x32 = x.astype(jnp.float32)
    step, scale = jitted(name)
    for i in range(num_model_calls(state)):
        k = jax.random.fold_in(key, i)
        fixed = jax.random.normal(jax.random.fold_in(k, 1), SHAPE)
        xin = scale(state, x, i)
        assert xin.dtype == jnp.bfloat16
        out = (0.1 * xin.astype(jnp.float32) + fixed).astype(jnp.bfloat16)
        x, state = step(state, out, i, x, noise=jax.random.normal(k, SHAPE, jnp.float32))
        assert x.dtype == jnp.bfloat16
        assert bool(jnp.all(jnp.isfinite(x))), f"{name} bf16 non-finite at step {i}"
        out32 = 0.1 * scale(state32, x32, i) + fixed
        x32, state32 = step(state32, out32, i, x32, noise=jax.random.normal(k, SHAPE, jnp.float32))
    scale_ref = max(1.0, float(jnp.max(jnp.abs(x32))))
    assert float(jnp.max(jnp.abs(x.astype(jnp.float32) - x32))) < 0.1 * scale_ref


def test_stochastic_steps_take_noise_not_a_key():
    """The sampler draws each image's noise itself (sd_jax.sampling.step_noise); solvers take it as noise=."""
    sched = get_scheduler("euler_a")
    state = sched.create(NoiseScheduleConfig.sd_v1(), 7, SHAPE)
    x = jnp.ones(SHAPE)
    z = jax.random.normal(jax.random.PRNGKey(11), SHAPE, jnp.float32)
    a, _ = sched.step(state, 0.1 * x, 2, x, noise=z)
    b, _ = sched.step(state, 0.1 * x, 2, x, noise=2 * z)
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(TypeError):
        sched.step(state, 0.1 * x, 2, x, jax.random.PRNGKey(11))  # no key argument
    for name in ("euler_a", "ddpm"):
        with pytest.raises(ValueError, match="noise="):
            get_scheduler(name).step(get_scheduler(name).create(NoiseScheduleConfig.sd_v1(), 7, SHAPE), x, 0, x)
    ddim = get_scheduler("ddim")
    with pytest.raises(ValueError, match="eta"):
        ddim.step(ddim.create(NoiseScheduleConfig.sd_v1(), 7, SHAPE, eta=0.5), x, 0, x)


def test_schedule_matches_diffusers():
    for extra in ({}, {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
                  {"beta_schedule": "squaredcos_cap_v2"}):
        ref = DDPMScheduler.from_config({**V14, **extra})
        cfg = NoiseScheduleConfig.from_diffusers_config({**V14, **extra})
        np.testing.assert_allclose(schedule.betas64(cfg), ref.betas.numpy(), rtol=1e-5, atol=1e-9)
        # diffusers' float32 cumprod drifts ~1e-5 relative by t = 999; ours is float64 then float32
        np.testing.assert_allclose(alphas_cumprod(cfg), ref.alphas_cumprod.numpy(), rtol=2e-5)
    b = schedule.betas64(NoiseScheduleConfig.sd_v1())
    np.testing.assert_allclose(b, np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, rtol=0, atol=0)


def test_add_noise_and_velocity_match_ddpm():
    ref = DDPMScheduler.from_config(V14)
    cfg = NoiseScheduleConfig.from_diffusers_config(V14)
    rng = np.random.default_rng(8)
    x0 = rng.standard_normal((3, 4, 2, 2)).astype(np.float32)
    noise = rng.standard_normal((3, 4, 2, 2)).astype(np.float32)
    t = np.array([0, 500, 999])
    ac = jnp.asarray(alphas_cumprod(cfg))
    args = (torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    assert_close(train_add_noise(ac, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)),
                 ref.add_noise(*args).numpy(), "add_noise")
    assert_close(get_velocity(ac, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)),
                 ref.get_velocity(*args).numpy(), "get_velocity")
    assert_close(train_add_noise(ac, jnp.asarray(x0), jnp.asarray(noise), 250),
                 ref.add_noise(args[0], args[1], torch.tensor([250])).numpy(), "add_noise scalar t")
    assert train_add_noise(ac, jnp.asarray(x0, jnp.bfloat16), jnp.asarray(noise), jnp.asarray(t)).dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(schedule.training_target("epsilon", ac, jnp.asarray(x0), jnp.asarray(noise), t)), noise
    )


def test_dpm_karras_timesteps_match_many_step_counts():
    for n in list(range(1, 60)) + [75, 100, 150, 250, 500, 999]:
        ref, cfg = make_pair("dpm++2m-karras", n)
        state = get_scheduler("dpm++2m-karras").create(cfg, n, SHAPE)
        np.testing.assert_array_equal(np.asarray(state.timesteps), ref.timesteps.numpy(), err_msg=f"n={n}")
        assert_close(state.sigmas, ref.sigmas.numpy(), f"karras sigmas n={n}")


def test_config_from_diffusers_and_registry():
    cfg = NoiseScheduleConfig.from_diffusers_config({**V14, "some_future_key": 3})
    assert cfg == NoiseScheduleConfig.sd_v1()
    assert scheduler_name_for_config(cfg) == "pndm"
    dpm = NoiseScheduleConfig.from_diffusers_config({**V14, "_class_name": "DPMSolverMultistepScheduler",
                                                     "use_karras_sigmas": True})
    assert scheduler_name_for_config(dpm) == "dpm++2m-karras"
    # a dict without the key takes diffusers' default, per solver when the classes disagree
    bare = NoiseScheduleConfig.from_diffusers_config({"_class_name": "DDIMScheduler"})
    assert bare.beta_schedule == "linear" and bare.clip_sample is None and bare.steps_offset == 0
    assert get_scheduler("ddim").create(bare, 7).clip_sample is True
    with pytest.raises(ValueError, match="'HeunDiscreteScheduler'"):
        scheduler_name_for_config(NoiseScheduleConfig(class_name="HeunDiscreteScheduler"))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: get_scheduler("euler").create(NoiseScheduleConfig(), 0), "num_inference_steps=0"),
        (lambda: get_scheduler("ddim").create(NoiseScheduleConfig(), 1001), "num_inference_steps=1001"),
        (lambda: get_scheduler("ddim").create(NoiseScheduleConfig(), 2.5), "num_inference_steps=2.5"),
        (lambda: get_scheduler("heun"), "'heun'.*ddim, pndm, lms, euler, euler_a, dpm\\+\\+2m"),
        (lambda: NoiseScheduleConfig(beta_schedule="cosine"), "beta_schedule='cosine'.*scaled_linear"),
        (lambda: NoiseScheduleConfig(prediction_type="eps"), "prediction_type='eps'"),
        (lambda: NoiseScheduleConfig(timestep_spacing="uniform"), "timestep_spacing='uniform'"),
        (lambda: NoiseScheduleConfig.from_diffusers_config({**V14, "beta_schedule": "sigmoid"}), "'sigmoid'"),
        (lambda: NoiseScheduleConfig.from_diffusers_config({**V14, "thresholding": True}), "thresholding=True"),
        (lambda: get_scheduler("euler").create(NoiseScheduleConfig(), 10, strength=2.0), "strength=2.0"),
        (lambda: get_scheduler("ddim").create(NoiseScheduleConfig(), 10, eta=1.5), "eta=1.5"),
        (lambda: get_scheduler("pndm").create(NoiseScheduleConfig(prediction_type="sample"), 10, SHAPE), "'sample'"),
        (lambda: get_scheduler("lms").create(NoiseScheduleConfig(), 10), "shape"),
    ],
)
def test_bad_values_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()
