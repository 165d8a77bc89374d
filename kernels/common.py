"""What the kernels' modules share: the float32 they compute in, softplus as every kernel can
lower it, the read's taps, the scan kernels' config, and the platform rule that picks a
backend for "auto". The backends import this and not each other."""
import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

F32 = jnp.float32


def softplus(x):
  """max(x, 0) + log1p(exp(-|x|)), log1p spelled with log only (Kahan's trick: Mosaic has no
  log1p), exact to a few ulps wherever log1p is."""
  e = jnp.exp(-jnp.abs(x))
  one_e = 1.0 + e
  log1p = jnp.where(one_e == 1.0, e, jnp.log(one_e) * (e / (one_e - 1.0)))
  return jnp.maximum(x, 0.0) + log1p


def taps(pos, length):
  """(p0, p1, f) of every location: the two rows read (int32, clamped to [0, L-1]) and the
  fraction of the second one."""
  floor = jnp.floor(pos)
  p0 = jnp.clip(floor, 0, length - 1).astype(jnp.int32)
  return p0, jnp.minimum(p0 + 1, length - 1), pos - floor


@dataclasses.dataclass(frozen=True)
class ScanConfig:
  """What a selective-scan kernel (pallas_tpu.py, pallas_gpu.py) is specialised to: the shape,
  its backend's block sizes (filled in and validated), the op's flags."""
  length: int  # L
  d_inner: int  # D
  n_state: int  # N
  groups: int  # G
  block_d: int  # channels per tile (a program's, or a grid step's)
  block_l: int  # steps per chunk: the state is carried (TPU) or stored (GPU) between chunks
  delta_softplus: bool
  reverse: bool
  has_z: bool
  interpret: Any  # False, or the Pallas interpreter's parameters

  @property
  def n_chunks(self):
    return pl.cdiv(self.length, self.block_l)

  @property
  def n_tiles(self):
    return self.d_inner // self.block_d


def resolve(op, backend, backends, env_var, auto):
  """The function `backend` names among `backends`, or `backend` itself when it is one.
  "auto" ($env_var overrides it) is a choice per platform inside one jitted function (every
  branch is traced, only the compiled platform's lowered): `auto` maps "tpu", "cuda", "cpu"
  and "default" to a backend's name or a function."""
  if backend == "auto":
    backend = os.environ.get(env_var, "auto")
  if backend == "auto":
    per_platform = {p: backends[b] if isinstance(b, str) else b for p, b in auto.items()}
    return lambda *a: jax.lax.platform_dependent(*a, **per_platform)
  if backend in backends or callable(backend):
    return backends.get(backend, backend)
  raise ValueError(f"{op}: unknown backend {backend!r}; choose 'auto' or one of "
                   f"{sorted(backends)}")
