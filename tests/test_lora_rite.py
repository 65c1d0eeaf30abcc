"""LoRA-RITE against its contract (docs/algorithm.md §4 and §7): reference, invariance, edge cases."""

import itertools

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import strategies as st

import rite_optax
from tests import helpers as h
from tests import numpy_reference as ref

SHAPES = [(24, 16, 4), (9, 30, 3), (24, 16, 4), (40, 8, 2)]
ALL_ON = dict(
    apply_escape=True, relative_eps=True, clip_unmagnified_grad=0.5,
    update_skipping=2.0, update_capping=0.3, weight_decay=1e-3, balance_factors=True)


def random_transform(rng, r, cond):
  """An invertible r×r matrix with condition number ``cond``."""
  q1, _ = np.linalg.qr(rng.standard_normal((r, r)))
  q2, _ = np.linalg.qr(rng.standard_normal((r, r)))
  return q1 @ np.diag(np.geomspace(1.0, cond, r) * rng.uniform(0.1, 10.0)) @ q2


def rite_state(state) -> rite_optax.ScaleByLoraRiteState:
  """The ScaleByLoraRiteState inside lora_rite's (partitioned, chained) state."""
  found = [
      s for s in jax.tree.leaves(
          state, is_leaf=lambda s: isinstance(s, rite_optax.ScaleByLoraRiteState))
      if isinstance(s, rite_optax.ScaleByLoraRiteState)]
  (s,) = found
  return s


def z_space_state(state, key):
  """The state as seen by Z: M_A U_Bᵀ, M_B U_Aᵀ, U_B V_A U_Bᵀ, U_A V_B U_Aᵀ, ρ_A, ρ_B."""
  s = rite_state(state)
  u_a, u_b = s.basis[key]['lora_a'], s.basis[key]['lora_b'].T
  m_a, m_b = s.first_moment[key]['lora_a'], s.first_moment[key]['lora_b'].T
  v_a, v_b = s.second_moment[key]['lora_a'], s.second_moment[key]['lora_b']
  return [m_a @ u_b.T, m_b @ u_a.T, u_b @ v_a @ u_b.T, u_a @ v_b @ u_a.T,
          s.escaped_mass[key]['lora_a'], s.escaped_mass[key]['lora_b']]


def rel_err(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-300)


def dz_sequence(rng, params, steps, hot=3, hot_scale=100.0):
  """Random dZ per step; adapter ``hot`` gets large gradients (skipping fires)."""
  seq = []
  for _ in range(steps):
    dz = h.random_dz(rng, params)
    dz[f'adapter_{hot}'] = dz[f'adapter_{hot}'] * hot_scale
    seq.append(dz)
  return seq


# ----------------------------------------------------------------------------
# Agreement with the independent NumPy reference, for every option combination.

NUMERIC_ON = dict(clip_unmagnified_grad=0.5, update_skipping=2.0, update_capping=0.3,
                  weight_decay=1e-3)
NUMERIC_OFF = dict(clip_unmagnified_grad=0.0, update_skipping=0.0, update_capping=0.0,
                   weight_decay=0.0)


@pytest.mark.parametrize(
    'apply_escape,relative_eps,balance_factors',
    list(itertools.product([False, True], repeat=3)))
def test_matches_numpy_reference_for_every_option_combination(
    apply_escape, relative_eps, balance_factors):
  pairs = h.random_pairs(0, SHAPES)
  params0 = h.to_params(pairs)
  rng = np.random.default_rng(1)
  dzs = dz_sequence(rng, params0, steps=8)
  # Numeric options are injected, so the 16 on/off combinations share one jit.
  tx = optax.inject_hyperparams(rite_optax.lora_rite)(
      learning_rate=1e-2, apply_escape=apply_escape, relative_eps=relative_eps,
      balance_factors=balance_factors, **NUMERIC_ON)
  update = jax.jit(tx.update)
  worst = 0.0
  for switches in itertools.product([False, True], repeat=len(NUMERIC_ON)):
    numeric = {k: (NUMERIC_ON if on else NUMERIC_OFF)[k]
               for k, on in zip(NUMERIC_ON, switches)}
    opts = ref.Options(lr=1e-2, apply_escape=apply_escape, relative_eps=relative_eps,
                       balance_factors=balance_factors, **numeric)
    params, state = params0, tx.init(params0)
    state.hyperparams.update({k: jnp.asarray(v, jnp.float64) for k, v in numeric.items()})
    factors = pairs
    ref_states = [(ref.init_side(a.shape[0], a.shape[1]), ref.init_side(b.shape[0], b.shape[1]))
                  for a, b in pairs]
    for t, dz in enumerate(dzs):
      grads = h.grads_from_dz(params, dz)
      factors, ref_states, applied = ref.step(
          factors, [(a, b) for a, b in h.from_params(grads)], ref_states, t, opts)
      assert applied
      updates, state = update(grads, state, params)
      params = optax.apply_updates(params, updates)
      for (a, b), (ra, rb) in zip(h.from_params(params), factors):
        worst = max(worst, rel_err(a, ra), rel_err(b, rb))
      # The state in Z-space agrees too (the bases themselves differ by design).
      for i, (sa, sb) in enumerate(ref_states):
        ours = z_space_state(state.inner_state, f'adapter_{i}')
        theirs = [sa.m @ sb.basis.T, sb.m @ sa.basis.T, sb.basis @ sa.v @ sb.basis.T,
                  sa.basis @ sb.v @ sa.basis.T, sa.rho, sb.rho]
        for x, y in zip(ours, theirs):
          assert np.allclose(x, y, rtol=1e-10, atol=1e-12)
  assert worst <= 1e-10, worst


