"""``python -m jaxmed.data.phantom``: write a phantom dataset (see `jaxmed.data.phantom`)."""

from jaxmed.data.phantom import main

main()
