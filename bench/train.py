"""Dreambooth train step, full-size SD v1.4 UNet: sd_jax against a PyTorch step of the same loss.

The step: 1 instance + 1 class example (batch 2), the text encoder frozen with cached
embeddings (2 x 77 x 768), VAE posteriors cached (sampled in the step), the whole UNet
training with AdamW (lr 5e-6, weight decay 0.01) and global-norm clipping 1.0; loss =
mse(instance) + 1.0 * mse(prior), t uniform in [0, 1000), fresh noise every step.

sd_jax: ``sd_jax.dreambooth.step`` (jitted, state donated), in three settings: fp32,
bf16 (bf16 compute, fp32 master weights and Adam state), bf16 + remat. Reference:
diffusers' ``UNet2DConditionModel`` in train mode, ``torch.optim.AdamW``, fp32, the loss of
diffusers' train_dreambooth.py. Random weights (speed does not depend on them), written
once as a diffusers folder; every implementation/setting runs in its own process so each
peak memory is its own. Reported per setting: seconds per step (median of ``--steps``
after ``--warmup`` steps), the resident memory once the training state is built, the peak
resident memory while stepping (``VmHWM``, reset after set-up), and for sd_jax the compile
time and XLA's own estimate of the step's memory (arguments + outputs + temporaries -
aliased, which is what a GPU/TPU would need on the device).

    python bench/train.py                    # 256x256 images (32x32 latents)
    python bench/train.py --resolution 512   # 64x64 latents: needs ~20 GB of RAM per process
    python bench/train.py --unet small       # a small UNet: checks the script in a minute
    python bench/train.py --estimate --resolution 512 [--fsdp 8]   # XLA's memory estimate only

``--lora-rank R`` (with ``--lora-base-dtype``, ``--lora-targets``) adds LoRA Dreambooth beside each
setting: rank-R adapters train (float32, with their AdamW state) over the frozen UNet stored in the
base dtype. Each setting then runs twice in the same invocation, full fine-tune and LoRA, and the
table gives LoRA / full (s/step, peak memory, XLA estimate) and the adapters' size; the PyTorch
reference stays the full fine-tune.

    python bench/train.py --resolution 512 --settings bf16 --skip-torch --lora-rank 4   # s/step, LoRA vs full
    python bench/train.py --estimate --resolution 512 --lora-rank 4 --lora-base-dtype bfloat16

``--estimate`` compiles the sd_jax step for each setting without allocating anything and prints
XLA's memory estimate per device (on ``--fsdp N`` host devices: the step of a mesh data=1 x
fsdp=N, the batch padded to N rows as the trainer pads it). It needs no weights and little RAM, so
it answers "does a 512² step fit" on a machine too small to run it; the figures are XLA:CPU's
buffer assignment, a guide to (not a measurement of) GPU/TPU memory.

A worker is skipped, with a line saying so, when the machine has less available memory than
it is estimated to need (``--min-free-gib`` overrides the estimate).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

from common import V14_UNET_CONFIG, available_gib, table

ROOT = Path(__file__).resolve().parent.parent
SMALL_UNET_CONFIG = {**V14_UNET_CONFIG, "block_out_channels": [64, 128, 128, 128], "layers_per_block": 1}
SETTINGS = {"fp32": ("float32", False), "bf16": ("bfloat16", False), "bf16-remat": ("bfloat16", True),
            "fp32-remat": ("float32", True)}
LR, WEIGHT_DECAY, MAX_GRAD_NORM, PRIOR_WEIGHT, SCALE = 5e-6, 0.01, 1.0, 1.0, 0.18215


# ----------------------------------------------------------------------------- memory

def _status_gib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next peak is the stepping's own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


# ----------------------------------------------------------------------------- inputs

def prepare(work: Path, unet_name: str, resolution: int) -> None:
    """Random UNet weights as a diffusers folder and the cached inputs (in a child process)."""
    folder = work / f"unet-{unet_name}"
    if not (folder / "config.json").exists():
        import torch
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        config = V14_UNET_CONFIG if unet_name == "v1.4" else SMALL_UNET_CONFIG
        UNet2DConditionModel(**config).save_pretrained(folder, safe_serialization=True)
    import numpy as np

    h = resolution // 8
    rng = np.random.default_rng(0)
    np.savez(work / f"inputs-{resolution}.npz",
             latent_mean=rng.standard_normal((2, h, h, 4)).astype(np.float32),
             latent_logvar=rng.uniform(-4, -2, (2, h, h, 4)).astype(np.float32),
             text_embeddings=rng.standard_normal((2, 77, 768)).astype(np.float32),
             prior_mask=np.array([0, 1], np.float32))


# ----------------------------------------------------------------------------- workers

def timed_steps(step, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def torch_worker(job: dict) -> dict:
    """diffusers UNet + torch AdamW: train_dreambooth.py's loss with prior preservation."""
    import numpy as np
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(job["folder"]).train()
    if job["remat"]:
        unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(unet.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    data = np.load(job["inputs"])
    mean = torch.from_numpy(data["latent_mean"].transpose(0, 3, 1, 2).copy())
    std = torch.exp(0.5 * torch.from_numpy(data["latent_logvar"].transpose(0, 3, 1, 2).copy()))
    emb = torch.from_numpy(data["text_embeddings"])
    losses = []

    def step():
        latents = (mean + std * torch.randn_like(mean)) * SCALE
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],))
        pred = unet(sched.add_noise(latents, noise, t), t, emb, return_dict=False)[0]
        pred, pred_prior = torch.chunk(pred, 2, dim=0)
        target, target_prior = torch.chunk(noise, 2, dim=0)
        loss = torch.nn.functional.mse_loss(pred.float(), target.float()) + PRIOR_WEIGHT * \
            torch.nn.functional.mse_loss(pred_prior.float(), target_prior.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    setup_rss = _status_gib("VmRSS")
    reset_peak()
    times = timed_steps(step, job["warmup"], job["steps"])
    return {"times": times, "setup_rss": setup_rss, "step_peak": _status_gib("VmHWM"),
            "losses": losses, "threads": torch.get_num_threads(), "version": torch.__version__}


def load_unet_params(folder: Path, model, sharding):
    """diffusers safetensors -> sd_jax parameter tree on the device, one tensor at a time."""
    import jax
    import jax.numpy as jnp
    from safetensors import safe_open

    from sd_jax.convert.core import (
        flatten_tree,
        flax_path_to_torch_name,
        torch_to_flax_array,
        unflatten_tree,
    )
    from sd_jax.pipeline import param_shapes

    shapes = param_shapes(model, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1, 768)))
    out = {}
    with safe_open(str(folder / "diffusion_pytorch_model.safetensors"), framework="numpy") as f:
        for path, spec in flatten_tree(shapes).items():
            array = torch_to_flax_array(f.get_tensor(flax_path_to_torch_name(path)), path[-1], tuple(spec.shape))
            out[path] = jax.device_put(array.astype("float32"), sharding)
            del array
    return unflatten_tree(out)


