"""Tests of jaxmed.strategies: the registry, peft parity and format, the optimizer over
each strategy."""
