"""t5x_configs.adapters without T5X: the merge equals the LoRA layer's forward pass, adapter
files round-trip at about the factors' size, and bad inputs are named."""

import json

import jax
import numpy as np
import pytest

from t5x_configs import adapters, lora

RANK, ALPHA = 4, 8.0


def _lora_params(seed=0):
  """A flaxformer-like flat param dict: a 3-D query kernel (embed, heads, kv), a 3-D out
  kernel (heads, kv, embed), a 2-D MLP kernel, a LoRA-free leaf."""
  rng = np.random.default_rng(seed)
  f32 = lambda *s: rng.standard_normal(s).astype(np.float32)
  return {
      'encoder/layers_0/attention/query/kernel': f32(16, 2, 4),
      'encoder/layers_0/attention/query/lora_a': f32(16, RANK),
      'encoder/layers_0/attention/query/lora_b': f32(RANK, 8),
      'encoder/layers_0/attention/out/kernel': f32(2, 4, 16),
      'encoder/layers_0/attention/out/lora_a': f32(8, RANK),
      'encoder/layers_0/attention/out/lora_b': f32(RANK, 16),
      'decoder/layers_0/mlp/wo/kernel': f32(32, 16),
      'decoder/layers_0/mlp/wo/lora_a': f32(32, RANK),
      'decoder/layers_0/mlp/wo/lora_b': f32(RANK, 16),
      'decoder/decoder_norm/scale': f32(16),
  }


def _dense(x, kernel, num_in_axes):
  """flaxformer DenseGeneral: contract x's last num_in_axes axes with the kernel's first."""
  return np.tensordot(x, kernel, axes=num_in_axes)


@pytest.mark.parametrize('module, in_shape, num_in_axes, out_features', [
    ('encoder/layers_0/attention/query', (16,), 1, (2, 4)),
    ('encoder/layers_0/attention/out', (2, 4), 2, (16,)),
    ('decoder/layers_0/mlp/wo', (32,), 1, (16,)),
])
def test_merged_kernel_equals_lora_forward(module, in_shape, num_in_axes, out_features):
  params = _lora_params()
  merged = adapters.merge_factors(params, adapters.extract_factors(params), ALPHA)
  x = np.random.default_rng(1).standard_normal((3, 5, *in_shape)).astype(np.float32)
  kernel, a, b = (params[f'{module}/{n}'] for n in ('kernel', 'lora_a', 'lora_b'))
  # The LoRA layer's output: x W + lora.lora_delta (the function LoraDenseGeneral calls).
  lora_out = _dense(x, kernel, num_in_axes) + np.asarray(
      lora.lora_delta(jax.numpy.asarray(x), a, b, num_in_axes, out_features, ALPHA / RANK))
  merged_out = _dense(x, merged[f'{module}/kernel'], num_in_axes)
  np.testing.assert_allclose(merged_out, lora_out, rtol=2e-5, atol=2e-5)
  # The adapter's contribution is large enough that a wrong scale cannot pass.
  assert np.abs(lora_out - _dense(x, kernel, num_in_axes)).max() > 1.0


def test_merge_drops_factors_and_keeps_other_leaves_and_dtypes():
  params = _lora_params()
  params['decoder/layers_0/mlp/wo/kernel'] = params['decoder/layers_0/mlp/wo/kernel'].astype(
      jax.numpy.bfloat16)
  merged = adapters.merge_factors(params, adapters.extract_factors(params), ALPHA)
  assert sorted(merged) == sorted(k for k in params if 'lora_' not in k)
  np.testing.assert_array_equal(merged['decoder/decoder_norm/scale'],
                                params['decoder/decoder_norm/scale'])
  assert merged['decoder/layers_0/mlp/wo/kernel'].dtype == jax.numpy.bfloat16
  assert merged['encoder/layers_0/attention/query/kernel'].dtype == np.float32


def test_zero_lora_b_merges_to_the_base():
  params = _lora_params()
  for k in params:
    if k.endswith('lora_b'):
      params[k] = np.zeros_like(params[k])
  merged = adapters.merge_factors(params, adapters.extract_factors(params), ALPHA)
  for k, v in merged.items():
    np.testing.assert_array_equal(v, params[k])


