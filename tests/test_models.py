"""The VMamba-family models: SS2D and Adaptor-T against oracles, the forms, shapes and gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import model_oracles
from scan_cases import rel_err
from adaptor_jax.models import AdaptorConfig, VSSM, common, trainable, trainable_mask
from adaptor_jax.models.adaptor import AdaptorS, AdaptorT
from adaptor_jax.models.ss2d import SS2D
from adaptor_jax.models.vim import Vim

SMALL = dict(dims=(16, 32, 64), depths=(1, 2, 1), ssm_ratio=2.0, scan_backend="reference")


def randomize(module, seed, scale=0.1):
  """Moves every param off its initial value (zero-initialised ones included)."""
  state = nnx.state(module, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  leaves = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  nnx.update(module, jax.tree.unflatten(treedef, leaves))


def pure_params(module):
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def numpy_adaptor_t(h, p, S, K, learned):
  """Adaptor-T by loops over batch, position, route, group and point (float64)."""
  h = np.asarray(h, np.float64)
  Bsz, L, R, D = h.shape
  dg = D // S
  out = h.copy()
  for b in range(Bsz):
    for i in range(L):
      for r in range(R):
        if learned:
          o = (h[b, i, r] @ p["phi_p"][r] + p["phi_p_bias"][r]).reshape(S, K)
          logits = (h[b, i, r] @ p["phi_c"][r] + p["phi_c_bias"][r]).reshape(S, K)
          c = np.exp(logits - logits.max(-1, keepdims=True))
          c /= c.sum(-1, keepdims=True)
          move = 1 / (1 + np.exp(-o))
        else:
          move = np.broadcast_to((np.arange(K) + 1.0) / K, (S, K))
          c = np.full((S, K), 1.0 / K)
        for s in range(S):
          window = L / 2 ** (S - 1 - s)
          g = slice(s * dg, (s + 1) * dg)
          for k in range(K):
            pos = i - window * move[s, k] if r < 2 else i + window * move[s, k]
            pos = min(max(pos, 0.0), L - 1.0)
            lo = int(np.floor(pos))
            hi = min(lo + 1, L - 1)
            f = pos - lo
            value = (1 - f) * h[b, lo, r, g] + f * h[b, hi, r, g]
            out[b, i, r, g] += p["gamma"][r, g] * c[s, k] * value
  return out


@pytest.mark.parametrize("selection", ["learned", "static"])
def test_adaptor_t_matches_numpy_loops(selection):
  S, K, D, L = 2, 3, 8, 13
  cfg = AdaptorConfig(num_groups=S, num_points=K, selection=selection)
  module = AdaptorT(D, cfg, gamma_init=1.0, dtype=jnp.float32, rngs=nnx.Rngs(0))
  randomize(module, seed=1, scale=0.5)
  h = jax.random.normal(jax.random.PRNGKey(2), (2, L, 4, D))
  scale_BRL = jax.random.normal(jax.random.PRNGKey(3), (2, 4, L))  # the scan's C per route
  p = {k: np.asarray(v) for k, v in pure_params(module).items()}
  want = numpy_adaptor_t(h, p, S, K, selection == "learned")
  for scale in (None, scale_BRL):
    got = jax.jit(lambda h, c: module(h.reshape(2, L, 4 * D), c))(h, scale).reshape(h.shape)
    want_scaled = want if scale is None else want * np.moveaxis(np.asarray(scale), 1, -1)[..., None]
    err = rel_err(got, want_scaled)
    print(f"adaptor_t {selection} scale={scale is not None}: rel err {err:.1e}")
    assert err <= 1e-5


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("dilations", [(1, 2, 3), (2,), (1, 4)])
@pytest.mark.parametrize("impl", ["op", "merged"])
def test_dilated_dwconvs_match_separate_convs(impl, dilations, dtype, tol):
  """The op (on the CPU, the stencil) and TPU's form of it (one depthwise convolution with the
  N kernels merged) against N depthwise lax convolutions (float32 oracle), forward and the
  gradients of y, kernel and bias; H, W smaller than the largest dilation's reach included."""
  N, D = len(dilations), 6
  keys = jax.random.split(jax.random.PRNGKey(sum(dilations) + len(dilations)), 4)
  y = jax.random.normal(keys[0], (2, 5, 7, D))
  kernel = jax.random.normal(keys[1], (N, 3, 3, D))
  bias = jax.random.normal(keys[2], (N, D))
  weight = jax.random.normal(keys[3], y.shape)

  def convs(y, kernel, bias):
    return sum(jax.lax.conv_general_dilated(
        y, kernel[n][:, :, None, :], (1, 1), ((d, d), (d, d)), rhs_dilation=(d, d),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=D,
        precision="highest") + bias[n] for n, d in enumerate(dilations))

  def ours(y, kernel, bias):
    args = [a.astype(dtype) for a in (y, kernel, bias)]
    op = common.dilated_dwconvs if impl == "op" else common._dwconv_merged
    return op(*args, dilations).astype(jnp.float32)

  def out_and_grads(f):
    grads = jax.grad(lambda *a: jnp.sum(weight * f(*a)), argnums=(0, 1, 2))(y, kernel, bias)
    return (f(y, kernel, bias), *grads)

  names = ("out", "dy", "dkernel", "dbias")
  for name, a, b in zip(names, out_and_grads(ours), out_and_grads(convs)):
    assert rel_err(a, b) <= tol, (name, dilations, dtype, rel_err(a, b))


