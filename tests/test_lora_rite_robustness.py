"""Where the reference code is fragile: float32 from LoRA init, bad options, whole-step
safety, dtypes and visible skipping (docs/algorithm.md §6.5 and §6.6)."""

import math
import warnings

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import strategies as st

import rite_optax


def fit_low_rank(dtype, seed, m=12, n=10, r=4, k=3, steps=30, lr=3e-2, **options):
  """LoRA init (A random, B = 0) fitted to a rank-k target: (final loss, ‖A‖).

  Every float is drawn once in float64 and cast, so both precisions start from
  the same numbers.
  """
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((m, r))
  target = jnp.asarray(rng.standard_normal((m, k)) @ rng.standard_normal((k, n)), dtype)
  params = {'l': {'lora_a': jnp.asarray(a, dtype), 'lora_b': jnp.zeros((r, n), dtype)}}
  loss = lambda p: 0.5 * jnp.mean(jnp.square(p['l']['lora_a'] @ p['l']['lora_b'] - target))
  tx = rite_optax.lora_rite(lr, **options)

  @jax.jit
  def step(p, s):
    updates, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, updates), s

  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return float(loss(params)), float(jnp.linalg.norm(params['l']['lora_a']))


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_float32_from_lora_init_with_a_low_rank_target_follows_float64(seed):
  """Before the null-direction rule (§6.5) float32 ended at loss 1.24 / 0.15 / 50 and
  ‖A‖ up to 1e5 on these seeds, while float64 converged."""
  loss64, norm64 = fit_low_rank(jnp.float64, seed)
  loss32, norm32 = fit_low_rank(jnp.float32, seed)
  assert loss32 <= 1.01 * loss64 + 1e-6, (loss32, loss64)
  assert abs(norm32 - norm64) <= 1e-3 * norm64, (norm32, norm64)


def fit_linear_layer(dtype, tx, seed=0, d=32, r=8, tokens=2, steps=150):
  """A frozen linear layer plus LoRA learns a rank-r delta from ``tokens`` inputs a
  step (each gradient has rank ≤ tokens < r); returns the held-out loss."""
  rng = np.random.default_rng(seed)
  base = jnp.asarray(rng.standard_normal((d, d)) / math.sqrt(d), dtype)
  delta = jnp.asarray(rng.standard_normal((d, r)) @ rng.standard_normal((r, d)) / d, dtype)
  params = {'l': {'lora_a': jnp.asarray(rng.standard_normal((d, r)) / math.sqrt(d), dtype),
                  'lora_b': jnp.zeros((r, d), dtype)}}
  inputs = jnp.asarray(rng.standard_normal((steps, tokens, d)), dtype)
  held_out = jnp.asarray(rng.standard_normal((1000, d)), dtype)

  def loss(p, x):
    adapted = base + p['l']['lora_a'] @ p['l']['lora_b']
    return 0.5 * jnp.mean(jnp.square(x @ adapted - x @ (base + delta)))

  @jax.jit
  def step(p, s, x):
    updates, s = tx.update(jax.grad(loss)(p, x), s, p)
    return optax.apply_updates(p, updates), s

  state = tx.init(params)
  for x in inputs:
    params, state = step(params, state, x)
  return float(loss(params, held_out))


def test_float32_linear_layer_from_two_tokens_a_step_follows_float64():
  loss64 = fit_linear_layer(jnp.float64, rite_optax.lora_rite(1e-2))
  loss32 = fit_linear_layer(jnp.float32, rite_optax.lora_rite(1e-2))
  adam32 = fit_linear_layer(jnp.float32, optax.adam(1e-2))
  initial = fit_linear_layer(jnp.float64, optax.set_to_zero(), steps=1)
  assert loss64 < 0.05 * initial, (loss64, initial)  # it learns, so the comparison means something
  assert loss32 <= 1.1 * loss64, (loss32, loss64)
  assert loss32 < adam32, (loss32, adam32)


