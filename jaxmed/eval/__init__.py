"""Evaluation: Inception features and FID, Vendi diversity, the domain classifier's metrics."""