def lora_split(cfg, unet_params) -> tuple[dict, dict]:
    """(trainable, frozen) of the step: the whole UNet trains, or (``cfg.lora.enabled``) adapters over the
    frozen UNet in the base dtype. ``unet_params`` may be arrays or ShapeDtypeStructs."""
    import jax
    import jax.numpy as jnp

    from sd_jax.dreambooth import lora

    if not cfg.lora.enabled:
        return {"unet": unet_params}, {}
    base = lora.STORAGE_DTYPES[cfg.lora.base_dtype]
    adapters = lora.init_adapters("unet", unet_params, cfg.lora.targets, cfg.lora.rank, cfg.seed)
    cast = (lambda x: jax.ShapeDtypeStruct(x.shape, base)) if isinstance(
        jax.tree.leaves(unet_params)[0], jax.ShapeDtypeStruct) else (lambda x: x.astype(base))
    return {"unet": adapters}, {"unet": jax.tree.map(cast, unet_params) if base != jnp.float32 else unet_params}


def lora_section(job: dict) -> dict:
    """The config's lora section of a job (off without ``lora_rank``)."""
    if not job.get("lora_rank"):
        return {}
    return {"enabled": True, "rank": job["lora_rank"], "base_dtype": job["lora_base_dtype"],
            "targets": job["lora_targets"]}