@hypothesis.settings(max_examples=12, deadline=None, derandomize=True)
@hypothesis.given(
    r=st.integers(1, 6), extra_rows=st.integers(0, 6), deficit=st.integers(0, 3),
    seed=st.integers(0, 2**16), lr=st.sampled_from([1e-2, 3e-2, 1e-1]))
def test_float32_tracks_float64_on_low_rank_problems_from_lora_init(
    r, extra_rows, deficit, seed, lr):
  """Random shapes, ranks of the target below r, B = 0: float32 within 2× of float64."""
  k = max(1, r - deficit)
  shape = dict(m=r + extra_rows, n=r + extra_rows // 2 + 1, r=r, k=k, steps=25, lr=lr)
  loss64, _ = fit_low_rank(jnp.float64, seed, **shape)
  loss32, _ = fit_low_rank(jnp.float32, seed, **shape)
  assert loss32 <= 2.0 * loss64 + 1e-5, (loss32, loss64)


def test_float32_keeps_weak_but_real_directions_at_rank_64():
  """The null-direction rule must not eat signal: a gradient whose singular values
  span 500× at r = 64 is whitened in float32 as in float64 (a threshold of r·eps·λ_max
  zeroed the weakest directions: 16% off)."""
  rng = np.random.default_rng(0)
  d, r = 256, 64
  a = np.linalg.qr(rng.standard_normal((d, r)))[0]
  b = np.linalg.qr(rng.standard_normal((d, r)))[0].T
  u, v = np.linalg.qr(rng.standard_normal((r, r)))[0], np.linalg.qr(rng.standard_normal((d, r)))[0]
  grad_b = (u * np.geomspace(1e-2, 2e-5, r)) @ v.T
  updates = {}
  for dtype in (jnp.float32, jnp.float64):
    params = {'l': {'lora_a': jnp.asarray(a, dtype), 'lora_b': jnp.asarray(b, dtype)}}
    grads = {'l': {'lora_a': jnp.zeros((d, r), dtype), 'lora_b': jnp.asarray(grad_b, dtype)}}
    tx = rite_optax.lora_rite(1.0, update_skipping=0.0, clip_unmagnified_grad=0.0)
    step, _ = tx.update(grads, tx.init(params), params)
    updates[dtype] = np.asarray(step['l']['lora_b'], np.float64)
  error = np.linalg.norm(updates[jnp.float32] - updates[jnp.float64])
  assert error <= 0.01 * np.linalg.norm(updates[jnp.float64])


PARAMS = {'q': {'lora_a': jnp.ones((8, 2)), 'lora_b': jnp.zeros((2, 4))}, 'bias': jnp.zeros(4)}

NUMERIC_OPTIONS = ['b1', 'b2', 'eps', 'weight_decay', 'unpaired_weight_decay',
                   'learning_rate', 'unpaired_learning_rate']
THRESHOLDS = ['clip_unmagnified_grad', 'update_skipping', 'update_capping']


@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -float('inf')])
@pytest.mark.parametrize('option', NUMERIC_OPTIONS + THRESHOLDS)
def test_non_finite_options_are_rejected_by_name(option, bad):
  if option in THRESHOLDS and not math.isnan(bad):
    return  # an infinite threshold means "off": see the next test
  kwargs = {'learning_rate': 1e-3, option: bad}
  with pytest.raises(ValueError, match=f'^{option} must be finite'):
    rite_optax.lora_rite(**kwargs)


def test_infinite_thresholds_switch_their_feature_off():
  params = {'q': {'lora_a': jnp.ones((8, 2)), 'lora_b': jnp.eye(2, 4)}}
  grads = jax.tree.map(lambda x: 50.0 * jnp.ones_like(x), params)  # skipping and clipping fire
  off = {name: 0.0 for name in THRESHOLDS}
  infinite = {name: float('inf') for name in THRESHOLDS}
  on = {'clip_unmagnified_grad': 1.0, 'update_skipping': 1.0, 'update_capping': 0.1}
  results = {}
  for label, kwargs in (('off', off), ('inf', infinite), ('on', on)):
    tx = rite_optax.lora_rite(1e-2, **kwargs)
    results[label], _ = tx.update(grads, tx.init(params), params)
  jax.tree.map(np.testing.assert_array_equal, results['inf'], results['off'])
  assert not np.allclose(results['on']['q']['lora_b'], results['off']['q']['lora_b'])


