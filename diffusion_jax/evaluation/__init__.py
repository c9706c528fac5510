"""Evaluation: metrics of generated samples."""
