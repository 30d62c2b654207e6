"""jaxmed's kernels and the one place that chooses them.

`dispatch` is what the layers and the optimizer call: for each op it picks, by the platform
being compiled for, a CPU path (the C++ XLA FFI kernels ``cpu_*.cc`` built by `build`, or
the jnp paths of `cpu_jnp`) or XLA's own op (`reference`).
"""
