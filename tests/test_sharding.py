"""Sharded runs on 8 simulated CPU devices: state specs, equality, HLO collectives."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import rite_optax
from rite_optax import pairing as pairing_lib

AUTO = jax.sharding.AxisType.Auto
SCANNED = pairing_lib.Pairing(
    rules=(
        pairing_lib.FactorRule(r'(?P<pair>scan)/lora_a', 'a', batch_axes=(0,)),
        pairing_lib.FactorRule(r'(?P<pair>scan)/lora_b', 'b', batch_axes=(0,)),
        pairing_lib.FactorRule(r'(?P<pair>q|v)/lora_a', 'a'),
        pairing_lib.FactorRule(r'(?P<pair>q|v)/lora_b', 'b'),
    ),
    name='scan+nnx',
)
STEPS = 20


def make_mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(AUTO,) * len(shape))


def problem(dtype=jnp.float32):
  """Params (two equal-shape adapters, one scanned, a bias) and LoRA targets."""
  keys = iter(jax.random.split(jax.random.key(0), 16))
  normal = lambda shape, scale=1.0: scale * jax.random.normal(next(keys), shape, dtype)
  params = {
      'q': {'lora_a': normal((64, 4)), 'lora_b': normal((4, 32), 0.5)},
      'v': {'lora_a': normal((64, 4)), 'lora_b': normal((4, 32), 0.5)},
      'scan': {'lora_a': normal((2, 128, 8)), 'lora_b': normal((2, 8, 16), 0.5)},
      'bias': normal((32,)),
  }
  targets = {
      'q': normal((64, 32)), 'v': normal((64, 32)), 'scan': normal((2, 128, 16)),
      'bias': normal((32,)),
  }
  return params, targets


@jax.jit
def loss(params, targets):
  total = jnp.mean(jnp.square(params['bias'] - targets['bias']))
  for name in ('q', 'v', 'scan'):
    z = params[name]['lora_a'] @ params[name]['lora_b']
    total += jnp.mean(jnp.square(z - targets[name]))
  return total


def optimizer():
  return rite_optax.lora_rite(3e-2, pairing=SCANNED, update_skipping=0.0)


def row_specs(data, model=None):
  """Factors sharded on their row axis; the scanned adapter's layers on ``data``."""
  rows = model or data
  return {
      'q': {'lora_a': P(rows, None), 'lora_b': P(None, rows)},
      'v': {'lora_a': P(rows, None), 'lora_b': P(None, rows)},
      'scan': ({'lora_a': P(data, model, None), 'lora_b': P(data, None, model)} if model
               else {'lora_a': P(None, data, None), 'lora_b': P(None, None, data)}),
      'bias': P(rows),
  }


def shardings(specs, mesh):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def train_step(tx):
  def step(params, state, targets):
    grads = jax.grad(loss)(params, targets)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def run(params, targets, steps, mesh=None, specs=None):
  """``steps`` jitted steps, unsharded when ``mesh`` is None."""
  tx = optimizer()
  if mesh is None:
    step = jax.jit(train_step(tx))
    state = tx.init(params)
  else:
    param_shardings = shardings(specs, mesh)
    state_shardings = shardings(
        rite_optax.state_partition_specs(tx, params, specs, SCANNED), mesh)
    params = jax.device_put(params, param_shardings)
    targets = jax.device_put(targets, NamedSharding(mesh, P()))
    state = jax.jit(tx.init, out_shardings=state_shardings)(params)
    # No out_shardings: the shardings the step's outputs keep are its own.
    step = jax.jit(train_step(tx))
  for _ in range(steps):
    params, state = step(params, state, targets)
  return params, state


def rite_state(state):
  is_rite = lambda x: isinstance(x, rite_optax.ScaleByLoraRiteState)
  rite, = [x for x in jax.tree.leaves(state, is_leaf=is_rite) if is_rite(x)]
  return rite


def fallback_state(state):
  """The AdamW fallback's state and every schedule count: basis-free as they are."""
  is_adam = lambda x: isinstance(x, (optax.ScaleByAdamState, optax.ScaleByScheduleState))
  return [x for x in jax.tree.leaves(state, is_leaf=is_adam) if is_adam(x)]


