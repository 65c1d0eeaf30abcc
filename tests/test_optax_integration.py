"""lora_rite composes like any optax transformation (optax's common-test style)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rite_optax
from tests import helpers as h

SHAPES = [(16, 12, 3), (10, 20, 2)]


def problem(dtype=jnp.float32, seed=0):
  params = h.to_params(h.random_pairs(seed, SHAPES), dtype)
  params['head'] = {'bias': jnp.zeros(5, dtype)}
  target = jax.tree.map(lambda x: x.astype(dtype),
                        h.delta_z(h.to_params(h.random_pairs(seed + 1, SHAPES))))

  def loss(p):
    fit = sum(jnp.sum(jnp.square(p[k]['lora_a'] @ p[k]['lora_b'] - target[k])) for k in target)
    return fit + jnp.sum(jnp.square(p['head']['bias'] - 1.0))

  return params, loss


def train(tx, params, loss, steps, jit=True):
  state = tx.init(params)

  def step(p, s):
    updates, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, updates), s

  step = jax.jit(step) if jit else step
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def assert_trees_close(x, y, **kw):
  for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), **kw)


def test_converges_on_a_small_problem_with_bias_in_the_fallback():
  params, loss = problem()
  final, _ = train(rite_optax.lora_rite(3e-2), params, loss, 150)
  assert float(loss(final)) < 1e-2 * float(loss(params))


def test_chain_with_scale_by_lora_rite_equals_lora_rite():
  params, loss = problem(jnp.float64)
  del params['head']
  chained = optax.chain(rite_optax.scale_by_lora_rite(), optax.scale(-1e-2))
  p1, _ = train(chained, params, lambda p: loss({**p, 'head': {'bias': jnp.ones(5)}}), 5)
  p2, _ = train(rite_optax.lora_rite(1e-2), params,
                lambda p: loss({**p, 'head': {'bias': jnp.ones(5)}}), 5)
  assert_trees_close(p1, p2, rtol=1e-12, atol=1e-15)


def test_inject_hyperparams_equals_the_plain_version():
  params, loss = problem(jnp.float64)
  kwargs = dict(b1=0.8, b2=0.99, eps=1e-5, clip_unmagnified_grad=0.7, update_skipping=5.0,
                update_capping=0.5, weight_decay=1e-3)
  plain, _ = train(rite_optax.lora_rite(2e-2, apply_escape=True, **kwargs), params, loss, 5)
  injected_tx = optax.inject_hyperparams(rite_optax.lora_rite)(
      learning_rate=2e-2, apply_escape=True, **kwargs)
  injected, state = train(injected_tx, params, loss, 5)
  assert_trees_close(plain, injected, rtol=1e-12, atol=1e-15)
  assert set(kwargs) | {'learning_rate'} <= set(state.hyperparams)


def test_inject_hyperparams_learning_rate_can_change_between_steps():
  params, loss = problem()
  tx = optax.inject_hyperparams(rite_optax.lora_rite)(learning_rate=1e-2)
  state = tx.init(params)
  state.hyperparams['learning_rate'] = jnp.asarray(0.0)
  updates, _ = jax.jit(tx.update)(jax.grad(loss)(params), state, params)
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(u, 0.0)


def test_learning_rate_schedule():
  params, loss = problem(jnp.float64)
  schedule = optax.piecewise_constant_schedule(1e-2, {3: 0.0})  # exactly 0 from step 3
  final, _ = train(rite_optax.lora_rite(schedule), params, loss, 6)
  after_3, _ = train(rite_optax.lora_rite(schedule), params, loss, 3)
  assert_trees_close(final, after_3, rtol=0, atol=0)


def test_multi_steps_accumulates_then_applies():
  params, loss = problem(jnp.float64)
  grads = jax.grad(loss)(params)
  tx = optax.MultiSteps(rite_optax.lora_rite(1e-2), every_k_schedule=2,
                        accumulator_dtype=jnp.float64)
  state = tx.init(params)
  u1, state = tx.update(grads, state, params)
  for u in jax.tree.leaves(u1):
    np.testing.assert_array_equal(u, 0.0)
  u2, state = tx.update(grads, state, params)
  direct, _ = rite_optax.lora_rite(1e-2).update(grads, rite_optax.lora_rite(1e-2).init(params), params)
  assert_trees_close(u2, direct, rtol=1e-12, atol=1e-15)


def test_apply_if_finite_around_lora_rite():
  params, loss = problem()
  tx = optax.apply_if_finite(rite_optax.lora_rite(1e-2), max_consecutive_errors=3)
  state = tx.init(params)
  grads = jax.grad(loss)(params)
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
  updates, state = jax.jit(tx.update)(bad, state, params)
  assert int(state.notfinite_count) == 1
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(u, 0.0)
  updates, state = jax.jit(tx.update)(grads, state, params)
  assert int(state.notfinite_count) == 0
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


def test_partition_with_frozen_branch_sees_masked_nodes():
  """The T5X freezing pattern: base weights frozen with set_to_zero."""
  params, _ = problem()
  params['kernel'] = jnp.ones((16, 12))
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: 'frozen' if 'kernel' in jax.tree_util.keystr(path) else 'train', params)
  tx = optax.partition(
      {'train': rite_optax.lora_rite(1e-2), 'frozen': optax.set_to_zero()}, labels)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)  # below update_skipping
  updates, state = jax.jit(tx.update)(grads, state, params)
  np.testing.assert_array_equal(updates['kernel'], 0.0)
  assert np.linalg.norm(updates['adapter_0']['lora_b']) > 0
  assert np.linalg.norm(updates['head']['bias']) > 0


def test_tree_map_params_is_a_no_op_with_identity():
  params, _ = problem()
  tx = rite_optax.lora_rite(1e-2)
  state = tx.init(params)
  mapped = optax.tree_map_params(tx, lambda x: x, state)
  assert jax.tree.structure(mapped) == jax.tree.structure(state)
  assert_trees_close(mapped, state, rtol=0, atol=0)


def test_state_is_params_structured():
  params, _ = problem()
  state = rite_optax.scale_by_lora_rite().init({k: v for k, v in params.items() if k != 'head'})
  factors = {k: v for k, v in params.items() if k != 'head'}
  for field in ('first_moment', 'basis', 'second_moment', 'escaped_mass'):
    assert jax.tree.structure(getattr(state, field)) == jax.tree.structure(factors)
  for k, v in factors.items():
    assert state.first_moment[k]['lora_b'].shape == v['lora_b'].shape
    assert state.basis[k]['lora_a'].shape == v['lora_a'].shape
    r = v['lora_a'].shape[1]
    assert state.second_moment[k]['lora_a'].shape == (r, r)
    assert state.escaped_mass[k]['lora_b'].shape == ()


def test_state_is_stable_under_lax_cond():
  """Init and update states have equal types, so they can be cond branches."""
  params, loss = problem()
  tx = rite_optax.lora_rite(1e-2)
  state = tx.init(params)
  grads = jax.grad(loss)(params)

  @jax.jit
  def maybe_update(flag, state):
    return jax.lax.cond(flag, lambda s: tx.update(grads, s, params)[1], lambda s: s, state)

  stepped = maybe_update(True, state)
  kept = maybe_update(False, state)
  assert_trees_close(kept, state, rtol=0, atol=0)
  assert int(rite_state_count(stepped)) == 1


def rite_state_count(state):
  (s,) = [x for x in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, rite_optax.ScaleByLoraRiteState))
          if isinstance(x, rite_optax.ScaleByLoraRiteState)]
  return s.count


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16, jnp.float64])
def test_updates_keep_the_param_dtype(dtype):
  params, loss = problem(dtype)
  tx = rite_optax.lora_rite(1e-2)
  state = tx.init(params)
  updates, new_state = jax.jit(tx.update)(jax.grad(loss)(params), state, params)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.dtype == p.dtype
  assert jax.tree.map(lambda x: x.dtype, new_state) == jax.tree.map(lambda x: x.dtype, state)
