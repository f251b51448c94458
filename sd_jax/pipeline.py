"""StableDiffusion: load a model, encode prompts and images, predict noise, decode.

The pipeline holds three Flax modules (stateless), their parameters as one
pytree ``{"text_encoder", "unet", "vae"}``, the tokenizer and the scheduler
configuration. Every compiled function is ``f(params, inputs) -> outputs``
and is cached per shape by ``jax.jit``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax import images as imageio
from sd_jax import memory, sampling, sharding
from sd_jax import prompts as promptlib
from sd_jax.convert import cache as converted_cache
from sd_jax.convert import core
from sd_jax.convert.diffusers import IGNORED_BUFFERS
from sd_jax.convert.source import MODEL_KEYS, ModelFiles, load_model_files
from sd_jax.models.clip import CLIPTextModel
from sd_jax.models.unet import UNet2DConditionModel
from sd_jax.models.vae import AutoencoderKL
from sd_jax.request import GenerationRequest, RequestError
from sd_jax import shape_cache
from sd_jax.limits import short_path
from sd_jax.safety import load_safety_checker
from sd_jax.schedulers import (NoiseScheduleConfig, get_scheduler, pad_schedule, schedule_length,
                               scheduler_name_for_config)
from sd_jax.tokenizer import load_tokenizer

log = logging.getLogger("sd_jax")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_dtype(dtype: Any, what: str = "dtype") -> Any:
    """'float32' | 'bfloat16' | 'float16' (or the jnp type) -> jnp dtype; anything else is an error."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"{what} {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    for value in DTYPES.values():
        if jnp.dtype(dtype) == jnp.dtype(value):
            return value
    raise ValueError(f"{what} {dtype!r} is not supported; choose one of {sorted(DTYPES)}")


def param_shapes(module: Any, *example_inputs: Any) -> dict[str, Any]:
    """Parameter shapes/dtypes of a module without allocating them (traced once, then cached)."""
    return shape_cache.param_shapes(module, *example_inputs)


@dataclasses.dataclass
class StableDiffusion:
    """A Stable Diffusion v1.x model: modules, parameters, tokenizer and scheduler config."""

    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    tokenizer: Any
    params: dict[str, Any]
    scheduler_config: dict[str, Any]
    source: str = ""
    skipped_weights: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    safety_checker: Any = None  # sd_jax.safety.SafetyCheck when the model folder has one
    lora_stack: Any = dataclasses.field(default=None, repr=False)  # sd_jax.lora.apply.LoraStack, made on first use

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: Any = "float32", *, param_dtype: Any = None,
                        variant: str | None = None, attention: str = "auto", remat: bool = False,
                        use_ema: bool = True, config: str | Path | None = None,
                        safety_checker: bool = True, cache: bool | str | Path | None = None,
                        **hub_options: Any) -> StableDiffusion:
        """Load a diffusers folder, a CompVis single file or a hub id.

        ``dtype`` is the compute dtype; parameters are stored in ``param_dtype``
        (default: the same as ``dtype``). ``use_ema`` picks a full-EMA file's EMA
        UNet weights; ``config`` overrides single-file architecture detection.
        ``safety_checker``: load the folder's ``safety_checker/`` when it has one
        (flagged images are reported in ``GenerationResult.nsfw``, never altered).
        ``cache``: the converted-layout cache of a local model (``sd_jax.convert.cache``):
        None uses ``$SD_JAX_CACHE`` or ``~/.cache/sd_jax/converted``, a path that folder,
        False none. A warm load memory-maps the converted parameters instead of converting.
        """
        compute = parse_dtype(dtype)
        storage = parse_dtype(param_dtype, "param_dtype") if param_dtype is not None else compute
        entry = converted_cache.entry_for(path, cache=cache, variant=variant, use_ema=use_ema, config=config,
                                          dtype=storage)
        hit = entry.load() if entry is not None else None
        if hit is not None:
            files, converted = hit
            try:
                return cls.from_model_files(files, compute, storage, attention=attention, remat=remat,
                                            safety_checker=safety_checker, converted=converted)
            except core.WeightMismatchError as err:
                entry.discard(str(err).splitlines()[0])
        files = load_model_files(path, variant=variant, use_ema=use_ema, config=config,
                                 safety_checker=safety_checker, **hub_options)
        return cls.from_model_files(files, compute, storage, attention=attention, remat=remat,
                                    safety_checker=safety_checker, cache_entry=entry)

    @classmethod
    def from_model_files(cls, files: ModelFiles, dtype: Any = jnp.float32, param_dtype: Any = None, *,
                         attention: str = "auto", remat: bool = False, safety_checker: bool = True,
                         converted: dict[str, dict[tuple[str, ...], Any]] | None = None,
                         cache_entry: converted_cache.Entry | None = None) -> StableDiffusion:
        """Build the modules and fill their parameters strictly from a :class:`ModelFiles`.

        ``converted``: the parameters already in sd_jax's layout (a converted-layout cache hit;
        ``files.states`` is then empty); ``cache_entry``: where to write the converted
        parameters for the next load.
        """
        param_dtype = dtype if param_dtype is None else param_dtype
        cfg = files.configs
        modules = dict(
            text_encoder=CLIPTextModel(cfg["text_encoder"], dtype=dtype, param_dtype=param_dtype),
            unet=UNet2DConditionModel(cfg["unet"], dtype=dtype, param_dtype=param_dtype,
                                      remat=remat, attention=attention),
            vae=AutoencoderKL(cfg["vae"], dtype=dtype, param_dtype=param_dtype, attention=attention),
        )
        params, skipped, host = {}, {}, {}
        for name in MODEL_KEYS:
            shapes = param_shapes(modules[name], *_example_inputs(name, modules[name].config))
            what = name.replace("_", " ")
            if converted is not None:
                tree, skipped[name] = core.adopt_tree(shapes, converted[name], what=what), []
            else:
                state = files.states.pop(name)
                tree, skipped[name] = core.load_state_dict(shapes, state, what=what, ignore=IGNORED_BUFFERS[name])
                del state
            # On the CPU device_put adopts the aligned host arrays (no copy); elsewhere it copies them.
            params[name] = jax.device_put(tree)
            if cache_entry is not None:
                host[name] = tree
            del tree
            if skipped[name]:
                log.info("%s: skipped buffers %s", name, ", ".join(skipped[name]))
        if cache_entry is not None:
            cache_entry.store(files, host)
            del host
        tokenizer = load_tokenizer(files.tokenizer_dir, pad_token=files.pad_token)
        checker = None
        if safety_checker and "safety_checker" in files.extra_dirs:
            checker = load_safety_checker(files.extra_dirs["safety_checker"],
                                          files.extra_dirs.get("feature_extractor"))
        return cls(tokenizer=tokenizer, params=params, scheduler_config=files.scheduler_config,
                   source=files.source, skipped_weights=skipped, safety_checker=checker, **modules)

    # ------------------------------------------------------------------ export
    def save_pretrained(self, folder: str | Path, dtype: Any = "float32", *, overwrite: bool = False) -> Path:
        """Write a complete diffusers folder (safetensors) that diffusers and sd_jax load."""
        from sd_jax.convert.export import save_pretrained

        return save_pretrained(self, folder, dtype, overwrite=overwrite)

    def save_single_file(self, path: str | Path, dtype: Any = "float16", *, overwrite: bool = False) -> Path:
        """Write a CompVis-layout ``.safetensors`` (AUTOMATIC1111, ComfyUI, diffusers' from_single_file)."""
        from sd_jax.convert.export import save_single_file

        return save_single_file(self, path, dtype, overwrite=overwrite)

    # ------------------------------------------------------------------ LoRA
    def _lora(self) -> Any:
        """The pipeline's :class:`~sd_jax.lora.apply.LoraStack` (made on first use)."""
        from sd_jax.lora.apply import LoraStack

        if self.lora_stack is None:
            self.lora_stack = LoraStack()
        return self.lora_stack

    def load_lora(self, path_or_hub_id: str | Path, scale: float = 1.0, name: str | None = None, *,
                  weight_name: str | None = None, **hub_options: Any) -> Any:
        """Merge a LoRA file (kohya or diffusers/PEFT, detected) into the UNet and text encoder.

        Call again to stack adapters, each with its own ``scale``; ``name`` (default: the file's stem)
        names it for :meth:`set_lora_scale` and :meth:`unload_lora`. A hub id fetches the repository's
        ``weight_name`` (default: its ``pytorch_lora_weights.safetensors`` or only ``.safetensors``).
        Strict: a layer the model does not have is an error listing it. Returns the loaded adapter.
        """
        stack = self._lora()
        entry = stack.entry(path_or_hub_id, self.params, scale, name, weight_name=weight_name, **hub_options)
        self.params = stack.add(entry, self.params)
        log.info("LoRA %s: %d layers at scale %g", entry.name, entry.layers, entry.scale)
        return entry

    def set_lora_scale(self, name: Any, scale: float) -> None:
        """Change a loaded adapter's scale (a traced value: nothing recompiles)."""
        self.params = self._lora().set_scale(name, scale, self.params)

    def unload_lora(self, name: Any = None) -> None:
        """Remove one adapter (``name``), or all: the parameters they changed get back their exact base values."""
        self.params = self._lora().remove(name, self.params)

    @property
    def loras(self) -> list[dict[str, Any]]:
        """The loaded adapters in load order: name, scale, short hash, source."""
        return self._lora().records()

    @contextlib.contextmanager
    def _request_loras(self, refs: Sequence[Any]):
        """A request's LoRAs merged on top of the loaded ones for its duration; yields their records."""
        stack = self._lora()
        extra = stack.entries([(ref.path, ref.scale) for ref in refs], self.params)
        params = self.params
        if extra:
            self.params = stack.apply(params, extra)
        try:
            yield stack.records(extra)
        finally:
            self.params = params

    # ------------------------------------------------------------------ properties
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        """The latent scale (0.18215 for SD v1)."""
        return float(self.vae.config.scaling_factor)

    # ------------------------------------------------------------------ text
    def tokenize(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Prompts -> (B, 77) int32 ids; a truncated prompt is reported with its dropped words."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for p in prompts:
            if not isinstance(p, str):
                raise ValueError(f"prompts must be strings, got {type(p).__name__}: {p!r}")
        ids, infos = self.tokenizer.tokenize(prompts)
        for prompt, info in zip(prompts, infos):
            if info.truncated:
                log.warning("prompt truncated to %d tokens; dropped: %r (prompt: %r)",
                            ids.shape[1], info.dropped_text, prompt)
        return ids

    def encode_prompt(self, prompts: str | Sequence[str], clip_skip: int = 0,
                      prompt_syntax: str = promptlib.DEFAULT_SYNTAX) -> jax.Array:
        """Prompts -> (B, 77 x chunks, width) conditioning (the final hidden state after the final LayerNorm).

        ``prompt_syntax="a1111"``: weights and chunks as :mod:`sd_jax.prompts`; ``"plain"``: the text
        as it is, truncated to 77 tokens.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self._conditioning(prompts, promptlib.check_syntax(prompt_syntax), clip_skip, len(prompts))

    def prompt_chunks(self, prompts: Sequence[str]) -> list[promptlib.Chunks]:
        """Each prompt in the A1111 syntax as weighted 77-token chunks (see :mod:`sd_jax.prompts`)."""
        tok, out = self.tokenizer, []
        if self.text_encoder.config.max_position_embeddings < promptlib.CHUNK_TOKENS + 2:
            raise ValueError(f"this text encoder takes {self.text_encoder.config.max_position_embeddings} tokens, "
                             f"fewer than a {promptlib.CHUNK_TOKENS + 2}-token chunk: use prompt_syntax='plain'")
        for prompt in prompts:
            fragments = promptlib.parse_attention(prompt)
            ids = tok.token_ids([text for text, _ in fragments])
            chunks = promptlib.chunk_tokens(fragments, ids, bos=tok.bos_id, eos=tok.eos_id, pad=tok.pad_id,
                                            comma=tok.comma_id, expansions=tok.expansions)
            if chunks.count > promptlib.MAX_CHUNKS:
                raise RequestError(("prompts",), f" must fit in {promptlib.MAX_CHUNKS} chunks of "
                                   f"{promptlib.CHUNK_TOKENS} tokens; one has {chunks.token_count} tokens: "
                                   f"{prompt[:40]!r}...")
            out.append(chunks)
        return out

    def chunk_count(self, prompts: Sequence[str], syntax: str) -> int:
        """Chunks of the longest prompt (1 for the plain syntax): every prompt of a batch is padded to it."""
        if syntax == "plain":
            return 1
        return max(c.count for c in self.prompt_chunks(list(dict.fromkeys(prompts))))

    def _conditioning(self, prompts: Sequence[str], syntax: str, clip_skip: int, batch: int,
                      chunks: int = 1) -> jax.Array:
        """Prompts -> (batch, 77 x chunks', width) conditioning, rows padded to ``batch`` by repeating the last;
        A1111 syntax: each prompt padded with empty chunks to at least ``chunks`` (see :meth:`chunk_count`)."""
        if syntax == "plain":
            return _encode_text(self.text_encoder, self.params["text_encoder"],
                                sampling.pad_batch(self.tokenize(prompts), batch), clip_skip)
        parts = self.prompt_chunks(prompts)
        count = max([chunks] + [c.count for c in parts])
        tok = self.tokenizer
        ids, weights = promptlib.pad_chunks(parts, count, tok.bos_id, tok.eos_id, tok.pad_id)  # (B, C, 77)
        ids, weights = sampling.pad_batch(ids, batch), sampling.pad_batch(weights, batch)
        length = ids.shape[-1]
        z = _encode_weighted(self.text_encoder, self.params["text_encoder"], jnp.asarray(ids.reshape(-1, length)),
                             jnp.asarray(weights.reshape(-1, length)), clip_skip)  # (batch * C, 77, width)
        return z.reshape(batch, count * length, z.shape[-1])

    def load_embedding(self, path: str | Path, token: str | None = None) -> str:
        """Load a textual-inversion embedding (A1111 ``.pt``/``.safetensors``, diffusers ``learned_embeds``);
        returns the prompt token that stands for it (default: A1111's file stem, or the diffusers file's key).
        See :mod:`sd_jax.embeddings`."""
        from sd_jax.embeddings import add_embedding, read_embedding

        embedding = read_embedding(path, token)
        add_embedding(self, embedding)
        log.info("embedding %s: token %r, %d vector(s)", path, embedding.token, embedding.vectors.shape[0])
        return embedding.token

    # ------------------------------------------------------------------ UNet
    def predict_noise(self, latents: Any, t: Any, emb: Any) -> jax.Array:
        """UNet epsilon prediction: latents (B, h, w, C) NHWC, t an int or (B,) ints -> (B, h, w, C)."""
        latents = jnp.asarray(latents)
        if latents.ndim != 4 or latents.shape[-1] != self.unet.config.in_channels:
            raise ValueError(f"latents must be (B, h, w, {self.unet.config.in_channels}) NHWC, "
                             f"got shape {latents.shape}")
        emb = jnp.asarray(emb)
        if emb.shape[0] != latents.shape[0]:
            raise ValueError(f"emb batch {emb.shape[0]} does not match latents batch {latents.shape[0]}")
        t = jnp.broadcast_to(jnp.asarray(t), (latents.shape[0],))
        return _predict_noise(self.unet, self.params["unet"], latents, t, emb)

    # ------------------------------------------------------------------ VAE
    def encode_image(self, images: Any, key: jax.Array | None = None) -> jax.Array:
        """Images (B, H, W, 3) in [0, 1] -> scaled latents; the posterior mean when ``key`` is None."""
        mean, logvar = self.latent_moments(images)
        if key is not None:
            mean = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        return mean * self.scaling_factor

    def latent_moments(self, images: Any) -> tuple[jax.Array, jax.Array]:
        """Images (B, H, W, 3) in [0, 1] -> the VAE posterior's unscaled (mean, logvar), float32."""
        images = jnp.asarray(images)
        factor = self.vae_scale_factor
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] % factor or images.shape[2] % factor:
            raise ValueError(f"images must be (B, H, W, 3) with H and W multiples of {factor}, "
                             f"got shape {images.shape}")
        return _vae_moments(self.vae, self.params["vae"], images)

    def decode_latents(self, latents: Any) -> jax.Array:
        """Scaled latents (B, h, w, 4) -> images (B, H, W, 3) float in [0, 1]."""
        latents = jnp.asarray(latents)
        if latents.ndim != 4 or latents.shape[-1] != self.vae.config.latent_channels:
            raise ValueError(f"latents must be (B, h, w, {self.vae.config.latent_channels}), "
                             f"got shape {latents.shape}")
        return _decode_latents(self.vae, self.params["vae"], latents, self.scaling_factor)

    # ------------------------------------------------------------------ sampling
    def __call__(self, prompt: str | Sequence[str], **kwargs: Any) -> list[Any]:
        """Generate images; see :meth:`generate` for the arguments. Returns PIL images."""
        return self.generate(prompt, **kwargs).images

    def noise_schedule(self) -> NoiseScheduleConfig:
        """The model folder's scheduler configuration (SD v1.4's when it has none)."""
        if not self.scheduler_config:
            return NoiseScheduleConfig.sd_v1()
        return NoiseScheduleConfig.from_diffusers_config(self.scheduler_config)

    def generate(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 devices: Sequence[Any] | None = None, progress: sampling.Progress | None = None,
                 **request: Any) -> GenerationResult:
        """Text (and optionally an init image and mask) -> images.

        The keyword arguments are those of :meth:`GenerationRequest.build
        <sd_jax.request.GenerationRequest.build>`: ``height``, ``width``,
        ``num_inference_steps``, ``guidance_scale`` (one or one per image),
        ``scheduler``, ``seed`` (image b gets ``seed + b``, or one per image;
        None/-1: random), ``num_images_per_prompt``, ``latents``, ``eta``,
        ``init_image`` + ``strength`` (img2img), ``mask_image`` (white =
        repaint), ``clip_skip``, ``batch_size`` (images per compiled call,
        default all), ``loras``, ``prompt_syntax`` ("a1111", the default:
        ``(word:1.3)``, ``[word]``, ``BREAK`` and long prompts, see
        :mod:`sd_jax.prompts`; "plain": literal, truncated to 77 tokens).
        The batch is split over ``devices`` (default: all local
        devices); ``progress`` receives per-step events (see :mod:`sd_jax.sampling`).
        """
        return self.run(GenerationRequest.build(prompt, negative_prompt, **request), devices=devices,
                        progress=progress)

    def run(self, request: GenerationRequest, *, devices: Sequence[Any] | None = None,
            progress: sampling.Progress | None = None) -> GenerationResult:
        """Every image of a request, batch by batch, as one result (checked against the model first)."""
        mesh = sharding.sampling_mesh(devices)
        self.check_request(request, mesh)
        with self._request_loras(request.loras) as loras:
            parts = [self._run_batch(batch, mesh, progress) for batch in request.batches()]
        return dataclasses.replace(GenerationResult.concatenate(parts, request), loras=loras)

    def scheduler_name(self, request: GenerationRequest) -> str:
        """The solver a request runs: its own, else the model folder's."""
        return request.scheduler or scheduler_name_for_config(self.noise_schedule())

    def check_request(self, request: GenerationRequest, mesh: Any = None, *, results: int | None = None) -> None:
        """What depends on this model: latent size, inpainting UNet, solver, clip skip, and memory.

        ``results``: images returned at once (default: the whole request).
        """
        factor = self.vae_scale_factor
        for name in ("height", "width"):
            if getattr(request, name) % factor:
                raise RequestError((name, getattr(request, name)), f" must be a multiple of {factor} for this model")
        if self.unet.config.in_channels == 9 and request.mask_image is None:
            raise RequestError("this is an inpainting model (9-channel UNet): pass ", ("init_image",), " and ",
                               ("mask_image",))
        shape = (request.height // factor, request.width // factor, self.vae.config.latent_channels)
        if request.latents is not None and request.latents.shape[1:] != shape:
            raise RequestError(("latents",), f" must have shape {(request.total, *shape)} (B, h, w, C) for this "
                               f"call, got {request.latents.shape}")
        name = self.scheduler_name(request)
        if request.eta and name != "ddim":
            raise RequestError(("eta", request.eta), f" only applies to the ddim scheduler (scheduler is {name!r})")
        self.chunk_count(request.prompts + request.negative_prompts, request.prompt_syntax)  # too long: refused now
        layers = self.text_encoder.config.num_hidden_layers
        if request.clip_skip >= layers:
            raise RequestError(("clip_skip", request.clip_skip), f" must be below the text encoder's {layers} "
                               "layers")
        from sd_jax.convert.source import looks_like_hub_id

        for lora in request.loras:  # read when the request runs (once per file); here only that it can be found
            if not Path(lora.path).expanduser().exists() and not looks_like_hub_id(lora.path):
                raise RequestError(("loras", short_path(lora.path)),
                                   " does not exist: pass a LoRA .safetensors file or a hub id")
        mesh = mesh if mesh is not None else sharding.sampling_mesh()
        devices = list(mesh.devices.flat)
        batch = _padded_batch(request, mesh.size)
        per_image = memory.sampling_bytes_per_image(
            self.unet.config.block_out_channels[0], self.vae.config.block_out_channels[0], factor,
            jnp.dtype(self.unet.dtype).itemsize, request.height, request.width, request.guided)
        memory.check_fits(per_image=per_image, batch=batch, height=request.height, width=request.width,
                          results=request.total if results is None else results, devices=devices)

    def _run_batch(self, req: GenerationRequest, mesh: Any, progress: sampling.Progress | None
                   ) -> GenerationResult:
        """One batch, padded to the compiled batch size, through text encoder, sampler and VAE."""
        n, chunk = req.total, _padded_batch(req, mesh.size)
        shape = (req.height // self.vae_scale_factor, req.width // self.vae_scale_factor,
                 self.vae.config.latent_channels)
        guided = req.guided
        texts = req.prompts + (req.negative_prompts if guided else ())
        count = self.chunk_count(texts, req.prompt_syntax)  # prompts and negatives padded to one chunk count
        cond = self._conditioning(req.prompts, req.prompt_syntax, req.clip_skip, chunk, count)
        uncond = self._conditioning(req.negative_prompts, req.prompt_syntax, req.clip_skip, chunk,
                                    count) if guided else None
        keys = sampling.seed_keys(sampling.pad_batch(np.asarray(req.seeds, np.uint32), chunk))
        guidance = sampling.pad_batch(np.asarray(req.guidance_scales, np.float32), chunk)
        name = self.scheduler_name(req)
        sched = get_scheduler(name)
        options = {"eta": req.eta} if name == "ddim" else {}
        strength = req.strength if req.init_image is not None else 1.0
        state = sched.create(self.noise_schedule(), req.steps, (chunk, *shape), strength=strength, **options)
        # One padded length for every step count: changing the steps never recompiles.
        state = pad_schedule(sched, state, schedule_length(self.noise_schedule()))
        noise = (sampling.pad_batch(req.latents, chunk) if req.latents is not None
                 else sampling.initial_noise(keys, shape))
        mode, extra = "txt2img", {}
        if req.init_image is None:
            start = noise * sched.init_noise_sigma(state)
        else:
            image = sampling.pad_batch(_per_image(req.init_image, n), chunk)
            post_keys = jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys)
            init_latents = self._encode_posterior(image, post_keys)
            if req.mask_image is None:
                start = sched.add_noise_at(state, init_latents, noise)
            else:
                mask_px = sampling.pad_batch(_per_image(req.mask_image, n), chunk)
                mask = _nearest_resize(mask_px, shape[:2])
                if self.unet.config.in_channels == 9:
                    mode = "inpaint"
                    keep = (mask_px < 0.5).astype(image.dtype)  # masked pixels -> 0 in [-1, 1], as diffusers
                    masked = self._encode_posterior(image * keep + 0.5 * (1.0 - keep), post_keys)
                    extra = {"mask": mask, "masked_latents": masked}
                else:
                    mode = "blend"
                    extra = {"mask": mask, "init_latents": init_latents, "noise": noise}
                start = (noise * sched.init_noise_sigma(state) if strength >= 1.0
                         else sched.add_noise_at(state, init_latents, noise))
        run = sampling.compiled_denoise(self.unet, sched, mode, guided, mesh, report=progress is not None)
        with sampling.reporting(progress, run, (chunk, *shape), int(state.num_calls - state.start_index)):
            inputs = (self.params["unet"], state, start, cond, uncond, guidance, keys, extra)
            latents = run(*jax.tree.map(jnp.asarray, inputs))  # numpy: refused by a jit of several processes
            images = np.asarray(self.decode_latents(latents))[:n]
        _check_finite(np.asarray(latents)[:n], images, req.seeds)
        nsfw = self.safety_checker(images)[0] if self.safety_checker is not None else None
        if nsfw is not None and any(nsfw):
            log.info("the safety checker flagged image(s) with seed(s) %s",
                     [seed for seed, flag in zip(req.seeds, nsfw) if flag])
        return dataclasses.replace(GenerationResult.of(req, name, images, nsfw), model=self.source,
                                   dtype=np.dtype(self.unet.dtype).name)

    def _encode_posterior(self, images_01: jax.Array, keys: jax.Array) -> jax.Array:
        """Scaled latents sampled from the VAE posterior, image b with its own key."""
        mean, logvar = _vae_moments(self.vae, self.params["vae"], images_01)
        draw = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], jnp.float32))(keys)
        return (mean + jnp.exp(0.5 * logvar) * draw) * self.scaling_factor


