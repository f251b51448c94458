"""AUTOMATIC1111's ``/sdapi/v1/txt2img`` and ``img2img``: its JSON fields -> one GenerationRequest, and back.

Every field A1111 defines is accepted. Each means what it means in A1111:

* used: prompt, negative_prompt, seed (-1 random; image i of the request gets seed + i, A1111's
  ``all_seeds``), sampler_name (or the older sampler_index), scheduler, steps, cfg_scale, width,
  height, batch_size, n_iter, eta (DDIM's eta; "Euler a" only runs at A1111's ancestral eta 1),
  send_images, override_settings.CLIP_stop_at_last_layers (clip skip), and for img2img
  init_images, denoising_strength, mask, mask_blur, inpainting_mask_invert;
* without effect in A1111 for what sd_jax serves (accepted, whatever the value): the hires-fix
  fields while enable_hr is false, txt2img's denoising_strength (hires fix only),
  image_cfg_scale (InstructPix2Pix models only), s_tmin/s_tmax (only with s_churn),
  do_not_save_*, comments, force_task_id, include_init_images, refiner_switch_at without a refiner;
* not supported: refused with 422 naming the field when set to anything but its "off" value
  (:data:`OFF_VALUES`), e.g. ``enable_hr: true``, ``restore_faces: true``, ``styles: ["x"]``.

Fields A1111 does not define are refused (422), so a misspelt field is not silently ignored.

Scheduler: A1111 1.9+ sends ``scheduler`` beside the sampler ("Automatic", "Uniform", "Karras");
"Automatic" means the sampler's own, which for "DPM++ 2M" is Karras there. Older clients send no
scheduler: "DPM++ 2M" is then the plain solver and "DPM++ 2M Karras" the Karras one, as A1111 < 1.9.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from sd_jax.limits import MAX_SEED, short
from sd_jax.request import MAX_PROMPT_CHARS, MAX_STEPS, GenerationRequest, RequestError, canonical_scheduler
from sd_jax.serve.fields import (FieldError, boolean, decode_image, from_request_error, integer, number, text)

# RequestError fields -> A1111's field names.
NAMES = {
    "prompt": "prompt", "prompts": "prompt", "negative_prompt": "negative_prompt",
    "negative_prompts": "negative_prompt", "seed": "seed", "seeds": "seed", "guidance_scale": "cfg_scale",
    "guidance_scales": "cfg_scale", "num_inference_steps": "steps", "scheduler": "sampler_name",
    "height": "height", "width": "width", "eta": "eta", "init_image": "init_images", "mask_image": "mask",
    "strength": "denoising_strength", "num_images_per_prompt": "batch_size", "batch_size": "batch_size",
    "clip_skip": "override_settings.CLIP_stop_at_last_layers", "latents": "latents",
}

DEFAULT_SAMPLER = "Euler"   # A1111's API default (sampler_index)
MAX_CFG = 100.0             # A1111's UI goes to 30
MAX_SIDE = 4096             # pixels; memory is checked as well
MAX_MASK_BLUR = 256

# Fields A1111 defines that sd_jax does not implement: the values that mean "off" (anything else is refused).
OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "styles": (None, []), "subseed_strength": (None, 0), "restore_faces": (None, False), "tiling": (None, False),
    "s_min_uncond": (None, 0), "save_images": (None, False), "script_name": (None, ""), "script_args": (None, []),
    "alwayson_scripts": (None, {}), "refiner_checkpoint": (None, "", "None"), "firstpass_image": (None, ""),
    "infotext": (None, ""), "enable_hr": (None, False), "latent_mask": (None, ""),
    "initial_noise_multiplier": (None, 1), "resize_mode": (None, 0), "distilled_cfg_scale": (None, 3.5),
    "seed_resize_from_h": (None, -1, 0), "seed_resize_from_w": (None, -1, 0),
}
# Fields without effect in A1111 for what sd_jax serves (see the module docstring).
NO_EFFECT = {
    "subseed", "do_not_save_samples", "do_not_save_grid", "override_settings_restore_afterwards", "comments",
    "force_task_id", "disable_extra_networks", "refiner_switch_at", "s_tmin", "s_tmax", "firstphase_width",
    "firstphase_height", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y",
    "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt", "hr_cfg",
    "hr_distilled_cfg", "hr_additional_modules", "image_cfg_scale", "include_init_images", "sampler_index",
    "token_merging_ratio", "token_merging_ratio_hr",
}
USED = {"prompt", "negative_prompt", "seed", "sampler_name", "scheduler", "steps", "cfg_scale", "width", "height",
        "batch_size", "n_iter", "eta", "s_churn", "s_noise", "send_images", "override_settings", "denoising_strength"}
IMG2IMG_USED = {"init_images", "mask", "mask_blur", "mask_blur_x", "mask_blur_y", "mask_round", "inpainting_fill",
                "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert"}
TXT2IMG_FIELDS = (USED | NO_EFFECT | set(OFF_VALUES)) - {"latent_mask", "initial_noise_multiplier", "resize_mode",
                                                          "image_cfg_scale", "include_init_images"}
IMG2IMG_FIELDS = USED | NO_EFFECT | set(OFF_VALUES) | IMG2IMG_USED
SCHEDULES = ("Automatic", "Uniform", "Karras")  # A1111's schedule types sd_jax has ("name" or "label")
KARRAS_DEFAULT = {"dpm++2m"}                     # samplers whose "Automatic" schedule is Karras in A1111 1.9+
CLIP_SKIP_SETTING = "CLIP_stop_at_last_layers"


@dataclasses.dataclass
class Job:
    """A parsed A1111 request: the GenerationRequest and what the response echoes."""

    request: GenerationRequest
    parameters: dict[str, Any]     # the request's fields with A1111's defaults filled in (the response echoes them)
    sampler_name: str
    schedule: str
    batch_size: int
    n_iter: int
    subseed: int
    send_images: bool
    overlay: tuple[np.ndarray, np.ndarray] | None = None  # inpainting: (init images, blurred mask), pasted back
    denoising_strength: float | None = None


def sampler_list() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/samplers``: A1111's names of the solvers sd_jax has, with sd_jax's name as alias."""
    from sd_jax.schedulers import A1111_SAMPLER_NAMES

    return [{"name": name, "aliases": [ours], "options": {"scheduler": "karras"} if ours in KARRAS_DEFAULT
             or ours.endswith("karras") else {}} for name, ours in A1111_SAMPLER_NAMES.items()]


