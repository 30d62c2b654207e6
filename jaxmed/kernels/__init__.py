"""jaxmed's kernels and the one place that chooses them.

`dispatch` is what the layers and the optimizer call: for each op it picks, by the platform
being compiled for, a CPU path (the C++ XLA FFI kernels ``cpu_*.cc`` built by `build`, or
the jnp paths of `cpu_jnp`) or XLA's own op (`reference`); for attention, by
``model.attention`` too, `dot_product` (XLA's fused attention, cuDNN's flash kernel on GPU)
or `tpu_flash` (the Pallas flash kernel on TPU).
"""
