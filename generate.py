"""Generate images with Stable Diffusion: ``python generate.py --prompt TEXT [--model MODEL]``.

A thin wrapper: ``sd_jax.cli.generate`` parses the flags (``--help`` lists them) and
``sd_jax.generation.run`` does the work.
"""

import sys

from sd_jax.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