def schedule_list() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/schedulers``."""
    return [{"name": s.lower(), "label": s, "aliases": None, "default_rho": -1, "need_inner_model": False}
            for s in SCHEDULES]


def resolve_sampler(body: Mapping[str, Any]) -> tuple[str, str, str]:
    """(sd_jax solver, A1111 sampler name, schedule label) of sampler_name/sampler_index and scheduler."""
    from sd_jax.schedulers import A1111_SAMPLER_NAMES

    name = body.get("sampler_name") or body.get("sampler_index") or DEFAULT_SAMPLER
    field = "sampler_name" if body.get("sampler_name") else "sampler_index"
    if not isinstance(name, str):
        raise FieldError(field, f"{field} must be a string, got {short(name)}")
    schedule = body.get("scheduler")
    if schedule is not None and not isinstance(schedule, str):
        raise FieldError("scheduler", f"scheduler must be a string, got {short(schedule)}")
    try:
        solver = canonical_scheduler(name)
    except RequestError:
        raise FieldError(field, f"{field} {short(name)} is not a sampler this server has; valid: "
                                f"{', '.join(A1111_SAMPLER_NAMES)}") from None
    label = next((a for a, ours in A1111_SAMPLER_NAMES.items() if ours == solver), name)
    if schedule is None:  # a client older than A1111 1.9: the sampler name says it all
        return solver, label, "Automatic"
    found = next((s for s in SCHEDULES if s.casefold() == schedule.casefold()), None)
    if found is None:
        raise FieldError("scheduler", f"scheduler {short(schedule)} is not one this server has; valid: "
                                      f"{', '.join(SCHEDULES)}")
    if solver in ("ddim", "pndm"):      # A1111's timestep samplers take no schedule
        return solver, label, found
    base = solver.removesuffix("-karras")
    karras = found == "Karras" or (found == "Automatic" and (solver.endswith("karras") or base in KARRAS_DEFAULT))
    if karras:
        if base != "dpm++2m":
            raise FieldError("scheduler", f"scheduler {found} with sampler {label}: this server has the Karras "
                                          "schedule for DPM++ 2M only; use scheduler Automatic or Uniform")
        solver = "dpm++2m-karras"
    else:
        solver = base
    return solver, "DPM++ 2M" if base == "dpm++2m" else label, found


def check_fields(body: Mapping[str, Any], allowed: set[str], endpoint: str) -> None:
    """Unknown fields and unsupported features switched on -> 422 naming the field."""
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise FieldError(unknown[0], f"{short(unknown[0])} is not a field of AUTOMATIC1111's {endpoint} "
                                     f"({len(unknown)} unknown field(s): {short(', '.join(unknown))})")
    for name, off in OFF_VALUES.items():
        if name in body and body[name] not in off:
            if name.startswith("seed_resize_from") and isinstance(body[name], int) and body[name] <= 0:
                continue
            raise FieldError(name, f"{name} {short(body[name])} is not supported by this server; leave it at "
                                   f"{short(off[-1])}")


def parse(body: Any, *, img2img: bool, max_images: int, max_pixels: int, prompt_syntax: str) -> Job:
    """An A1111 request body (parsed JSON) -> a :class:`Job`, or FieldError naming the bad field."""
    if not isinstance(body, dict):
        raise FieldError("body", f"the request body must be a JSON object, got {type(body).__name__}")
    endpoint = "img2img" if img2img else "txt2img"
    check_fields(body, IMG2IMG_FIELDS if img2img else TXT2IMG_FIELDS, endpoint)
    solver, sampler_name, schedule = resolve_sampler(body)
    prompt = text(body, "prompt", "", MAX_PROMPT_CHARS)
    negative = text(body, "negative_prompt", "", MAX_PROMPT_CHARS)
    steps = integer(body, "steps", 50, 1, MAX_STEPS)
    cfg = number(body, "cfg_scale", 7.0, 0.0, MAX_CFG)
    width = integer(body, "width", 512, 8, MAX_SIDE)
    height = integer(body, "height", 512, 8, MAX_SIDE)
    batch_size = integer(body, "batch_size", 1, 1, max_images)
    n_iter = integer(body, "n_iter", 1, 1, max_images)
    if batch_size * n_iter > max_images:
        raise FieldError("n_iter", f"batch_size {batch_size} x n_iter {n_iter} = {batch_size * n_iter} images; "
                                   f"this server makes at most {max_images} per request")
    seed = integer(body, "seed", -1, -1, MAX_SEED)
    subseed = body.get("subseed")  # without effect (subseed_strength is 0); reported in info as A1111 does
    if not isinstance(subseed, int) or isinstance(subseed, bool) or not 0 <= subseed <= MAX_SEED:
        subseed = int(np.random.default_rng().integers(0, MAX_SEED))
    eta = _eta(body, solver)
    _sampler_extras(body, solver)
    clip_skip = _clip_skip(body.get("override_settings"))
    send_images = boolean(body, "send_images", True)
    total = batch_size * n_iter
    init = mask = overlay = strength = None
    if img2img:
        strength = number(body, "denoising_strength", 0.75, 0.0, 1.0)
        init, mask, overlay = _img2img_images(body, batch_size, n_iter, width, height, max_pixels)
    try:
        request = GenerationRequest.build(
            prompt, negative, height=height, width=width, num_inference_steps=steps, guidance_scale=cfg,
            scheduler=solver, seed=seed, num_images_per_prompt=total, eta=eta, init_image=init, strength=strength,
            mask_image=mask, clip_skip=clip_skip, prompt_syntax=prompt_syntax)
    except RequestError as err:
        raise from_request_error(err, NAMES) from None
    parameters = {name: body.get(name) for name in sorted(IMG2IMG_FIELDS if img2img else TXT2IMG_FIELDS)}
    parameters.update(prompt=prompt, negative_prompt=negative, seed=seed, steps=steps, cfg_scale=cfg, width=width,
                      height=height, batch_size=batch_size, n_iter=n_iter, sampler_name=sampler_name,
                      scheduler=body.get("scheduler"), eta=body.get("eta"), send_images=send_images)
    if img2img:
        parameters["denoising_strength"] = strength
        if not body.get("include_init_images"):  # as A1111: the echo leaves the images out unless asked
            parameters["init_images"] = parameters["mask"] = None
    return Job(request, parameters, sampler_name, schedule, batch_size, n_iter, subseed, send_images, overlay,
               strength)


def _eta(body: Mapping[str, Any], solver: str) -> float:
    """A1111's eta: DDIM's (default 0); the ancestral samplers' (Euler a: only A1111's default 1); else unused."""
    eta = number(body, "eta", None, 0.0, 1000.0)
    if solver == "ddim":
        return 0.0 if eta is None else eta
    if solver == "euler_a" and eta is not None and eta != 1.0:
        raise FieldError("eta", f"eta {eta:g} with Euler a: this server runs ancestral sampling at eta 1 only "
                                "(A1111's default); leave eta at 1 or null")
    return 0.0


def _sampler_extras(body: Mapping[str, Any], solver: str) -> None:
    """s_churn (A1111's Euler only) and s_noise (ancestral samplers): their defaults only."""
    churn = number(body, "s_churn", 0.0, 0.0, 1e6)
    if solver == "euler" and churn:
        raise FieldError("s_churn", f"s_churn {churn:g} is not supported by this server; leave it at 0")
    noise = number(body, "s_noise", 1.0, 0.0, 1e6)
    if solver == "euler_a" and noise != 1.0:
        raise FieldError("s_noise", f"s_noise {noise:g} is not supported by this server; leave it at 1")


def _clip_skip(settings: Any) -> int:
    """override_settings: A1111's clip skip ("CLIP_stop_at_last_layers": 1 = none) and nothing else."""
    if settings in (None, {}):
        return 0
    if not isinstance(settings, dict):
        raise FieldError("override_settings", f"override_settings must be an object, got {short(settings)}")
    other = sorted(set(settings) - {CLIP_SKIP_SETTING})
    if other:
        name = f"override_settings.{str(other[0])[:40]}"
        raise FieldError(name, f"{name} is not supported by this server (supported: {CLIP_SKIP_SETTING})")
    value = integer(settings, CLIP_SKIP_SETTING, 1, 1, 12)
    return value - 1


def _img2img_images(body: Mapping[str, Any], batch_size: int, n_iter: int, width: int, height: int,
                    max_pixels: int) -> tuple[list[Any], Any, Any]:
    """init_images (one, or one per batch image, repeated each iteration, as A1111) and the mask."""
    from PIL import Image, ImageFilter, ImageOps

    from sd_jax import images as imageio

    images = body.get("init_images")
    if not isinstance(images, list) or not images:
        raise FieldError("init_images", "init_images must be a list of base64 images (one, or one per "
                                        "batch_size image)")
    if len(images) not in (1, batch_size):
        raise FieldError("init_images", f"{len(images)} init_images for batch_size {batch_size}: give one, or "
                                        "one per image of a batch")
    pil = [imageio.to_rgb(decode_image(im, f"init_images[{i}]", max_pixels)) for i, im in enumerate(images)]
    per_image = pil if len(pil) == 1 else pil * n_iter
    if body.get("mask") in (None, ""):
        return per_image, None, None
    if body.get("inpaint_full_res") not in (None, False, 0):
        raise FieldError("inpaint_full_res", "inpaint_full_res true (A1111's 'Only masked') is not supported by "
                                             "this server; set it to false ('Whole picture')")
    if body.get("inpainting_fill") not in (None, 1):
        raise FieldError("inpainting_fill", f"inpainting_fill {short(body.get('inpainting_fill'))}: this server "
                                            "starts from the original image under the mask only; set it to 1 "
                                            "('original')")
    mask = decode_image(body["mask"], "mask", max_pixels).convert("L")
    if integer(body, "inpainting_mask_invert", 0, 0, 1):
        mask = ImageOps.invert(mask)
    blur_x = integer(body, "mask_blur_x", integer(body, "mask_blur", 4, 0, MAX_MASK_BLUR), 0, MAX_MASK_BLUR)
    blur_y = integer(body, "mask_blur_y", blur_x, 0, MAX_MASK_BLUR)
    if "mask_blur" in body and "mask_blur_x" not in body:
        blur_x = blur_y = integer(body, "mask_blur", 4, 0, MAX_MASK_BLUR)
    mask = mask.resize((width, height), Image.LANCZOS) if mask.size != (width, height) else mask
    if blur_x or blur_y:  # A1111 blurs the mask; the latent mask is the blurred one rounded, the overlay soft
        mask = mask.filter(ImageFilter.GaussianBlur(radius=max(blur_x, blur_y)))
    init_arr = np.stack([imageio.image_to_array(im, height, width, 3) for im in per_image])
    mask_arr = np.asarray(mask, np.float32)[None, :, :, None] / 255.0
    return per_image, mask, (init_arr, mask_arr)


def apply_overlay(images: np.ndarray, overlay: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """Inpainting, as A1111: the init image pasted back outside the (blurred) mask."""
    if overlay is None:
        return images
    init, mask = overlay
    return (images * mask + np.broadcast_to(init, images.shape) * (1.0 - mask)).astype(np.float32)


def infotext(job: Job, index: int, model_name: str, model_hash: str | None = None) -> str:
    """A1111's infotext of image ``index`` (sd_jax's one writer of it, :func:`sd_jax.outputs.a1111_parameters`)."""
    from sd_jax import __version__
    from sd_jax.outputs import a1111_parameters

    req = job.request
    return a1111_parameters(
        req.prompts[index], req.negative_prompts[index], steps=req.steps, sampler=job.sampler_name,
        cfg_scale=req.guidance_scales[index], seed=req.seeds[index], width=req.width, height=req.height,
        model=model_name, model_hash=model_hash, clip_skip=req.clip_skip, denoising_strength=job.denoising_strength,
        eta=req.eta, extra={"Schedule type": job.schedule, "Version": f"sd_jax {__version__}"})


def info(job: Job, model_name: str, model_hash: str | None = None) -> str:
    """The ``info`` JSON string, with the keys A1111's ``Processed.js()`` writes."""
    req = job.request
    total = req.total
    return json.dumps({
        "prompt": req.prompts[0], "all_prompts": list(req.prompts), "negative_prompt": req.negative_prompts[0],
        "all_negative_prompts": list(req.negative_prompts), "seed": req.seeds[0], "all_seeds": list(req.seeds),
        "subseed": job.subseed, "all_subseeds": [min(job.subseed + i, MAX_SEED) for i in range(total)],
        "subseed_strength": 0, "width": req.width, "height": req.height, "sampler_name": job.sampler_name,
        "cfg_scale": req.guidance_scales[0], "steps": req.steps, "batch_size": job.batch_size,
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": model_name,
        "sd_model_hash": model_hash,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": job.denoising_strength, "extra_generation_params": {"Schedule type": job.schedule},
        "index_of_first_image": 0,
        "infotexts": [infotext(job, i, model_name, model_hash) for i in range(total)],
        "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": req.clip_skip + 1,
        "is_using_inpainting_conditioning": req.mask_image is not None, "version": "sd_jax",
        "n_iter": job.n_iter, "scheduler": req.scheduler,
    })


def response(job: Job, images: np.ndarray, model_name: str, model_hash: str | None = None) -> dict[str, Any]:
    """``{images, parameters, info}`` as A1111 answers (each PNG carries its infotext as 'parameters')."""
    from sd_jax.serve.fields import encode_png

    images = apply_overlay(images, job.overlay)
    encoded = ([encode_png(im, {"parameters": infotext(job, i, model_name, model_hash)})
                for i, im in enumerate(images)] if job.send_images else [])
    return {"images": encoded, "parameters": job.parameters, "info": info(job, model_name, model_hash)}
