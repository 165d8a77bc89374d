"""The ops (DESIGN.md §2, §3): the selective scan and Adaptor-T's interpolated memory read (given
its locations, or learned from its states), each
with a reference, an XLA path and Pallas kernels."""
from kernels.api import BACKENDS, selective_scan
from kernels.learned import learned_read
from kernels.read import memory_read

__all__ = ["BACKENDS", "learned_read", "memory_read", "selective_scan"]
