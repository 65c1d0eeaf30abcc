"""What an adversarial user does to lora_rite: traced options out of range, half-precision
fallbacks, gradient dtypes that differ from the params', huge but finite gradients, trees
without pairs, resized factors, zero-size factors; and a fuzz over all of them."""

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import strategies as st

import rite_optax

F32 = jnp.float32  # the tests enable x64; overflow is a float32 matter
PARAMS = {'q': {'lora_a': jnp.ones((8, 2), F32), 'lora_b': jnp.eye(2, 4, dtype=F32)},
          'k': {'lora_a': jnp.eye(6, 2, dtype=F32), 'lora_b': jnp.eye(2, 4, dtype=F32)},
          'bias': jnp.zeros(4, F32)}
GRADS = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), PARAMS)


def finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.inexact))


def uncounted(state):
  """The state without LoRA-RITE's ``skipped`` counter."""
  is_rite = lambda x: isinstance(x, rite_optax.ScaleByLoraRiteState)
  return jax.tree.map(lambda x: x._replace(skipped=None) if is_rite(x) else x, state,
                      is_leaf=is_rite)


def assert_skipped(before, after, updates):
  """A skipped step: zero updates, every state leaf as it was, one more skipped step."""
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(u, 0.0)
  jax.tree.map(np.testing.assert_array_equal, uncounted(after), uncounted(before))
  assert int(rite_optax.diagnostics(after)['skipped_steps']) == (
      int(rite_optax.diagnostics(before)['skipped_steps']) + 1)


def injected(**hyperparams):
  return optax.inject_hyperparams(rite_optax.lora_rite, hyperparam_dtype=jnp.float32)(
      **hyperparams)


@pytest.mark.parametrize('name,value', [
    ('b1', 1.0), ('b2', 1.0), ('b2', 1.5), ('eps', -1.0), ('eps', jnp.nan), ('b1', jnp.nan),
    ('learning_rate', jnp.nan), ('learning_rate', jnp.inf), ('weight_decay', -1.0),
    ('unpaired_learning_rate', jnp.nan), ('unpaired_eps', -1.0),
    ('unpaired_weight_decay', jnp.inf), ('update_skipping', jnp.nan)])
def test_a_traced_option_out_of_range_skips_the_step_and_nothing_is_lost(name, value):
  """b2 = 1 made the bias-corrected decay 0/0: NaN params and state, skipped_steps 0."""
  tx = injected(learning_rate=1e-2, unpaired_learning_rate=1e-2)
  update = jax.jit(tx.update)
  _, state = update(GRADS, tx.init(PARAMS), PARAMS)
  bad = state._replace(hyperparams=dict(state.hyperparams, **{name: jnp.asarray(value,
                                                                               jnp.float32)}))
  updates, after = update(GRADS, bad, PARAMS)
  # inject_hyperparams' own count moves on; everything inside is as it was.
  assert_skipped(bad.inner_state, after.inner_state, updates)
  resumed, _ = update(GRADS, after._replace(hyperparams=state.hyperparams), PARAMS)
  expected, _ = update(GRADS, state, PARAMS)
  jax.tree.map(np.testing.assert_array_equal, resumed, expected)


def test_a_schedule_that_turns_nan_skips_those_steps():
  tx = rite_optax.lora_rite(lambda count: jnp.where(count == 1, jnp.nan, 1e-2),
                            unpaired_learning_rate=1e-2)
  update = jax.jit(tx.update)
  updates, state = update(GRADS, tx.init(PARAMS), PARAMS)
  assert finite(updates) and any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates))
  updates, after = update(GRADS, state, PARAMS)
  assert_skipped(state, after, updates)


def test_scale_by_lora_rite_alone_skips_on_a_traced_option_out_of_range():
  factors = {'q': PARAMS['q']}
  tx = optax.inject_hyperparams(rite_optax.scale_by_lora_rite, hyperparam_dtype=jnp.float32)()
  grads = {'q': GRADS['q']}
  _, state = tx.update(grads, tx.init(factors), factors)
  bad = state._replace(hyperparams=dict(state.hyperparams, b2=jnp.asarray(1.0)))
  updates, after = tx.update(grads, bad, factors)
  assert_skipped(bad.inner_state, after.inner_state, updates)


