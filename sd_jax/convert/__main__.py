"""``python -m sd_jax.convert SRC DST``: convert between diffusers folders, CompVis single files and hub ids.

    python -m sd_jax.convert sd-v1-4-full-ema.ckpt sd14/                # -> diffusers folder (float32, EMA UNet)
    python -m sd_jax.convert sd14/ sd14.safetensors --dtype float16     # -> CompVis single file
    python -m sd_jax.convert model.ckpt out/ --no-ema                   # raw UNet weights (for training)
    python -m sd_jax.convert custom.ckpt out/ --config v1-inference.yaml

DST ending in ``.safetensors`` gets the single-file layout, anything else a diffusers folder.
Errors are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from sd_jax.convert.export import EXPORT_DTYPES, convert


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m sd_jax.convert",
        description="Convert Stable Diffusion weights: diffusers folder, CompVis .ckpt/.safetensors or hub id "
                    "-> diffusers folder, or -> CompVis .safetensors when DST ends in .safetensors.")
    parser.add_argument("src", help="diffusers folder, .ckpt/.safetensors file, or hub id (org/name)")
    parser.add_argument("dst", help="output folder, or a file name ending in .safetensors")
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


def one_line(err: BaseException) -> str:
    """An exception as one line: its lines joined, its type named when the message is empty."""
    text = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; 0 on success, 2 with one error line on failure."""
    args = parse_args(argv)
    hub = {k: v for k, v in (("revision", args.revision), ("token", args.token), ("cache_dir", args.cache_dir))
           if v is not None}
    try:
        out = convert(args.src, args.dst, dtype=args.dtype, use_ema=args.ema, config=args.config,
                      overwrite=args.overwrite, variant=args.variant, **hub)
    except (ValueError, OSError, KeyError, TypeError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
