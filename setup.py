"""jaxmed: fine-tune Stable Diffusion on medical images with JAX/Flax, and measure each strategy."""

from setuptools import find_namespace_packages, setup

setup(
    name="jaxmed",
    version="0.1.0",
    description=(
        "JAX/Flax fine-tuning of Stable Diffusion on medical images: 11+ strategies, "
        "sharded training, diffusers-format checkpoints, FID / Vendi / alignment / "
        "downstream-classifier evaluation."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # namespace discovery: the asset folders (no __init__.py) are packages too, which
    # setuptools otherwise warns about at every install
    packages=find_namespace_packages(include=["jaxmed", "jaxmed.*"]),
    include_package_data=True,
    # The C++ kernels (kernels/*.cc, *.h) are compiled at first use (kernels/build.py).
    package_data={"jaxmed": ["assets/**/*", "kernels/*.cc", "kernels/*.h"]},
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.6",
        "ml-collections>=0.1.1",
        "numpy>=1.24",
        "safetensors>=0.4",
        "transformers>=4.40",  # CLIPTokenizer only
        "pillow>=10",
        "pandas>=2",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "scipy>=1.10",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # Parity tests against the PyTorch references. Install torch==2.13.0 (CPU) first.
        "test": [
            "pytest>=7",
            "pytest-xdist>=3",
            "torch>=2.1",
            "diffusers>=0.30",
            "transformers>=4.40",
            "peft>=0.12",
            "accelerate>=0.30",
            "scikit-learn>=1.3",
            "scikit-image>=0.22",
            "ruff>=0.4",
            # tests/test_notebook.py executes colab/jaxmed_demo.ipynb in an IPython kernel
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
        ],
        "tfds": ["tensorflow-datasets>=4.9", "tensorflow-cpu>=2.15"],
        # `python -m jaxmed.plan` for TPU topologies: libtpu compiles for a slice without a
        # TPU. jax's own extra pins the libtpu that matches the installed jax.
        "tpu-plan": ["jax[tpu]"],
    },
)
