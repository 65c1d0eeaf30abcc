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
    'utils.RestoreCheckpointConfig', 'dense_attention.MultiHeadDotProductAttention',
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