def jax_worker(job: dict) -> dict:
    """sd_jax's jitted Dreambooth step on one device."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import sd_jax  # noqa: F401  (XLA:CPU defaults before the backend starts)
    from sd_jax.dreambooth.config import TrainConfig
    from sd_jax.dreambooth.optim import make_optimizer
    from sd_jax.dreambooth.step import StepModels, init_train_state, make_train_step
    from sd_jax.memory import compiled_peak_bytes
    from sd_jax.models.unet import UNet2DConditionModel, UNetConfig
    from sd_jax.schedulers import NoiseScheduleConfig, alphas_cumprod
    from sd_jax.sharding import host_local_batch_to_global, make_mesh, replicated

    cfg = TrainConfig.from_dict({
        "data": {"cache_latents": True, "cache_text_embeddings": True},
        "train": {"mixed_precision": job["dtype"], "remat": job["remat"], "prior_loss_weight": PRIOR_WEIGHT},
        "optim": {"learning_rate": LR, "weight_decay": WEIGHT_DECAY, "max_grad_norm": MAX_GRAD_NORM},
        "lora": lora_section(job)})
    unet_cfg = UNetConfig.from_diffusers(json.loads((Path(job["folder"]) / "config.json").read_text()))
    compute = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[job["dtype"]]
    unet = UNet2DConditionModel(unet_cfg, dtype=compute, param_dtype=jnp.float32, remat=job["remat"])
    models = StepModels(unet=unet, text_encoder=None, vae=None,
                        alphas_cumprod=alphas_cumprod(NoiseScheduleConfig.sd_v1()), prediction_type="epsilon",
                        scaling_factor=SCALE)
    mesh = make_mesh(devices=jax.devices()[:1])
    trainable, frozen = lora_split(cfg, load_unet_params(Path(job["folder"]), unet, replicated(mesh)))
    optimizer = make_optimizer(cfg, trainable)
    state = init_train_state(trainable, optimizer, mesh, cfg, donate=not cfg.lora.enabled)
    del trainable
    train_step = make_train_step(models, cfg, optimizer, mesh, state, frozen)
    data = dict(np.load(job["inputs"]))
    batch = host_local_batch_to_global(data, mesh)
    start = time.perf_counter()
    compiled = train_step.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - start
    peak = compiled_peak_bytes(compiled)
    xla_gib = None if peak is None else peak / 2**30
    losses = []
    holder = {"state": state}
    del state

    def step():
        holder["state"], metrics = compiled(holder["state"], frozen, batch)
        jax.block_until_ready((holder["state"], metrics))
        losses.append(float(metrics["loss"]))

    n_adapter = sum(x.size for x in jax.tree.leaves(holder["state"].params)) if cfg.lora.enabled else 0
    setup_rss = _status_gib("VmRSS")
    reset_peak()
    times = timed_steps(step, job["warmup"], job["steps"])
    return {"times": times, "setup_rss": setup_rss, "step_peak": _status_gib("VmHWM"), "losses": losses,
            "compile_s": compile_s, "xla_gib": xla_gib, "version": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "adapter_params": n_adapter}


# ----------------------------------------------------------------------------- driver

def estimate_worker(job: dict) -> dict:
    """Compile-only: XLA's memory estimate of the sd_jax step on a data=1 x fsdp=N mesh."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import sd_jax  # noqa: F401
    from sd_jax.dreambooth.config import TrainConfig
    from sd_jax.dreambooth.optim import make_optimizer
    from sd_jax.dreambooth.step import StepModels, abstract_train_state, make_train_step
    from sd_jax.memory import compiled_peak_bytes
    from sd_jax.models.unet import UNet2DConditionModel, UNetConfig
    from sd_jax.pipeline import param_shapes
    from sd_jax.schedulers import NoiseScheduleConfig, alphas_cumprod
    from sd_jax.sharding import BATCH_AXES, abstract, make_mesh, tree_shardings

    fsdp = job["fsdp"]
    cfg = TrainConfig.from_dict({
        "data": {"cache_latents": True, "cache_text_embeddings": True},
        "train": {"mixed_precision": job["dtype"], "remat": job["remat"]}, "mesh": {"data": 1, "fsdp": fsdp},
        "lora": lora_section(job)})
    config = V14_UNET_CONFIG if job["unet"] == "v1.4" else SMALL_UNET_CONFIG
    compute = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[job["dtype"]]
    unet = UNet2DConditionModel(UNetConfig.from_diffusers(config), dtype=compute, param_dtype=jnp.float32,
                                remat=job["remat"])
    models = StepModels(unet=unet, text_encoder=None, vae=None,
                        alphas_cumprod=alphas_cumprod(NoiseScheduleConfig.sd_v1()), prediction_type="epsilon",
                        scaling_factor=SCALE)
    mesh = make_mesh(data=1, fsdp=fsdp, devices=jax.devices()[:fsdp])
    shapes = {"unet": param_shapes(unet, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32),
                                   jnp.zeros((1, 1, 768)))}
    trainable, frozen = lora_split(cfg, shapes["unet"])
    optimizer = make_optimizer(cfg, trainable)
    state = abstract_train_state(trainable, optimizer, mesh, cfg)
    frozen = abstract(frozen, tree_shardings(frozen, mesh, cfg.mesh.fsdp_min_size))
    rows, h = max(2, fsdp), job["resolution"] // 8
    rows_sharding = NamedSharding(mesh, P(BATCH_AXES))
    spec = lambda *shape: jax.ShapeDtypeStruct((rows, *shape), jnp.float32, sharding=rows_sharding)
    batch = {"latent_mean": spec(h, h, 4), "latent_logvar": spec(h, h, 4), "text_embeddings": spec(77, 768),
             "prior_mask": spec(), "valid": spec()}
    start = time.perf_counter()
    compiled = make_train_step(models, cfg, optimizer, mesh, state, frozen).lower(state, frozen, batch).compile()
    mem, g = compiled.memory_analysis(), 2**30
    n_adapter = sum(x.size for x in jax.tree.leaves(trainable)) if cfg.lora.enabled else 0
    return {"compile_s": time.perf_counter() - start, "args": mem.argument_size_in_bytes / g,
            "temp": mem.temp_size_in_bytes / g, "total": compiled_peak_bytes(compiled) / g,
            "adapter_params": n_adapter}


