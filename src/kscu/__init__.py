"""kscu: Key Step Concept Unlearning for text-to-image diffusion models."""

__version__ = "0.1.0"