@pytest.mark.parametrize('dtype', [jnp.float16, jnp.bfloat16])
def test_the_fallback_works_in_half_precision(dtype):
  """eps = 1e-8 is 0 in float16: a bias gradient below ~8e-3 gave -inf updates."""
  params = jax.tree.map(lambda x: x.astype(dtype), PARAMS)
  tx = rite_optax.lora_rite(1e-2)
  for scale in (1e-3, 1e-5):
    grads = jax.tree.map(lambda x, s=scale: jnp.full_like(x, s), params)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    assert finite(updates) and finite(state)
    # Adam's first step is -lr·sign(g): the fallback computes it in float32.
    np.testing.assert_allclose(np.asarray(updates['bias'], np.float32), -1e-2, rtol=1e-2)


@pytest.mark.parametrize('param_dtype,grad_dtype', [
    (jnp.bfloat16, jnp.float32), (jnp.float16, jnp.float32), (jnp.float32, jnp.bfloat16),
    (jnp.float32, jnp.float16), (jnp.bfloat16, jnp.float16)])
def test_state_dtypes_never_drift_and_the_step_compiles_once(param_dtype, grad_dtype):
  """bf16 params with float32 gradients turned the fallback's mu into float32 after one step."""
  params = jax.tree.map(lambda x: x.astype(param_dtype), PARAMS)
  grads = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x, grad_dtype), params)
  tx = rite_optax.lora_rite(1e-2)
  expected = jax.eval_shape(tx.init, params)
  mesh = jax.make_mesh((1,), ('data',))
  specs = jax.tree.map(lambda _: jax.sharding.PartitionSpec(), params)
  abstract = rite_optax.abstract_state(tx, params, specs, mesh)
  update = jax.jit(tx.update)
  state = tx.init(params)
  for _ in range(3):
    updates, state = update(grads, state, params)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == jax.tree.map(
        lambda x: (x.shape, x.dtype), expected)
    assert jax.tree.map(lambda x: x.dtype, updates) == jax.tree.map(lambda x: x.dtype, params)
  assert jax.tree.map(lambda x: x.dtype, abstract) == jax.tree.map(lambda x: x.dtype, expected)
  assert update._cache_size() == 1


@pytest.mark.parametrize('huge', [1e20, 1e30, 3e38])
def test_a_huge_but_finite_gradient_is_skipped_by_update_skipping_not_the_whole_step(huge):
  """Its r×r Gram overflows; the adapter is zeroed as at 1e10, and the rest of the step
  (the other adapter, the bias) is exactly the step it would have been."""
  tx = rite_optax.lora_rite(1e-2)
  update = jax.jit(tx.update)
  state = tx.init(PARAMS)
  _, state = update(GRADS, state, PARAMS)
  results = {}
  for size in (1e10, huge):
    grads = dict(GRADS, q=jax.tree.map(lambda x, s=size: jnp.full_like(x, s), GRADS['q']))
    results[size] = update(grads, state, PARAMS)
  updates, after = results[huge]
  diag = rite_optax.diagnostics(after)
  assert int(diag['skipped_steps']) == 0 and int(diag['skipped_factors']) == 2
  assert finite(after) and finite(updates)
  jax.tree.map(np.testing.assert_array_equal, results[huge], results[1e10])


def test_a_huge_gradient_with_skipping_and_clipping_off_skips_the_whole_step():
  tx = rite_optax.lora_rite(1e-2, update_skipping=0.0, clip_unmagnified_grad=0.0)
  state = tx.init(PARAMS)
  grads = dict(GRADS, q=jax.tree.map(lambda x: jnp.full_like(x, 1e30), GRADS['q']))
  updates, after = jax.jit(tx.update)(grads, state, PARAMS)
  assert_skipped(state, after, updates)


@pytest.mark.parametrize('params,hint', [
    ({}, 'matches the factor names'),
    ({'bias': jnp.zeros(4)}, 'matches the factor names'),
    ({'w': {'kernel_lora_a': jnp.ones((4, 2)), 'kernel_lora_b': jnp.ones((2, 4))}},
     "pair under pairing='qwix'")])