def test_dilated_dwconvs_is_a_convolution_on_tpu_only():
  """Adaptor-S: which program each platform gets (values are checked above)."""
  y = jax.ShapeDtypeStruct((2, 5, 7, 6), jnp.float32)
  k = jax.ShapeDtypeStruct((3, 3, 3, 6), jnp.float32)
  b = jax.ShapeDtypeStruct((3, 6), jnp.float32)
  def text(platform):
    grad = jax.grad(lambda *a: jnp.sum(common.dilated_dwconvs(*a, (1, 2, 3))), argnums=(0, 1, 2))
    return jax.jit(grad).trace(y, k, b).lower(lowering_platforms=(platform,)).as_text()
  assert "stablehlo.convolution" in text("tpu")
  for platform in ("cpu", "cuda"):
    assert "stablehlo.convolution" not in text(platform), platform


def test_depthwise_conv3x3_is_a_stencil_on_cpu_and_a_convolution_elsewhere():
  """SS2D's conv2d: its values and gradients are checked through SS2D's oracle test (on the CPU,
  the stencil); here, which program each platform gets."""
  x = jax.ShapeDtypeStruct((2, 5, 7, 6), jnp.float32)
  k = jax.ShapeDtypeStruct((3, 3, 6), jnp.float32)
  def text(platform):
    grad = jax.grad(lambda x, k: jnp.sum(common.depthwise_conv3x3(x, k)), argnums=(0, 1))
    return jax.jit(grad).trace(x, k).lower(lowering_platforms=(platform,)).as_text()
  assert "stablehlo.convolution" not in text("cpu")
  for platform in ("tpu", "cuda"):
    assert "stablehlo.convolution" in text(platform), platform


def _ss2d_case(with_adaptor, seed):
  cfg = AdaptorConfig(num_groups=2, num_points=3)
  rngs = nnx.Rngs(seed)
  d_model, ratio = 8, 2.0
  kw = {}
  if with_adaptor:
    kw = dict(adaptor_t=AdaptorT(16, cfg, gamma_init=1.0, dtype=jnp.float32, rngs=rngs),
              adaptor_s=AdaptorS(16, cfg, zero_init=False, dtype=jnp.float32, rngs=rngs))
  module = SS2D(d_model, ssm_ratio=ratio, rngs=rngs, **kw)
  randomize(module, seed + 1, scale=0.2)
  x = jax.random.normal(jax.random.PRNGKey(seed + 2), (2, 5, 7, d_model))  # H != W
  oracle = functools.partial(model_oracles.ss2d, adaptor=dict(num_groups=2, num_points=3)
                             if with_adaptor else None)
  return module, x, oracle


@pytest.mark.parametrize("with_adaptor", [False, True], ids=["plain", "adaptor"])
def test_ss2d_matches_route_by_route_oracle(with_adaptor):
  """Forward and gradients (input and every param) against flipped copies scanned one by one."""
  module, x, oracle = _ss2d_case(with_adaptor, seed=3 + with_adaptor)
  graphdef, params = nnx.split(module, nnx.Param)

  @jax.jit
  def both(params, x):
    def ours(params, x):
      return nnx.merge(graphdef, params)(x)

    def theirs(params, x):
      return oracle(x, nnx.to_pure_dict(params))

    weight = jax.random.normal(jax.random.PRNGKey(9), ours(params, x).shape)
    out = []
    for f in (ours, theirs):
      y, grads = jax.value_and_grad(lambda p, x: jnp.sum(weight * f(p, x)), argnums=(0, 1))(
          params, x)
      out.append((f(params, x), grads))
    return out

  (y, g), (y_ref, g_ref) = both(params, x)
  assert rel_err(y, y_ref) <= 1e-5, rel_err(y, y_ref)
  errs = jax.tree.map(rel_err, g, g_ref)
  worst = max(jax.tree.leaves(errs))
  print(f"ss2d {with_adaptor=}: fwd {rel_err(y, y_ref):.1e} worst grad {worst:.1e}")
  assert worst <= 1e-4, errs