@jax.jit
def z_space(state):
  """The state as seen in Z-space, free of the orthonormal basis' gauge.

  Bases from the eigh of an r×r Gram matrix are unique only up to an r×r
  rotation that float32 rounding moves (docs/algorithm.md: any orthonormal basis
  gives the same updates), so moments are compared as ``M_A U_Bᵀ`` and ``U_B V_A U_Bᵀ``,
  which are basis-free, as are ``count``, ``skipped``, ``ρ``, the diagnostics, the
  fallback's moments and the schedule counts.
  """
  rite = rite_state(state)
  out = {'count': rite.count, 'skipped': rite.skipped, 'rho': rite.escaped_mass,
         'skipped_factors': rite.skipped_factors, 'grad_norm': rite.grad_norm,
         'clip_scale': rite.clip_scale, 'fallback': fallback_state(state)}
  for name in ('q', 'v', 'scan'):
    m, u, v = (getattr(rite, f)[name] for f in ('first_moment', 'basis', 'second_moment'))
    u_a, u_b = u['lora_a'], jnp.swapaxes(u['lora_b'], -1, -2)  # (.., rows, r)
    m_a, m_b = m['lora_a'], jnp.swapaxes(m['lora_b'], -1, -2)
    out[name] = {
        'm_a': m_a @ jnp.swapaxes(u_b, -1, -2), 'm_b': m_b @ jnp.swapaxes(u_a, -1, -2),
        'v_a': u_b @ v['lora_a'] @ jnp.swapaxes(u_b, -1, -2),
        'v_b': u_a @ v['lora_b'] @ jnp.swapaxes(u_a, -1, -2),
    }
  return out


def relative_errors(actual, exact):
  """‖actual − exact‖ / ‖exact‖ per leaf (absolute where the exact leaf is 0)."""
  errors = []
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(exact), strict=True):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    scale = np.linalg.norm(e)
    errors.append(np.linalg.norm(a - e) / (scale if scale > 0 else 1.0))
  return np.array(errors)


def assert_rounding_level(actual, baseline, exact, steps, factor=4.0):
  """``actual`` is as close to exact arithmetic as ``baseline`` is, up to ``factor``.

  ``actual`` and ``baseline`` are float32 runs of the same computation with
  different reduction orders (sharded vs one device, pmean vs a vmapped mean);
  ``exact`` is the same run in float64 from the same float32 inputs. Two float32
  trajectories through ``steps`` eigendecompositions cannot promise a fixed
  relative agreement (each is a different rounding of the exact trajectory, and
  the problem amplifies rounding), so each leaf of ``actual`` may be off the
  exact run by ``factor`` times the larger of the baseline's error and
  ``steps·eps₃₂``, a per-step rounding floor. A sharding bug (a partial sum where
  an all-reduce belongs, a shard read as the whole) is an O(1) error.
  """
  floor = steps * np.finfo(np.float32).eps
  allowed = factor * np.maximum(relative_errors(baseline, exact), floor)
  errors = relative_errors(actual, exact)
  assert np.all(errors <= allowed), (errors, allowed)


MESHES = {
    '1d': (((8,), ('data',)), ('data',)),
    '2d': (((2, 4), ('data', 'model')), ('data', 'model')),
}


