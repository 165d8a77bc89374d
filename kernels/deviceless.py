"""Deviceless TPU compiles: the chips (their published figures), the devices of a slice of one
on a machine without a TPU, and what a compiled program reports (memory, cost, the kernels it
calls). With libtpu installed (the `tpu-aot` extra), `jax.experimental.topologies` gives the
devices and `jit(...).lower(...).compile()` on them runs the real XLA:TPU compiler, Mosaic
included. The kernels' tests compile them this way; adaptor_jax.training.aot compiles the train
step with it (benchmarks/tpu_fit.py).
"""
import dataclasses
import importlib.util
import os


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU chip's published figures (Google Cloud's system architecture pages)."""
  name: str
  hbm_gib: float        # HBM per chip
  bf16_tflops: float    # peak dense bf16 FLOP/s, in 1e12
  hbm_gbps: float       # HBM bandwidth, in 1e9 bytes/s
  chip_config: str      # libtpu's chip configuration: "megacore" joins a chip's two TensorCores
  torus_dims: int       # 2 (v5e's 2-D torus) or 3

  def topology(self, shape):
    """libtpu's topology name of a slice of this chip, e.g. (2, 2) -> "v5e:2x2"."""
    return f"{self.name}:{'x'.join(map(str, shape))}"

  def slice_shape(self, chips):
    """The slice shape of `chips` chips (1, 4, 8, 16...): (2, 2) or (2, 2, 1) for 4."""
    shape = [1] * self.torus_dims
    i = 0
    while chips > 1:
      if chips % 2:
        raise ValueError(f"{self.name}: slices have a power-of-two number of chips, "
                         f"got {chips}")
      shape[i % self.torus_dims] *= 2
      chips //= 2
      i += 1
    return tuple(shape)


CHIPS = {
    "v5e": Chip("v5e", 16, 197, 819, "default", 2),
    "v4": Chip("v4", 32, 275, 1228, "megacore", 3),
    "v5p": Chip("v5p", 95, 459, 2765, "megacore", 3),
}


def topology_devices(chip, shape):
  """The devices of a `shape` slice of `chip` ("v5e", "v4", "v5p"), e.g. shape (2, 2), (1, 1,
  1) or CHIPS[chip].slice_shape(n), one device per chip. Raises ValueError when libtpu is
  missing or does not know the topology."""
  if importlib.util.find_spec("libtpu") is None:
    raise ValueError("compiling for TPU needs libtpu: pip install -c constraints.txt -e "
                     "'.[tpu-aot]'")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server: this is not a TPU VM
  # Compile-only processes never own a TPU: let several of them load libtpu at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # noqa: PLC0415 - needs libtpu only when called
  spec = CHIPS[chip]
  chips = 1
  for n in shape:
    chips *= n
  kwargs = dict(chip_config_name=spec.chip_config)
  if chips < 4:  # libtpu's default host holds 2x2x1 chips; smaller slices are one small host
    kwargs["chips_per_host_bounds"] = tuple(shape) + (1,) * (3 - len(shape))
  try:
    topo = topologies.get_topology_desc(topology_name=spec.topology(shape), platform="tpu",
                                        **kwargs)
  except (RuntimeError, ValueError) as e:  # jax's JaxRuntimeError is a RuntimeError
    raise ValueError(f"TPU topology {spec.topology(shape)} ({kwargs}): {e}") from e
  return topo.devices


def memory(compiled):
  """Bytes per device of a compiled program: arguments, outputs, temporaries, aliases, and the
  total HBM it needs (arguments + temporaries + outputs - aliases)."""
  m = compiled.memory_analysis()
  out = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
             temporaries=m.temp_size_in_bytes, aliases=m.alias_size_in_bytes,
             code=m.generated_code_size_in_bytes)
  out["hbm"] = out["arguments"] + out["temporaries"] + out["outputs"] - out["aliases"]
  return out


def cost(compiled):
  """FLOPs and bytes accessed per device of a compiled program (XLA's cost analysis)."""
  c = compiled.cost_analysis()
  c = c[0] if isinstance(c, (list, tuple)) else c
  return dict(flops=float(c.get("flops", 0.0)), bytes=float(c.get("bytes accessed", 0.0)))


def custom_calls(compiled, name):
  """The lines of the compiled (optimized) HLO that call the kernel `name` (e.g.
  "selective_scan_fwd"), with their operand shapes: per-shard shapes mean per-shard calls."""
  return [line.strip() for line in compiled.as_text().splitlines()
          if "custom-call" in line and name in line]
