"""jaxmed: fine-tuning Stable Diffusion on medical images with JAX/Flax.

Subpackages: `jaxmed.models` (our own Flax UNet / VAE / CLIP text tower and the
diffusers-layout weight reader/writer), `jaxmed.diffusion` (pure-JAX noise schedules and samplers).
"""

__version__ = "0.1.0"