def as_float64(tree):
  """Floating leaves in float64 (same values); counters stay integers."""
  return jax.tree.map(
      lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


@pytest.fixture(scope='module')
def unsharded():
  """The float32 run on one device and the same run in float64 (exact enough)."""
  params, targets = problem()
  exact = run(as_float64(params), as_float64(targets), STEPS)
  return run(params, targets, STEPS), exact


@pytest.mark.parametrize('which', sorted(MESHES))
def test_sharded_run_equals_unsharded_and_keeps_predicted_shardings(which, unsharded):
  (shape, names), axes = MESHES[which]
  mesh = make_mesh(shape, names)
  specs = row_specs(*axes)
  params, targets = problem()
  tx = optimizer()
  predicted = shardings(rite_optax.state_partition_specs(tx, params, specs, SCANNED), mesh)

  sharded_params, sharded_state = run(params, targets, STEPS, mesh, specs)
  initial_types = jax.tree.map(jax.typeof, jax.jit(tx.init, out_shardings=predicted)(params))

  (baseline_params, baseline_state), (exact_params, exact_state) = unsharded
  assert_rounding_level(sharded_params, baseline_params, exact_params, STEPS)
  # The raw bases are an eigh gauge that rounding may rotate: the state is
  # compared in Z-space, which holds every field but that gauge.
  assert_rounding_level(z_space(sharded_state), z_space(baseline_state), z_space(exact_state),
                        STEPS)
  for leaf, expected in zip(jax.tree.leaves(sharded_state), jax.tree.leaves(predicted),
                            strict=True):
    assert leaf.sharding.is_equivalent_to(expected, leaf.ndim), (leaf.sharding, expected)
  assert jax.tree.map(jax.typeof, sharded_state) == initial_types
  # The loss decreased, so the comparison is not between two frozen runs.
  assert loss(sharded_params, targets) < 0.8 * loss(params, targets)


def test_specs_follow_rite_fields_and_fallback_through_wrappers():
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), problem()[0])
  specs = row_specs('data', 'model')
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.inject_hyperparams(rite_optax.lora_rite)(learning_rate=1e-3, pairing=SCANNED))
  state_specs = rite_optax.state_partition_specs(tx, abstract, specs, SCANNED)

  rite = rite_state(state_specs)
  assert rite.count == P() and rite.skipped == P()
  assert rite.first_moment['scan']['lora_a'] == P('data', 'model', None)
  assert rite.basis['q']['lora_b'] == P(None, 'model')
  assert rite.second_moment['scan']['lora_b'] == P('data', None, None)
  assert rite.second_moment['q']['lora_a'] == P(None, None)
  assert rite.escaped_mass['scan']['lora_a'] == P('data')
  assert rite.escaped_mass['q']['lora_a'] == P()
  assert isinstance(rite.first_moment['bias'], optax.MaskedNode)
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  adam, = [x for x in jax.tree.leaves(state_specs, is_leaf=is_adam) if is_adam(x)]
  assert adam.mu['bias'] == P('model') and adam.nu['bias'] == P('model')
  assert isinstance(adam.mu['q']['lora_a'], optax.MaskedNode)
  # Specs and state have the same structure, and every spec fits its leaf.
  state = jax.eval_shape(tx.init, abstract)
  for leaf, spec in zip(jax.tree.leaves(state), jax.tree.leaves(state_specs), strict=True):
    assert len(spec) <= leaf.ndim


def abstract_problem():
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), problem()[0])


@pytest.mark.parametrize('make', [
    lambda pairing: rite_optax.lora_rite(1e-3, pairing=pairing),
    lambda pairing: rite_optax.scale_by_lora_rite(pairing=pairing),
])
def test_transformation_carries_its_resolved_pairing(make):
  assert make(SCANNED).init.pairing is SCANNED
  assert make('qwix').init.pairing == rite_optax.qwix()
  assert isinstance(make(SCANNED), optax.GradientTransformationExtraArgs)


def test_specs_read_the_pairing_the_transformation_carries():
  params, specs = abstract_problem(), row_specs('data', 'model')
  tx = optimizer()
  carried = rite_optax.state_partition_specs(tx, params, specs)
  assert carried == rite_optax.state_partition_specs(tx, params, specs, SCANNED)
  # The scanned adapter's r×r state keeps its layer axis' entry: read with SCANNED.
  assert rite_state(carried).second_moment['scan']['lora_a'] == P('data', None, None)
  target = rite_optax.abstract_state(tx, params, specs, make_mesh((2, 4), ('data', 'model')))
  assert jax.tree.map(lambda x: x.sharding.spec, target) == carried


@pytest.mark.parametrize('wrong, named', [
    ('qwix', "pairing='qwix' differs from .* built with, 'scan\\+nnx'"),
    # Same name, other rules: the whole pairings are named.
    (dataclasses.replace(SCANNED, rules=SCANNED.rules[2:]), 'differs from .*batch_axes=\\(0,\\)'),
])
def test_specs_with_another_pairing_than_the_transformation_fail_naming_both(wrong, named):
  with pytest.raises(ValueError, match=named):
    rite_optax.state_partition_specs(optimizer(), abstract_problem(), row_specs('data'), wrong)


