"""jaxmed's tests. The folders mirror jaxmed/'s rooms (models, kernels, strategies, diffusion,
data, eval); the entry points and house-wide checks sit here. A package, so that test files
with the same name in two folders do not clash and `from tests.helpers import ...` works."""
