"""Command-line front ends: argument parsing and reporting over one library call each.

``generate.py`` and ``train_dreambooth.py`` at the top of the repository are
thin wrappers around ``sd_jax.cli.generate.main`` (and, later,
``sd_jax.cli.train_dreambooth.main``); tests and notebooks call the same
``run`` functions directly.
"""
