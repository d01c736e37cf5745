"""Synthetic datasets: procedurally generated clips with exact ground truth."""
