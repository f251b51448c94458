"""LoRA adapters: read and write kohya and diffusers/PEFT files, merge them into a pipeline's parameters.

    from sd_jax.lora import LoraLayer, LoraAdapter, read_lora, save_lora

See :mod:`sd_jax.lora.files` for the formats and :mod:`sd_jax.lora.apply` for merging
(``W' = W + sum_i scale_i * (alpha_i / rank_i) * up_i @ down_i``, scales traced).
"""

from sd_jax.lora.files import (LoraAdapter, LoraFormatError, LoraLayer, check_lora_source, detect_format, kohya_name,
                               module_names, parse_lora_arg, parse_state_dict, read_lora, save_lora, short_hash)

__all__ = ["LoraAdapter", "LoraFormatError", "LoraLayer", "check_lora_source", "detect_format", "kohya_name",
           "module_names", "parse_lora_arg", "parse_state_dict", "read_lora", "save_lora", "short_hash"]
