"""Shared builders for the tests: random adapters in the nnx layout, benchmark scripts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rite_optax
from tests import numpy_reference as ref


def random_pairs(seed, shapes, scale=1.0, zero_b=False):
  """Canonical float64 pairs [(A (m, r), B (n, r))] for shapes [(m, n, r)]."""
  rng = np.random.default_rng(seed)
  pairs = []
  for m, n, r in shapes:
    a = rng.standard_normal((m, r)) * scale / np.sqrt(m)
    b = np.zeros((n, r)) if zero_b else rng.standard_normal((n, r)) / np.sqrt(n)
    pairs.append((a, b))
  return pairs


def to_params(pairs, dtype=jnp.float64):
  """nnx layout: {'adapter_i': {'lora_a': A (m, r), 'lora_b': Bᵀ (r, n)}}."""
  return {
      f'adapter_{i}': {'lora_a': jnp.asarray(a, dtype), 'lora_b': jnp.asarray(b.T, dtype)}
      for i, (a, b) in enumerate(pairs)
  }


def from_params(params):
  return [
      (np.asarray(params[k]['lora_a'], np.float64), np.asarray(params[k]['lora_b'], np.float64).T)
      for k in sorted(params, key=lambda k: int(k.split('_')[1]))
  ]


def delta_z(params):
  return {k: v['lora_a'] @ v['lora_b'] for k, v in params.items()}


def grads_from_dz(params, dz):
  """∇lora_a = dZ lora_bᵀ, ∇lora_b = lora_aᵀ dZ: the chain rule through Z."""
  return {
      k: {'lora_a': dz[k] @ v['lora_b'].T, 'lora_b': v['lora_a'].T @ dz[k]}
      for k, v in params.items()
  }


def random_dz(rng, params, scale=1.0):
  return {
      k: jnp.asarray(rng.standard_normal(v['lora_a'].shape[:1] + v['lora_b'].shape[1:]) * scale,
                     v['lora_a'].dtype)
      for k, v in params.items()
  }


def run(tx, params, dz_sequence):
  """Applies ``tx`` for every dZ in the sequence; returns (params, state)."""
  state = tx.init(params)

  @jax.jit
  def step(params, state, dz):
    updates, state = tx.update(grads_from_dz(params, dz), state, params)
    return optax.apply_updates(params, updates), state

  for dz in dz_sequence:
    params, state = step(params, state, dz)
  return params, state


def reference_options(**kw):
  return ref.Options(**kw)


def rite(lr, **kw):
  return rite_optax.lora_rite(lr, **kw)

