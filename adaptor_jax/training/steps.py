"""The train state, its creation on the mesh, and the jitted train and eval steps.

The model is split once into a static graph (`Net.graphdef`, plus its never-trained non-param
state: drop path's RNG variables, reseeded every step) and pure-dict pytrees:

  state = {"step": int32, "params": {...}, "opt": optax state, "ema": {...} or None,
           "stats": {...}}   # BatchNorm's running statistics ({} for a model without any)

Every array in `state` has an explicit NamedSharding (sharding.py); the train step is one
`jax.jit` with in/out shardings and the state donated. Randomness (augmentation, drop path) is
a function of (config.seed, step) only, so a resumed run repeats an uninterrupted one exactly.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from adaptor_jax.models import registry
from adaptor_jax.training import sharding, tasks


def model_kwargs(config, num_classes):
  """create_model arguments from the config."""
  kwargs = dict(config.model_overrides.to_dict())
  kwargs.update(num_classes=num_classes, dtype=jnp.dtype(config.dtype), remat=config.remat)
  if registry.has_scan(config.model):
    kwargs["scan_backend"] = config.scan_backend
  if config.form:
    kwargs.update(form=config.form, share_adaptor=config.share_adaptor)
  if config.drop_path_rate >= 0:
    kwargs["drop_path_rate"] = config.drop_path_rate
  return kwargs


def build_model(config, num_classes, seed=None):
  """A fresh model (call it under jit or nnx.eval_shape: eager creation is slow)."""
  seed = config.seed if seed is None else seed
  return registry.create_model(config.model, rngs=nnx.Rngs(seed),
                               **model_kwargs(config, num_classes))


@dataclasses.dataclass(frozen=True)
class Net:
  """The static half of the model: its graph and non-param state."""
  graphdef: Any
  rest: Any
  wrt: Any = nnx.Param  # the nnx filter of the params that train (registry.trainable)

  def model(self, params, *, train, key=None, stats=None):
    """The module with `params` and BatchNorm `stats` (pure dicts; stats may be omitted by a
    model without BatchNorm); in training mode drop path and dropout draw from `key`.
    Differentiate it with nnx transforms at the level it is made (nnx forbids mutating its
    RNG state from inside a jax.grad trace)."""
    model = nnx.merge(self.graphdef, params, {} if stats is None else stats, self.rest)
    if train:
      nnx.reseed(model, default=key)
      model.train()
    else:
      model.eval()
    return model


def make_net(config, num_classes):
  """(net, abstract params as an nnx.State, trainable mask or None), without any compute."""
  model = nnx.eval_shape(lambda: build_model(config, num_classes))
  graphdef, params, _, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  head_only = config.train_only == "head"
  mask = registry.trainable_mask(model, head_only=head_only)
  wrt = registry.trainable(model, head_only=head_only)
  return Net(graphdef, placeholders(rest), wrt), params, mask


def param_counts(abstract_params, mask):
  """{"params", "trainable", "trainable_share"} of make_net's params and trainable mask."""
  sizes = [a.size for a in jax.tree.leaves(nnx.to_pure_dict(abstract_params))]
  flags = jax.tree.leaves(mask) if mask is not None else [True] * len(sizes)
  total, trained = sum(sizes), sum(n for n, t in zip(sizes, flags) if t)
  return dict(params=total, trainable=trained, trainable_share=trained / total)


def placeholders(rest):
  """Concrete stand-ins for abstract non-param state (drop path's RNG key and count): drop path
  is reseeded every train step, so these values are never used."""
  rest = nnx.to_pure_dict(rest)  # plain arrays: merge makes fresh Variables in the caller's trace
  return jax.tree.map(lambda a: jax.random.key(0) if jax.dtypes.issubdtype(
      a.dtype, jax.dtypes.prng_key) else jnp.zeros(a.shape, a.dtype), rest)


