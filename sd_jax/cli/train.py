"""``train_dreambooth.py``: flags -> a validated TrainConfig -> :func:`sd_jax.dreambooth.trainer.train`.

A recipe (``--config configs/dreambooth/<recipe>.yaml``) gives the defaults;
the flags below and generic ``--set key=value`` overrides (dotted keys of the
config, e.g. ``--set optim.lr_schedule=cosine``) change it. The single-concept
flags (``--instance-dir``, ``--instance-prompt``, ``--class-prompt``,
``--class-dir``, ``--num-class-images``) build ``concepts[0]``; several
concepts come from the recipe's ``concepts:`` list. ``--lora`` (or ``--lora-rank`` /
``--lora-alpha``, or ``--config configs/dreambooth/lora.yaml``) trains LoRA adapters instead of the
whole model.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sd_jax.cli import common

PROG = "train_dreambooth.py"

# flag dest -> dotted config key
FLAG_KEYS = {
    "model": "model.path", "output_dir": "output_dir", "seed": "seed",
    "resolution": "data.resolution", "max_train_steps": "train.max_train_steps",
    "learning_rate": "optim.learning_rate", "text_encoder_lr": "optim.text_encoder_lr",
    "train_batch_size": "train.train_batch_size", "train_text_encoder": "train.train_text_encoder",
    "prior_loss_weight": "train.prior_loss_weight", "checkpoint_every": "checkpoint.every",
    "sample_every": "logging.sample_every", "mixed_precision": "train.mixed_precision",
    "grad_accum_steps": "optim.grad_accum_steps", "lr_schedule": "optim.lr_schedule",
    "skip_bad_images": "data.skip_bad_images", "save_single_file": "checkpoint.save_single_file",
    "clip_skip": "train.clip_skip",
    "lora": "lora.enabled", "lora_rank": "lora.rank", "lora_alpha": "lora.alpha", "merge": "checkpoint.merge_lora",
}
SHOWN_DEFAULTS = {"lora_alpha": "the rank"}  # flags whose built-in default is not a plain value
CONCEPT_FLAGS = ("instance_dir", "instance_prompt", "class_prompt", "class_dir", "num_class_images")


def build_parser() -> common.ArgumentParser:
    """The command line."""
    p = common.ArgumentParser(prog=PROG, description="Dreambooth fine-tuning of Stable Diffusion v1.x in JAX. "
                              "Writes OUTPUT_DIR/checkpoints (Orbax), logs (TensorBoard), samples and final "
                              "(a diffusers folder); an existing OUTPUT_DIR is resumed. Defaults shown are the "
                              "built-in ones; a --config recipe changes them, flags and --set change the recipe.")
    p.add_argument("--config", metavar="YAML", help="a recipe from configs/dreambooth/ (defaults for everything)")
    p.add_argument("--model", help="starting model: diffusers folder, .ckpt/.safetensors file or hub id "
                                    f"(default: {_default_model()})")
    p.add_argument("--instance-dir", help="folder of 3-20 photos of the subject")
    p.add_argument("--instance-prompt", help='e.g. "a photo of sks dog"')
    p.add_argument("--class-prompt", help='e.g. "a photo of dog" (turns prior preservation on)')
    p.add_argument("--class-dir", help="class images folder (missing ones are generated; default "
                                       "OUTPUT_DIR/class_images/concept_0)")
    p.add_argument("--num-class-images", type=int, help="class images to use")
    p.add_argument("--output-dir", help="where checkpoints, logs, samples and the final model go")
    p.add_argument("--resolution", type=int, help="training image size, a multiple of 8")
    p.add_argument("--max-train-steps", type=int, help="optimizer updates (raise it to extend a finished run)")
    p.add_argument("--learning-rate", type=float, help="peak learning rate of the UNet")
    p.add_argument("--text-encoder-lr", type=float, help="learning rate of the text encoder (none: --learning-rate)")
    p.add_argument("--train-batch-size", type=int, help="instance images per step (+ as many class images)")
    p.add_argument("--train-text-encoder", action="store_true", default=None, help="fine-tune the text encoder too")
    p.add_argument("--clip-skip", type=int, metavar="N",
                   help="condition the UNet on the text encoder's hidden state N layers before the last (class "
                        "images and samples too); AUTOMATIC1111's \"Clip skip\" and kohya's --clip_skip are N + 1 "
                        "(their 2, as NovelAI-derived anime models use, is --clip-skip 1); sample the result "
                        "with the same value (generate.py --clip-skip N)")
    p.add_argument("--prior-loss-weight", type=float, help="weight of the class-image (prior preservation) loss")
    p.add_argument("--checkpoint-every", type=int, help="save a resumable checkpoint every N steps")
    p.add_argument("--sample-every", type=int, help="validation samples every N steps (0: none)")
    p.add_argument("--mixed-precision", choices=("float32", "bfloat16"), help="compute dtype (masters stay float32)")
    p.add_argument("--grad-accum-steps", type=int, help="micro-batches per optimizer update")
    p.add_argument("--lr-schedule", choices=("constant", "warmup", "cosine", "linear"), help="learning-rate schedule")
    p.add_argument("--skip-bad-images", action="store_true", default=None,
                   help="warn about and skip unreadable images instead of stopping")
    p.add_argument("--save-single-file", action="store_true", default=None,
                   help="also write OUTPUT_DIR/model.safetensors (CompVis layout, float16: AUTOMATIC1111, "
                        "ComfyUI)")
    p.add_argument("--lora", action="store_true", default=None,
                   help="train LoRA adapters (a few MB) on the frozen model instead of the whole UNet (with "
                        "--train-text-encoder: adapters on the text encoder too); final/ gets them as "
                        "pytorch_lora_weights.safetensors (diffusers) and kohya_lora.safetensors (AUTOMATIC1111, "
                        "ComfyUI)")
    p.add_argument("--lora-rank", type=int, metavar="R", help="rank of the LoRA adapters (implies --lora)")
    p.add_argument("--lora-alpha", type=float, metavar="A",
                   help="LoRA alpha: the adapters are scaled by alpha / rank (implies --lora)")
    p.add_argument("--merge", action="store_true", default=None,
                   help="with --lora: final/ also holds the full model with the LoRA merged in (a diffusers folder)")
    p.add_argument("--seed", type=int, help="seed of the data order, noise and class images")
    p.add_argument("--resume", action="store_true", help="require resuming from OUTPUT_DIR's checkpoints "
                                                         "(resuming is automatic when they exist)")
    p.add_argument("--no-resume", action="store_true", help="refuse to start if OUTPUT_DIR has checkpoints")
    p.add_argument("--resume-step", type=int, metavar="N",
                   help="resume from checkpoint N (e.g. the good one before a damaged checkpoint); later "
                        "checkpoints are moved to checkpoints/.set_aside/, not deleted")
    p.add_argument("--overwrite", action="store_true",
                   help="train in a non-empty OUTPUT_DIR that is not an sd_jax run; its files are left alone "
                        "(sd_jax never deletes or replaces a file it did not write)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config value, e.g. --set optim.ema_decay=0.999 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the header and summary stay)")
    _show_defaults(p)
    return p


def _default_model() -> str:
    from sd_jax.generation import DEFAULT_MODEL

    return DEFAULT_MODEL


def _show_defaults(p: common.ArgumentParser) -> None:
    """Append each recipe-backed flag's built-in default to its help (argparse's own default stays None so
    that a --config recipe, then the flag, decide)."""
    from sd_jax.dreambooth.config import Concept, load_config

    values = load_config(None, require_runnable=False).to_dict()
    concept = {f.name: f.default for f in dataclasses.fields(Concept) if f.default is not dataclasses.MISSING}
    for action in p._actions:
        if action.dest in SHOWN_DEFAULTS:
            value = SHOWN_DEFAULTS[action.dest]
        elif action.dest in FLAG_KEYS and action.dest != "model":
            value: Any = values
            for part in FLAG_KEYS[action.dest].split("."):
                value = value.get(part) if isinstance(value, dict) else None
        elif action.dest in CONCEPT_FLAGS and concept.get(action.dest) not in (None, ""):
            value = concept[action.dest]
        else:
            continue
        shown = "none" if value in (None, "") else "on" if value is True else "off" if value is False else value
        action.help = f"{action.help + ' ' if action.help else ''}(default: {shown})"


def config_from_args(args: Any) -> Any:
    """Recipe + flags + --set -> a validated TrainConfig (raises ValueError naming the bad value)."""
    from sd_jax.dreambooth.config import TrainConfig, apply_overrides, load_config

    base = load_config(args.config, require_runnable=False).to_dict()  # the recipe, validated
    concept = {name: getattr(args, name) for name in CONCEPT_FLAGS if getattr(args, name) is not None}
    if concept:
        if len(base.get("concepts") or []) > 1:
            raise ValueError("--instance-dir/--instance-prompt/... set one concept, but the recipe lists "
                             f"{len(base['concepts'])}; edit the recipe or use --set concepts.N.key=value")
        base["concepts"] = [dict((base.get("concepts") or [{}])[0]) | concept]
    flags = {key: getattr(args, dest) for dest, key in FLAG_KEYS.items() if getattr(args, dest) is not None}
    if args.lora_rank is not None or args.lora_alpha is not None:
        flags.setdefault("lora.enabled", True)
    base = apply_overrides(apply_overrides(base, flags, what="flag"), args.set, what="--set")
    if not (base.get("model") or {}).get("path"):
        base = apply_overrides(base, {"model.path": _default_model()}, what="flag")
    config = TrainConfig.from_dict(base)
    config.check_runnable()
    return config


def run(args: Any) -> Any:
    """Validate, check files cheaply, then train."""
    if args.resume and args.no_resume:
        raise ValueError("--resume and --no-resume contradict each other")
    if args.resume_step is not None and (args.no_resume or args.resume_step < 1):
        raise ValueError(f"--resume-step {args.resume_step}: expected a checkpoint step >= 1 (and no --no-resume)")
    config = config_from_args(args)
    common.check_model_source(config.model.path)
    for c in config.concepts:
        if not Path(c.instance_dir).is_dir():
            raise ValueError(f"instance folder {c.instance_dir!r} does not exist")
    common.prepare_output_dir(config.output_dir, "--output-dir")
    from sd_jax.dreambooth.trainer import train

    resume = True if args.resume or args.resume_step is not None else False if args.no_resume else None
    result = train(config, resume=resume, progress=not args.no_progress, overwrite=args.overwrite,
                   resume_step=args.resume_step)
    if result.complete:
        print(f"{result.output_dir} is already complete (step {result.steps} of {result.steps}); final/ is left as "
              "it is. Raise --max-train-steps to train further.")
    if config.lora.enabled and result.final_dir is not None:
        from sd_jax.dreambooth.lora import KOHYA_FILE, PEFT_FILE

        print(f"LoRA: {result.final_dir / PEFT_FILE} (diffusers, PEFT), {result.final_dir / KOHYA_FILE} "
              "(AUTOMATIC1111, ComfyUI)")
    if not config.lora.enabled or config.checkpoint.merge_lora:
        print(f"final model: {result.final_dir}" + (f"; single file: {result.single_file}" if result.single_file
                                                     else ""))
    elif result.single_file:
        print(f"merged single file: {result.single_file}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; one clear line and exit 2 on a bad value or a diverged run, 130 after Ctrl-C."""
    from sd_jax.dreambooth.run_dir import TrainingDiverged, TrainingInterrupted

    args = build_parser().parse_args(argv)
    try:
        return common.run_main(PROG, lambda: run(args), passthrough=(TrainingInterrupted, TrainingDiverged))
    except TrainingInterrupted as stop:
        print(f"{PROG}: {common.one_line(stop)}", file=sys.stderr)
        return common.EXIT_INTERRUPTED
    except TrainingDiverged as err:
        return common.print_error(PROG, err)


if __name__ == "__main__":
    sys.exit(main())
