"""Every gin file parses without T5X/flaxformer (only their selectors skipped), every
rite_optax/optax binding resolves, and the optimizer built from gin equals Python's."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rite_optax
from t5x_configs import labels, lora

gin = pytest.importorskip('gin')

GIN_DIR = pathlib.Path(__file__).resolve().parents[1] / 'gin'
GIN_FILES = sorted(p.name for p in GIN_DIR.glob('*.gin'))
# Selectors of T5X, flaxformer and seqio (and our subclasses of theirs) only.
T5X_AND_FLAXFORMER = [
    'optimizers.OptaxWrapper', 'adafactor.Adafactor', 'models.EncoderDecoderModel',
    'partitioning.PjitPartitioner', 'partitioning.standard_logical_axis_rules',
    'utils.RestoreCheckpointConfig', 'utils.DatasetConfig',
    'dense_attention.MultiHeadDotProductAttention',
    'dense.MlpBlock', 'lora_dense.LoraDenseGeneral', 'seqio.ByteVocabulary',
    'trainer.Trainer', 'diagnostics.LoraRiteMetrics',
]


@pytest.fixture
def parse():
  gin.clear_config(clear_constants=True)
  gin.add_config_file_search_path(str(GIN_DIR))

  def _parse(name):
    # No finalize: its hook rejects the (skipped) T5X references left in macros.
    gin.parse_config_files_and_bindings([str(GIN_DIR / name)], [],
                                        skip_unknown=T5X_AND_FLAXFORMER, finalize_config=False)
  yield _parse
  gin.clear_config(clear_constants=True)


def test_no_init_py_in_gin_folder():
  assert not (GIN_DIR / '__init__.py').exists()


@pytest.mark.parametrize('name', GIN_FILES)
def test_parses_with_only_t5x_selectors_skipped(parse, name):
  parse(name)
  config = gin.config_str()
  for selector in ('rite_optax.lora_rite', 'optax.adamw', 'labels.freeze_base',
                   'optax.warmup_cosine_decay_schedule', 'tasks.register_text_task',
                   'tasks.register_synthetic_task'):
    # Only our own configurables remain bound; every one resolved to a real function.
    if selector in open(GIN_DIR / name).read() or _included_binds(name, selector):
      assert gin.config._REGISTRY.get_match(selector) is not None, selector  # pylint: disable=protected-access
  assert 'gin.REQUIRED' not in config or name.startswith('mt5_xxl')


def _included_binds(name, selector):
  text = (GIN_DIR / name).read_text()
  return any(selector in (GIN_DIR / inc).read_text()
             for inc in GIN_FILES if f"include '{inc}'" in text)


def _toy_params():
  return {'encoder': {'layers_0': {'attention': {'query': {
      'kernel': jnp.ones((8, 4)), 'lora_a': jnp.full((8, 2), 0.1), 'lora_b': jnp.zeros((2, 4))}}}},
          'decoder': {'layer_norm': {'scale': jnp.ones((8,))}}}


def _run(tx, steps=2):
  params = _toy_params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  for i in range(steps):
    grads = jax.tree.map(lambda x, s=1e-2 * (i + 1): s * jnp.ones_like(x), params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _macro(name):
  return gin.query_parameter(f'%{name}').scoped_configurable_fn()


@pytest.mark.parametrize('name', ['mt5_xxl_lora_rite_finetune.gin', 'tiny_lora_rite_cpu.gin'])
def test_lora_rite_optimizer_from_gin_equals_python(parse, name):
  parse(name)
  macro = lambda m: gin.query_parameter(f'%{m}')
  python_tx = labels.freeze_base(rite_optax.lora_rite(
      optax.warmup_cosine_decay_schedule(
          0.0, macro('LEARNING_RATE'), macro('WARMUP_STEPS'), macro('DECAY_STEPS'), 0.0),
      b1=0.9, b2=0.999, eps=1e-6, clip_unmagnified_grad=1.0, update_skipping=1.0,
      unpaired='adamw'))
  gin_tx = _macro('OPTAX_TX')
  (p_gin, s_gin), (p_py, s_py) = _run(gin_tx), _run(python_tx)
  jax.tree.map(np.testing.assert_array_equal, (p_gin, s_gin), (p_py, s_py))
  assert jnp.any(p_gin['encoder']['layers_0']['attention']['query']['lora_b'] != 0)
  np.testing.assert_array_equal(p_gin['encoder']['layers_0']['attention']['query']['kernel'], 1.0)


def test_adam_twin_from_gin_equals_python(parse):
  parse('mt5_xxl_lora_adam_finetune.gin')
  python_tx = labels.freeze_base(optax.adamw(
      optax.warmup_cosine_decay_schedule(0.0, 2e-4, 100, 5000, 0.0), eps=1e-8, weight_decay=0.0))
  (p_gin, s_gin), (p_py, s_py) = _run(_macro('OPTAX_TX')), _run(python_tx)
  jax.tree.map(np.testing.assert_array_equal, (p_gin, s_gin), (p_py, s_py))


def test_xxl_config_values(parse):
  parse('mt5_xxl_lora_rite_finetune.gin')
  rank, alpha = gin.query_parameter('%LORA_RANK'), gin.query_parameter('%LORA_ALPHA')
  lora.check_rank_and_alpha(rank, alpha)
  lora.check_dropout(gin.query_parameter('%LORA_DROPOUT'))
  lora.check_init(gin.query_parameter('%LORA_A_INIT'))
  targets = lora.compile_targets(gin.query_parameter('%LORA_TARGETS'))
  assert lora.is_target('decoder/layers_23/encoder_decoder_attention/out', targets)
  assert gin.query_parameter('%BATCH_SIZE') == 128
  assert gin.query_parameter('%TRAIN_STEPS') == 1_005_000
  assert gin.query_parameter('%INITIAL_CHECKPOINT_PATH').endswith('mt5_xxl/checkpoint_1000000')
  for dim in (64, 64 * 64, 10240):  # heads, joined_kv, mlp split by the model axis
    assert dim % 16 == 0


def test_gin_dir_is_the_checkout_gin_folder():
  import t5x_configs

  assert pathlib.Path(t5x_configs.gin_dir()) == GIN_DIR


class _Ref(str):
  """An @reference or %macro, kept as text."""


class _KeepReferences(gin.config_parser.ParserDelegate):

  def configurable_reference(self, scoped_name, evaluate):
    return _Ref(f'@{scoped_name}()' if evaluate else f'@{scoped_name}')

  def macro(self, macro_name):
    return _Ref(f'%{macro_name}')


def _statements(name):
  """``{selector or selector.arg: value}`` of a gin file and its includes in gin/, later wins."""
  out = {}
  with open(GIN_DIR / name) as f:
    for st in gin.config_parser.ConfigParser(f, _KeepReferences()):
      if isinstance(st, gin.config_parser.IncludeStatement):
        out.update(_statements(st.filename))
      elif isinstance(st, gin.config_parser.BindingStatement):
        selector = f'{st.scope}/{st.selector}' if st.scope else st.selector
        out[f'{selector}.{st.arg_name}' if st.arg_name else selector] = st.value
  return out


LORA_FACTORY = 'dense.MlpBlock.dense_general_factory'
RESTORE_MAP = 'utils.RestoreCheckpointConfig.assignment_map'
EVAL_INFER = {  # file: whether it builds the LoRA model
    'tiny_eval_cpu.gin': False, 'tiny_lora_eval_cpu.gin': True,
    'tiny_infer_cpu.gin': False, 'tiny_lora_infer_cpu.gin': True,
    'mt5_xxl_eval.gin': False, 'mt5_xxl_lora_eval.gin': True,
    'mt5_xxl_infer.gin': False, 'mt5_xxl_lora_infer.gin': True,
}


@pytest.mark.parametrize('name, with_lora', sorted(EVAL_INFER.items()))
def test_eval_and_infer_restore_checkpoints_as_saved(name, with_lora):
  # The training restore map drops factors and optimizer state and needs fallback_to_scratch
  # (an init_rng that t5x.infer does not have): eval/infer must not inherit it.
  st = _statements(name)
  assert RESTORE_MAP not in st and 'utils.RestoreCheckpointConfig.fallback_to_scratch' not in st
  assert st['utils.DatasetConfig.split'] == 'validation'
  assert (st.get(LORA_FACTORY) == '@lora_dense.LoraDenseGeneral') is with_lora
  if name.startswith('tiny'):
    assert st['OPTIMIZER'] is None  # an InferenceState: no optimizer to build
    assert st['MIXTURE_OR_TASK_NAME'] == '@tasks.register_synthetic_task()'
  else:
    files = st['tasks.register_text_task.split_files']
    assert list(files) == ['validation'] and files['validation'] in ('%EVAL_FILES', '%INFER_FILES')
    assert st['partitioning.PjitPartitioner.num_partitions'] == 16


@pytest.mark.parametrize('finetune, evaluate', [
    ('tiny_lora_rite_cpu.gin', 'tiny_lora_eval_cpu.gin'),
    ('tiny_lora_adam_cpu.gin', 'tiny_lora_infer_cpu.gin'),
    ('mt5_xxl_lora_rite_finetune.gin', 'mt5_xxl_lora_eval.gin'),
    ('mt5_xxl_lora_adam_finetune.gin', 'mt5_xxl_lora_infer.gin'),
])
def test_eval_infer_build_the_fine_tuned_lora_model(finetune, evaluate):
  train, ev = _statements(finetune), _statements(evaluate)
  assert train[RESTORE_MAP] == (('.*/lora_[ab]', None), ('state/param_states.*', None))
  for macro in ('LORA_RANK', 'LORA_ALPHA', 'LORA_TARGETS', 'LORA_A_INIT'):
    assert ev[macro] == train[macro], macro


def test_tiny_adam_twin_differs_from_lora_rite_only_in_the_optimizer():
  rite, adam = _statements('tiny_lora_rite_cpu.gin'), _statements('tiny_lora_adam_cpu.gin')
  assert rite['labels.freeze_base.tx'] == '@rite_optax.lora_rite()'
  assert adam['labels.freeze_base.tx'] == '@optax.adamw()'
  optimizer_only = lambda k: k.startswith(('rite_optax.', 'optax.adamw', 'labels.freeze_base.tx',
                                            'trainer.Trainer.weight_metrics_computer'))
  shared = lambda st: {k: v for k, v in st.items() if not optimizer_only(k)}
  assert shared(rite) == shared(adam)
  assert rite['LEARNING_RATE'] == 1e-2 and rite['EVAL_PERIOD'] == 20
  # The periodic eval decodes as far as t5x.eval / t5x.infer do, so their predictions agree.
  assert rite['infer_eval/utils.DatasetConfig.task_feature_lengths'] == '%TASK_FEATURE_LENGTHS'


def test_tiny_adam_twin_from_gin_equals_python(parse):
  parse('tiny_lora_adam_cpu.gin')
  python_tx = labels.freeze_base(optax.adamw(
      optax.warmup_cosine_decay_schedule(0.0, 1e-2, 0, 1000, 0.0), eps=1e-8, weight_decay=0.0))
  (p_gin, s_gin), (p_py, s_py) = _run(_macro('OPTAX_TX')), _run(python_tx)
  jax.tree.map(np.testing.assert_array_equal, (p_gin, s_gin), (p_py, s_py))
