"""Dreambooth fine-tuning: data (instance and class images), loss, train step, checkpoints, logging."""
