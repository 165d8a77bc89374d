"""Two processes of one jax.distributed job on CPU, for tests/test_hosts.py:

  python tests/hosts_cases.py CASE PORT PROCESS_ID

Each joins the job (hosts.initialize, host_timeout_s 4: heartbeats every second), then inside
hosts.watched() runs steps of one all-reduce over both processes, as train.py runs its loop:
  fails0, fails1  that process stops at step 20 with a user error (bad data on its shard, say);
                  the other goes on stepping (process 0 hosts the coordination service)
  both_fail       both stop at step 20 with the same user error (a diverged loss, say)
A user error ends in one line, exit 1 (commands.main, as train.py); a lost peer in the watchdog's.
"""
import sys
import time

import jax
import jax.numpy as jnp

from adaptor_jax import commands, errors
from adaptor_jax.training import hosts


def main(case, port, process_id):
  hosts.initialize(f"localhost:{port}", 2, process_id, timeout_s=4)
  mesh = jax.sharding.Mesh(jax.devices(), ("d",))
  sharding = jax.sharding.NamedSharding(mesh, jax.P("d"))
  total = jax.jit(lambda x: x.sum())
  with hosts.watched():
    for step in range(1, 100000):
      x = jax.make_array_from_process_local_data(sharding, jnp.ones((2,)))
      assert float(total(x)) == 4.0
      if step == 20 and case in ("both_fail", f"fails{process_id}"):
        raise errors.UserError(f"process {process_id}: step {step}: the data went bad")
      time.sleep(0.01)


if __name__ == "__main__":
  commands.main(lambda argv: main(argv[1], argv[2], int(argv[3])))(sys.argv)