@pytest.mark.parametrize('learning_rate', [None, '1e-3', b'1e-3'])
def test_learning_rate_must_be_a_number_or_a_schedule(learning_rate):
  with pytest.raises(TypeError, match='learning_rate must be a number or an optax schedule'):
    rite_optax.lora_rite(learning_rate)
  if learning_rate is not None:  # None there means "the factors' learning rate"
    with pytest.raises(TypeError, match='unpaired_learning_rate must be a number'):
      rite_optax.lora_rite(1e-3, unpaired_learning_rate=learning_rate)


@pytest.mark.parametrize('relative_eps', [False, True])
def test_eps_zero_is_finite_from_lora_init(relative_eps):
  """V = 0 on the lora_a side at B = 0: every direction is null, the step is 0, not 0/0."""
  tx = rite_optax.lora_rite(1e-2, eps=0.0, relative_eps=relative_eps, update_skipping=0.0)
  params, state = PARAMS, tx.init(PARAMS)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(3):
    updates, state = jax.jit(tx.update)(grads, state, params)
    params = optax.apply_updates(params, updates)
    for leaf in jax.tree.leaves((params, state)):
      assert jnp.all(jnp.isfinite(leaf))
  assert jnp.any(params['q']['lora_b'] != 0) and jnp.any(params['q']['lora_a'] != 1)


def test_rank_zero_factors_fail_at_init_naming_them():
  params = {'q': {'lora_a': jnp.ones((4, 0)), 'lora_b': jnp.ones((0, 4))}}
  with pytest.raises(ValueError, match=r'q/lora_a and q/lora_b: rank 0'):
    rite_optax.lora_rite(1e-3).init(params)


def test_a_transposed_torch_layout_with_square_weights_is_flagged():
  """lora_a (r, d), lora_b (d, r) read with the nnx convention pair with "rank" d."""
  params = {'proj': {'lora_a': jnp.ones((4, 16)), 'lora_b': jnp.ones((16, 4))}}
  with pytest.warns(UserWarning, match=r'proj/lora_a \(4, 16\) and proj/lora_b \(16, 4\): rank 16'
                                       r' is larger than the rows'):
    text = rite_optax.describe(params, print_output=False)
  assert "warning: proj/lora_a (4, 16)" in text and "pairing='peft'" in text
  with pytest.warns(UserWarning, match='layout may be transposed'):
    rite_optax.lora_rite(1e-3).init(params)
  router = {'gate': {'lora_a': jnp.ones((64, 16)), 'lora_b': jnp.ones((16, 8))}}  # 8 outputs, r=16
  for fine in (jax.tree.map(lambda x: x.T, params), router):  # not flagged
    with warnings.catch_warnings():
      warnings.simplefilter('error')
      text = rite_optax.describe(fine, print_output=False)
    assert 'warning' not in text


def schedule_counts(state):
  is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
  return [x.count for x in jax.tree.leaves(state, is_leaf=is_schedule) if is_schedule(x)]


