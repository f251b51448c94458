"""The device benchmark: sd_jax against diffusers (PyTorch) on one GPU or TPU, one command, <= 8 minutes.

    python bench/accelerator.py                  # full size: SD v1.4 architecture, 512^2, random weights
    python bench/accelerator.py --tiny           # the same code path at tiny sizes (the CPU check, ~1-2 min)

Writes ``bench/results/<device>-<date>.json`` and ``.md`` (a table, goals of issue 12 item 5 marked
met or not), updated after every phase, so a run cut short still leaves its figures. Downloads
nothing: the model is built from random weights by the PyTorch worker (same weights for both).

Two worker processes stay up for the whole run, one per framework (their CUDA libraries never
share a process), driven by this parent over pipes; timed calls alternate sd_jax, diffusers,
sd_jax, diffusers... and medians are quoted. Phases, in order (a phase that would not fit the
remaining ``--budget-s`` is skipped and says so):

1. build      diffusers writes the random model folder (UNet, VAE, CLIP text, tokenizer, PNDM config).
2. train      Dreambooth step at the image size: instance + class (batch 2), cached latents and text
              embeddings, bf16 compute, fp32 master weights, AdamW, clipping 1.0. sd_jax's jitted
              step against the PyTorch step of bench/train.py (under bf16 autocast on the device):
              s/step and peak device memory (the worker's peak minus what it held before).
              First in each worker, so the peak is the step's own.
3. parity     UNet eps on the same latents/timesteps/text: sd_jax fp32 and bf16 vs diffusers fp32
              (max |err| / max |ref|).
4. image b1   text -> image, PNDM 50 steps, CFG 7.5, batch 1: s/image; sd_jax's first call (cold:
              fresh persistent cache) minus a steady call is the compile time.
5. dpm image  DPM++ 2M 25 steps, sd_jax bf16 vs diffusers fp16: time, mean/max pixel difference.
6. attention  4096 tokens (B=2, H=8, D=40) forward + backward: cudnn, xla, blocked, naive (bf16, fp32).
7. batch 8, batch 32   images/s (PNDM 50), cold compile of each shape.
8. 2nd process  a new sd_jax process on the same compilation cache: start -> first image, and the
              cached compile (first call minus steady call).

sd_jax runs in bfloat16 (the UNet's fp32 copy only for parity), diffusers in float16 with SDPA
(its default attention on torch >= 2; float32 when PyTorch is on a CPU, as in --tiny here).
Every figure that compares is a ratio measured in this run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE = 7.5
LR, WEIGHT_DECAY, MAX_GRAD_NORM, SCALE = 5e-6, 0.01, 1.0, 0.18215

# Full size: the SD v1.4 architecture (bench/common.py's configs); tiny: the same code on toy sizes.
SIZES = {
    "full": dict(image=512, pndm_steps=50, dpm_steps=25, batches=(8, 32), train_steps=5, repeats=3,
                 attention_tokens=4096, attention_repeats=5),
    "tiny": dict(image=64, pndm_steps=50, dpm_steps=25, batches=(8, 32), train_steps=3, repeats=2,
                 attention_tokens=256, attention_repeats=2),
}
# Rough seconds each phase needs on an H200 (compiles included), to skip what cannot fit.
PHASE_SECONDS = {"train": 120, "parity": 50, "image b1": 60, "dpm image": 50, "attention": 30,
                 "batch 8": 60, "batch 32": 120, "2nd process": 60}
GOALS = {  # issue 12 item 5, on one H200
    "image_b1_s": 0.45, "image_b1_ratio": 0.7, "images_per_s": 4.0, "train_ratio": 0.8,
    "compile_cold_s": 30.0, "compile_cached_s": 3.0,
}

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                 attention_head_dim=4, norm_num_groups=8)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                block_out_channels=(8, 16, 16, 16), norm_num_groups=8, sample_size=64,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
TINY_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                 projection_dim=32)
V14_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, act_fn="silu", layers_per_block=2,
               block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=512,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
V14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                layer_norm_eps=1e-5, projection_dim=768)
V14_SCHEDULER = dict(beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, clip_sample=False,
                     num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
                     trained_betas=None)


def initial_latents(batch: int, size: int, seed: int = 1234):
    """The unit-variance starting noise both implementations get, NHWC (batch, h, w, 4)."""
    import numpy as np

    return np.random.default_rng(seed).standard_normal((batch, size // 8, size // 8, 4), dtype=np.float32)


def train_inputs(size: int, width: int) -> dict:
    """Cached Dreambooth inputs: posterior mean/logvar (2, h, w, 4), text embeddings, prior mask."""
    import numpy as np

    h, rng = size // 8, np.random.default_rng(0)
    return dict(latent_mean=rng.standard_normal((2, h, h, 4)).astype(np.float32),
                latent_logvar=rng.uniform(-4, -2, (2, h, h, 4)).astype(np.float32),
                text_embeddings=rng.standard_normal((2, 77, width)).astype(np.float32),
                prior_mask=np.array([0, 1], np.float32))


def parity_inputs(size: int, width: int) -> dict:
    """UNet inputs for the parity check: batch 2 (as CFG), timesteps 10 and 981."""
    import numpy as np

    rng = np.random.default_rng(7)
    return dict(latents=rng.standard_normal((2, size // 8, size // 8, 4)).astype(np.float32),
                timesteps=np.array([10, 981], np.int32),
                text=rng.standard_normal((2, 77, width)).astype(np.float32))


# ============================================================================ the sd_jax worker
class JaxWorker:
    """sd_jax on the default JAX device (bf16 pipeline; fp32 UNet for parity)."""

    def __init__(self, t_spawn: float):
        import jax

        import sd_jax  # noqa: F401  (persistent compilation cache; XLA:CPU defaults)

        self.jax = jax
        self.t_spawn = t_spawn
        self.device = jax.devices()[0]
        self.pipes = {}

    def _mem(self) -> dict:
        stats = self.device.memory_stats() or {}
        return {k: stats.get(k) for k in ("bytes_in_use", "peak_bytes_in_use")}

    def info(self) -> dict:
        jax = self.jax
        return {"jax": jax.__version__, "backend": jax.default_backend(), "device_kind": self.device.device_kind,
                "devices": jax.device_count(), "cache": str(jax.config.jax_compilation_cache_dir),
                "since_spawn_s": time.time() - self.t_spawn}

    def load(self, folder: str) -> dict:
        """The pipeline in float32 (parity) and bfloat16 (everything else) from one folder."""
        import dataclasses

        import jax.numpy as jnp

        from sd_jax import StableDiffusion

        t = time.perf_counter()
        fp32 = StableDiffusion.from_pretrained(folder, safety_checker=False)
        bf16 = jnp.bfloat16
        low = dataclasses.replace(
            fp32, text_encoder=fp32.text_encoder.clone(dtype=bf16, param_dtype=bf16),
            unet=fp32.unet.clone(dtype=bf16, param_dtype=bf16), vae=fp32.vae.clone(dtype=bf16, param_dtype=bf16),
            params=self.jax.tree.map(lambda a: a.astype(bf16), fp32.params))
        self.jax.block_until_ready(low.params)
        self.pipes = {"float32": fp32, "bfloat16": low}
        return {"load_s": time.perf_counter() - t, "since_spawn_s": time.time() - self.t_spawn}

    def train(self, folder: str, size: int, steps: int, warmup: int) -> dict:
        """sd_jax's jitted Dreambooth step (bench/train.py's jax_worker, on the device)."""
        import jax
        import jax.numpy as jnp

        from sd_jax.dreambooth.config import TrainConfig
        from sd_jax.dreambooth.optim import make_optimizer
        from sd_jax.dreambooth.step import StepModels, init_train_state, make_train_step
        from sd_jax.models.unet import UNet2DConditionModel, UNetConfig
        from sd_jax.schedulers import NoiseScheduleConfig, alphas_cumprod
        from sd_jax.sharding import host_local_batch_to_global, make_mesh, replicated

        before = self._mem()
        unet_cfg = UNetConfig.from_diffusers(json.loads((Path(folder) / "unet" / "config.json").read_text()))
        cfg = TrainConfig.from_dict({
            "data": {"cache_latents": True, "cache_text_embeddings": True},
            "train": {"mixed_precision": "bfloat16", "remat": False, "prior_loss_weight": 1.0},
            "optim": {"learning_rate": LR, "weight_decay": WEIGHT_DECAY, "max_grad_norm": MAX_GRAD_NORM}})
        unet = UNet2DConditionModel(unet_cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32)
        models = StepModels(unet=unet, text_encoder=None, vae=None,
                            alphas_cumprod=alphas_cumprod(NoiseScheduleConfig.sd_v1()), prediction_type="epsilon",
                            scaling_factor=SCALE)
        mesh = make_mesh(devices=jax.devices()[:1])
        trainable = {"unet": _load_unet(Path(folder) / "unet", unet, replicated(mesh))}
        optimizer = make_optimizer(cfg, trainable)
        state = init_train_state(trainable, optimizer, mesh, cfg, donate=True)
        del trainable
        train_step = make_train_step(models, cfg, optimizer, mesh, state, {})
        batch = host_local_batch_to_global(train_inputs(size, unet_cfg.cross_attention_dim), mesh)
        t = time.perf_counter()
        compiled = train_step.lower(state, {}, batch).compile()
        compile_s = time.perf_counter() - t
        analysis = compiled.memory_analysis()
        xla_gib = None if analysis is None else (
            analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
            - analysis.alias_size_in_bytes) / 2**30
        holder, losses, times = {"state": state}, [], []
        del state
        for i in range(warmup + steps):
            t = time.perf_counter()
            holder["state"], metrics = compiled(holder["state"], {}, batch)
            losses.append(float(metrics["loss"]))  # waits for the step
            if i >= warmup:
                times.append(time.perf_counter() - t)
        after = self._mem()
        del holder, compiled
        peak = None
        if after.get("peak_bytes_in_use") is not None:
            peak = (after["peak_bytes_in_use"] - (before.get("bytes_in_use") or 0)) / 2**30
        return {"times": times, "compile_s": compile_s, "peak_gib": peak, "xla_estimate_gib": xla_gib,
                "losses": losses}

    def unet_parity(self, inputs: str, out: str) -> dict:
        """eps of the fp32 and bf16 UNets on the parity inputs -> ``out`` (npz)."""
        import numpy as np

        x = dict(np.load(inputs))
        eps, times = {}, {}
        for dtype, pipe in self.pipes.items():
            pipe.predict_noise(x["latents"], x["timesteps"], x["text"]).block_until_ready()  # compile
            t = time.perf_counter()
            eps[dtype] = np.asarray(pipe.predict_noise(x["latents"], x["timesteps"], x["text"]), np.float32)
            times[dtype] = time.perf_counter() - t
        np.savez(out, **eps)
        return {"unet_call_s": times}

    def generate(self, solver: str, steps: int, batch: int, size: int, save: str | None = None) -> dict:
        """One timed ``generate`` call of the bf16 pipeline (prompt in, float images out)."""
        import numpy as np

        t = time.perf_counter()
        result = self.pipes["bfloat16"].generate(
            PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=GUIDANCE, scheduler=solver,
            seed=0, num_images_per_prompt=batch, latents=initial_latents(batch, size))
        seconds = time.perf_counter() - t
        if save:
            np.save(save, result.array)
        return {"seconds": seconds, "finite": bool(np.isfinite(result.array).all()),
                "since_spawn_s": time.time() - self.t_spawn}

    def attention(self, tokens: int, repeats: int) -> dict:
        """Forward + backward seconds (median) and compiled temporaries per kernel and dtype."""
        import jax
        import jax.numpy as jnp
        import numpy as np

        from sd_jax.models import attention as attn

        rng = np.random.default_rng(0)
        base = [rng.standard_normal((2, tokens, 8, 40), dtype=np.float32) for _ in range(4)]
        rows = {}
        for dtype in ("bfloat16", "float32"):
            q, k, v = (jnp.asarray(a, dtype) for a in base[:3])
            w = jnp.asarray(base[3])
            for kernel in ("cudnn", "xla", "blocked", "naive"):
                name = f"{kernel} {dtype}"
                if kernel == "cudnn" and dtype == "float32":
                    continue  # cuDNN flash attention has no float32 kernel
                try:
                    def loss(q, k, v, kernel=kernel):
                        return jnp.sum(attn.attention(q, k, v, implementation=kernel).astype(jnp.float32) * w)
                    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
                    analysis = fn.memory_analysis()
                    jax.block_until_ready(fn(q, k, v))
                    times = []
                    for _ in range(repeats):
                        t = time.perf_counter()
                        jax.block_until_ready(fn(q, k, v))
                        times.append(time.perf_counter() - t)
                    rows[name] = {"seconds": statistics.median(times),
                                  "temp_gib": None if analysis is None else analysis.temp_size_in_bytes / 2**30}
                except Exception as exc:  # noqa: BLE001  (a kernel this device lacks: recorded, not fatal)
                    rows[name] = {"error": _short_error(exc)}
        auto = {dtype: attn.choose_implementation(
            jax.default_backend(), dtype, tokens, tokens, 40, batch_heads=16,
            hopper=jax.default_backend() == "gpu" and attn._is_hopper_or_later()) for dtype in ("bfloat16", "float32")}
        return {"kernels": rows, "auto": auto}


def _load_unet(folder: Path, model, sharding):
    """A diffusers UNet safetensors file -> sd_jax float32 parameters on the device, tensor by tensor."""
    import jax
    import jax.numpy as jnp
    from safetensors import safe_open

    from sd_jax.convert.core import flatten_tree, flax_path_to_torch_name, torch_to_flax_array, unflatten_tree
    from sd_jax.pipeline import param_shapes

    width = model.config.cross_attention_dim
    shapes = param_shapes(model, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1, width)))
    out = {}
    with safe_open(str(folder / "diffusion_pytorch_model.safetensors"), framework="numpy") as f:
        for path, spec in flatten_tree(shapes).items():
            array = torch_to_flax_array(f.get_tensor(flax_path_to_torch_name(path)), path[-1], tuple(spec.shape))
            out[path] = jax.device_put(array.astype("float32"), sharding)
    return unflatten_tree(out)


# ============================================================================ the PyTorch worker
class TorchWorker:
    """diffusers on the first CUDA device (or the CPU): fp32 for parity, fp16 for sampling."""

    def __init__(self, t_spawn: float):
        import torch

        self.torch = torch
        self.t_spawn = t_spawn
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.pipes = {}

    def _sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def info(self) -> dict:
        import diffusers
        import transformers

        torch = self.torch
        name = torch.cuda.get_device_name(0) if self.device.type == "cuda" else "cpu"
        return {"torch": torch.__version__, "diffusers": diffusers.__version__,
                "transformers": transformers.__version__, "device": name, "threads": torch.get_num_threads()}

    def build(self, folder: str, tiny: bool) -> dict:
        """Write the random model folder (on the device: initialising 1 B parameters on a CPU is slow)."""
        from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        from common import V14_UNET_CONFIG
        from sd_jax.tokenizer import load_tokenizer

        folder = Path(folder)
        if (folder / "model_index.json").exists():
            return {"built": False}
        t = time.perf_counter()
        self.torch.manual_seed(0)
        with self.device:
            unet = UNet2DConditionModel(**(TINY_UNET if tiny else V14_UNET_CONFIG))
            vae = AutoencoderKL(**(TINY_VAE if tiny else V14_VAE))
            text = CLIPTextModel(CLIPTextConfig(**(TINY_TEXT if tiny else V14_TEXT)))
        load_tokenizer(None).save(folder / "tokenizer")
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                       scheduler=PNDMScheduler.from_config(V14_SCHEDULER), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(folder, safe_serialization=True)
        del pipe, unet, vae, text
        return {"built": True, "seconds": time.perf_counter() - t}

    def load(self, folder: str, fp16: bool = True) -> dict:
        from diffusers import StableDiffusionPipeline

        torch = self.torch
        t = time.perf_counter()
        # Sampling runs in float16 on CUDA, as users run diffusers; on a CPU (the --tiny check) in
        # float32: PyTorch's CPU float16 kernels take ~100x longer and would measure nothing useful.
        low = torch.float16 if self.device.type == "cuda" else torch.float32
        for name, dtype in (("float32", torch.float32), ("float16", low))[:2 if fp16 else 1]:
            pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None,
                                                           requires_safety_checker=False)
            pipe.set_progress_bar_config(disable=True)
            self.pipes[name] = pipe.to(self.device)
        self._sync()
        return {"load_s": time.perf_counter() - t}

    def train(self, folder: str, size: int, steps: int, warmup: int) -> dict:
        """bench/train.py's PyTorch step (diffusers' train_dreambooth.py loss), bf16 autocast, AdamW."""
        import numpy as np
        from diffusers import DDPMScheduler, UNet2DConditionModel

        torch = self.torch
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_pretrained(Path(folder) / "unet").to(self.device).train()
        opt = torch.optim.AdamW(unet.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)
        sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000)
        data = train_inputs(size, unet.config.cross_attention_dim)
        nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(self.device)  # noqa: E731
        mean, std = nchw(data["latent_mean"]), torch.exp(0.5 * nchw(data["latent_logvar"]))
        emb = torch.from_numpy(data["text_embeddings"]).to(self.device)
        alphas = sched.alphas_cumprod.to(self.device)
        losses, times = [], []
        for i in range(warmup + steps):
            t = time.perf_counter()
            latents = (mean + std * torch.randn_like(mean)) * SCALE
            noise = torch.randn_like(latents)
            ts = torch.randint(0, 1000, (latents.shape[0],), device=self.device)
            a = alphas[ts].view(-1, 1, 1, 1)
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                pred = unet(noisy, ts, emb, return_dict=False)[0]
            pred, pred_prior = torch.chunk(pred.float(), 2, dim=0)
            target, target_prior = torch.chunk(noise, 2, dim=0)
            loss = torch.nn.functional.mse_loss(pred, target) + torch.nn.functional.mse_loss(pred_prior, target_prior)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), MAX_GRAD_NORM)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())  # waits for the step
            if i >= warmup:
                times.append(time.perf_counter() - t)
        peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if cuda else None
        del unet, opt
        if cuda:
            torch.cuda.empty_cache()
        return {"times": times, "peak_gib": peak, "losses": losses}

    def unet_parity(self, inputs: str, out: str) -> dict:
        import numpy as np

        torch = self.torch
        x = dict(np.load(inputs))
        unet = self.pipes["float32"].unet
        with torch.no_grad():
            eps = unet(torch.from_numpy(x["latents"].transpose(0, 3, 1, 2).copy()).to(self.device),
                       torch.from_numpy(x["timesteps"].astype(np.int64)).to(self.device),
                       encoder_hidden_states=torch.from_numpy(x["text"]).to(self.device)).sample
        np.save(out, eps.float().cpu().numpy().transpose(0, 2, 3, 1))
        return {}

    def generate(self, solver: str, steps: int, batch: int, size: int, save: str | None = None) -> dict:
        import numpy as np
        from diffusers import DPMSolverMultistepScheduler, PNDMScheduler

        torch = self.torch
        pipe = self.pipes["float16"]
        config = dict(pipe.scheduler.config)
        if solver == "pndm":
            pipe.scheduler = PNDMScheduler.from_config(config)
        else:
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(
                config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=False)
        latents = torch.from_numpy(initial_latents(batch, size).transpose(0, 3, 1, 2).copy())
        dtype = pipe.unet.dtype
        t = time.perf_counter()
        images = pipe(PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=GUIDANCE,
                      num_images_per_prompt=batch, latents=latents.to(self.device, dtype),
                      output_type="np").images
        seconds = time.perf_counter() - t
        if save:
            np.save(save, np.asarray(images, np.float32))
        return {"seconds": seconds, "finite": bool(np.isfinite(images).all())}


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return text[:300]


def worker_main(kind: str) -> None:
    """Serve JSON requests on stdin, one per line; answer on the original stdout."""
    t_spawn = float(os.environ.get("BENCH_T_SPAWN", time.time()))
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library prints go to stderr; stdout is the protocol
    worker = (JaxWorker if kind == "jax" else TorchWorker)(t_spawn)
    out.write(json.dumps({"ready": time.time() - t_spawn}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = {"result": getattr(worker, request.pop("op"))(**request)}
        except Exception as exc:  # noqa: BLE001  (reported to the parent, which records it)
            traceback.print_exc()
            reply = {"error": _short_error(exc)}
        out.write(json.dumps(reply) + "\n")
        out.flush()


# ============================================================================ the parent
class Worker:
    """A worker process and a line reader with timeouts."""

    def __init__(self, kind: str, env: dict, log: Path):
        self.kind = kind
        self.spawned = time.time()
        self.log = open(log, "a")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", kind],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env={**env, "BENCH_T_SPAWN": repr(self.spawned)}, cwd=ROOT)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.ready = None

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _reply(self, timeout: float) -> dict:
        try:
            line = self.lines.get(timeout=max(timeout, 1.0))
        except queue.Empty:
            raise TimeoutError(f"{self.kind} worker: no answer within {timeout:.0f} s") from None
        if line is None:
            raise RuntimeError(f"{self.kind} worker exited (code {self.proc.poll()}); see {self.log.name}")
        return json.loads(line)

    def wait_ready(self, timeout: float) -> float:
        if self.ready is None:
            self.ready = self._reply(timeout)["ready"]
        return self.ready

    def call(self, op: str, timeout: float, **kwargs):
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        reply = self._reply(timeout)
        if "error" in reply:
            raise RuntimeError(f"{self.kind}.{op}: {reply['error']}")
        return reply["result"]

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def device_label(info: dict, tiny: bool) -> str:
    """'nvidia-h200', 'tpu-v5-lite', 'cpu-tiny' ... for the result file name."""
    kind = info.get("device_kind", "device") if info.get("backend") != "cpu" else "cpu"
    label = re.sub(r"[^a-z0-9]+", "-", str(kind).lower()).strip("-") or "device"
    return f"{label}-tiny" if tiny else label


def relative_error(a, b) -> float:
    import numpy as np

    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(float(np.abs(b).max()), 1e-12))


class Run:
    """Phases, budget and the results file."""

    def __init__(self, args):
        self.args = args
        self.size = SIZES["tiny" if args.tiny else "full"]
        self.start = time.time()
        self.results: dict = {"tiny": args.tiny, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), "budget_s": args.budget_s, "sizes": self.size, "phases": {}, "skipped": {}}
        if args.tiny:
            self.results["note"] = ("tiny sizes: checks the benchmark's code path end to end; the figures are not "
                                    "SD-size figures and say nothing about speed on a GPU")
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix="sd_jax_accel_"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.folder = self.work / ("model-tiny" if args.tiny else "model-v1.4")
        self.cache = Path(tempfile.mkdtemp(prefix="jax-cache-", dir=self.work))  # cold: a fresh cache
        self.paths = None

    def left(self) -> float:
        return self.args.budget_s - (time.time() - self.start)

    def fits(self, phase: str) -> bool:
        if self.args.phases and phase not in self.args.phases:
            self.results["skipped"][phase] = "not among --phases"
            return False
        need = PHASE_SECONDS[phase] * (0.25 if self.args.tiny else 1.0)
        if self.left() < need:
            self.results["skipped"][phase] = f"{need:.0f} s needed, {self.left():.0f} s left of the budget"
            print(f"[skip] {phase}: {self.results['skipped'][phase]}", flush=True)
            return False
        return True

    def env(self, kind: str) -> dict:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        if kind == "jax":
            # Leave room for the PyTorch worker on the same device; the peak figures read each framework's
            # own allocator. Cold compile: a fresh persistent cache every run.
            env.update(XLA_PYTHON_CLIENT_PREALLOCATE="false", SD_JAX_COMPILATION_CACHE=str(self.cache),
                       TF_CPP_MIN_LOG_LEVEL="2")
        return env

    def record(self, phase: str, value) -> None:
        self.results["phases"][phase] = value
        self.results["elapsed_s"] = time.time() - self.start
        self.write()

    def write(self) -> None:
        if self.paths is None:
            return
        self.paths[0].write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        self.paths[1].write_text(markdown(self.results) + "\n")


def alternate(pairs: list[tuple[str, Worker, str, dict]], repeats: int, timeout) -> dict[str, list]:
    """Call each (label, worker, op, kwargs) in turn, ``repeats`` rounds; results per label."""
    out: dict[str, list] = {label: [] for label, *_ in pairs}
    for _ in range(repeats):
        for label, worker, op, kwargs in pairs:
            out[label].append(worker.call(op, timeout(), **kwargs))
    return out


def main_parent(args) -> int:
    import numpy as np

    run = Run(args)
    s, work = run.size, run.work
    size = s["image"]
    # A call that started inside the budget may finish past it, by up to --grace-s.
    timeout = lambda: max(run.left(), 0.0) + args.grace_s  # noqa: E731
    jw = Worker("jax", run.env("jax"), work / "jax.log")
    tw = Worker("torch", run.env("torch"), work / "torch.log")
    try:
        jw.wait_ready(300)
        tw.wait_ready(300)
        jinfo, tinfo = jw.call("info", 60), tw.call("info", 60)
        run.results.update(jax_info=jinfo, torch_info=tinfo)
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{device_label(jinfo, args.tiny)}-{datetime.date.today().isoformat()}"
        run.paths = (out_dir / f"{stem}.json", out_dir / f"{stem}.md")
        # A TPU VM has no CUDA: PyTorch would run on the host CPU, minutes per 512^2 image. There the
        # reference keeps its parity role (UNet fp32 on the CPU) and every timing/image comparison is sd_jax only.
        timed_ref = tinfo["device"] != "cpu" or jinfo["backend"] == "cpu"
        run.results["reference_timed"] = timed_ref
        print(f"jax {jinfo['jax']} on {jinfo['backend']}:{jinfo['device_kind']}; torch {tinfo['torch']} on "
              f"{tinfo['device']}; diffusers {tinfo['diffusers']}; results -> {run.paths[0]}", flush=True)

        run.record("build", tw.call("build", timeout(), folder=str(run.folder), tiny=args.tiny))

        if run.fits("train"):
            phase = {}
            for label, worker in (("sd_jax", jw), ("torch", tw))[:2 if timed_ref else 1]:
                try:
                    phase[label] = worker.call("train", timeout(), folder=str(run.folder), size=size,
                                               steps=s["train_steps"], warmup=1)
                except (RuntimeError, TimeoutError) as exc:
                    phase[label] = {"error": str(exc)}
            run.record("train", phase)

        run.record("load", {"sd_jax": jw.call("load", timeout(), folder=str(run.folder)),
                            "diffusers": tw.call("load", timeout(), folder=str(run.folder), fp16=timed_ref)})

        if run.fits("parity"):
            inputs = work / "parity_inputs.npz"
            np.savez(inputs, **parity_inputs(size, json.loads((run.folder / "unet" / "config.json").read_text())
                                             ["cross_attention_dim"]))
            timing = jw.call("unet_parity", timeout(), inputs=str(inputs), out=str(work / "eps_jax.npz"))
            tw.call("unet_parity", timeout(), inputs=str(inputs), out=str(work / "eps_torch.npy"))
            ref, ours = np.load(work / "eps_torch.npy"), np.load(work / "eps_jax.npz")
            run.record("parity", {"unet_rel_err_fp32": relative_error(ours["float32"], ref),
                                  "unet_rel_err_bf16": relative_error(ours["bfloat16"], ref), **timing})

        pndm = ("pndm", s["pndm_steps"])
        if run.fits("image b1"):
            kw = dict(solver=pndm[0], steps=pndm[1], batch=1, size=size)
            first = jw.call("generate", timeout(), **kw)
            pairs = [("sd_jax", jw, "generate", kw)]
            if timed_ref:
                tw.call("generate", timeout(), **{**kw, "steps": 1})  # diffusers warm-up
                pairs.append(("diffusers", tw, "generate", kw))
            rounds = alternate(pairs, s["repeats"], timeout)
            steady = statistics.median(r["seconds"] for r in rounds["sd_jax"])
            ref = statistics.median(r["seconds"] for r in rounds["diffusers"]) if timed_ref else None
            run.record("image b1", {"sd_jax_s": steady, "diffusers_s": ref, "sd_jax_first_call_s": first["seconds"],
                                    "compile_cold_s": first["seconds"] - steady, "rounds": rounds})

        if run.fits("dpm image"):
            dpm = dict(solver="dpm++2m", steps=s["dpm_steps"], batch=1, size=size)
            first = jw.call("generate", timeout(), **dpm)
            ours = jw.call("generate", timeout(), **dpm, save=str(work / "dpm_jax.npy"))
            phase = {"sd_jax_s": ours["seconds"], "sd_jax_first_call_s": first["seconds"], "finite": ours["finite"],
                     "diffusers_s": None, "mean_abs_diff_255": None, "max_abs_diff_255": None}
            if timed_ref:
                tw.call("generate", timeout(), **{**dpm, "steps": 1})
                ref = tw.call("generate", timeout(), **dpm, save=str(work / "dpm_torch.npy"))
                diff = np.abs(np.load(work / "dpm_jax.npy") - np.load(work / "dpm_torch.npy")) * 255.0
                phase.update(diffusers_s=ref["seconds"], mean_abs_diff_255=float(diff.mean()),
                             max_abs_diff_255=float(diff.max()), finite=ours["finite"] and ref["finite"])
            run.record("dpm image", phase)

        if run.fits("attention"):
            run.record("attention", jw.call("attention", timeout(), tokens=s["attention_tokens"],
                                            repeats=s["attention_repeats"]))

        for batch in s["batches"]:
            phase = f"batch {batch}"
            if not run.fits(phase):
                continue
            kw = dict(solver=pndm[0], steps=pndm[1], batch=batch, size=size)
            try:
                first = jw.call("generate", timeout(), **kw)
                ours = jw.call("generate", timeout(), **kw)
                ref = None
                if timed_ref:
                    tw.call("generate", timeout(), **{**kw, "steps": 1})
                    ref = tw.call("generate", timeout(), **kw)["seconds"]
                run.record(phase, {"sd_jax_images_per_s": batch / ours["seconds"],
                                   "diffusers_images_per_s": batch / ref if ref else None,
                                   "sd_jax_s": ours["seconds"], "diffusers_s": ref,
                                   "compile_cold_s": first["seconds"] - ours["seconds"]})
            except (RuntimeError, TimeoutError) as exc:  # e.g. out of memory at batch 32
                run.record(phase, {"error": str(exc)})

        if run.fits("2nd process"):
            kw = dict(solver=pndm[0], steps=pndm[1], batch=1, size=size)
            if "image b1" not in run.results["phases"]:  # (--phases) the cache must hold what the 2nd process runs
                jw.call("generate", timeout(), **kw)
            second = Worker("jax", run.env("jax"), work / "jax2.log")
            try:
                second.wait_ready(timeout())
                second.call("load", timeout(), folder=str(run.folder))
                first = second.call("generate", timeout(), **kw)
                steady = second.call("generate", timeout(), **kw)
                run.record("2nd process", {"start_to_first_image_s": first["since_spawn_s"],
                                           "compile_cached_s": first["seconds"] - steady["seconds"],
                                           "first_call_s": first["seconds"], "steady_s": steady["seconds"]})
            finally:
                second.close()
    except Exception as exc:  # noqa: BLE001  (whatever happened, keep what was measured)
        run.results["error"] = _short_error(exc)
        print(f"[error] {run.results['error']} (logs: {work})", flush=True)
    finally:
        run.results["elapsed_s"] = time.time() - run.start
        run.write()
        for w in (jw, tw):
            w.close()
    if run.paths:
        print(run.paths[1].read_text())
    return 1 if "error" in run.results else 0


# ============================================================================ the table
def _fmt(x, unit="", digits=3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}{unit}"
    return f"{x}{unit}"


def _goal(ok: bool | None, tiny: bool) -> str:
    if tiny or ok is None:
        return "n/a"
    return "met" if ok else "not met"


def markdown(results: dict) -> str:
    """The results as a Markdown table: figure, sd_jax, diffusers/PyTorch, ratio, goal."""
    p, tiny = results["phases"], results["tiny"]
    ji, ti = results.get("jax_info", {}), results.get("torch_info", {})
    rows = []

    def add(figure, ours, ref, ratio=None, goal="", unit=" s"):
        rows.append((figure, _fmt(ours, unit), _fmt(ref, unit), _fmt(ratio, "", 3), goal))

    par = p.get("parity", {})
    if par:
        add("UNet eps rel. error, fp32 vs diffusers fp32", par.get("unet_rel_err_fp32"), None, unit="")
        add("UNet eps rel. error, bf16 vs diffusers fp32", par.get("unet_rel_err_bf16"), None, unit="")
    b1 = p.get("image b1", {})
    if b1:
        ratio = b1["sd_jax_s"] / b1["diffusers_s"] if b1["diffusers_s"] else None
        ok = b1["sd_jax_s"] <= GOALS["image_b1_s"] and (ratio is None or ratio <= GOALS["image_b1_ratio"])
        add("image, PNDM 50, batch 1 (s/image)", b1["sd_jax_s"], b1["diffusers_s"], ratio,
            _goal(ok, tiny) + " (≤ 0.45 s, ≤ 0.7×)")
        add("compile, cold (first call − steady)", b1["compile_cold_s"], None, None,
            _goal(b1["compile_cold_s"] <= GOALS["compile_cold_s"], tiny) + " (≤ 30 s)")
    second = p.get("2nd process", {})
    if second:
        add("compile, persistent cache (2nd process)", second["compile_cached_s"], None, None,
            _goal(second["compile_cached_s"] <= GOALS["compile_cached_s"], tiny) + " (≤ 3 s)")
        add("2nd process: start → first image", second["start_to_first_image_s"], None)
    dpm = p.get("dpm image", {})
    if dpm:
        add("image, DPM++ 2M 25, batch 1", dpm["sd_jax_s"], dpm["diffusers_s"],
            dpm["sd_jax_s"] / dpm["diffusers_s"] if dpm["diffusers_s"] else None)
        if dpm["mean_abs_diff_255"] is not None:
            add("DPM++ image, bf16 vs diffusers fp16: mean / max pixel diff (of 255)",
                f"{dpm['mean_abs_diff_255']:.2f} / {dpm['max_abs_diff_255']:.1f}", None, unit="")
    for batch in results["sizes"]["batches"]:
        r = p.get(f"batch {batch}", {})
        if "error" in r:
            rows.append((f"images/s, batch {batch}", r["error"][:80], "", "", ""))
        elif r:
            ratio = (r["diffusers_images_per_s"] and r["diffusers_images_per_s"] / r["sd_jax_images_per_s"])  # time
            add(f"images/s, PNDM 50, batch {batch}", r["sd_jax_images_per_s"], r["diffusers_images_per_s"], ratio,
                _goal(r["sd_jax_images_per_s"] >= GOALS["images_per_s"], tiny) + " (≥ 4 images/s)", unit="")
    train = p.get("train", {})
    if train:
        j, t = train.get("sd_jax", {}), train.get("torch", {})
        js = statistics.median(j["times"]) if j.get("times") else None
        ts = statistics.median(t["times"]) if t.get("times") else None
        ratio = js / ts if js and ts else None
        mem_ok = None if j.get("peak_gib") is None or t.get("peak_gib") is None else j["peak_gib"] <= t["peak_gib"]
        ok = None if ratio is None else ratio <= GOALS["train_ratio"] and mem_ok is not False
        add("Dreambooth step (s/step)", js if js else j.get("error"), ts if ts else t.get("error"), ratio,
            _goal(ok, tiny) + " (≤ 0.8×, no more memory)")
        add("Dreambooth step peak device memory (GiB)", j.get("peak_gib"), t.get("peak_gib"), None, unit="")
        add("Dreambooth step compile", j.get("compile_s"), None)
    att = p.get("attention", {})
    for name, r in att.get("kernels", {}).items():
        if "error" in r:
            rows.append((f"attention fwd+bwd {name}", r["error"][:80], "", "", ""))
        else:
            rows.append((f"attention fwd+bwd {name}", _fmt(r["seconds"], " s"), "", "",
                         f"temp {_fmt(r['temp_gib'], ' GiB')}"))
    if att:
        rows.append(("attention: auto picks", f"bf16 {att['auto']['bfloat16']}, fp32 {att['auto']['float32']}",
                     "", "", ""))
    lines = [f"# sd_jax accelerator benchmark{' (TINY sizes: code-path check only)' if tiny else ''}",
             "",
             f"{results['date']}; jax {ji.get('jax')} on {ji.get('backend')}:{ji.get('device_kind')}; "
             f"torch {ti.get('torch')} on {ti.get('device')}; diffusers {ti.get('diffusers')}; "
             f"image {results['sizes']['image']}²; elapsed {_fmt(results.get('elapsed_s'), ' s', 4)}.",
             "Ratios are sd_jax time / reference time (< 1: sd_jax faster). Reference: diffusers fp16 (SDPA) "
             "for sampling, PyTorch bf16 autocast for training.",
             "",
             "| figure | sd_jax | diffusers / PyTorch | ratio | goal (issue 12) |",
             "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    for phase, why in results.get("skipped", {}).items():
        lines.append(f"\nSkipped {phase}: {why}.")
    if results.get("error"):
        lines.append(f"\nStopped early: {results['error']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model and 64^2 images: the CPU check")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="stop starting phases that would not end within this many seconds (default 450)")
    parser.add_argument("--grace-s", type=float, default=120.0,
                        help="how long past the budget a running call may take before the run stops (default 120)")
    parser.add_argument("--out", default=str(BENCH / "results"), help="folder for the JSON and Markdown results")
    parser.add_argument("--workdir", default=None, help="model folder and scratch files (default: a new temp dir)")
    parser.add_argument("--phases", nargs="+", choices=list(PHASE_SECONDS), default=None,
                        help="run only these phases (default: all); build and load always run")
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker)
        return 0
    if args.budget_s <= 0 or args.grace_s < 0:
        parser.error(f"--budget-s {args.budget_s!r} must be positive and --grace-s {args.grace_s!r} >= 0")
    return main_parent(args)


if __name__ == "__main__":
    sys.exit(main())
