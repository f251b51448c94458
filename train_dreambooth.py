"""Dreambooth fine-tuning of Stable Diffusion v1.x in JAX: see ``python train_dreambooth.py --help``.

    python train_dreambooth.py --model M --instance-dir D --instance-prompt "a photo of sks dog" \
        --class-prompt "a photo of dog" --class-dir C --num-class-images 200 --output-dir O \
        [--config configs/dreambooth/unet.yaml]
"""

import sys

from sd_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
