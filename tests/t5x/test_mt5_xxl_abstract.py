"""The real flaxformer mT5-XXL with gin/lora.gin, built abstractly (skipped without
flaxformer): the LoRA factor count and sizes equal tests/test_t5x_configs.py's hand-built tree."""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip('t5x')
flaxformer = pytest.importorskip('flaxformer')
gin = pytest.importorskip('gin')

pytestmark = pytest.mark.t5x

GIN_DIR = pathlib.Path(__file__).resolve().parents[2] / 'gin'
MT5_XXL_GIN = 'flaxformer/t5x/configs/t5/models/mt5_xxl.gin'


def _flaxformer_gin_root() -> str:
  for root in (os.environ.get('FLAXFORMER_GIN_ROOT', ''),
               str(pathlib.Path(flaxformer.__file__).resolve().parents[1])):
    if root and (pathlib.Path(root) / MT5_XXL_GIN).exists():
      return root
  pytest.skip(f'{MT5_XXL_GIN} not found; set FLAXFORMER_GIN_ROOT to a flaxformer checkout.')


def _abstract_params(gin_file, bindings):
  """``{path: ShapeDtypeStruct}`` of the mT5-XXL that flaxformer's gin + ``gin_file`` build."""
  gin.clear_config(clear_constants=True)
  try:
    gin.add_config_file_search_path(str(GIN_DIR))
    gin.add_config_file_search_path(_flaxformer_gin_root())
    gin.parse_config_files_and_bindings([MT5_XXL_GIN, gin_file], bindings, finalize_config=False)
    module = gin.query_parameter('%ARCHITECTURE').scoped_configurable_fn()
    tokens = lambda: jnp.ones((1, 8), jnp.int32)
    # Sub-module factories read gin when called: build inside the config.
    variables = jax.eval_shape(lambda: module.init(
        jax.random.key(0), tokens(), tokens(), tokens(), enable_dropout=False))
  finally:
    gin.clear_config(clear_constants=True)
  return {'/'.join(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(variables['params'])[0]}


def test_mt5_xxl_lora_param_tree():
  flat = _abstract_params('mt5_xxl_lora_rite_finetune.gin',
                          ["TRAIN_FILES='t.jsonl'", "VALIDATION_FILES='v.jsonl'"])
  factors = {k: v for k, v in flat.items() if k.endswith(('lora_a', 'lora_b'))}
  assert len(factors) == 864
  assert sum(int(np.prod(v.shape)) for v in factors.values()) == 70_778_880
  assert factors['decoder/layers_23/encoder_decoder_attention/out/lora_a'].shape == (4096, 16)
  assert factors['encoder/layers_0/mlp/wi_1/lora_b'].shape == (16, 10240)
  # Base kernels keep their public-checkpoint shapes.
  assert flat['encoder/layers_0/attention/query/kernel'].shape == (4096, 4096)
  assert flat['decoder/layers_0/mlp/wo/kernel'].shape == (10240, 4096)


@pytest.mark.parametrize('gin_file, binding, num_factors', [
    ('mt5_xxl_lora_eval.gin', "EVAL_FILES='e.jsonl'", 864),
    ('mt5_xxl_infer.gin', "INFER_FILES='i.jsonl'", 0),
])
def test_mt5_xxl_eval_infer_build_the_trained_or_merged_tree(gin_file, binding, num_factors):
  flat = _abstract_params(gin_file, [binding])
  assert sum(k.endswith(('lora_a', 'lora_b')) for k in flat) == num_factors
  assert flat['encoder/layers_0/attention/query/kernel'].shape == (4096, 4096)
