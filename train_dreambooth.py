"""Dreambooth fine-tuning CLI — not implemented yet.

The trainer (prior preservation, sharded jitted train step, Orbax checkpoints)
is tracked as its own piece of work; until it lands this script refuses to run
rather than pretend to train.
"""

import sys


def main() -> int:
    print("train_dreambooth.py: Dreambooth training is not implemented yet in this version of sd_jax.",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