def run_estimates(args) -> None:
    """--estimate: one compile-only process per setting; a table of XLA's per-device estimates."""
    from common import machine

    rows = []
    kinds = [False, True] if args.lora_rank else [False]  # LoRA: beside the full fine-tune of each setting
    for s, with_lora in [(s, k) for s in args.settings for k in kinds]:
        dtype, remat = SETTINGS[s]
        tag, lora_job = (_lora_tag(args), _lora_job(args)) if with_lora else ("", {})
        job = {"name": f"estimate-{s}-fsdp{args.fsdp}{tag}", "impl": "estimate", "dtype": dtype,
               "remat": remat, "fsdp": args.fsdp, "resolution": args.resolution, "unet": args.unet, **lora_job}
        work = args.dir or Path(tempfile.mkdtemp(prefix="sd_jax_bench_train_"))
        work.mkdir(parents=True, exist_ok=True)
        r = run_worker(job, work, args.timeout,
                       env={**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.fsdp}"})
        print(f"  {job['name']}: {r}", flush=True)
        what = f"step {args.resolution}², {s}{_lora_tag(args, ', ') if with_lora else ''}, fsdp={args.fsdp}"
        if "total" in r:
            rows.append((f"{what}: XLA memory per device",
                         f"{r['total']:.2f} GiB (state {r['args']:.2f} + temporaries {r['temp']:.2f})", "", ""))
            if r.get("adapter_params"):  # float32 adapters: the PEFT file's size, give or take its header
                rows.append((f"{what}: adapters", f"{r['adapter_params'] / 1e6:.2f} M parameters, "
                             f"{r['adapter_params'] * 4 / 2**20:.1f} MiB as float32", "", ""))
        else:
            rows.append((what, r["error"], "", ""))
    print()
    print(f"machine: {machine()}; UNet {args.unet}; batch 1 instance + 1 class"
          f"{f' padded to {args.fsdp} rows' if args.fsdp > 2 else ''}; AdamW float32 state; compile only "
          f"(XLA:CPU buffer assignment)")
    print(table(rows, header=("figure", "sd_jax", "", "")))


def _lora_job(args) -> dict:
    return ({"lora_rank": args.lora_rank, "lora_base_dtype": args.lora_base_dtype, "lora_targets": args.lora_targets}
            if args.lora_rank else {})


def _lora_tag(args, sep: str = "-") -> str:
    if not args.lora_rank:
        return ""
    return f"{sep}lora{'' if sep == '-' else ' '}r{args.lora_rank}{sep}{args.lora_base_dtype}{sep}" \
           f"{'+'.join(args.lora_targets)}"


def need_gib(n_params: int, resolution: int, remat: bool, dtype: str) -> float:
    """Rough RSS a worker needs: weights, grads, 2 Adam moments (+ a bf16 copy) + activations."""
    state = n_params * 4 * 4 / 2**30 + (n_params * 2 / 2**30 if dtype == "bfloat16" else 0)
    acts = (resolution / 256) ** 2 * (0.5 if remat else 1.5) * n_params / 860e6
    return state + acts + 1.0


def run_worker(job: dict, work: Path, timeout: int, env: dict | None = None) -> dict:
    path = work / f"job-{job['name']}.json"
    path.write_text(json.dumps(job))
    out = work / f"result-{job['name']}.json"
    out.unlink(missing_ok=True)
    env = {**(env or os.environ), "SD_JAX_COMPILATION_CACHE": "0"}  # compile times are first compiles
    proc = subprocess.run([sys.executable, __file__, "--worker", str(path), "--result", str(out)],
                          capture_output=True, text=True, timeout=timeout, check=False, env=env)
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stdout + proc.stderr)[-1500:]
        return {"error": f"exit {proc.returncode}" + (" (killed: out of memory?)" if proc.returncode in (-9, 137)
                                                     else ""), "log": tail}
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=256, choices=(256, 512))
    parser.add_argument("--unet", default="v1.4", choices=("v1.4", "small"))
    parser.add_argument("--settings", nargs="+", default=["fp32", "bf16", "bf16-remat"], choices=sorted(SETTINGS))
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--min-free-gib", type=float, default=None)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per worker")
    parser.add_argument("--estimate", action="store_true", help="XLA's memory estimate only (compile, no run)")
    parser.add_argument("--fsdp", type=int, default=1, help="with --estimate: a data=1 x fsdp=N mesh of host devices")
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA Dreambooth at this rank (0: full fine-tune)")
    parser.add_argument("--lora-base-dtype", default="bfloat16", choices=("float32", "bfloat16"),
                        help="with --lora-rank: storage of the frozen UNet")
    parser.add_argument("--lora-targets", nargs="+", default=["attention"], choices=("attention", "proj", "ff", "conv"),
                        help="with --lora-rank: the adapted layer groups")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        job = json.loads(Path(args.worker).read_text())
        result = {"torch": torch_worker, "jax": jax_worker, "estimate": estimate_worker}[job["impl"]](job)
        result["overall_peak"] = _status_gib("VmHWM")
        Path(args.result).write_text(json.dumps(result))
        return

    if args.estimate:
        run_estimates(args)
        return
    work = args.dir or Path(tempfile.mkdtemp(prefix="sd_jax_bench_train_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"preparing random {args.unet} UNet weights and inputs in {work} ...", flush=True)
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); from train import prepare; "
            f"from pathlib import Path; prepare(Path({str(work)!r}), {args.unet!r}, {args.resolution})")
    subprocess.run([sys.executable, "-c", code], check=True)  # torch's memory is freed with the process
    folder = work / f"unet-{args.unet}"
    n_params = int(os.path.getsize(folder / "diffusion_pytorch_model.safetensors") / 4)  # float32 weights
    jobs = []
    if not args.skip_torch:
        jobs.append({"name": "torch-fp32", "impl": "torch", "dtype": "float32", "remat": False})
    for s in args.settings:
        dtype, remat = SETTINGS[s]
        jobs.append({"name": f"sd_jax-{s}", "impl": "jax", "dtype": dtype, "remat": remat})
        if args.lora_rank:  # the same setting with LoRA, right after its full fine-tune
            jobs.append({"name": f"sd_jax-{s}{_lora_tag(args)}", "impl": "jax", "dtype": dtype, "remat": remat,
                         **_lora_job(args)})
    results = {}
    for job in jobs:
        job.update(folder=str(folder), inputs=str(work / f"inputs-{args.resolution}.npz"), steps=args.steps,
                   warmup=args.warmup)
        need = args.min_free_gib or need_gib(n_params, args.resolution, job["remat"], job["dtype"])
        free = available_gib()
        if free < need:
            results[job["name"]] = {"error": f"skipped: {free:.1f} GiB available, ~{need:.1f} GiB needed"}
            print(job["name"], results[job["name"]]["error"], flush=True)
            continue
        print(f"running {job['name']} ({free:.1f} GiB available, ~{need:.1f} GiB estimated) ...", flush=True)
        results[job["name"]] = run_worker(job, work, args.timeout)
        r = results[job["name"]]
        print(f"  {job['name']}: " + (f"{statistics.median(r['times']):.2f} s/step, step peak "
                                      f"{r['step_peak']:.1f} GiB, losses {[round(x, 4) for x in r['losses']]}"
                                      if "times" in r else f"{r['error']}\n{r.get('log', '')}"), flush=True)
    print_table(results, args, n_params)


