"""The compiler steering (rite_optax/steering.py, used by rite_optax/engine.py), each
decision checked on the compiled step: every test here fails when its workaround is removed."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rite_optax
from rite_optax import steering, thin


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
  """steering.gated: without it XLA copies every U_prev and every X before the basis write."""
  rows, rank = 2048, 16  # above STACK_BELOW: one piece per factor
  compiled = compiled_step(lora_params(4, rows, rank))
  assert factor_copies(compiled.as_text(), rows, rank) == 0


def test_planted_write_flag_without_the_reads_brings_back_the_copies(monkeypatch):
  rows, rank = 2048, 16
  monkeypatch.setattr(steering, 'gated', lambda flag, links: flag)
  compiled = compiled_step(lora_params(4, rows, rank))
  assert factor_copies(compiled.as_text(), rows, rank) > 0


def instructions(compiled) -> int:
  return len(re.findall(r'\n\s*(?:ROOT )?%\S+ = ', compiled.as_text()))


def program_sizes(monkeypatch) -> dict[int, int]:
  monkeypatch.setattr(steering, 'GROUP_PAIRS', 8)
  return {n: instructions(compiled_step(lora_params(n, 1024, 16))) for n in (2, 4, 8, 16, 24)}


def test_program_grows_linearly_with_pieces_and_groups(monkeypatch):
  """The program's size per added pair is the same from 4 to 8 pairs as from 8 to 16
  (one group), and per added group the same from 1 to 2 groups as from 2 to 3
  (measured 1.00 and 1.00): nothing in the step is formed per pair of pieces."""
  size = program_sizes(monkeypatch)
  assert (size[8] - size[4]) / 4 < 1.15 * (size[4] - size[2]) / 2, size
  assert size[24] - size[16] < 1.04 * (size[16] - size[8]), size


def test_planted_links_per_pair_of_pieces_grow_the_program_faster(monkeypatch):
  def links(x):  # each piece's link reads every earlier piece's first column
    column = lambda p: p[:, 0, :] if x.rank_major else p[:, :, 0]
    return [jnp.broadcast_to(sum(jnp.sum(column(p) * column(q)) for q in x.pieces[:j + 1]),
                             p.shape[:1]) for j, p in enumerate(x.pieces)]
  monkeypatch.setattr(steering, 'links', links)
  size = program_sizes(monkeypatch)
  assert (size[8] - size[4]) / 4 > 1.15 * (size[4] - size[2]) / 2, size


def cost(params, tx=None) -> tuple[float, float]:
  """(XLA temp, bytes accessed) of the compiled step, in units of the params' bytes."""
  compiled = compiled_step(params, tx)
  params_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return (compiled.memory_analysis().temp_size_in_bytes / params_bytes,
          analysis['bytes accessed'] / params_bytes)


def test_step_moves_23_factor_sized_passes_and_holds_no_factor_sized_temporaries(monkeypatch):
  """The compiled step (update + apply) reads and writes under 25.2 params' worth of
  bytes as XLA's cost model counts them (measured 24.9; optax.adam: 10), and holds
  under a quarter of the params in XLA temp (measured 0.17): the pieces run one
  after another (steering.in_order, steering.product_gram) and the new bases are
  formed straight into the state (steering.branch). The cost model also counts the
  branch that reads the gradients when a Gram overflowed (steering.gradients_finite), never
  taken otherwise: one params' worth (measured 1.00), and no temp."""
  temp, passes = cost(lora_params(8, 2048, 16))
  monkeypatch.setattr(steering, 'gradients_finite',
                      lambda grad_grams, grads: steering.all_finite(grad_grams))
  temp_without, passes_without = cost(lora_params(8, 2048, 16))
  assert passes_without < 25.2
  assert temp_without < 0.25
  assert passes - passes_without < 1.05
  assert temp < 0.25


