"""``LoraDenseGeneral`` against flaxformer's ``DenseGeneral`` (skipped without flaxformer)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip('flaxformer')

from flax import linen as nn  # noqa: E402
from flaxformer.components import dense  # noqa: E402

from t5x_configs import lora_dense  # noqa: E402

pytestmark = pytest.mark.t5x


class _Attention(nn.Module):
  """Stands in for flaxformer's attention: names the projection like it does."""

  layer: type
  kwargs: dict

  @nn.compact
  def __call__(self, x):
    q = self.layer(features=(4, 8), axis=-1, use_bias=False, name='query',
                   kernel_axis_names=['embed', 'heads', 'kv'], **self.kwargs)(x)
    return self.layer(features=16, axis=(-2, -1), use_bias=False, name='out',
                      kernel_axis_names=['heads', 'kv', 'embed'], **self.kwargs)(q)


class _Layer(nn.Module):
  layer: type
  kwargs: dict

  @nn.compact
  def __call__(self, x):
    return _Attention(self.layer, self.kwargs, name='attention')(x)


def _init(layer, **kwargs):
  x = jax.random.normal(jax.random.key(0), (2, 3, 16))
  module = _Layer(layer, kwargs)
  variables = module.init(jax.random.key(1), x)
  return module, variables, x


def test_kernel_unchanged_factors_added_and_zero_at_init():
  base, base_vars, x = _init(dense.DenseGeneral)
  lora_mod, lora_vars, _ = _init(lora_dense.LoraDenseGeneral, rank=2, alpha=4.0,
                                 targets=['.*attention/(query|out)'])
  q = lora_vars['params']['attention']['query']
  assert q['kernel'].shape == base_vars['params']['attention']['query']['kernel'].shape
  assert q['lora_a'].shape == (16, 2) and q['lora_b'].shape == (2, 32)
  axes = lora_vars['params_axes']['attention']['query']
  assert axes['kernel_axes'].names == ('embed', 'joined_kv')
  assert axes['lora_a_axes'].names == ('embed', 'lora_rank')
  assert axes['lora_b_axes'].names == ('lora_rank', 'joined_kv')
  assert lora_vars['params_axes']['attention']['out']['lora_a_axes'].names == ('joined_kv', 'lora_rank')
  # Same base weights, lora_b = 0: identical outputs (a LoRA-free checkpoint loads as is).
  merged = jax.tree.map(lambda x: x, lora_vars)
  for name in ('query', 'out'):
    merged['params']['attention'][name]['kernel'] = base_vars['params']['attention'][name]['kernel']
  np.testing.assert_allclose(lora_mod.apply(merged, x), base.apply(base_vars, x), rtol=1e-6)


def test_delta_is_scaled_low_rank_product_and_targets_select():
  module, variables, x = _init(lora_dense.LoraDenseGeneral, rank=2, alpha=4.0,
                               targets=['.*attention/query'])
  assert 'lora_a' not in variables['params']['attention']['out']
  q = variables['params']['attention']['query']
  q['lora_b'] = jnp.ones_like(q['lora_b'])
  sub = lora_dense.LoraDenseGeneral(features=(4, 8), axis=-1, use_bias=False, rank=2, alpha=4.0,
                                    kernel_axis_names=['embed', 'heads', 'kv'],
                                    targets=['.*'])
  y = sub.apply({'params': q}, x)
  expected = (x @ q['kernel'] + 2.0 * x @ q['lora_a'] @ q['lora_b']).reshape(2, 3, 4, 8)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_bad_rank_names_the_option():
  with pytest.raises(ValueError, match='rank'):
    _init(lora_dense.LoraDenseGeneral, rank=-1)