def lora_rows(args, setting: str, lora_r: dict, full: dict) -> list[tuple[str, str, str, str]]:
    """LoRA against the full fine-tune of the same setting, measured in the same invocation."""
    what = f"step {args.resolution}², {setting}"
    t_lora, t_full = statistics.median(lora_r["times"]), statistics.median(full["times"])
    rows = [(f"{what}: LoRA / full fine-tune, s/step", f"{t_lora:.2f} / {t_full:.2f} s", "", f"{t_lora / t_full:.2f}"),
            (f"{what}: LoRA / full fine-tune, peak RSS stepping", f"{lora_r['step_peak']:.1f} / "
             f"{full['step_peak']:.1f} GiB", "", f"{lora_r['step_peak'] / full['step_peak']:.2f}")]
    if lora_r.get("xla_gib") and full.get("xla_gib"):
        rows.append((f"{what}: LoRA / full fine-tune, XLA memory estimate",
                     f"{lora_r['xla_gib']:.2f} / {full['xla_gib']:.2f} GiB", "",
                     f"{lora_r['xla_gib'] / full['xla_gib']:.2f}"))
    n = lora_r["adapter_params"]  # float32 adapters: the PEFT file's size, give or take its header
    rows.append((f"{what}: adapters", f"{n / 1e6:.2f} M parameters, {n * 4 / 2**20:.1f} MiB as float32", "", ""))
    return rows