class NonFiniteOutput(ValueError):
    """Sampling produced NaN or infinite values (bad weights, or float16 overflow): no image is written."""


@dataclasses.dataclass
class GenerationResult:
    """Images of one generate() call with everything needed to reproduce each."""

    images: list[Any]
    array: np.ndarray  # (B, H, W, 3) float32 in [0, 1]
    seeds: list[int]
    prompts: list[str]
    negative_prompts: list[str]
    guidance_scales: list[float]
    scheduler: str
    num_inference_steps: int
    height: int
    width: int
    nsfw: list[bool] | None = None
    request: GenerationRequest | None = None  # the whole request (eta, strength, clip skip, batch size, ...)
    model: str = ""   # the pipeline's source (folder, file or hub id)
    dtype: str = ""   # its compute dtype
    loras: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # name, scale, hash, source of each LoRA

    @classmethod
    def of(cls, request: GenerationRequest, scheduler: str, images: np.ndarray, nsfw: list[bool] | None,
           pil: list[Any] | None = None) -> GenerationResult:
        """The result of one request's images (``pil``: the same images, already converted)."""
        return cls(images=imageio.to_pil(images) if pil is None else pil, array=images, seeds=list(request.seeds),
                   prompts=list(request.prompts), negative_prompts=list(request.negative_prompts),
                   guidance_scales=list(request.guidance_scales), scheduler=scheduler,
                   num_inference_steps=request.steps, height=request.height, width=request.width,
                   nsfw=None if nsfw is None else list(nsfw), request=request)

    @classmethod
    def concatenate(cls, parts: Sequence[GenerationResult], request: GenerationRequest) -> GenerationResult:
        """The batches of one request as one result."""
        if len(parts) == 1:
            return dataclasses.replace(parts[0], request=request)
        nsfw = None if parts[0].nsfw is None else [f for p in parts for f in p.nsfw]
        array = np.concatenate([p.array for p in parts], axis=0)
        return dataclasses.replace(cls.of(request, parts[0].scheduler, array, nsfw,
                                          [im for p in parts for im in p.images]),
                                   model=parts[0].model, dtype=parts[0].dtype)


