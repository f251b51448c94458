"""``generate.py``: the command line of :func:`sd_jax.generation.run` (parse, run, print).

    python generate.py --prompt "an astronaut riding a horse"            # CompVis/stable-diffusion-v1-4
    python generate.py --model sd14/ --from-file prompts.txt --n-images 4 --grid --scheduler dpm++2m-karras
    python generate.py --model sd14/ --prompt "a castle" --init-image sketch.png --strength 0.6

Errors name the command-line flag (``--height 60 must be ...``): the request's
errors (:class:`~sd_jax.request.RequestError`) are rendered with :data:`FLAGS`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sd_jax.cli import common

PROG = "generate.py"

# Request and run fields (as sd_jax.request and GenerateConfig name them) -> the flag that sets them.
FLAGS = {
    "loras": "--lora",
    "prompt": "--prompt", "prompts": "--prompt", "negative_prompt": "--negative-prompt",
    "negative_prompts": "--negative-prompt", "num_inference_steps": "--steps", "guidance_scale": "--guidance-scale",
    "guidance_scales": "--guidance-scale", "scheduler": "--scheduler", "seed": "--seed", "seeds": "--seed",
    "num_images_per_prompt": "--n-images", "n_images": "--n-images", "height": "--height", "width": "--width",
    "eta": "--eta", "init_image": "--init-image", "mask_image": "--mask-image", "strength": "--strength",
    "batch_size": "--batch-size", "clip_skip": "--clip-skip", "dtype": "--dtype", "prompt_syntax": "--plain-prompts",
    "embeddings": "--embedding",
}


def config_from_args(args: argparse.Namespace) -> Any:
    """The parsed command line -> a :class:`~sd_jax.generation.GenerateConfig` (reads --from-file)."""
    from sd_jax.generation import GenerateConfig

    prompts = list(args.prompt or [])
    if args.from_file is not None:
        prompts = common.read_lines(args.from_file, "--from-file")
        if not prompts:
            raise ValueError(f"--from-file {args.from_file!r} has no prompts (blank lines and # comments "
                             "are skipped)")
    return GenerateConfig(model=args.model, prompts=tuple(prompts), negative_prompt=args.negative_prompt,
                          steps=args.steps, scheduler=args.scheduler, guidance_scale=args.guidance_scale,
                          height=args.height, width=args.width, seed=args.seed, n_images=args.n_images,
                          batch_size=args.batch_size, outdir=Path(args.outdir), grid=args.grid, dtype=args.dtype,
                          init_image=args.init_image, strength=args.strength, mask_image=args.mask_image,
                          safety_checker=not args.no_safety_checker, watermark=args.watermark, eta=args.eta,
                          clip_skip=args.clip_skip, loras=tuple(args.lora or ()), progress=not args.no_progress,
                          prompt_syntax="plain" if args.plain_prompts else "a1111",
                          embeddings=tuple(args.embedding or ()))


def run(args: argparse.Namespace) -> Any:
    """Run the parsed command line and print its summary; returns the :class:`RunResult`."""
    from sd_jax import generation
    from sd_jax.request import RequestError

    try:
        cfg = config_from_args(args)
        print(f"seed: {cfg.seed}" + (" (random; --seed N repeats this run)" if args.seed in (None, -1) else ""),
              flush=True)
        result = generation.run(cfg)
    except RequestError as err:
        raise ValueError(err.render(FLAGS)) from None
    timing = result.timing
    if timing["compile_s"]:
        print(f"compile time {timing['compile_s']:.1f} s")
    print(f"time to first image: {timing['first_image_s']:.1f} s (model load included)")
    elapsed, total = timing["elapsed_s"], len(result.files)
    rate = f"{total / elapsed:.2f} images/s"
    if timing["compile_s"] and elapsed > timing["compile_s"]:
        rate += f" overall, {total / (elapsed - timing['compile_s']):.2f} images/s after compilation"
    print(f"{total} image(s) in {elapsed:.1f} s: {rate}")
    print(f"wrote {total} image(s) (seed {result.seed}): {common.format_paths(result.files)}")
    if result.grid is not None:
        print(f"wrote grid {result.grid}")
    if result.flagged:
        print(f"warning: the safety checker flagged {len(result.flagged)} of {total} image(s) (files left "
              f"unchanged): {', '.join(map(str, result.flagged))}", file=sys.stderr)
    return result


def build_parser() -> common.ArgumentParser:
    """The generate.py command line."""
    from sd_jax.generation import DEFAULT_MAX_BATCH, DEFAULT_MODEL, DTYPES
    from sd_jax.lora.files import parse_lora_arg
    from sd_jax.request import DEFAULT_GUIDANCE, DEFAULT_SIZE, DEFAULT_STEPS, IMG2IMG_STRENGTH, INPAINT_STRENGTH
    from sd_jax.request import a1111_sampler_names, canonical_scheduler, scheduler_names

    names = scheduler_names()
    p = common.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate images with Stable Diffusion v1.x (text-to-image, img2img, inpainting).",
        epilog="Files: OUTDIR/NNNNN-SEED.png (numbering continues after the highest number in OUTDIR), with the\n"
               "generation parameters as PNG text. Image i of a run gets seed SEED+i; --seed S --n-images 1\n"
               "with its prompt regenerates one image (pixel-identical with the same --batch-size and devices).\n"
               "Progress is shown per denoising step; the first batch of a size compiles the sampler first.\n"
               "Offline (HF_HUB_OFFLINE=1 or no network) a hub id is read from the Hugging Face cache.\n"
               "Bad values exit with status 2 and one error line.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"diffusers folder, .ckpt/.safetensors file or hub id (default {DEFAULT_MODEL}, "
                        "downloaded once into the Hugging Face cache)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", metavar="TEXT",
                     help="prompt; repeat the flag for several prompts")
    src.add_argument("--from-file", metavar="FILE",
                     help="prompts, one per line (blank lines and lines starting with # are skipped)")
    p.add_argument("--negative-prompt", default="", metavar="TEXT", help="negative prompt for every image")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"denoising steps (default {DEFAULT_STEPS})")
    p.add_argument("--scheduler", "--sampler", type=common.argument_type(canonical_scheduler), metavar="NAME",
                   help=f"one of {', '.join(names)}, or AUTOMATIC1111's name ({', '.join(a1111_sampler_names())}) "
                        "(default: the model folder's own)")
    p.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE,
                   help=f"classifier-free guidance (default {DEFAULT_GUIDANCE})")
    p.add_argument("--height", type=int, help=f"pixels, a multiple of 8 (default {DEFAULT_SIZE}, or the "
                                              "--init-image's height rounded down to a multiple of 8)")
    p.add_argument("--width", type=int, help=f"pixels, a multiple of 8 (default {DEFAULT_SIZE}, or the "
                                             "--init-image's width rounded down to a multiple of 8)")
    p.add_argument("--seed", type=int, help="seed of the first image; image i gets SEED+i (default, and -1: a "
                                            "random seed, printed and recorded in every PNG)")
    p.add_argument("--n-images", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--batch-size", type=int, help=f"images per compiled call (default: min(total images, "
                                                  f"{DEFAULT_MAX_BATCH}))")
    p.add_argument("--outdir", default="outputs", help="output folder (default: outputs)")
    p.add_argument("--grid", action="store_true", help="also write all images of the run as grid-NNNNN.png")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype (default float32)")
    p.add_argument("--init-image", metavar="FILE", help="img2img: start from this image (resized to the output "
                                                        "size)")
    p.add_argument("--strength", type=float, help=f"img2img/inpainting (needs --init-image): how much to change "
                                                  f"the init image, in (0, 1] (default {IMG2IMG_STRENGTH}, "
                                                  f"inpainting {INPAINT_STRENGTH})")
    p.add_argument("--mask-image", metavar="FILE", help="inpainting (needs --init-image): white = repaint")
    p.add_argument("--no-safety-checker", action="store_true",
                   help="do not run the model folder's safety checker (flagged images are reported, never altered)")
    p.add_argument("--watermark", action="store_true",
                   help="embed the CompVis invisible watermark (needs: pip install 'sd_jax[watermark]')")
    p.add_argument("--eta", type=float, default=0.0, help="ddim only: noise of each step, 0 = deterministic")
    p.add_argument("--clip-skip", type=int, default=0, help="use the text encoder's hidden state this many layers "
                                                            "before the last (default 0; AUTOMATIC1111's \"Clip skip\" "
                                                            "is this + 1: its 2 is --clip-skip 1)")
    p.add_argument("--plain-prompts", action="store_true",
                   help="take prompts literally, truncated to 77 tokens (default: AUTOMATIC1111's syntax: (word:1.3), "
                        "(word), [word], \\( for a literal bracket, BREAK, prompts over 75 tokens in chunks)")
    p.add_argument("--embedding", action="append", metavar="FILE[:TOKEN]",
                   help="a textual-inversion embedding (AUTOMATIC1111 .pt/.safetensors or diffusers "
                        "learned_embeds.safetensors); TOKEN (default: the file name without extension, or the "
                        "diffusers file's token) stands for it in prompts; repeat the flag for several")
    p.add_argument("--lora", action="append", metavar="FILE[:SCALE]", type=common.argument_type(parse_lora_arg),
                   help="a LoRA adapter (kohya or diffusers/PEFT .safetensors, or a hub id) merged at SCALE "
                        "(default 1); repeat the flag to stack several; each is recorded with its short hash")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the summary is still printed)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run, and return the exit status (2 with one error line for a bad value)."""
    args = build_parser().parse_args(argv)
    return common.run_main(PROG, lambda: run(args))
