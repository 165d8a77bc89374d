"""The ops (DESIGN.md §2, §3): the selective scan and Adaptor-T's interpolated memory read, each
with a reference, an XLA path and Pallas kernels."""
from kernels.api import BACKENDS, selective_scan
from kernels.read import memory_read

__all__ = ["BACKENDS", "memory_read", "selective_scan"]
