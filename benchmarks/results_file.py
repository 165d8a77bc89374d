"""What the benchmark scripts share: a results file of rows merged by key, kept after every row
(so a stopped run continues where it stopped), and the timed steps of a compiled train step."""
import datetime
import json
import os
import statistics
import time

import jax

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def load(path):
  """The results file at `path` ({} when there is none yet), with its "rows" dict."""
  results = {}
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
  results.setdefault("rows", {})
  return results


def save(path, results, **meta):
  """Writes `results` with `meta` and the time it was updated, merged over the rows the file
  holds now (another run of the script may have added some since it was loaded)."""
  merged = {**load(path)["rows"], **results["rows"]}
  results["rows"].update(merged)  # in place: callers keep adding rows to the dict they hold
  results.update(meta, updated=datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds"))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(results, f, indent=1, sort_keys=True)


def timed_steps(compiled, state, batch, warmup, iters):
  """Runs the (state-donating) train step `warmup` untimed then `iters` timed times. Returns
  (state, last metrics, the step times in seconds)."""
  for _ in range(warmup):
    state, metrics = jax.block_until_ready(compiled(state, batch))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(compiled(state, batch))  # donated: reassign
    times.append(time.perf_counter() - start)
  return state, metrics, times


median = statistics.median
