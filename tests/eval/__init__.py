"""Tests of jaxmed.eval: FID / Vendi, the Inception network, the downstream classifier."""
