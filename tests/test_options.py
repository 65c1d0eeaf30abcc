"""Option checks of every transformation the package exports (rite_optax/options.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rite_optax
from rite_optax import options

PARAMS = {'q': {'lora_a': jnp.ones((8, 2)), 'lora_b': jnp.eye(2, 4)}, 'bias': jnp.zeros(4)}
NAN, INF = float('nan'), float('inf')

# factory, its numeric options (name -> a valid value), and whether it takes a learning rate.
FACTORIES = {
    'lora_rite': (rite_optax.lora_rite, ['b1', 'b2', 'eps', 'weight_decay',
                                         'unpaired_weight_decay', 'unpaired_eps'], True),
    'scale_by_lora_rite': (rite_optax.scale_by_lora_rite, ['b1', 'b2', 'eps', 'weight_decay'],
                           False),
    'lora_plus': (rite_optax.lora_plus, ['ratio', 'b1', 'b2', 'eps', 'weight_decay'], True),
    'riemannian_adam': (rite_optax.riemannian_adam,
                        ['b1', 'b2', 'eps', 'reg', 'weight_decay'], True),
    'scale_by_riemannian_adam': (rite_optax.scale_by_riemannian_adam,
                                 ['b1', 'b2', 'eps', 'reg'], False),
    'scale_lora_b': (rite_optax.scale_lora_b, ['ratio'], False),
}
CASES = [(name, option) for name, (_, opts, _) in FACTORIES.items() for option in opts]


def build(name, **kwargs):
  factory, _, takes_lr = FACTORIES[name]
  if name == 'scale_lora_b':
    kwargs.setdefault('ratio', 2.0)
  return factory(1e-3, **kwargs) if takes_lr else factory(**kwargs)


@pytest.mark.parametrize('bad', [NAN, INF, -INF])
@pytest.mark.parametrize('name,option', CASES)
def test_non_finite_numbers_are_rejected_by_name(name, option, bad):
  with pytest.raises(ValueError, match=f'^{option} must be (finite|in)'):
    build(name, **{option: bad})


@pytest.mark.parametrize('name,option', CASES)
def test_out_of_range_and_non_numbers_are_rejected_by_name(name, option):
  low = {'b1': 1.0, 'b2': 1.5}.get(option, -1.0)  # decays are in [0, 1), the rest >= 0
  with pytest.raises(ValueError, match=f'^{option} must be in'):
    build(name, **{option: low})
  for wrong in ('0.9', None, True):
    with pytest.raises(TypeError, match=f'^{option} must be a real number'):
      build(name, **{option: wrong})


@pytest.mark.parametrize('name', [n for n, (_, _, lr) in FACTORIES.items() if lr])
@pytest.mark.parametrize('learning_rate', [None, '1e-3', b'1e-3', [1e-3], NAN, INF])
def test_learning_rates_are_numbers_arrays_or_schedules(name, learning_rate):
  factory = FACTORIES[name][0]
  error = ValueError if isinstance(learning_rate, float) else TypeError
  with pytest.raises(error, match='^learning_rate must be'):
    factory(learning_rate)
  factory(jnp.asarray(1e-3))
  factory(optax.constant_schedule(1e-3))


@pytest.mark.parametrize('name,option', CASES)
@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_half_precision_arrays_are_rejected_with_the_fix(name, option, dtype):
  """inject_hyperparams casts hyperparameters to the params' dtype: 0.999 is 1.0 in bf16."""
  value = jnp.asarray(0.5, dtype)
  with pytest.raises(TypeError, match=f'^{option} arrived as a {jnp.dtype(dtype).name} array'
                                      '.*hyperparam_dtype=jnp.float32'):
    build(name, **{option: value})
  build(name, **{option: jnp.asarray(0.5, jnp.float32)})


@pytest.mark.parametrize('name', ['lora_rite', 'lora_plus', 'riemannian_adam'])
def test_bf16_params_under_inject_hyperparams_name_the_fix_at_init(name):
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
  factory = FACTORIES[name][0]
  with pytest.raises(TypeError, match='hyperparam_dtype=jnp.float32'):
    optax.inject_hyperparams(factory)(learning_rate=1e-3).init(params)
  tx = optax.inject_hyperparams(factory, hyperparam_dtype=jnp.float32)(learning_rate=1e-3)
  grads = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  if name == 'lora_rite':  # the baselines promote, as optax.adamw does under inject_hyperparams
    assert jax.tree.map(lambda u: u.dtype, updates) == jax.tree.map(lambda p: p.dtype, params)


def test_range_holds_matches_check_number():
  """The traced check and the construction check agree on every kind of value."""
  for allowed in (options.UNIT, options.NON_NEGATIVE, options.THRESHOLD, options.ANY):
    for value in (-INF, -1.0, 0.0, 0.5, 0.999, 1.0, 2.0, INF, NAN):
      try:
        options.check_number('x', value, allowed)
        static = True
      except ValueError:
        static = False
      assert bool(allowed.holds(jnp.asarray(value))) == static, (allowed, value)


def test_traced_ok_ignores_python_numbers_and_checks_arrays():
  assert bool(options.traced_ok({'b1': (NAN, options.UNIT)}))  # checked at construction
  assert not bool(options.traced_ok({'b1': (jnp.asarray(1.0), options.UNIT)}))
  assert bool(options.traced_ok({'b1': (jnp.asarray(0.9), options.UNIT)}))
  count = jnp.asarray(3)
  assert not bool(options.learning_rate_ok(lambda c: jnp.where(c > 2, NAN, 1.0), count))
  assert bool(options.learning_rate_ok(lambda c: jnp.where(c > 5, NAN, 1.0), count))
  assert bool(options.learning_rate_ok(1e-3, count))
  np.testing.assert_array_equal(options.learning_rate_ok(jnp.asarray(INF), count), False)


@pytest.mark.parametrize('make', [lambda: rite_optax.lora_rite(1e-3, unpaired='frozen'),
                                  lambda: rite_optax.factor_labels('nnx', 'frozen')])
def test_unpaired_must_be_a_known_choice(make):
  with pytest.raises(ValueError, match=r"^unpaired must be one of \('adamw', 'zero', 'error'\)"):
    make()