def test_apply_puts_factors_back_on_a_lora_free_base():
  params = _lora_params()
  base = {k: v for k, v in params.items() if 'lora_' not in k}
  out = adapters.apply_factors(base, adapters.extract_factors(params))
  assert sorted(out) == sorted(params)
  for k, v in out.items():
    np.testing.assert_array_equal(v, params[k])


def test_adapter_file_round_trip_and_size(tmp_path):
  factors = adapters.extract_factors(_lora_params())
  path = str(tmp_path / 'a.npz')
  meta = adapters.save_adapters(path, factors, alpha=ALPHA, targets=lora.ALL_PROJECTIONS,
                                base_checkpoint='/ckpt/checkpoint_20', step=60)
  assert meta['rank'] == RANK and meta['scale'] == ALPHA / RANK
  got, got_meta = adapters.load_adapters(path)
  assert got_meta == json.loads(json.dumps(meta))
  assert got_meta['targets'] == list(lora.ALL_PROJECTIONS)
  assert sorted(got) == sorted(factors)
  for k, v in factors.items():
    np.testing.assert_array_equal(got[k], v)
  size, data = (tmp_path / 'a.npz').stat().st_size, adapters.factor_bytes(factors)
  # Uncompressed: the data plus ~300 bytes of zip + npy headers per array, and the JSON.
  assert data < size < data + 400 * (len(factors) + 1) + len(json.dumps(meta))


@pytest.mark.parametrize('mutate, match', [
    (lambda p: p.pop('encoder/layers_0/attention/query/lora_b'), 'has no lora_b'),
    (lambda p: p.pop('encoder/layers_0/attention/out/kernel'), 'no kernel'),
    (lambda p: p.update({'decoder/layers_0/mlp/wo/lora_a': np.ones((32, 2), np.float32),
                         'decoder/layers_0/mlp/wo/lora_b': np.ones((2, 16), np.float32)}),
     'several ranks'),
    (lambda p: p.update({'decoder/layers_0/mlp/wo/kernel': np.ones((16, 32), np.float32)}),
     'does not split'),
])
def test_bad_factors_are_named(mutate, match):
  params = _lora_params()
  mutate(params)
  with pytest.raises(ValueError, match=match):
    adapters.merge_factors(params, {k: v for k, v in params.items() if 'lora_' in k}, ALPHA)


def test_no_factors_and_bad_files(tmp_path):
  with pytest.raises(ValueError, match='no lora_a/lora_b'):
    adapters.extract_factors({'a/kernel': np.ones(2)})
  np.savez(tmp_path / 'x.npz', a=np.ones(2))
  with pytest.raises(ValueError, match='not a rite_optax adapter file'):
    adapters.load_adapters(str(tmp_path / 'x.npz'))
  with pytest.raises(ValueError, match='.npz'):
    adapters.save_adapters(str(tmp_path / 'a.bin'), adapters.extract_factors(_lora_params()),
                           alpha=1.0)


def test_run_config_from_t5x_config_gin(tmp_path):
  (tmp_path / 'config.gin').write_text(
      "from __gin__ import dynamic_registration\n"
      "INITIAL_CHECKPOINT_PATH = '/base/checkpoint_20'\n"
      "LORA_ALPHA = 8.0\n"
      "LORA_TARGETS = \\\n    ['.*attention/(query|key|value|out)', '.*mlp/(wi(_[0-9]+)?|wo)']\n"
      "LORA_RANK = 4\n")
  got = adapters.read_run_config(str(tmp_path / 'checkpoint_60'))
  assert got == {'INITIAL_CHECKPOINT_PATH': '/base/checkpoint_20', 'LORA_ALPHA': 8.0,
                 'LORA_TARGETS': list(lora.ALL_PROJECTIONS)}
  assert adapters.checkpoint_step('/m/checkpoint_60/') == 60
  with pytest.raises(ValueError, match='checkpoint_<step>'):
    adapters.checkpoint_step('/m/final')