def test_a_tree_without_pairs_fails_at_init_naming_the_pairing(params, hint):
  for tx in (rite_optax.lora_rite(1e-3), rite_optax.scale_by_lora_rite()):
    with pytest.raises(ValueError, match=f"^pairing 'nnx' finds no LoRA factor pair.*{hint}"):
      tx.init(params)


def test_factors_resized_since_init_fail_naming_the_path_and_both_shapes():
  tx = rite_optax.lora_rite(1e-3)
  state = tx.init(PARAMS)
  resized = dict(PARAMS, q={'lora_a': jnp.ones((8, 3)), 'lora_b': jnp.ones((3, 4))})
  with pytest.raises(ValueError, match=r'q/lora_a: the factor has shape \(8, 3\) but its'
                                       r' LoRA-RITE state \(from init\) has shape \(8, 2\)'):
    tx.update(jax.tree.map(jnp.ones_like, resized), state, resized)
  wrong_grads = dict(GRADS, k={'lora_a': jnp.ones((6, 3)), 'lora_b': GRADS['k']['lora_b']})
  with pytest.raises(ValueError, match=r'k/lora_a.*\(6, 3\)'):
    tx.update(wrong_grads, state, PARAMS)


@pytest.mark.parametrize('a,b', [((0, 2), (2, 4)), ((8, 2), (2, 0)), ((0, 8, 2), (0, 2, 4))])
def test_zero_size_factors_fail_at_init_naming_them(a, b):
  """A (0, r) lora_a left NaN in the second moment (a division by the row count)."""
  pairing = rite_optax.nnx(batch_axes=(0,)) if len(a) == 3 else 'nnx'
  params = {'q': {'lora_a': jnp.ones(a), 'lora_b': jnp.ones(b)}}
  with pytest.raises(ValueError, match=r'q/lora_a and q/lora_b: zero-size factor'):
    rite_optax.lora_rite(1e-3, pairing=pairing).init(params)


DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


@hypothesis.settings(max_examples=16, deadline=None, derandomize=True)
@hypothesis.given(
    rows=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12)), min_size=1, max_size=3),
    rank=st.integers(1, 5), batch=st.sampled_from([None, 1, 3]),
    scale=st.sampled_from([1e-30, 1e-6, 1.0, 1e6, 1e20]),
    param_dtype=st.sampled_from(DTYPES), grad_dtype=st.sampled_from(DTYPES),
    skipping=st.sampled_from([1.0, 0.0]), clip=st.sampled_from([1.0, 0.0]),
    capping=st.sampled_from([0.0, 0.5]), weight_decay=st.sampled_from([0.0, 1e-2]),
    escape=st.booleans(), seed=st.integers(0, 2**16))
def test_fuzz_finite_in_finite_out_fixed_dtypes_one_compilation(
    rows, rank, batch, scale, param_dtype, grad_dtype, skipping, clip, capping, weight_decay,
    escape, seed):
  """Whatever the shapes, scales, dtypes and options: finite params and gradients give
  finite params and state, updates in the params' dtypes, state dtypes and structure of
  ``jax.eval_shape(tx.init)``, and one compilation for three steps."""
  rng = np.random.default_rng(seed)
  lead = () if batch is None else (batch,)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(lead + shape), param_dtype)
  params = {f'l{i}': {'lora_a': normal(m, rank), 'lora_b': normal(rank, n)}
            for i, (m, n) in enumerate(rows)}
  params['bias'] = normal(rows[0][1])
  pairing = 'nnx' if batch is None else rite_optax.nnx(batch_axes=(0,))
  tx = rite_optax.lora_rite(
      1e-2, update_skipping=skipping, clip_unmagnified_grad=clip, update_capping=capping,
      weight_decay=weight_decay, apply_escape=escape, pairing=pairing)
  expected = jax.tree.map(lambda x: (x.shape, x.dtype), jax.eval_shape(tx.init, params))

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return updates, optax.apply_updates(params, updates), state

  steps = [jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape),
                                               grad_dtype), params) for _ in range(3)]
  hypothesis.assume(finite(steps))  # 1e6 is inf in float16
  state = tx.init(params)
  for grads in steps:
    updates, params, state = step(params, state, grads)
    assert finite(params) and finite(state)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == expected
    assert jax.tree.map(lambda u: u.dtype, updates) == jax.tree.map(lambda p: p.dtype, params)
  assert step._cache_size() == 1
