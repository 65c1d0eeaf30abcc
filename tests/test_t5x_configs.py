"""t5x_configs without T5X: LoRA math, axis names, partition rule, freezing, data files,
and the mT5-XXL LoRA param tree and LoRA-RITE state built abstractly."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import rite_optax
from rite_optax import pairing as pairing_lib
from t5x_configs import labels, lora, metrics, partition_rules, tasks

RESHAPED = {'heads * kv': 'joined_kv'}


def test_lora_delta_matches_dense_formula():
  k = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k[0], (2, 5, 3, 4))  # contract the last two axes (heads, kv)
  a = jax.random.normal(k[1], (12, 2))
  b = jax.random.normal(k[2], (2, 6))
  out = lora.lora_delta(x, a, b, num_in_axes=2, out_features=(6,), scale=0.5)
  expected = 0.5 * x.reshape(2, 5, 12) @ a @ b
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  multi_out = lora.lora_delta(x, a, jnp.tile(b, (1, 2)), 2, (3, 4), 1.0)
  assert multi_out.shape == (2, 5, 3, 4)


def test_factor_axis_names_follow_flaxformer_kernels():
  assert lora.factor_axis_names(['embed', 'heads', 'kv'], 1, RESHAPED, 'q') == (
      ('embed', 'lora_rank'), ('lora_rank', 'joined_kv'))
  assert lora.factor_axis_names(['heads', 'kv', 'embed'], 2, RESHAPED, 'out') == (
      ('joined_kv', 'lora_rank'), ('lora_rank', 'embed'))
  assert lora.factor_axis_names(None, 1, RESHAPED, 'x') == (
      ('unmodeled', 'lora_rank'), ('lora_rank', 'unmodeled'))
  with pytest.raises(ValueError, match='mlp_activations'):
    lora.factor_axis_names(['embed', 'mlp_activations', 'mlp'], 1, RESHAPED, 'wi')


@pytest.mark.parametrize('path, hit', [
    ('encoder/layers_0/attention/query', True),
    ('decoder/layers_3/self_attention/out', True),
    ('decoder/layers_3/encoder_decoder_attention/value', True),
    ('encoder/layers_0/mlp/wi_1', True),
    ('decoder/layers_0/mlp/wo', True),
    ('decoder/logits_dense', False),
])
def test_default_targets(path, hit):
  assert lora.is_target(path, lora.compile_targets(lora.ALL_PROJECTIONS)) is hit


@pytest.mark.parametrize('call, match', [
    (lambda: lora.check_rank_and_alpha(-1, 1.0), 'rank'),
    (lambda: lora.check_rank_and_alpha(4, 0.0), 'alpha'),
    (lambda: lora.check_dropout(1.0), 'dropout_rate'),
    (lambda: lora.check_init('ones'), 'a_init'),
    (lambda: lora.compile_targets('.*query'), 'targets'),
    (lambda: lora.compile_targets(['(']), 'targets'),
])
def test_bad_lora_options_name_the_option(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_a_initializer_scale():
  a = lora.a_initializer('kaiming_uniform')(jax.random.key(0), (4096, 16))
  assert float(jnp.abs(a).max()) <= 1 / math.sqrt(4096) + 1e-7
  assert float(jnp.abs(lora.a_initializer('zeros')(jax.random.key(0), (3, 2))).max()) == 0


def _toy_params():
  return {'q': {'kernel': jnp.ones((8, 4)), 'lora_a': jnp.ones((8, 2)) * 0.1,
                'lora_b': jnp.ones((2, 4)) * 0.1},
          'norm': {'scale': jnp.ones((8,))}}


def test_freeze_base_zeroes_base_updates_only():
  params = _toy_params()
  tx = labels.freeze_base(rite_optax.lora_rite(1e-2, unpaired='error'))
  state = tx.init(params)
  # Small gradients: the default update skipping zeroes an unmagnified RMS > 1.
  grads = jax.tree.map(lambda x: 1e-2 * jnp.ones_like(x), params)
  updates, _ = tx.update(grads, state, params)
  assert not jnp.any(updates['q']['kernel']) and not jnp.any(updates['norm']['scale'])
  assert jnp.all(updates['q']['lora_a'] != 0) and jnp.all(updates['q']['lora_b'] != 0)


def test_trainable_labels_errors():
  with pytest.raises(ValueError, match='trainable'):
    labels.trainable_labels('lora_a')
  with pytest.raises(ValueError, match='matches no param'):
    labels.trainable_labels(['nothing'])(_toy_params())


def _rite_states(state):
  found = []
  jax.tree.map(lambda s: found.append(s) if isinstance(s, rite_optax.ScaleByLoraRiteState) else None,
               state, is_leaf=lambda s: isinstance(s, rite_optax.ScaleByLoraRiteState))
  return found


def test_partition_rule_on_freeze_base_state():
  params = _toy_params()
  axes = {'q': {'kernel': P('embed', 'joined_kv'), 'lora_a': P('embed', 'lora_rank'),
                'lora_b': P('lora_rank', 'joined_kv')}, 'norm': {'scale': P('embed')}}
  state = labels.freeze_base(rite_optax.lora_rite(1e-2)).init(params)
  (rite_state,) = _rite_states(state)
  got = partition_rules.lora_rite_state_axes(rite_state, axes)
  assert got.count is None and got.skipped is None
  for field in ('first_moment', 'basis'):
    tree = getattr(got, field)
    assert tree['q']['lora_a'] == axes['q']['lora_a'] and tree['q']['lora_b'] == axes['q']['lora_b']
    assert isinstance(tree['q']['kernel'], optax.MaskedNode)
    assert isinstance(tree['norm']['scale'], optax.MaskedNode)
  # Unscanned: the r×r second moment is replicated, the scalar escaped mass None.
  assert got.second_moment['q']['lora_a'] == P(None, None)
  assert got.escaped_mass['q']['lora_b'] is None
  # Same structure as the state (None is an empty subtree, exactly as T5X expects).
  assert (jax.tree.structure(got.first_moment, is_leaf=lambda x: isinstance(x, P))
          == jax.tree.structure(rite_state.first_moment))


SCANNED_NNX = rite_optax.nnx(batch_axes=(1,))  # T5X scan_layers, param_scan_axis=1


def _scanned_params_and_axes(layers=3, rank=2):
  """A flaxformer scanned layer stack: the layer axis at 1 of every kernel and factor."""
  sds = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  params = {'encoder': {'layers': {'attention': {'query': {
      'kernel': sds(8, layers, 16), 'lora_a': sds(8, layers, rank), 'lora_b': sds(rank, layers, 16)}}},
      'encoder_norm': {'scale': sds(8)}}}
  axes = {'encoder': {'layers': {'attention': {'query': {
      'kernel': P('embed', 'layers', 'joined_kv'), 'lora_a': P('embed', 'layers', 'lora_rank'),
      'lora_b': P('lora_rank', 'layers', 'joined_kv')}}}, 'encoder_norm': {'scale': P('embed')}}}
  return params, axes


def _normalised(tree):
  """Spec leaves as entry tuples without trailing ``None`` s: ``None`` (T5X's replicated),
  ``P()`` and ``P(None, None)`` all become ``()``."""
  def entries(spec):
    spec = () if spec is None else tuple(spec)
    while spec and spec[-1] is None:
      spec = spec[:-1]
    return spec
  return jax.tree.map(entries, tree, is_leaf=lambda x: x is None or isinstance(x, P))


def test_t5x_rule_and_state_partition_specs_agree_on_a_scanned_stack(monkeypatch):
  monkeypatch.setattr(partition_rules, 'register', lambda pairing: None)  # T5X's table stays
  params, axes = _scanned_params_and_axes()
  tx = labels.freeze_base(rite_optax.lora_rite(1e-2, pairing=SCANNED_NNX))
  (rite_state,) = _rite_states(jax.eval_shape(tx.init, params))
  t5x_rule = partition_rules.lora_rite_state_axes(rite_state, axes, SCANNED_NNX)
  (ours,) = _rite_states(rite_optax.state_partition_specs(tx, params, axes))
  assert _normalised(t5x_rule) == _normalised(ours)
  # Each layer's r×r state lives with its layer.
  query = lambda tree: tree['encoder']['layers']['attention']['query']
  assert query(t5x_rule.second_moment)['lora_b'] == P('layers', None, None)
  assert query(t5x_rule.escaped_mass)['lora_a'] == P('layers')
  assert query(t5x_rule.basis)['lora_b'] == axes['encoder']['layers']['attention']['query']['lora_b']


def test_freeze_base_carries_the_pairing_and_registers_the_rule_with_it(monkeypatch):
  registered = []
  monkeypatch.setattr(partition_rules, 'register', registered.append)
  tx = labels.freeze_base(rite_optax.lora_rite(1e-2, pairing=SCANNED_NNX))
  assert pairing_lib.carried_pairing(tx) == SCANNED_NNX and registered == [SCANNED_NNX]
  adam = labels.freeze_base(optax.adamw(1e-3))
  assert pairing_lib.carried_pairing(adam) is None and registered == [SCANNED_NNX]


def test_register_with_and_without_t5x():
  try:
    import t5x  # noqa: F401
  except ImportError:
    assert partition_rules.register() is False
    return
  from t5x import optimizers
  rules = optimizers.OptaxStatePartitionRules._RULES  # pylint: disable=protected-access
  try:
    assert partition_rules.register(SCANNED_NNX) is True
    rule = rules[rite_optax.ScaleByLoraRiteState]
    assert rule.func is partition_rules.lora_rite_state_axes
    assert rule.keywords == {'pairing': SCANNED_NNX}
  finally:
    partition_rules.register()
  assert rules[rite_optax.ScaleByLoraRiteState].keywords == {'pairing': rite_optax.nnx()}


def test_read_jsonl_and_tsv(tmp_path):
  j = tmp_path / 'd.jsonl'
  j.write_text(json.dumps({'inputs': 'a\tb', 'targets': 'c', 'id': 1}) + '\n\n'
               + json.dumps({'inputs': 'd', 'targets': 'é'}) + '\n', encoding='utf-8')
  assert list(tasks.read_examples(str(j))) == [
      {'inputs': 'a\tb', 'targets': 'c'}, {'inputs': 'd', 'targets': 'é'}]
  t = tmp_path / 'd.tsv'
  t.write_text('x "y\tz\n\nu\tv\n', encoding='utf-8')
  assert list(tasks.read_examples(str(t))) == [
      {'inputs': 'x "y', 'targets': 'z'}, {'inputs': 'u', 'targets': 'v'}]
  src = tmp_path / 'q.jsonl'
  src.write_text(json.dumps({'question': 'q', 'answer': 'a'}) + '\n')
  assert list(tasks.read_examples(str(src), inputs_key='question', targets_key='answer')) == [
      {'inputs': 'q', 'targets': 'a'}]


@pytest.mark.parametrize('name, text, kwargs, match', [
    ('bad.jsonl', '{"inputs": "a"}\n', {}, r'bad.jsonl:1: no field .targets. \(targets_key\)'),
    ('bad.jsonl', 'oops\n', {}, r'bad.jsonl:1: not valid JSON'),
    ('bad.jsonl', '{"inputs": 1, "targets": "b"}\n', {}, r'inputs_key'),
    ('bad.tsv', 'a\tb\tc\n', {}, r'bad.tsv:1: expected 2 tab-separated columns'),
    ('bad.txt', 'a\tb\n', {}, r'file_format'),
    ('bad.tsv', 'a\tb\n', {'file_format': 'csv'}, r'file_format'),
])
def test_bad_data_files_name_file_line_and_option(tmp_path, name, text, kwargs, match):
  path = tmp_path / name
  path.write_text(text)
  with pytest.raises(ValueError, match=match):
    list(tasks.read_examples(str(path), **kwargs))


def test_split_files_checked(tmp_path):
  (tmp_path / 't.jsonl').write_text('')
  for bad in ({}, 'train.jsonl', ['train.jsonl']):
    with pytest.raises(ValueError, match='split_files must map split names'):
      tasks.check_split_files(bad)
  # Eval and infer read one split; no 'train' needed.
  assert tasks.check_split_files({'validation': str(tmp_path / 't.jsonl')}) == {
      'validation': [str(tmp_path / 't.jsonl')]}
  with pytest.raises(ValueError, match=r"split_files\['validation'\]: no such file"):
    tasks.check_split_files({'train': str(tmp_path / 't.jsonl'), 'validation': ['/nope.jsonl']})
  assert tasks.check_split_files({'train': str(tmp_path / 't.jsonl')}) == {
      'train': [str(tmp_path / 't.jsonl')]}


def test_synthetic_examples_are_deterministic_reversals():
  ex = tasks.synthetic_examples(20, seed=3)
  assert ex == tasks.synthetic_examples(20, seed=3)
  assert all(e['targets'] == e['inputs'].removeprefix('reverse: ')[::-1] for e in ex)


def test_seqio_registration(tmp_path):
  seqio = pytest.importorskip('seqio')
  (tmp_path / 'tr.tsv').write_text('abc\tcba\n')
  name = tasks.register_text_task('t5x_configs_test', {'train': str(tmp_path / 'tr.tsv')})
  assert tasks.register_text_task('t5x_configs_test', {'train': str(tmp_path / 'tr.tsv')}) == name
  ds = seqio.get_mixture_or_task(name).get_dataset(None, split='train', shuffle=False)
  (ex,) = list(ds.as_numpy_iterator())
  assert bytes(ex['targets_pretokenized']) == b'cba'
  # What T5X's evaluator calls: the postprocessor on targets and outputs, then the metrics.
  task = seqio.get_mixture_or_task(name)
  assert task.predict_metric_fns == [metrics.exact_match, metrics.rouge_l]
  assert task.postprocess_fn(ex['targets_pretokenized'], example=ex, is_target=True) == 'cba'
  custom = tasks.register_text_task(name, {'train': str(tmp_path / 'tr.tsv')},
                                    metric_fns=[metrics.rouge_l])
  assert seqio.get_mixture_or_task(custom).predict_metric_fns == [metrics.rouge_l]


@pytest.mark.parametrize('metric_fns', ['exact_match', [metrics.exact_match, 'rouge_l'], 3])
def test_bad_metric_fns_are_named(tmp_path, metric_fns):
  (tmp_path / 'tr.tsv').write_text('abc\tcba\n')
  with pytest.raises(ValueError, match='metric_fns'):
    tasks.register_text_task('t5x_configs_bad', {'train': str(tmp_path / 'tr.tsv')},
                             metric_fns=metric_fns)
  with pytest.raises(ValueError, match='metric_fns'):
    tasks.register_synthetic_task(metric_fns=metric_fns)


# mT5-XXL (flaxformer mt5_xxl.gin): 24+24 layers, embed 4096, 64 heads × 64, mlp 10240,
# gated GeLU (wi_0, wi_1). Kernel axis names as flaxformer gives them.
XXL = dict(layers=24, embed=4096, joined_kv=64 * 64, mlp=10240)
XXL_KERNELS = {
    'query': (['embed', 'heads', 'kv'], 1), 'key': (['embed', 'heads', 'kv'], 1),
    'value': (['embed', 'heads', 'kv'], 1), 'out': (['heads', 'kv', 'embed'], 2),
    'wi_0': (['embed', 'mlp'], 1), 'wi_1': (['embed', 'mlp'], 1), 'wo': (['mlp', 'embed'], 1),
}
SIZES = {'embed': XXL['embed'], 'joined_kv': XXL['joined_kv'], 'mlp': XXL['mlp'], 'lora_rank': None}
# T5X standard_logical_axis_rules (1-D activation partitioning) for these names.
MESH_AXIS = {'embed': None, 'joined_kv': 'model', 'mlp': 'model', 'lora_rank': None}


def _xxl_lora_tree(rank):
  """Abstract params and logical axes of mT5-XXL's LoRA-adapted projections."""
  params, axes = {}, {}
  blocks = {'encoder': {'attention': ['query', 'key', 'value', 'out'], 'mlp': ['wi_0', 'wi_1', 'wo']},
            'decoder': {'self_attention': ['query', 'key', 'value', 'out'],
                        'encoder_decoder_attention': ['query', 'key', 'value', 'out'],
                        'mlp': ['wi_0', 'wi_1', 'wo']}}
  for stack, modules in blocks.items():
    for i in range(XXL['layers']):
      for module, projections in modules.items():
        for proj in projections:
          names, n_in = XXL_KERNELS[proj]
          path = f'{stack}/layers_{i}/{module}/{proj}'
          assert lora.is_target(path, lora.compile_targets(lora.ALL_PROJECTIONS))
          a_axes, b_axes = lora.factor_axis_names(names, n_in, RESHAPED, path)
          kernel_axes = (a_axes[0], b_axes[1])
          shape = lambda ax: tuple(rank if n == 'lora_rank' else SIZES[n] for n in ax)
          params[path] = {
              'kernel': jax.ShapeDtypeStruct(shape(kernel_axes), jnp.float32),
              'lora_a': jax.ShapeDtypeStruct(shape(a_axes), jnp.float32),
              'lora_b': jax.ShapeDtypeStruct(shape(b_axes), jnp.float32)}
          axes[path] = {'kernel': P(*kernel_axes), 'lora_a': P(*a_axes), 'lora_b': P(*b_axes)}
  return params, axes


def _bytes_per_device(sds, spec, model_parallel):
  split = math.prod(model_parallel for n in spec or () if n and MESH_AXIS[n] == 'model')
  return sds.size * sds.dtype.itemsize // split


def test_mt5_xxl_lora_rite_state_sizes_and_axes():
  rank, mp = 16, 64
  params, axes = _xxl_lora_tree(rank)
  state = jax.eval_shape(labels.freeze_base(rite_optax.lora_rite(1e-4)).init, params)
  (rite_state,) = _rite_states(state)
  state_axes = partition_rules.lora_rite_state_axes(rite_state, axes)

  factor_paths = [(p, f) for p in params for f in ('lora_a', 'lora_b')]
  assert len(params) == 24 * 7 + 24 * 11 == 432  # adapters
  assert len(factor_paths) == 864  # factors
  n_lora = sum(params[p][f].size for p, f in factor_paths)
  per_layer = 4 * 2 * 4096 * rank + 3 * (4096 + 10240) * rank
  assert n_lora == 24 * per_layer + 24 * (per_layer + 4 * 2 * 4096 * rank) == 70_778_880

  for p, f in factor_paths:
    assert rite_state.first_moment[p][f].shape == params[p][f].shape
    assert rite_state.second_moment[p][f].shape == (rank, rank)
    assert state_axes.first_moment[p][f] == axes[p][f] == state_axes.basis[p][f]
    assert state_axes.second_moment[p][f] == P(None, None)
  assert isinstance(rite_state.first_moment[p]['kernel'], optax.MaskedNode)

  total = per_device = 0
  for field in ('first_moment', 'basis', 'second_moment', 'escaped_mass'):
    for p, f in factor_paths:
      sds, spec = getattr(rite_state, field)[p][f], getattr(state_axes, field)[p][f]
      total += sds.size * 4
      per_device += _bytes_per_device(sds, spec, mp)
  assert total == 2 * 4 * n_lora + 864 * (rank * rank + 1) * 4
  # lora_a of q/k/v/wi and lora_b of out/wo keep 'embed' (replicated under 1-D
  # partitioning); their partners are split 64 ways.
  replicated_elems = 24 * (3 + 2) * 4096 * rank + 24 * (3 + 3 + 2) * 4096 * rank  # q,k,v,wi_0,wi_1 a
  replicated_elems += 24 * 2 * 4096 * rank + 24 * 3 * 4096 * rank  # out, wo b (enc; dec 2 outs + wo)
  split_elems = n_lora - replicated_elems
  expected = 2 * 4 * (replicated_elems + split_elems // mp) + 864 * (rank * rank + 1) * 4
  assert per_device == expected
  assert per_device < 0.55 * total
