"""``pmap`` data parallelism: gradients averaged with ``lax.pmean``, state replicated."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tests.test_sharding import (
    as_float64,
    assert_rounding_level,
    loss,
    optimizer,
    problem,
    z_space,
)

DEVICES = 8
STEPS = 5


def per_device_targets(targets):
  """One shard of targets per device; their mean is ``targets``'s loss gradient."""
  noise = jax.random.normal(jax.random.key(1), (DEVICES,), jnp.float32)
  noise = noise - noise.mean()
  return jax.tree.map(lambda t: t[None] + noise.reshape((DEVICES,) + (1,) * t.ndim), targets)


def test_pmap_with_pmean_equals_single_device_run():
  params, targets = problem()
  shards = per_device_targets(targets)
  tx = optimizer()

  def pmapped_step(params, state, targets):
    grads = jax.lax.pmean(jax.grad(loss)(params, targets), 'devices')
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def mean_loss(params, shards):
    return jnp.mean(jax.vmap(loss, in_axes=(None, 0))(params, shards))

  def reference_step(params, state, shards):
    grads = jax.grad(mean_loss)(params, shards)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  replicate = jax.jit(lambda tree: jax.tree.map(lambda x: jnp.stack([x] * DEVICES), tree))
  p_params, p_state = replicate(params), replicate(tx.init(params))
  p_step = jax.pmap(pmapped_step, axis_name='devices')
  ref_step = jax.jit(reference_step)
  ref_params, ref_state = params, tx.init(params)
  # The single-device run again in float64 from the same inputs: the yardstick
  # for how far float32 rounding alone moves this trajectory.
  exact_params, exact_state, exact_shards = as_float64((params, tx.init(params), shards))
  for _ in range(STEPS):
    p_params, p_state = p_step(p_params, p_state, shards)
    ref_params, ref_state = ref_step(ref_params, ref_state, shards)
    exact_params, exact_state = ref_step(exact_params, exact_state, exact_shards)

  for replicated in jax.tree.leaves((p_params, p_state)):
    replicated = np.asarray(replicated)
    for device in range(1, DEVICES):  # the state stays replicated
      np.testing.assert_array_equal(replicated[device], replicated[0])
  first = lambda tree: jax.tree.map(lambda x: np.asarray(x)[0], tree)
  assert_rounding_level(first(p_params), ref_params, exact_params, STEPS)
  # Bases are compared through the gauge-free Z-space state (see test_sharding).
  assert_rounding_level(z_space(first(p_state)), z_space(ref_state), z_space(exact_state), STEPS)
  assert loss(first(p_params), targets) < 0.95 * loss(params, targets)