# ----------------------------------------------------------------------------
# Transformation invariance.

def _equivalent_runs(tx, dtype, cond, steps_list, seed=0):
  pairs = h.random_pairs(seed, SHAPES)
  rng = np.random.default_rng(seed + 5)
  transforms = [random_transform(rng, r, cond) for _, _, r in SHAPES]
  equivalent = [(a @ t, b @ np.linalg.inv(t).T) for (a, b), t in zip(pairs, transforms)]
  p1, p2 = h.to_params(pairs, dtype), h.to_params(equivalent, dtype)
  dzs = dz_sequence(rng, p1, max(steps_list))
  results = {}
  for steps in steps_list:
    q1, s1 = h.run(tx, p1, dzs[:steps])
    q2, s2 = h.run(tx, p2, dzs[:steps])
    z1, z2 = h.delta_z(q1), h.delta_z(q2)
    results[steps] = (max(rel_err(z2[k], z1[k]) for k in z1), s1, s2)
  return results


def test_invariant_to_equivalent_factorizations_float64():
  tx = rite_optax.lora_rite(1e-2, **ALL_ON)
  results = _equivalent_runs(tx, jnp.float64, cond=1e3, steps_list=(1, 10, 100))
  for steps, (z_err, s1, s2) in results.items():
    assert z_err <= 1e-10, (steps, z_err)
    for i in range(len(SHAPES)):
      for x, y in zip(z_space_state(s1, f'adapter_{i}'), z_space_state(s2, f'adapter_{i}')):
        assert rel_err(x, y) <= 1e-9 or np.allclose(x, y, atol=1e-12), (steps, i)


def test_adam_is_not_invariant():
  """The same check fails for Adam by many orders of magnitude."""
  results = _equivalent_runs(optax.adam(1e-2), jnp.float64, cond=1e3, steps_list=(1, 10))
  for steps, (z_err, _, _) in results.items():
    assert z_err > 1e-2, (steps, z_err)


def test_invariant_in_float32_to_float32_accuracy():
  tx = rite_optax.lora_rite(1e-2, **ALL_ON)
  results = _equivalent_runs(tx, jnp.float32, cond=1e2, steps_list=(10,))
  z_err = results[10][0]
  assert z_err <= 1e-4, z_err


@hypothesis.settings(max_examples=12, deadline=None, derandomize=True)
@hypothesis.given(
    m=st.integers(1, 24), n=st.integers(1, 24), r=st.integers(1, 6),
    log_scale=st.floats(-6.0, 6.0))
def test_scale_invariance_over_shapes_ranks_and_scales(m, n, r, log_scale):
  """(A·s, B/s) follows the same Z trajectory as (A, B), for s in 1e-6..1e6."""
  s = 10.0**log_scale
  (a, b), = h.random_pairs(m * 100 + n, [(m, n, r)])
  tx = rite_optax.lora_rite(1e-2, apply_escape=True)
  rng = np.random.default_rng(r)
  p1 = h.to_params([(a, b)])
  dzs = [h.random_dz(rng, p1) for _ in range(4)]
  q1, _ = h.run(tx, p1, dzs)
  q2, _ = h.run(tx, h.to_params([(a * s, b / s)]), dzs)
  z1, z2 = h.delta_z(q1)['adapter_0'], h.delta_z(q2)['adapter_0']
  assert np.all(np.isfinite(z2))
  assert rel_err(z2, z1) <= 1e-8


