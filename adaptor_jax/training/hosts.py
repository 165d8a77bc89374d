"""Several hosts: `jax.distributed.initialize()` when the run spans more than one process."""
import os

import jax

# Set by the launchers of multi-process jobs (TPU pods, SLURM, Open MPI, explicit coordinators).
_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
                      "OMPI_COMM_WORLD_SIZE")


def _launched_multi_process():
  for name in _MULTI_PROCESS_ENV:
    value = os.environ.get(name, "")
    if name == "TPU_WORKER_HOSTNAMES" and "," in value:
      return True
    if name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE") and value.isdigit() and int(value) > 1:
      return True
    if name == "JAX_COORDINATOR_ADDRESS" and value:
      return True
  return False


def initialize(coordinator_address=None, num_processes=None, process_id=None):
  """Joins the job's processes before any device is touched: with explicit arguments, or by
  jax.distributed's auto-detection when a launcher set up several processes. On CPU the
  collectives go through gloo. A single-process run does nothing."""
  explicit = coordinator_address is not None
  if not (explicit or _launched_multi_process()):
    return
  if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()
