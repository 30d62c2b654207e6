"""Tests of jaxmed.data: readers, the input pipeline, the phantom, the pretraining corpus."""
