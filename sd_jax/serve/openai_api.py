"""OpenAI's ``POST /v1/images/generations``: its JSON fields -> one GenerationRequest, and back.

Fields: prompt, n (1-10), size ("WxH", multiples of 8; "auto" = 512x512, SD v1's size),
response_format ("b64_json" only: this server keeps no files to link to), model (any name; the
server has one), user. quality "auto"/"standard", style, background "auto", moderation,
output_format "png" are accepted at those values; anything else OpenAI defines is refused with
400 naming it. Beyond OpenAI's fields (send them with the client's ``extra_body``):
negative_prompt, seed, steps, guidance_scale, sampler (sd_jax's or A1111's names).
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

from sd_jax.limits import MAX_SEED, short
from sd_jax.request import (DEFAULT_GUIDANCE, DEFAULT_SIZE, DEFAULT_STEPS, MAX_PROMPT_CHARS, MAX_STEPS,
                            GenerationRequest, RequestError)
from sd_jax.serve.fields import FieldError, encode_png, from_request_error, integer, number, text

MAX_N = 10  # OpenAI's bound
MAX_SIDE = 4096  # pixels; memory is checked as well
NAMES = {
    "prompt": "prompt", "prompts": "prompt", "negative_prompt": "negative_prompt",
    "negative_prompts": "negative_prompt", "seed": "seed", "seeds": "seed", "guidance_scale": "guidance_scale",
    "guidance_scales": "guidance_scale", "num_inference_steps": "steps", "scheduler": "sampler", "height": "size",
    "width": "size", "num_images_per_prompt": "n",
}
# OpenAI's fields that mean nothing here, with the values accepted (anything else is refused).
ACCEPTED_VALUES: dict[str, tuple[Any, ...]] = {
    "quality": (None, "auto", "standard"), "style": (None, "vivid", "natural"), "background": (None, "auto"),
    "moderation": (None, "auto", "low"), "output_format": (None, "png"), "output_compression": (None, 100),
    "stream": (None, False), "partial_images": (None, 0),
}
FIELDS = {"prompt", "n", "size", "response_format", "model", "user", "safety_identifier", "negative_prompt", "seed",
          "steps", "guidance_scale", "sampler"} | set(ACCEPTED_VALUES)
SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


@dataclasses.dataclass
class Job:
    request: GenerationRequest


def parse(body: Any, *, max_images: int, prompt_syntax: str = "plain") -> Job:
    """An OpenAI images request body (parsed JSON) -> a :class:`Job`, or FieldError naming the field."""
    if not isinstance(body, dict):
        raise FieldError("body", f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise FieldError(unknown[0], f"{short(unknown[0])} is not a field this server accepts (fields: "
                                     f"{', '.join(sorted(FIELDS))})")
    for name, accepted in ACCEPTED_VALUES.items():
        if body.get(name) not in accepted:
            raise FieldError(name, f"{name} {short(body.get(name))} is not supported by this server; accepted: "
                                   f"{', '.join(str(a) for a in accepted if a is not None)}")
    if "prompt" not in body:
        raise FieldError("prompt", "prompt is required")
    prompt = text(body, "prompt", "", MAX_PROMPT_CHARS)
    n = integer(body, "n", 1, 1, min(MAX_N, max_images))
    fmt = body.get("response_format")
    if fmt not in (None, "b64_json"):
        raise FieldError("response_format", f"response_format {short(fmt)}: this server answers b64_json only "
                                            "(it keeps no files to link to)")
    width, height = _size(body.get("size"))
    seed = integer(body, "seed", -1, -1, MAX_SEED)
    steps = integer(body, "steps", DEFAULT_STEPS, 1, MAX_STEPS)
    guidance = number(body, "guidance_scale", DEFAULT_GUIDANCE, 0.0, 100.0)
    sampler = body.get("sampler")
    negative = text(body, "negative_prompt", "", MAX_PROMPT_CHARS)
    try:
        request = GenerationRequest.build(prompt, negative, height=height, width=width, num_inference_steps=steps,
                                          guidance_scale=guidance, scheduler=sampler, seed=seed,
                                          num_images_per_prompt=n, prompt_syntax=prompt_syntax)
    except RequestError as err:
        raise from_request_error(err, NAMES) from None
    return Job(request)


def _size(value: Any) -> tuple[int, int]:
    """"WxH" -> (width, height); None or "auto": SD v1's 512x512."""
    if value in (None, "auto"):
        return DEFAULT_SIZE, DEFAULT_SIZE
    match = SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise FieldError("size", f"size {short(value)} must be \"WIDTHxHEIGHT\" (e.g. \"512x512\") or \"auto\"")
    width, height = int(match.group(1)), int(match.group(2))
    if not 8 <= width <= MAX_SIDE or not 8 <= height <= MAX_SIDE:
        raise FieldError("size", f"size {short(value)}: width and height must be multiples of 8 in [8, {MAX_SIDE}]")
    return width, height


def response(images: Any) -> dict[str, Any]:
    """``{created, data: [{b64_json}]}``."""
    return {"created": int(time.time()), "data": [{"b64_json": encode_png(im), "revised_prompt": None}
                                                  for im in images]}


def error_body(err: FieldError | str, kind: str = "invalid_request_error") -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    message = str(err)
    param = err.field if isinstance(err, FieldError) else None
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}