def test_adaptor_needs_d_state_1():
  cfg = AdaptorConfig()
  rngs = nnx.Rngs(0)
  with pytest.raises(ValueError, match="d_state=1"):
    SS2D(16, ssm_ratio=1.0, d_state=4, rngs=rngs,
         adaptor_t=AdaptorT(16, cfg, gamma_init=1.0, dtype=jnp.float32, rngs=rngs))
  with pytest.raises(ValueError, match="num_groups"):
    AdaptorT(18, cfg, gamma_init=1.0, dtype=jnp.float32, rngs=rngs)
  with pytest.raises(ValueError, match="selection"):
    AdaptorConfig(selection="fixed")
  with pytest.raises(ValueError, match="form"):
    VSSM(**SMALL, form="parallel", rngs=rngs)


def test_booster_at_init_equals_its_vmamba():
  base = VSSM(**SMALL, num_classes=10, rngs=nnx.Rngs(0))
  randomize(base, seed=1)
  booster = VSSM(**SMALL, num_classes=10, form="booster", rngs=nnx.Rngs(5))
  # Random adaptor selection weights; gamma and the Adaptor-S convs keep their zero init.
  for path, var in nnx.to_flat_state(nnx.state(booster, nnx.Param)):
    if "phi_p" in path or "phi_c" in path:
      var[...] = jax.random.normal(jax.random.PRNGKey(len(path)), var.shape)
  nnx.update(booster, nnx.state(base, nnx.Param))
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 32, 32, 3))
  y_base, y_boost = jax.jit(lambda x: (base(x), booster(x)))(x)
  diff = float(jnp.max(jnp.abs(y_base - y_boost)))
  print(f"booster vs base: max abs diff {diff:.1e} "
        f"(logits up to {float(jnp.max(jnp.abs(y_base))):.1f})")
  assert diff <= 1e-6


def _grads(model, wrt, x):
  graphdef, params, rest = nnx.split(model, wrt, ...)

  @jax.jit
  def grad_fn(params, rest, x):
    def loss(params):
      return jnp.sum(nnx.merge(graphdef, params, rest)(x) ** 2)
    return jax.grad(loss)(params)

  return grad_fn(params, rest, x)


