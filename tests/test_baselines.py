"""Tests for rite_optax.baselines: LoRA+ and Riemannian-preconditioned Adam."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rite_optax


def _params(rng):
  return {
      'dense': {'lora_a': jnp.asarray(rng.normal(size=(6, 3))),
                'lora_b': jnp.asarray(rng.normal(size=(3, 5)))},
      'bias': jnp.asarray(rng.normal(size=(5,))),
  }


def _grads(rng, params):
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)


def _run(tx, params, grads_seq):
  state = tx.init(params)
  for grads in grads_seq:
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_lora_plus_equals_adam_with_two_learning_rates():
  rng = np.random.default_rng(0)
  params = _params(rng)
  grads_seq = [_grads(rng, params) for _ in range(5)]
  got = _run(rite_optax.lora_plus(1e-2, ratio=4.0, weight_decay=0.1), params,
             grads_seq)
  labels = {'dense': {'lora_a': 'a', 'lora_b': 'b'}, 'bias': 'a'}
  want = _run(optax.partition(
      {'a': optax.adamw(1e-2, weight_decay=0.1),
       'b': optax.adamw(4e-2, weight_decay=0.1)}, labels), params, grads_seq)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-12),
               got, want)


def test_lora_plus_under_inject_hyperparams():
  rng = np.random.default_rng(1)
  params = _params(rng)
  grads_seq = [_grads(rng, params) for _ in range(3)]
  injected = optax.inject_hyperparams(rite_optax.lora_plus)(
      learning_rate=1e-2, ratio=8.0)
  want = _run(rite_optax.lora_plus(1e-2, ratio=8.0), params, grads_seq)
  got = _run(injected, params, grads_seq)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-12),
               got, want)


def _riemannian_reference(a, b, grads_seq, lr, b1, b2, eps, reg):
  """Float64 NumPy scaled Adam; delta = a @ b, a (m, r), b (r, n)."""
  mu = {k: np.zeros_like(v) for k, v in (('a', a), ('b', b))}
  nu = {k: np.zeros_like(v) for k, v in (('a', a), ('b', b))}
  eye = np.eye(a.shape[1])
  for t, (ga, gb) in enumerate(grads_seq, start=1):
    new = {}
    for k, g in (('a', ga), ('b', gb)):
      mu[k] = b1 * mu[k] + (1 - b1) * g
      nu[k] = b2 * nu[k] + (1 - b2) * g * g
      m_hat = mu[k] / (1 - b1**t)
      v_hat = nu[k] / (1 - b2**t)
      if k == 'a':  # A's preconditioner comes from B's rows: (B Bᵀ + δI)⁻¹.
        m_hat = m_hat @ np.linalg.inv(b @ b.T + reg * eye)
      else:
        m_hat = np.linalg.inv(a.T @ a + reg * eye) @ m_hat
      new[k] = -lr * m_hat / (np.sqrt(v_hat) + eps)
    a, b = a + new['a'], b + new['b']
  return a, b


def test_riemannian_adam_matches_update_formula_float64():
  rng = np.random.default_rng(2)
  a = rng.normal(size=(7, 3))
  b = rng.normal(size=(3, 4))
  grads_seq = [(rng.normal(size=a.shape), rng.normal(size=b.shape))
               for _ in range(4)]
  want_a, want_b = _riemannian_reference(
      a, b, grads_seq, lr=0.05, b1=0.9, b2=0.99, eps=1e-8, reg=1e-3)
  tx = rite_optax.riemannian_adam(0.05, b1=0.9, b2=0.99, eps=1e-8, reg=1e-3)
  params = {'lora_a': jnp.asarray(a), 'lora_b': jnp.asarray(b)}
  got = _run(tx, params, [{'lora_a': jnp.asarray(ga), 'lora_b': jnp.asarray(gb)}
                          for ga, gb in grads_seq])
  assert got['lora_a'].dtype == jnp.float64
  np.testing.assert_allclose(got['lora_a'], want_a, rtol=1e-12)
  np.testing.assert_allclose(got['lora_b'], want_b, rtol=1e-12)


def test_riemannian_adam_unpaired_leaves_get_adam():
  rng = np.random.default_rng(3)
  params = _params(rng)
  grads_seq = [_grads(rng, params) for _ in range(3)]
  got = _run(rite_optax.riemannian_adam(1e-2), params, grads_seq)
  want = _run(optax.adam(1e-2), params, grads_seq)
  np.testing.assert_allclose(got['bias'], want['bias'], rtol=1e-12)
  assert not np.allclose(got['dense']['lora_a'], want['dense']['lora_a'])


def test_riemannian_adam_jits_in_float32():
  rng = np.random.default_rng(4)
  params = jax.tree.map(lambda x: x.astype(jnp.float32), _params(rng))
  tx = rite_optax.riemannian_adam(1e-3)
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(params, state, params)
  assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(updates))
  assert all(np.isfinite(u).all() for u in jax.tree.leaves(updates))


@pytest.mark.parametrize('factory, kwargs, message', [
    (rite_optax.lora_plus, {'ratio': -1.0}, 'ratio'),
    (rite_optax.lora_plus, {'b1': 1.0}, 'b1'),
    (rite_optax.riemannian_adam, {'reg': -1.0}, 'reg'),
    (rite_optax.riemannian_adam, {'eps': 'x'}, 'eps'),
])
def test_arguments_are_validated(factory, kwargs, message):
  with pytest.raises((ValueError, TypeError), match=message):
    factory(1e-3, **kwargs)


def test_riemannian_adam_needs_params():
  params = {'lora_a': jnp.ones((4, 2)), 'lora_b': jnp.ones((2, 3))}
  tx = rite_optax.riemannian_adam(1e-3)
  with pytest.raises(ValueError, match='needs params'):
    tx.update(params, tx.init(params))
