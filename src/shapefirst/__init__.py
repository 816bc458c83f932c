"""shapefirst: explain and accelerate text-to-image diffusion models."""
__version__ = "0.1.0"
