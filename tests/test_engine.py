"""The executor's layout and scheduling decisions (rite_optax/engine.py), each checked on
the compiled step: every test here fails when its workaround is removed."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rite_optax
from rite_optax import engine


def lora_params(pairs, rows, rank, seed=0, rank2=None):
  key = jax.random.PRNGKey(seed)
  params = {}
  for i in range(pairs):
    ka, kb = jax.random.split(jax.random.fold_in(key, i))
    r = rank2 if rank2 and i % 2 else rank
    params[f'p{i:02d}'] = {'lora_a': jax.random.normal(ka, (rows, r), jnp.float32),
                           'lora_b': jax.random.normal(kb, (r, rows), jnp.float32)}
  return params


def compiled_step(params, tx=None):
  tx = tx or rite_optax.lora_rite(1e-3)
  state = tx.init(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step.lower(params, state, params).compile()


def entry(hlo: str) -> str:
  start = hlo.index('ENTRY')
  return hlo[start:hlo.index('\n}\n', start)]


def factor_copies(hlo: str, rows: int, rank: int) -> int:
  """Top-level copies of a factor-shaped array."""
  shapes = (f'f32[{rows},{rank}]', f'f32[{rank},{rows}]')
  return sum(1 for line in entry(hlo).splitlines()
             if re.search(r' copy\(', line) and any(s in line.split('=')[1] for s in shapes))


def test_new_bases_and_params_overwrite_their_donated_buffers():
  """_read_first: without it XLA copies every U_prev before the basis write."""
  rows, rank = 2048, 16  # above STACK_BELOW: one piece per factor
  compiled = compiled_step(lora_params(4, rows, rank))
  assert factor_copies(compiled.as_text(), rows, rank) == 0


def test_planted_shared_write_flag_brings_back_the_copies(monkeypatch):
  rows, rank = 2048, 16
  monkeypatch.setattr(engine, '_read_first', lambda finite, reads: [
      jnp.broadcast_to(finite, p.shape[:1]) for p in reads])
  compiled = compiled_step(lora_params(4, rows, rank))
  assert factor_copies(compiled.as_text(), rows, rank) > 0


def instructions(compiled) -> int:
  return len(re.findall(r'\n\s*(?:ROOT )?%\S+ = ', compiled.as_text()))


def test_program_grows_linearly_with_pieces():
  """Per-piece flags, never a scalar summed over every piece (pieces² growth): the
  program's size per added pair is the same from 4 to 16 pairs as from 16 to 32
  (measured 1.03; a flag summed over the stack gives 1.28, and more with more pairs)."""
  size = {n: instructions(compiled_step(lora_params(n, 2048, 16))) for n in (4, 16, 32)}
  per_pair_low = (size[16] - size[4]) / 12
  per_pair_high = (size[32] - size[16]) / 16
  assert per_pair_high < 1.15 * per_pair_low, size


def test_small_factors_of_a_side_run_as_one_stacked_piece():
  """STACK_BELOW: 24 small pairs compile to about as many matmuls as 2 pairs."""
  dots = lambda n: len(re.findall(r' dot\(|ynn_fusion', entry(
      compiled_step(lora_params(n, 64, 8)).as_text())))
  assert dots(24) <= dots(2) + 4 * 24  # the per-pair extras are slices, not matmuls
  assert dots(24) < 0.5 * 12 * dots(2)


def test_on_cpu_every_eigh_runs_in_a_sequential_loop():
  """_eigh: a batched LAPACK eigh on the CPU intra-op pool can deadlock (two at once)."""
  compiled = compiled_step(lora_params(3, 64, 4, rank2=8))
  hlo = compiled.as_text()
  assert 'eigh' in hlo.lower() or 'syevd' in hlo.lower()
  top = entry(hlo)
  assert not re.search(r'custom-call\(.*(syevd|eigh)', top, re.IGNORECASE)


def test_eigh_calls_for_different_ranks_are_chained():
  """eigh_each: calls for different r are ordered by an optimization barrier."""
  mats = [jnp.eye(3)[None], jnp.eye(5)[None]]
  jaxpr = str(jax.make_jaxpr(engine.eigh_each)(mats))
  assert 'optimization_barrier' in jaxpr
  for m, (lam, q) in zip(mats, engine.eigh_each(mats)):
    np.testing.assert_allclose(q @ (lam[..., None] * np.swapaxes(q, 1, 2)), m, atol=1e-12)


def test_stacked_and_separate_pieces_give_the_same_step(monkeypatch):
  """Stacking is a layout decision only: the trajectory is the same either way."""
  def run(stack_below):
    monkeypatch.setattr(engine, 'STACK_BELOW', stack_below)
    params = jax.tree.map(lambda x: x.astype(jnp.float64), lora_params(3, 32, 4))
    grads = jax.tree.map(lambda x: 0.1 * jnp.cos(x), params)
    tx = rite_optax.lora_rite(1e-2)
    state = tx.init(params)
    for _ in range(3):
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    return params, state

  stacked, separate = run(engine.STACK_BELOW), run(0)
  for got, want in zip(jax.tree.leaves(stacked), jax.tree.leaves(separate)):
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
