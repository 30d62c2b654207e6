"""Tests of jaxmed.diffusion: noise schedules and samplers against diffusers."""
