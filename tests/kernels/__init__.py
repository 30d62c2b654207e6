"""Tests of jaxmed.kernels: the CPU FFI kernels and the dispatch by platform."""
