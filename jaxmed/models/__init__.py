"""jaxmed's own Flax Stable Diffusion models and the diffusers-layout weight reader/writer."""
