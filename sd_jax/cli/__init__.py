"""Command-line front ends: argument parsing and printing over one library call each.

``generate.py`` and ``train_dreambooth.py`` at the top of the repository are
thin wrappers around ``sd_jax.cli.generate.main`` and ``sd_jax.cli.train.main``;
the logic they call lives in the library (:func:`sd_jax.generation.run`,
:func:`sd_jax.dreambooth.trainer.train`), which tests and notebooks call directly.
"""