def test_specs_of_a_combination_without_pairing_ask_for_it():
  tx = optax.chain(rite_optax.scale_by_lora_rite(pairing=SCANNED), optax.scale(-1e-3))
  factors = {k: v for k, v in abstract_problem().items() if k != 'bias'}
  specs = {k: v for k, v in row_specs('data', 'model').items() if k != 'bias'}
  with pytest.raises(ValueError, match='carries no pairing .* pass pairing='):
    rite_optax.state_partition_specs(tx, factors, specs)
  rite = rite_state(rite_optax.state_partition_specs(tx, factors, specs, SCANNED))
  assert rite.second_moment['scan']['lora_b'] == P('data', None, None)


@pytest.mark.parametrize('wrong', ['nnx', 'qwix'])
def test_specs_of_a_combination_with_the_wrong_pairing_fail_by_name(wrong):
  tx = optax.inject_hyperparams(rite_optax.lora_rite)(learning_rate=1e-3, pairing=SCANNED)
  with pytest.raises(ValueError, match='need the pairing given to the transformation'):
    rite_optax.state_partition_specs(tx, abstract_problem(), row_specs('data'), wrong)


def test_abstract_state_carries_shardings_of_the_specs():
  mesh = make_mesh((2, 4), ('data', 'model'))
  params = problem()[0]
  specs = row_specs('data', 'model')
  tx = optimizer()
  target = rite_optax.abstract_state(tx, params, specs, mesh, SCANNED)
  state = jax.eval_shape(tx.init, params)
  expected = rite_optax.state_partition_specs(tx, params, specs, SCANNED)
  for leaf, abstract, spec in zip(jax.tree.leaves(state), jax.tree.leaves(target),
                                  jax.tree.leaves(expected), strict=True):
    assert (abstract.shape, abstract.dtype) == (leaf.shape, leaf.dtype)
    assert abstract.sharding == NamedSharding(mesh, spec)


def collectives(hlo_text):
  """``(op, result shape)`` of every cross-device collective in optimized HLO."""
  ops = 'all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute'
  pattern = rf'=\s*(\(?[a-z0-9]+\[[^=]*?)\s+({ops})(?:-start)?\('
  return [(op, shape) for shape, op in re.findall(pattern, hlo_text)]


@pytest.mark.parametrize('which', sorted(MESHES))
def test_sharded_update_gathers_no_param_shaped_array(which):
  (shape, names), axes = MESHES[which]
  mesh = make_mesh(shape, names)
  specs = row_specs(*axes)
  params, _ = problem()
  tx = optimizer()
  param_shardings = shardings(specs, mesh)
  state_shardings = shardings(rite_optax.state_partition_specs(tx, params, specs), mesh)
  update = jax.jit(tx.update, in_shardings=(param_shardings, state_shardings, param_shardings),
                   out_shardings=(param_shardings, state_shardings))
  state = jax.eval_shape(tx.init, params)
  hlo = update.lower(params, state, params).compile().as_text()
  found = collectives(hlo)
  shapes = lambda result: [tuple(int(d) for d in dims.split(',') if d)
                           for dims in re.findall(r'\[([0-9,]*)\]', result)]
  ranks = {4, 8}
  # The Gram formulation needs only r×r all-reduces (and scalars). No
  # param-shaped array is ever gathered; on CPU the one-matrix-at-a-time eigh
  # loop gathers the r×r stack of a batch-sharded (scanned) adapter, r×r only.
  for op, result in found:
    if op == 'all-gather':
      for dims in shapes(result):
        assert len(dims) == 3 and dims[-1] == dims[-2] and dims[-1] in ranks, result
  all_reduces = [result for op, result in found if op == 'all-reduce']
  assert all_reduces, 'a sharded step needs r×r all-reduces; the HLO parser found none'
  for result in all_reduces:
    for dims in shapes(result):
      assert dims == () or (dims[-1] == dims[-2] and dims[-1] in ranks), result
  if which == '1d':
    # Factors sharded on rows over every device: nothing but those all-reduces.
    assert {op for op, _ in found} == {'all-reduce'}, found