def param_shardings(abstract_params, mesh):
  """Pure-dict NamedShardings of the params on `mesh` (FSDP rules in sharding.py)."""
  return nnx.to_pure_dict(sharding.state_shardings(abstract_params, mesh))


def create(config, num_classes, mesh, tx, made=None):
  """(net, state, state_shardings): a fresh state made directly in its shardings on `mesh`.
  `made`: make_net's result when the caller has it already."""
  net, abstract_params, _ = made or make_net(config, num_classes)
  shardings = param_shardings(abstract_params, mesh)

  def init():
    model = build_model(config, num_classes)
    return (nnx.to_pure_dict(nnx.state(model, nnx.Param)),
            nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))

  repl = sharding.replicated(mesh)
  stats_shardings = jax.tree.map(lambda _: repl, initial_stats(config, num_classes))
  params, stats = _compile(jax.jit(init, out_shardings=(shardings, stats_shardings)))()
  state, shardings = init_state(params, shardings, config, tx, mesh, stats)
  return net, state, shardings


def initial_stats(config, num_classes):
  """The BatchNorm statistics a fresh model starts with, abstract ({} without BatchNorm)."""
  model = nnx.eval_shape(lambda: build_model(config, num_classes))
  return nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))


def _compile(jitted, *args):
  """Compiles `jitted`; on CPU with XLA's backend optimisations off (init code runs once, and
  its compile time is otherwise tens of seconds)."""
  lowered = jitted.lower(*args)
  if jax.default_backend() == "cpu":
    return lowered.compile(compiler_options=dict(xla_backend_optimization_level=0,
                                                 xla_llvm_disable_expensive_passes=True))
  return lowered.compile()


def state_shardings(abstract_params, param_shardings, config, tx, mesh, stats):
  """The shardings of every leaf of the train state around params of `param_shardings`
  (BatchNorm's `stats`, small, are replicated)."""
  repl = sharding.replicated(mesh)
  masked = lambda x: isinstance(x, optax.MaskedNode)  # frozen params' slots (multi_transform)
  opt_shardings = optax.tree_map_params(
      tx, lambda x, s: x if masked(x) else s, jax.eval_shape(tx.init, abstract_params),
      param_shardings, transform_non_params=lambda _: repl, is_leaf=masked)
  return dict(step=repl, params=param_shardings, opt=opt_shardings,
              ema=param_shardings if config.ema_decay else None,
              stats=jax.tree.map(lambda _: repl, stats))


def _make_state(params, stats, tx, config):
  return dict(step=jnp.zeros((), jnp.int32), params=params, opt=tx.init(params),
              ema=jax.tree.map(jnp.copy, params) if config.ema_decay else None, stats=stats)


def init_state(params, param_shardings, config, tx, mesh, stats):
  """The train state around `params` and `stats` (already placed), and the shardings of every
  leaf."""
  shardings = state_shardings(params, param_shardings, config, tx, mesh, stats)
  make = lambda params, stats: _make_state(params, stats, tx, config)
  state = _compile(jax.jit(make, in_shardings=(param_shardings, shardings["stats"]),
                           out_shardings=shardings), params, stats)(params, stats)
  return state, shardings


def abstract_state(config, num_classes, mesh, tx, made=None):
  """(net, the train state as ShapeDtypeStructs carrying their shardings, state shardings):
  what `create` would make on `mesh`, without computing anything, for ahead-of-time compiles
  (benchmarks/tpu_fit.py compiles train steps for TPU topologies this way)."""
  net, abstract_params, _ = made or make_net(config, num_classes)
  param_sh = param_shardings(abstract_params, mesh)
  params = nnx.to_pure_dict(abstract_params)
  stats = initial_stats(config, num_classes)
  shardings = state_shardings(params, param_sh, config, tx, mesh, stats)
  shapes = jax.eval_shape(lambda p, s: _make_state(p, s, tx, config), params, stats)
  placed = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, shardings)
  return net, placed, shardings