def print_table(results: dict, args, n_params: int) -> None:
    from common import machine

    def fmt_time(r):
        return f"{statistics.median(r['times']):.2f} s" if "times" in r else r["error"]

    ref = results.get("torch-fp32", {})
    rows = []
    for name, r in results.items():
        if name == "torch-fp32":
            continue
        setting = name.removeprefix("sd_jax-")
        ratio = (f"{statistics.median(r['times']) / statistics.median(ref['times']):.2f}"
                 if "times" in r and "times" in ref else "-")
        rows.append((f"step {args.resolution}², {setting}: s/step", fmt_time(r), fmt_time(ref) if ref else "-", ratio))
        if "times" in r:
            mem_ratio = f"{r['step_peak'] / ref['step_peak']:.2f}" if "times" in ref else "-"
            rows.append((f"step {args.resolution}², {setting}: peak RSS stepping (after set-up)",
                         f"{r['step_peak']:.1f} GiB", f"{ref['step_peak']:.1f} GiB" if "times" in ref else "-",
                         mem_ratio))
            rows.append((f"step {args.resolution}², {setting}: RSS after set-up / process peak",
                         f"{r['setup_rss']:.1f} / {r['overall_peak']:.1f} GiB",
                         f"{ref['setup_rss']:.1f} / {ref['overall_peak']:.1f} GiB" if "times" in ref else "-", ""))
            xla = f"{r['xla_gib']:.1f} GiB" if r.get("xla_gib") is not None else "n/a"
            rows.append((f"step {args.resolution}², {setting}: compile / XLA memory estimate",
                         f"{r['compile_s']:.0f} s / {xla}", "", ""))
            full = results.get(name.removesuffix(_lora_tag(args)), {}) if args.lora_rank else {}
            if r.get("adapter_params") and "times" in full:
                rows += lora_rows(args, setting, r, full)
    print()
    jax_info = next((r for n, r in results.items() if n != "torch-fp32" and "times" in r), {})
    print(f"machine: {machine()}; torch {ref.get('version', '?')} ({ref.get('threads', '?')} threads); "
          f"XLA_FLAGS={jax_info.get('xla_flags', '')!r}; UNet {args.unet} ({n_params / 1e6:.0f} M parameters), "
          f"batch 1 instance + 1 class, AdamW; medians of {args.steps} steps after {args.warmup} warm-up; "
          f"reference = torch fp32; ratio = sd_jax / torch (< 1: sd_jax faster / smaller)"
          + ("; LoRA rows: ratio = LoRA / sd_jax's full fine-tune of the same setting" if args.lora_rank else ""))
    print(table(rows))


if __name__ == "__main__":
    main()
