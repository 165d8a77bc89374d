"""memory_read's CPU backend: the XLA FFI kernels of read_cpu.cc behind one custom_vjp.

`pip install -e .` compiles read_cpu.cc into kernels/_read_cpu*.so (setup.py) against the XLA
FFI headers that jaxlib ships; the first call registers its two handlers with XLA:CPU. The
kernels take float32: h (and gamma, scale) of another dtype are cast to float32 around them, and
the output and gradients cast back (the xla path accumulates in float32 too). An absent gamma
or scale goes in as an empty array.
"""
import functools
import importlib.util

import jax
import jax.numpy as jnp

from kernels.common import F32

LIBRARY = "kernels._read_cpu"
TARGETS = {"adaptor_read_fwd": "AdaptorReadForward", "adaptor_read_bwd": "AdaptorReadBackward"}


@functools.cache
def register():
  """Loads the compiled kernels and registers them with XLA:CPU, once per process; False when
  they are not built."""
  import ctypes  # noqa: PLC0415 - only here

  spec = importlib.util.find_spec(LIBRARY)
  if spec is None or spec.origin is None:
    return False
  library = ctypes.cdll.LoadLibrary(spec.origin)
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                platform="cpu")
  return True


def cpu(h, pos, weight, gamma=None, scale=None):
  # "auto" traces this branch on every host; on a GPU or TPU host without the library it is
  # traced and never lowered.
  if not register() and jax.default_backend() == "cpu":
    raise RuntimeError(
        "memory_read: the CPU kernels (kernels/read_cpu.cc) are not built; run "
        "`pip install -e .` from the repository root (it compiles them with the C++ compiler), "
        "or set ADAPTOR_READ_BACKEND=xla")
  return _cpu(h, pos, weight, gamma, scale)


def _f32(x, empty_shape=(0,)):
  return jnp.zeros(empty_shape, F32) if x is None else x.astype(F32)


@jax.custom_vjp
def _cpu(h, pos, weight, gamma, scale):
  out = jax.ffi.ffi_call("adaptor_read_fwd", jax.ShapeDtypeStruct(h.shape, F32),
                         vmap_method="sequential")(
      h.astype(F32), pos, weight, _f32(gamma), _f32(scale))
  return out.astype(h.dtype)


def _cpu_fwd(h, pos, weight, gamma, scale):
  return _cpu(h, pos, weight, gamma, scale), (h, pos, weight, gamma, scale)


def _cpu_bwd(res, d_out):
  h, pos, weight, gamma, scale = res
  batch, length, groups, C = h.shape
  shapes = (h.shape, pos.shape, pos.shape, (batch, groups, C),
            (0,) if scale is None else scale.shape)
  dh, d_pos, d_weight, d_gamma, d_scale = jax.ffi.ffi_call(
      "adaptor_read_bwd", [jax.ShapeDtypeStruct(s, F32) for s in shapes],
      vmap_method="sequential")(
      h.astype(F32), pos, weight, _f32(gamma), _f32(scale), d_out.astype(F32))
  return (dh.astype(h.dtype), d_pos, d_weight,
          None if gamma is None else jnp.sum(d_gamma, axis=0).astype(gamma.dtype),
          None if scale is None else d_scale.astype(scale.dtype))


_cpu.defvjp(_cpu_fwd, _cpu_bwd)