@pytest.mark.parametrize('poisoned', ['q/lora_a', 'q/lora_b', 'bias'])
@pytest.mark.parametrize('value', [jnp.nan, jnp.inf])
def test_a_non_finite_gradient_anywhere_skips_the_whole_step(poisoned, value):
  tx = rite_optax.lora_rite(optax.linear_schedule(1e-2, 1e-3, 10))
  grads = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), PARAMS)
  update = jax.jit(tx.update)
  updates, state = update(grads, tx.init(PARAMS), PARAMS)
  params = optax.apply_updates(PARAMS, updates)

  path = poisoned.split('/')
  bad = jax.tree.map(lambda x: x, grads)
  leaf = bad[path[0]] if len(path) == 1 else bad[path[0]][path[1]]
  leaf = leaf.at[(0,) * leaf.ndim].set(value)
  if len(path) == 1:
    bad[path[0]] = leaf
  else:
    bad[path[0]] = dict(bad[path[0]], **{path[1]: leaf})
  skipped_updates, skipped_state = update(bad, state, params)

  for u in jax.tree.leaves(skipped_updates):
    np.testing.assert_array_equal(u, 0.0)
  diag_before, diag_after = rite_optax.diagnostics(state), rite_optax.diagnostics(skipped_state)
  assert int(diag_after['skipped_steps']) == int(diag_before['skipped_steps']) + 1
  is_rite = lambda x: isinstance(x, rite_optax.ScaleByLoraRiteState)
  uncounted = lambda tree: jax.tree.map(
      lambda x: x._replace(skipped=None) if is_rite(x) else x, tree, is_leaf=is_rite)
  jax.tree.map(np.testing.assert_array_equal, uncounted(skipped_state), uncounted(state))
  assert schedule_counts(skipped_state) == schedule_counts(state) == [1, 1]
  # Nothing is lost: the next finite step is the step that would have come.
  expected = update(grads, state, params)
  resumed = update(grads, skipped_state, params)
  jax.tree.map(np.testing.assert_array_equal, resumed[0], expected[0])


def test_updates_come_back_in_the_param_dtype_whatever_the_gradient_dtype():
  params = {'q': {'lora_a': jnp.ones((8, 2), jnp.float32), 'lora_b': jnp.eye(2, 4, dtype=jnp.float32)},
            'bias': jnp.zeros(4, jnp.float32)}
  tx = rite_optax.lora_rite(1e-2)
  grads = jax.tree.map(lambda x: jnp.ones_like(x, jnp.bfloat16), params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert jax.tree.map(lambda u: u.dtype, updates) == jax.tree.map(lambda p: p.dtype, params)
  assert all(jnp.any(u != 0) for u in jax.tree.leaves(updates))


def test_diagnostics_show_a_summed_loss_that_update_skipping_freezes():
  """A loss summed over many tokens makes RMS(ḡ) » 1: every factor is skipped, and
  the diagnostics say so (the trap of T5X's default summed loss)."""
  rng = np.random.default_rng(0)
  params = {'q': {'lora_a': jnp.asarray(rng.standard_normal((16, 4)), jnp.float32),
                  'lora_b': jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)}}
  x = jnp.asarray(rng.standard_normal((512, 16)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((512, 8)), jnp.float32)
  summed = lambda p: jnp.sum(jnp.square(x @ p['q']['lora_a'] @ p['q']['lora_b'] - y))
  mean = lambda p: summed(p) / y.size
  tx = rite_optax.lora_rite(1e-2)
  for loss, skipped in ((summed, 2), (mean, 0)):
    state = tx.init(params)
    step = jax.jit(lambda p, s, loss=loss: tx.update(jax.grad(loss)(p), s, p))
    p = params
    for _ in range(3):
      updates, state = step(p, state)
      p = optax.apply_updates(p, updates)
    diag = jax.jit(rite_optax.diagnostics)(state)
    assert set(diag) == {'step', 'skipped_steps', 'skipped_factors', 'skipped_factors_total',
                         'grad_norm', 'clip_scale'}
    assert int(diag['step']) == 3 and int(diag['skipped_steps']) == 0
    assert int(diag['skipped_factors']) == skipped
    assert int(diag['skipped_factors_total']) == 3 * skipped
    if skipped:  # frozen: the summed loss did not move
      assert float(summed(p)) == float(summed(params))
    else:
      assert float(summed(p)) < float(summed(params))
      assert 0 < float(diag['grad_norm'])
      norm = float(diag['grad_norm'])
      assert float(diag['clip_scale']) == pytest.approx(min(1.0, 1.0 / norm), rel=1e-6)


def test_diagnostics_report_clipping_and_find_the_state_through_wrappers():
  tx = optax.MultiSteps(optax.inject_hyperparams(rite_optax.lora_rite)(
      learning_rate=1e-2, update_skipping=0.0, clip_unmagnified_grad=0.25), every_k_schedule=1)
  params = {'q': {'lora_a': jnp.ones((8, 2)), 'lora_b': jnp.ones((2, 4))}}
  grads = jax.tree.map(jnp.ones_like, params)
  _, state = jax.jit(tx.update)(grads, tx.init(params), params)
  diag = rite_optax.diagnostics(state)
  norm = float(diag['grad_norm'])
  assert norm > 0.25 and float(diag['clip_scale']) == pytest.approx(0.25 / norm, rel=1e-6)
  with pytest.raises(ValueError, match='exactly one ScaleByLoraRiteState'):
    rite_optax.diagnostics(optax.adam(1e-3).init(params))


def test_bf16_params_get_the_float32_update_rounded_once():
  """The learning rate is applied in float32 before the one cast to bf16 (applied to a
  bf16 update it would round twice: 12 of 48 entries one ulp off, measured)."""
  keys = jax.random.split(jax.random.key(0), 4)
  params = {'w_lora_a': jax.random.normal(keys[0], (32, 3), jnp.float32),
            'w_lora_b': 0.1 * jax.random.normal(keys[1], (3, 16), jnp.float32)}
  grads = {'w_lora_a': jax.random.normal(keys[2], (32, 3), jnp.float32),
           'w_lora_b': jax.random.normal(keys[3], (3, 16), jnp.float32)}
  bf16 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree)
  tx = rite_optax.lora_rite(1e-2, pairing='qwix')
  u16, _ = tx.update(bf16(grads), tx.init(bf16(params)), bf16(params))
  # The float32 run starts from the same (bf16-representable) numbers.
  params32, grads32 = (jax.tree.map(lambda x: x.astype(jnp.float32), bf16(t))
                       for t in (params, grads))
  u32, _ = tx.update(grads32, tx.init(params32), params32)
  for key in u16:
    assert u16[key].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(u16[key], np.float32),
                                  np.asarray(u32[key].astype(jnp.bfloat16), np.float32))


