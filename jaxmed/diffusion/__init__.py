"""Diffusion: noise schedules, the samplers that step them, and the guided sampling function."""
