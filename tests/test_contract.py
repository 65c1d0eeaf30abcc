"""The optax contract, for every transformation the package exports (in the style of optax's
own ``_common_test.py``): jit, dtypes, ``inject_hyperparams``, schedules, ``MultiSteps``, no
recompilation, and a state whose dtypes, shapes and shardings an update leaves unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import rite_optax
from tests import helpers as h
from tests.test_sharding import make_mesh

SHAPES = [(16, 12, 3), (10, 20, 2)]
LR = 1e-2


def balanced_adam(learning_rate):
  return optax.chain(optax.adam(learning_rate), rite_optax.balance_lora_factors())


def rite_chain(learning_rate):
  return optax.chain(rite_optax.scale_by_lora_rite(), optax.scale_by_learning_rate(learning_rate))


TRANSFORMATIONS = {
    'lora_rite': rite_optax.lora_rite,
    'scale_by_lora_rite': rite_chain,
    'balance_lora_factors': balanced_adam,
    'lora_plus': rite_optax.lora_plus,
    'riemannian_adam': rite_optax.riemannian_adam,
}
pytestmark = pytest.mark.parametrize('name', list(TRANSFORMATIONS))


def params_and_grads(dtype=jnp.float32, seed=0):
  params = h.to_params(h.random_pairs(seed, SHAPES), dtype)
  grads = [h.to_params(h.random_pairs(seed + 1 + i, SHAPES), dtype) for i in range(4)]
  return params, grads


def run(tx, params, grads, jit=True):
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  for g in grads:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def assert_close(x, y, **kw):
  for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), **kw)


def test_jit_equals_eager(name):
  params, grads = params_and_grads(jnp.float64)
  tx = TRANSFORMATIONS[name](LR)
  assert_close(run(tx, params, grads), run(tx, params, grads, jit=False), rtol=1e-10,
               atol=1e-12)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_updates_in_the_param_dtype_and_a_stable_state(name, dtype):
  params, grads = params_and_grads(dtype)
  tx = TRANSFORMATIONS[name](LR)
  expected = jax.eval_shape(tx.init, params)
  state = tx.init(params)
  traces = []

  @jax.jit
  def step(params, state, g):
    traces.append(1)
    updates, state = tx.update(g, state, params)
    return updates, optax.apply_updates(params, updates), state

  for g in grads:
    updates, params, state = step(params, state, g)
    assert jax.tree.map(lambda u: u.dtype, updates) == jax.tree.map(lambda p: p.dtype, params)
  assert len(traces) == 1  # the state never changes shape or dtype: one compilation
  struct = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)
  assert struct(state) == struct(expected)
  assert all(np.isfinite(np.asarray(x, np.float64)).all() for x in jax.tree.leaves(params))


def test_inject_hyperparams_equals_the_plain_version(name):
  params, grads = params_and_grads(jnp.float64)
  injected = optax.inject_hyperparams(TRANSFORMATIONS[name])(learning_rate=LR)
  assert_close(run(injected, params, grads)[0], run(TRANSFORMATIONS[name](LR), params, grads)[0],
               rtol=1e-12, atol=1e-14)


def test_a_schedule_equals_its_constant(name):
  params, grads = params_and_grads(jnp.float64)
  scheduled = TRANSFORMATIONS[name](optax.constant_schedule(LR))
  assert_close(run(scheduled, params, grads)[0], run(TRANSFORMATIONS[name](LR), params, grads)[0],
               rtol=1e-12, atol=1e-14)


def test_multi_steps_applies_the_mean_of_every_k_gradients(name):
  """(MultiSteps accumulates in float32 unless told otherwise.)"""
  params, grads = params_and_grads(jnp.float64)
  multi = optax.MultiSteps(TRANSFORMATIONS[name](LR), every_k_schedule=2,
                         accumulator_dtype=jnp.float64)
  mean = [jax.tree.map(lambda a, b: (a + b) / 2, grads[i], grads[i + 1]) for i in (0, 2)]
  state = multi.init(params)
  p = params
  for i, g in enumerate(grads):
    updates, state = jax.jit(multi.update)(g, state, p)
    if i % 2 == 0:  # accumulating: nothing applied yet
      assert all(not np.asarray(u).any() for u in jax.tree.leaves(updates))
    p = optax.apply_updates(p, updates)
  assert_close(p, run(TRANSFORMATIONS[name](LR), params, mean)[0], rtol=1e-10, atol=1e-12)


def test_shardings_survive_an_update(name):
  """A state placed on the mesh (factor-shaped leaves as their factor, the rest replicated)
  comes out of a jitted update with the same shardings."""
  mesh = make_mesh((2, 4), ('data', 'model'))
  params, grads = params_and_grads(jnp.float32)
  spec = lambda x: P('data', None) if x.ndim == 2 and x.shape[0] % 2 == 0 else P()
  shard = lambda tree: jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))),
                                    tree)
  params = shard(params)
  tx = TRANSFORMATIONS[name](LR)
  state = shard(tx.init(params))
  _, new_state = jax.jit(tx.update)(shard(grads[0]), state, params)
  for before, after in zip(jax.tree.leaves(state), jax.tree.leaves(new_state), strict=True):
    assert after.sharding.is_equivalent_to(before.sharding, after.ndim), (before.sharding,
                                                                         after.sharding)
