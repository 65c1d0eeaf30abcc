"""The smallest honest end-to-end example: fit LoRA adapters to low-rank targets.

Several adapters of different shapes start from standard LoRA init
(``lora_b = 0``) and are fitted, on fresh random inputs every step, to a teacher
whose weight deltas are low rank. LoRA-RITE and optax.adam run side by side.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import rite_optax

SHAPES = {'query': (64, 64), 'value': (64, 32), 'mlp_in': (64, 128), 'mlp_out': (128, 64)}


def make_problem(rank: int, seed: int):
  """Returns (initial LoRA params, teacher deltas)."""
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 3 * len(SHAPES)))
  params, teacher = {}, {}
  for name, (m, n) in SHAPES.items():
    params[name] = {
        'lora_a': jax.random.normal(next(keys), (m, rank)) / jnp.sqrt(m),
        'lora_b': jnp.zeros((rank, n)),
    }
    teacher[name] = (
        jax.random.normal(next(keys), (m, rank))
        @ jax.random.normal(next(keys), (rank, n)) / jnp.sqrt(m * rank))
  return params, teacher


def loss_fn(params, teacher, key):
  """Mean squared output error of every adapter on a fresh input batch."""
  total = 0.0
  for name, (m, _) in SHAPES.items():
    x = jax.random.normal(jax.random.fold_in(key, m), (32, m))
    delta = params[name]['lora_a'] @ params[name]['lora_b']
    total += jnp.mean(jnp.square(x @ (delta - teacher[name])))
  return total


def fit(tx: optax.GradientTransformation, params, teacher, steps: int, seed: int):
  """Trains ``params`` with ``tx``; returns (final params, held-out loss)."""
  state = tx.init(params)

  @jax.jit
  def step(params, state, key):
    grads = jax.grad(loss_fn)(params, teacher, key)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  key = jax.random.PRNGKey(seed + 1)
  for _ in range(steps):
    key, sub = jax.random.split(key)
    params, state = step(params, state, sub)
  return params, float(loss_fn(params, teacher, jax.random.PRNGKey(10_000)))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog='rite-optax', description=__doc__)
  parser.add_argument('--steps', type=int, default=300, help='optimizer steps per run')
  parser.add_argument('--rank', type=int, default=4, help='LoRA rank')
  parser.add_argument('--seed', type=int, default=0, help='random seed')
  args = parser.parse_args(argv)

  params, teacher = make_problem(args.rank, args.seed)
  start = float(loss_fn(params, teacher, jax.random.PRNGKey(10_000)))
  print(f'{len(SHAPES)} adapters, rank {args.rank}, {args.steps} steps;'
        f' held-out loss at init: {start:.4f}')
  for name, tx in (('lora_rite', rite_optax.lora_rite(3e-2)),
                   ('adam', optax.adam(3e-3))):
    t0 = time.perf_counter()
    _, final = fit(tx, params, teacher, args.steps, args.seed)
    print(f'{name:>10}: {start:.4f} -> {final:.4f}  ({time.perf_counter() - t0:.1f} s)')