def _padded_batch(request: GenerationRequest, devices: int) -> int:
    """The compiled batch size: the request's batch size (default: all its images), a multiple of ``devices``."""
    chunk = request.batch_size or request.total
    return chunk + (-chunk % devices)


def _per_image(arr: np.ndarray, n: int) -> np.ndarray:
    """A (1 or n, ...) image stack as (n, ...)."""
    return np.broadcast_to(arr, (n, *arr.shape[1:]))


def _check_finite(latents: np.ndarray, images: np.ndarray, seeds: Sequence[int]) -> None:
    """Refuse NaN/inf latents or images (they would be written as black PNGs)."""
    bad = ~(np.isfinite(latents).all(axis=(1, 2, 3)) & np.isfinite(images).all(axis=(1, 2, 3)))
    if bad.any():
        which = [seed for seed, b in zip(seeds, bad) if b]
        raise NonFiniteOutput(f"sampling produced NaN/inf values for {len(which)} of {len(seeds)} image(s) (seeds "
                              f"{', '.join(map(str, which[:8]))}{', ...' if len(which) > 8 else ''}); no image was "
                              "written for them: the model's weights or config hold non-finite values, or the dtype "
                              "overflows (try --dtype float32 or bfloat16)")


def _nearest_resize(mask: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """(B, H, W, 1) -> (B, h, w, 1) nearest neighbour, as torch.nn.functional.interpolate's default."""
    big_h, big_w = mask.shape[1:3]
    rows = (jnp.arange(hw[0]) * big_h) // hw[0]
    cols = (jnp.arange(hw[1]) * big_w) // hw[1]
    return mask[:, rows][:, :, cols]


def _example_inputs(name: str, config: Any) -> tuple[Any, ...]:
    """Smallest inputs that trace every parameter of a module (for eval_shape)."""
    if name == "text_encoder":
        return (jnp.zeros((1, config.max_position_embeddings), jnp.int32),)
    if name == "unet":
        return (jnp.zeros((1, 8, 8, config.in_channels)), jnp.zeros((1,), jnp.int32),
                jnp.zeros((1, 1, config.cross_attention_dim)))
    factor = 2 ** (len(config.block_out_channels) - 1)
    return (jnp.zeros((1, factor, factor, config.in_channels)),)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _encode_text(module: CLIPTextModel, params: Any, ids: jax.Array, clip_skip: int) -> jax.Array:
    """Jitted text encoder."""
    return module.apply({"params": params}, ids, clip_skip=clip_skip)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _encode_weighted(module: CLIPTextModel, params: Any, ids: jax.Array, weights: jax.Array,
                     clip_skip: int) -> jax.Array:
    """Jitted text encoder over (N, 77) chunks, hidden states weighted per token (A1111's emphasis)."""
    return promptlib.apply_weights(module.apply({"params": params}, ids, clip_skip=clip_skip), weights)


@functools.partial(jax.jit, static_argnums=(0,))
def _predict_noise(module: UNet2DConditionModel, params: Any, latents: jax.Array, t: jax.Array,
                   emb: jax.Array) -> jax.Array:
    """Jitted UNet call."""
    return module.apply({"params": params}, latents.astype(module.dtype), t, emb.astype(module.dtype))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _decode_latents(module: AutoencoderKL, params: Any, latents: jax.Array, scale: float) -> jax.Array:
    """Jitted VAE decoder: scaled latents -> [0, 1] images."""
    images = module.apply({"params": params}, (latents / scale).astype(module.compute_dtype),
                          method=AutoencoderKL.decode)
    return jnp.clip(images.astype(jnp.float32) / 2.0 + 0.5, 0.0, 1.0)


@functools.partial(jax.jit, static_argnums=(0,))
def _vae_moments(module: AutoencoderKL, params: Any, images_01: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Posterior mean and log-variance (float32) of [0, 1] images."""
    mean, logvar = module.apply({"params": params}, (images_01 * 2.0 - 1.0).astype(module.compute_dtype),
                                method=AutoencoderKL.encode)
    return mean.astype(jnp.float32), logvar.astype(jnp.float32)