def make_train_step(net, tx, config, num_classes, shardings, mesh):
  """jit(train_step)(state, batch) -> (state, metrics); the batch (the task's, e.g. {"image":
  uint8, "label": int32}) split over the mesh's batch axes; the state is donated. The task
  (config.task, tasks.py) makes the inputs and targets on device and the loss. metrics: loss,
  grad_norm (before clipping) and finite (both finite); with config.skip_nonfinite a
  non-finite step leaves params, optimizer state and EMA as they were."""
  accum, task = config.grad_accum, tasks.get(config.task)

  def grad_fn(params, stats, x, targets, key):
    """(loss, grads, the BatchNorm statistics this forward pass updated)."""
    def loss_fn(model):
      loss = task.loss(model(x), targets)
      return loss, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    grad = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, net.wrt), has_aux=True)
    (loss, stats), grads = grad(net.model(params, train=True, key=key, stats=stats))
    return loss, _zeros_where_missing(nnx.to_pure_dict(grads), params), stats

  def train_step(state, batch):
    key = jax.random.fold_in(jax.random.key(config.seed), state["step"])
    k_aug, k_drop = jax.random.split(key)
    x, targets = task.train_inputs(k_aug, batch, config.data, num_classes)
    if accum == 1:
      loss, grads, stats = grad_fn(state["params"], state["stats"], x, targets, k_drop)
    else:
      # micro-batch i takes every accum-th example: each device's part of the batch splits
      # evenly into the micro-batches, so they stay on every device (no resharding)
      micro = lambda tree: jax.tree.map(
          lambda a: a.reshape(a.shape[0] // accum, accum, *a.shape[1:]).swapaxes(0, 1), tree)

      def body(carry, inputs):  # the statistics go from micro-batch to micro-batch
        (loss, grads), stats = carry
        i, x_i, t_i = inputs
        loss_i, grads_i, stats = grad_fn(state["params"], stats, x_i, t_i,
                                         jax.random.fold_in(k_drop, i))
        return (jax.tree.map(jnp.add, (loss, grads), (loss_i, grads_i)), stats), None

      zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state["params"]))
      ((loss, grads), stats), _ = jax.lax.scan(
          body, (zero, state["stats"]), (jnp.arange(accum), micro(x), micro(targets)))
      loss, grads = jax.tree.map(lambda g: g / accum, (loss, grads))
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = state["ema"]
    if ema is not None:
      d = config.ema_decay
      ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = dict(params=params, opt=opt, ema=ema, stats=stats)
    if config.skip_nonfinite:  # such a step changes nothing but the step count
      old = {k: state[k] for k in new}
      new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new = dict(new, step=state["step"] + 1)
    return new, dict(loss=loss, grad_norm=grad_norm, finite=finite)

  batch_shardings = sharding.batch_sharding(mesh)
  return jax.jit(sharding.on_mesh(train_step, mesh), in_shardings=(shardings, batch_shardings),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)


def _zeros_where_missing(grads, params):
  """Frozen params get no gradient computed (argnums=DiffState(wrt)); optax wants the full tree."""
  flat = dict(jax.tree_util.tree_flatten_with_path(grads)[0])
  return jax.tree_util.tree_map_with_path(
      lambda path, p: flat[path] if path in flat else jnp.zeros_like(p), params)


def make_eval_step(net, config, param_shardings, mesh):
  """jit(eval_step)(variables, batch) -> the task's counts (classification: top1, top5, n)
  summed over the (global) batch; padded examples count in none. variables: {"params": the
  params, "stats": BatchNorm's statistics ({} without BatchNorm)}."""
  task = tasks.get(config.task)

  def eval_step(variables, batch):
    model = net.model(variables["params"], train=False, stats=variables["stats"])
    return task.eval_counts(model, batch, config.data)

  repl = sharding.replicated(mesh)
  return jax.jit(sharding.on_mesh(eval_step, mesh),
                 in_shardings=(dict(params=param_shardings, stats=repl),
                               sharding.batch_sharding(mesh)),
                 out_shardings=repl)
