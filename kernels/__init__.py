"""The selective-scan op (DESIGN.md §2): a reference, an XLA path and Pallas TPU/GPU kernels."""
from kernels.api import BACKENDS, selective_scan

__all__ = ["BACKENDS", "selective_scan"]
