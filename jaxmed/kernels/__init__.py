"""jaxmed's own kernels: XLA:CPU custom calls in C++ (cpu_*.cc, built by `build`)."""