def test_with_unpaired_zero_the_frozen_leaves_gradients_are_not_read():
  """Their updates are discarded, so a NaN there skips nothing, and XLA need not
  compute the frozen weights' gradients at all."""
  tx = rite_optax.lora_rite(1e-2, unpaired='zero')
  grads = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), PARAMS)
  grads['bias'] = grads['bias'].at[0].set(jnp.nan)
  updates, state = jax.jit(tx.update)(grads, tx.init(PARAMS), PARAMS)
  assert int(rite_optax.diagnostics(state)['skipped_steps']) == 0
  assert jnp.any(updates['q']['lora_b'] != 0)
  np.testing.assert_array_equal(updates['bias'], 0.0)

  frozen = {'w': jnp.ones((64, 64)), 'l': {'lora_a': jnp.ones((64, 4)), 'lora_b': jnp.ones((4, 64))}}
  x = jnp.ones((8, 64))
  loss = lambda p: jnp.sum(jnp.square(x @ p['w'] + (x @ p['l']['lora_a']) @ p['l']['lora_b']))

  def flops(tx):
    step = lambda p, s: tx.update(jax.grad(loss)(p), s, p)
    cost = jax.jit(step).lower(frozen, tx.init(frozen)).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)['flops']

  without_w = optax.partition({'rite': rite_optax.lora_rite(1e-2, unpaired='error'),
                               'frozen': optax.set_to_zero()},
                              lambda p: {'w': 'frozen', 'l': {'lora_a': 'rite', 'lora_b': 'rite'}})
  assert flops(tx) <= 1.01 * flops(without_w)