def test_backbone_form_every_param_gets_a_gradient():
  model = VSSM(**SMALL, num_classes=10, form="backbone", rngs=nnx.Rngs(0))
  model.eval()
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  grads = _grads(model, nnx.Param, x)
  bad = [("/".join(map(str, p)), float(jnp.max(jnp.abs(g[...]))))
         for p, g in nnx.to_flat_state(grads)
         if not (jnp.all(jnp.isfinite(g[...])) and jnp.any(g[...] != 0))]
  assert not bad, bad
  assert len(nnx.to_flat_state(grads)) == len(nnx.to_flat_state(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("share", [False, True], ids=["per_block", "shared"])
def test_adaptor_form_trains_only_adaptors_and_head(share):
  model = VSSM(**SMALL, num_classes=10, form="adaptor", share_adaptor=share, 
               rngs=nnx.Rngs(0))
  randomize(model, seed=3)  # gamma != 0 so the branch is live
  model.eval()
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  grads = _grads(model, trainable(model), x)
  paths = {p for p, _ in nnx.to_flat_state(grads)}
  assert paths, "nothing trains"
  assert all(("adaptor_t" in p or "adaptor_s" in p or p[0] in ("head", "head_norm"))
             for p in paths), paths
  for p, g in nnx.to_flat_state(grads):
    assert jnp.all(jnp.isfinite(g[...])) and jnp.any(g[...] != 0), p
  mask = trainable_mask(model)
  assert {p for p, v in nnx.to_flat_state(mask) if v} == paths
  params = nnx.state(model, nnx.Param)  # an optax step with the mask moves exactly those
  tx = optax.multi_transform({True: optax.sgd(1.0), False: optax.set_to_zero()}, mask)
  ones = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(ones, tx.init(params), params)
  moved = optax.apply_updates(params, updates)
  assert {p for (p, a), (_, b) in zip(nnx.to_flat_state(params), nnx.to_flat_state(moved))
          if jnp.any(a[...] != b[...])} == paths
  frozen = [p for p, v in nnx.to_flat_state(mask) if not v]
  assert any("in_proj" in p for p in frozen) and any("mlp" in p for p in frozen)
  n_adaptors = sum("adaptor_t" in p and p[-1] == "gamma" for p in paths)
  assert n_adaptors == (len(SMALL["depths"]) if share else sum(SMALL["depths"]))
  with_norms = trainable_mask(model, norms=True)
  assert any(v and "out_norm" in p for p, v in nnx.to_flat_state(with_norms))


def test_bfloat16_compute_follows_float32():
  """dtype=bfloat16 computes in bf16 from the same float32 params; logits within bf16 precision."""
  f32 = VSSM(**SMALL, num_classes=10, form="backbone", rngs=nnx.Rngs(0))
  bf16 = VSSM(**SMALL, num_classes=10, form="backbone", dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  randomize(f32, seed=4)
  nnx.update(bf16, nnx.state(f32, nnx.Param))
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  y32, y16 = jax.jit(lambda x: (f32(x), bf16(x)))(x)
  err = rel_err(y16.astype(jnp.float32), y32)
  print(f"bf16 vs f32 logits: rel err {err:.1e}")
  assert y16.dtype == jnp.bfloat16 and err <= 2e-2


def test_every_param_has_logical_axes():
  model = nnx.eval_shape(lambda: VSSM(**SMALL, form="backbone", rngs=nnx.Rngs(0)))
  names = {"embed", "mlp", "inner", "classes", "route", None}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == len(var.shape), path
    assert set(axes) <= names, (path, axes)


def test_drop_path_drops_whole_residual_branches_in_training_only():
  from adaptor_jax.models.vmamba import VSSBlock
  block = VSSBlock(8, drop_path=1.0, ssm_ratio=2.0, d_state=1, mlp_ratio=4.0, adaptor_t=None,
                   adaptor_s=None, dtype=jnp.float32, scan_backend="reference",
                   rngs=nnx.Rngs(0, dropout=1))
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 4, 8))
  block.train()
  assert jnp.array_equal(block(x), x)  # both branches dropped: the block is the identity
  block.eval()
  assert rel_err(block(x), x) > 1e-3


def _train_loss_and_grads(make, remat, x):
  """Loss and gradients of a model in training mode (drop path live, a fixed key), as the train
  step computes them (nnx.reseed, then nnx.value_and_grad), and the jaxpr of that step."""
  graphdef, params, rest = nnx.split(make(remat), nnx.Param, ...)

  def step(params, rest, x):
    model = nnx.merge(graphdef, params, rest)
    nnx.reseed(model, default=jax.random.key(5))
    model.train()
    loss, grads = nnx.value_and_grad(lambda m: jnp.sum(m(x) ** 2))(model)
    return loss, nnx.to_pure_dict(nnx.state(grads, nnx.Param))

  return jax.jit(step)(params, rest, x), str(jax.make_jaxpr(step)(params, rest, x))


REMAT_MODELS = {
    "vssm": (lambda remat: VSSM(dims=(16, 32), depths=(1, 2), ssm_ratio=2.0, scan_backend="xla",
                                num_classes=10, form="backbone", drop_path_rate=0.5,
                                remat=remat, rngs=nnx.Rngs(0)), (2, 16, 16, 3)),
    "vim": (lambda remat: Vim(embed_dim=16, depth=3, patch_size=8, stride=8, d_state=4,
                              num_classes=5, image_size=32, drop_path_rate=0.5,
                              scan_backend="xla", remat=remat, rngs=nnx.Rngs(0)), (2, 32, 32, 3)),
}


@pytest.mark.parametrize("remat", ["full", "matmuls"])
@pytest.mark.parametrize("family", sorted(REMAT_MODELS))
def test_remat_keeps_the_numerics(family, remat):
  """Every block rematerialised (config.remat): loss and every gradient equal those without
  remat, drop path included (its masks are drawn again identically in the recompute)."""
  make, shape = REMAT_MODELS[family]
  x = jax.random.normal(jax.random.PRNGKey(1), shape)
  (loss, grads), _ = _train_loss_and_grads(make, "none", x)
  (loss_r, grads_r), jaxpr = _train_loss_and_grads(make, remat, x)
  assert "checkpoint" in jaxpr or "remat" in jaxpr
  assert rel_err(loss_r, loss) <= 1e-6
  flat, flat_r = jax.tree.leaves(grads), jax.tree.leaves(grads_r)
  assert len(flat) == len(flat_r)
  errs = [rel_err(a, b) for a, b in zip(flat_r, flat)]
  print(f"{family} remat={remat}: loss {float(loss):.4f}, max grad rel err {max(errs):.1e}")
  assert max(errs) <= 1e-5


def test_unknown_remat_is_named():
  with pytest.raises(ValueError, match="remat must be one of"):
    VSSM(**SMALL, remat="some", rngs=nnx.Rngs(0))