# ----------------------------------------------------------------------------
# Edge cases: LoRA init, rank deficiency, extreme scales, bf16.

def test_standard_lora_init_moves_only_b_on_the_first_step():
  params = h.to_params(h.random_pairs(0, SHAPES, zero_b=True))
  tx = rite_optax.lora_rite(1e-2)
  state = tx.init(params)
  dz = h.random_dz(np.random.default_rng(0), params, scale=0.1)  # below update_skipping
  updates, state = tx.update(h.grads_from_dz(params, dz), state, params)
  for k, u in updates.items():
    np.testing.assert_array_equal(u['lora_a'], 0.0)
    assert np.all(np.isfinite(u['lora_b'])) and np.linalg.norm(u['lora_b']) > 0
  params = optax.apply_updates(params, updates)
  updates, _ = tx.update(h.grads_from_dz(params, dz), state, params)
  for u in updates.values():
    assert np.linalg.norm(u['lora_a']) > 0


def _quadratic_fit(tx, params, target, steps):
  def loss(p):
    return sum(jnp.sum(jnp.square(p[k]['lora_a'] @ p[k]['lora_b'] - target[k])) for k in p)

  state = tx.init(params)

  @jax.jit
  def step(p, s):
    updates, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, updates), s

  start = loss(params)
  for _ in range(steps):
    params, state = step(params, state)
  return float(start), float(loss(params)), params


def test_rank_deficient_factors_give_finite_updates_and_learn():
  pairs = h.random_pairs(0, SHAPES)
  # Repeated columns: A has rank r-1 and B rank 1.
  pairs = [(np.concatenate([a[:, :-1], a[:, :1]], 1), np.repeat(b[:, :1], b.shape[1], 1))
           for a, b in pairs]
  params = h.to_params(pairs)
  target = h.delta_z(h.to_params(h.random_pairs(9, SHAPES)))
  start, end, final = _quadratic_fit(rite_optax.lora_rite(3e-2), params, target, 50)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(final))
  assert end < 0.5 * start


@pytest.mark.parametrize('scale', [1e-6, 1e6])
def test_extreme_factor_scales_float32(scale):
  pairs = [(a * scale, b / scale) for a, b in h.random_pairs(0, SHAPES)]
  params = h.to_params(pairs, jnp.float32)
  target = jax.tree.map(lambda x: x.astype(jnp.float32),
                        h.delta_z(h.to_params(h.random_pairs(9, SHAPES))))
  start, end, final = _quadratic_fit(rite_optax.lora_rite(3e-2), params, target, 30)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(final))
  assert end < 0.5 * start


def test_bf16_params_keep_their_dtype_and_learn():
  params = h.to_params(h.random_pairs(0, SHAPES), jnp.bfloat16)
  target = jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                        h.delta_z(h.to_params(h.random_pairs(9, SHAPES))))
  tx = rite_optax.lora_rite(3e-2)
  state = tx.init(params)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(rite_state(state).first_moment))
  start, end, final = _quadratic_fit(tx, params, target, 30)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(final))
  assert end < 0.5 * start


# ----------------------------------------------------------------------------
# Non-finite gradients skip the whole step.

@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_non_finite_gradient_skips_the_step_and_loses_nothing(bad):
  params = h.to_params(h.random_pairs(0, SHAPES))
  rng = np.random.default_rng(0)
  dzs = [h.random_dz(rng, params, scale=0.3) for _ in range(3)]
  tx = rite_optax.lora_rite(1e-2, **ALL_ON)
  update = jax.jit(tx.update)

  def train(poison_before=None):
    p, s = params, tx.init(params)
    for i, dz in enumerate(dzs):
      grads = h.grads_from_dz(p, dz)
      if i == poison_before:
        bad_grads = jax.tree.map(lambda x: x, grads)
        bad_grads['adapter_2']['lora_a'] = bad_grads['adapter_2']['lora_a'].at[0, 0].set(bad)
        u, s_after = update(bad_grads, s, p)
        for x in jax.tree.leaves(u):
          np.testing.assert_array_equal(x, 0.0)
        assert int(rite_state(s_after).skipped) == 1
        assert int(rite_state(s_after).count) == int(rite_state(s).count)
        for x, y in zip(jax.tree.leaves(rite_state(s_after)[2:]),
                        jax.tree.leaves(rite_state(s)[2:])):
          np.testing.assert_array_equal(x, y)
        s = s_after
      u, s = update(grads, s, p)
      p = optax.apply_updates(p, u)
    return p, s

  clean_params, clean_state = train()
  p, s = train(poison_before=1)
  for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(clean_params)):
    np.testing.assert_array_equal(x, y)
  assert int(rite_state(s).count) == int(rite_state(clean_state).count) == 3


