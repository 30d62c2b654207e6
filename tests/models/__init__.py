"""Tests of jaxmed.models: the Flax UNet, VAE and CLIP text tower, layers, weights."""
