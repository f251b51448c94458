"""Generate images with Stable Diffusion: ``python generate.py --model MODEL --prompt TEXT``.

A thin wrapper; the logic is ``sd_jax.cli.generate`` (``--help`` lists the flags).
"""

import sys

from sd_jax.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