def test_float_count_from_a_restored_checkpoint():
  """T5X restores integer counters as float32; the step must be the same."""
  params = h.to_params(h.random_pairs(0, SHAPES))
  dz = h.random_dz(np.random.default_rng(0), params)
  tx = rite_optax.scale_by_lora_rite()
  state = tx.init(params)
  grads = h.grads_from_dz(params, dz)
  for _ in range(2):
    _, state = tx.update(grads, state, params)
  as_float = state._replace(count=state.count.astype(jnp.float32))
  u_int, s_int = tx.update(grads, state, params)
  u_float, s_float = tx.update(grads, as_float, params)
  for x, y in zip(jax.tree.leaves(u_int), jax.tree.leaves(u_float)):
    np.testing.assert_array_equal(x, y)
  assert s_float.count.dtype == jnp.float32 and float(s_float.count) == 3.0


def test_update_jits_once():
  params = h.to_params(h.random_pairs(0, SHAPES), jnp.float32)
  tx = rite_optax.lora_rite(1e-2)
  traces = []

  @jax.jit
  def step(p, s, dz):
    traces.append(None)
    u, s = tx.update(h.grads_from_dz(p, dz), s, p)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  rng = np.random.default_rng(0)
  for _ in range(3):
    params, state = step(params, state, h.random_dz(rng, params))
  assert len(traces) == 1
  assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == jax.tree.map(
      lambda x: (x.shape, x.dtype), tx.init(params))


# ----------------------------------------------------------------------------
# Clear errors at init, naming the offending param path or option.

@pytest.mark.parametrize('params,message', [
    ({'enc': {'q': {'lora_a': jnp.ones((4, 2))}}}, 'enc/q/lora_a'),
    ({'enc': {'q': {'lora_b': jnp.ones((2, 4))}}}, 'enc/q/lora_b'),
    ({'q': {'lora_a': jnp.ones((4, 2)), 'lora_b': jnp.ones((3, 4))}}, 'q/lora_a and q/lora_b: rank mismatch'),
    ({'q': {'lora_a': jnp.ones((4,)), 'lora_b': jnp.ones((2, 4))}}, 'q/lora_a'),
    ({'q': {'lora_a': jnp.ones((4, 2), jnp.int32), 'lora_b': jnp.ones((2, 4))}}, 'q/lora_a'),
])
def test_bad_factors_raise_at_init_naming_the_path(params, message):
  for tx in (rite_optax.lora_rite(1e-3), rite_optax.scale_by_lora_rite()):
    with pytest.raises((ValueError, TypeError), match=message):
      tx.init(params)


def test_scale_by_lora_rite_rejects_leaves_that_are_not_factors():
  params = {'q': {'lora_a': jnp.ones((4, 2)), 'lora_b': jnp.ones((2, 4))}, 'norm': jnp.ones(4)}
  with pytest.raises(ValueError, match="'norm'"):
    rite_optax.scale_by_lora_rite().init(params)


def test_unpaired_error_names_the_leaves():
  params = {'q': {'lora_a': jnp.ones((4, 2)), 'lora_b': jnp.ones((2, 4))}, 'head': {'bias': jnp.ones(4)}}
  with pytest.raises(ValueError, match='head/bias'):
    rite_optax.lora_rite(1e-3, unpaired='error').init(params)


def test_update_without_params_raises():
  params = {'q': {'lora_a': jnp.ones((4, 2)), 'lora_b': jnp.ones((2, 4))}}
  tx = rite_optax.scale_by_lora_rite()
  with pytest.raises(ValueError, match='needs params'):
    tx.update(params, tx.init(params))


@pytest.mark.parametrize('kwargs,message', [
    (dict(b1=1.0), 'b1'), (dict(b2=-0.1), 'b2'), (dict(eps=-1.0), 'eps'),
    (dict(b1='0.9'), 'b1'), (dict(relative_eps=1), 'relative_eps'),
    (dict(apply_escape='yes'), 'apply_escape'), (dict(weight_decay=-1.0), 'weight_decay'),
    (dict(balance_factors=None), 'balance_factors'), (dict(unpaired='sgd'), 'unpaired'),
    (dict(pairing='torch'), 'pairing'),
])
def test_bad_options_raise_naming_the_option(kwargs, message):
  with pytest.raises((ValueError, TypeError), match=message):
    rite_optax.lora_rite(1e-3, **kwargs)
