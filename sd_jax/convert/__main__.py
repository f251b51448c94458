"""``python -m sd_jax.convert SRC DST``: convert between diffusers folders, CompVis single files and hub ids.

    python -m sd_jax.convert sd-v1-4-full-ema.ckpt sd14/                # -> diffusers folder (float32, EMA UNet)
    python -m sd_jax.convert sd14/ sd14.safetensors --dtype float16     # -> CompVis single file
    python -m sd_jax.convert model.ckpt out/ --no-ema                   # raw UNet weights (for training)
    python -m sd_jax.convert custom.ckpt out/ --config v1-inference.yaml

DST's name decides the format: ``*.safetensors`` the single-file layout, a name without a suffix
(or ending in ``/``) a diffusers folder; ``.ckpt``/``.bin`` (pickles) and other suffixes are refused.
A bad input is one line and exit status 2; a bug, its traceback and exit status 1.
"""

from __future__ import annotations

import argparse
import sys

from sd_jax.cli import common
from sd_jax.convert.export import EXPORT_DTYPES, convert

PROG = "python -m sd_jax.convert"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = common.ArgumentParser(
        prog=PROG,
        description="Convert Stable Diffusion weights: diffusers folder, CompVis .ckpt/.safetensors or hub id "
                    "-> diffusers folder (DST without a suffix), or -> CompVis .safetensors (DST ending in "
                    ".safetensors). sd_jax never writes pickles (.ckpt/.bin).")
    parser.add_argument("src", help="diffusers folder, .ckpt/.safetensors file, or hub id (org/name)")
    parser.add_argument("dst", help="output folder (no suffix, or ending in /), or a file name ending in .safetensors")
    parser.add_argument("--dtype", choices=sorted(EXPORT_DTYPES),
                        help="weight dtype of the output (default: float32 for a folder, float16 for a single file)")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="full-EMA files: take the EMA UNet weights (default) or, with --no-ema, the raw ones")
    parser.add_argument("--config", help="architecture of a single file: a diffusers folder or a CompVis .yaml")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    parser.add_argument("--variant", help="diffusers weight variant to read, e.g. fp16")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit)")
    parser.add_argument("--token", help="hub access token (for gated or private repositories)")
    parser.add_argument("--cache-dir", help="hub cache directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the conversion: 0 on success, 2 with one line for a bad input, 1 with a traceback for a bug."""
    args = parse_args(argv)
    hub = {k: v for k, v in (("revision", args.revision), ("token", args.token), ("cache_dir", args.cache_dir))
           if v is not None}

    def run() -> None:
        out = convert(args.src, args.dst, dtype=args.dtype, use_ema=args.ema, config=args.config,
                      overwrite=args.overwrite, variant=args.variant, **hub)
        print(f"wrote {out}")

    return common.run_main(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