def test_planted_select_for_the_basis_costs_three_passes(monkeypatch):
  def select(applied, new, kept):
    return kept._with([jnp.where(applied, u, p) for u, p in zip(new().pieces, kept.pieces)])
  monkeypatch.setattr(steering, 'branch', select)
  assert cost(lora_params(8, 2048, 16))[1] > 26.5


def test_planted_unordered_pieces_hold_the_params_in_temp(monkeypatch):
  monkeypatch.setattr(steering, 'in_order', lambda p, r, k, previous: (p, r, k))
  assert cost(lora_params(8, 2048, 16))[0] > 0.9  # measured 1.13


def test_planted_unordered_gram_pieces_hold_the_params_in_temp(monkeypatch):
  def unordered(x, small):
    return thin.symmetric(thin.stack([u.cross(u)[0] for u in (
        thin.Thin((p,), x.rank_major).times(s) for p, s in zip(x.pieces, x.split(small)))]))
  monkeypatch.setattr(steering, 'product_gram', unordered)
  assert cost(lora_params(8, 2048, 16))[0] > 0.9  # measured 1.05


def test_bytes_per_pair_do_not_grow_with_pairs(monkeypatch):
  """GROUP_PAIRS: XLA's cost model counts each piece's slice of a stacked r×r
  array as a read of the whole stack, so bytes per pair would grow with the
  group (64 pairs of 512×16 in one group: +16% over 16 pairs)."""
  per_pair = lambda n: cost(lora_params(n, 512, 16))[1]
  assert per_pair(64) < 1.03 * per_pair(16)
  monkeypatch.setattr(steering, 'GROUP_PAIRS', 10**6)
  assert per_pair(64) > 1.1 * per_pair(16)


def test_small_factors_of_a_side_run_as_one_stacked_piece():
  """STACK_BELOW: a group of small pairs compiles to about as many matmuls as 2 pairs."""
  n = steering.GROUP_PAIRS
  dots = lambda n: len(re.findall(r' dot\(|ynn_fusion', entry(
      compiled_step(lora_params(n, 64, 8)).as_text())))
  assert dots(n) <= dots(2) + 4 * n  # the per-pair extras are slices, not matmuls
  assert dots(n) < 0.5 * (n // 2) * dots(2)


def test_on_cpu_every_eigh_runs_in_a_sequential_loop():
  """steering._eigh: a batched LAPACK eigh on the CPU intra-op pool can deadlock (two at once)."""
  compiled = compiled_step(lora_params(3, 64, 4, rank2=8))
  hlo = compiled.as_text()
  assert 'eigh' in hlo.lower() or 'syevd' in hlo.lower()
  top = entry(hlo)
  assert not re.search(r'custom-call\(.*(syevd|eigh)', top, re.IGNORECASE)


def test_eigh_calls_for_different_ranks_are_chained():
  """eigh_each: calls for different r are ordered by an optimization barrier."""
  mats = [jnp.eye(3)[None], jnp.eye(5)[None]]
  jaxpr = str(jax.make_jaxpr(steering.eigh_each)(mats))
  assert 'optimization_barrier' in jaxpr
  for m, (lam, q) in zip(mats, steering.eigh_each(mats)):
    np.testing.assert_allclose(q @ (lam[..., None] * np.swapaxes(q, 1, 2)), m, atol=1e-12)


def test_stacked_and_separate_pieces_give_the_same_step(monkeypatch):
  """Stacking is a layout decision only: the trajectory is the same either way."""
  def run(stack_below):
    monkeypatch.setattr(steering, 'STACK_BELOW', stack_below)
    params = jax.tree.map(lambda x: x.astype(jnp.float64), lora_params(3, 32, 4))
    grads = jax.tree.map(lambda x: 0.1 * jnp.cos(x), params)
    tx = rite_optax.lora_rite(1e-2)
    state = tx.init(params)
    for _ in range(3):
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    return params, state

  stacked, separate = run(steering.STACK_BELOW), run(0)
  for got, want in zip(jax.tree.leaves(stacked), jax.tree.leaves(separate)):
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
