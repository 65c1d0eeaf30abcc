"""Real ``python -m t5x.train`` runs of gin/tiny_*_cpu.gin on 2 simulated CPU devices.

Skipped without t5x, flaxformer and seqio. flaxformer's gin files are looked up
next to the installed package or under ``$FLAXFORMER_GIN_ROOT`` (a flaxformer
source checkout: the folder that contains ``flaxformer/``).
"""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip('t5x')
flaxformer = pytest.importorskip('flaxformer')
pytest.importorskip('seqio')

import jax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

pytestmark = pytest.mark.t5x

GIN_DIR = pathlib.Path(__file__).resolve().parents[2] / 'gin'
ARCHITECTURE_GIN = 'flaxformer/t5x/configs/t5/architectures/t5_1_1_flaxformer.gin'
BASE_STEPS = 20


def _flaxformer_gin_root() -> str:
  candidates = [os.environ.get('FLAXFORMER_GIN_ROOT', ''),
                str(pathlib.Path(flaxformer.__file__).resolve().parents[1])]
  for root in candidates:
    if root and (pathlib.Path(root) / ARCHITECTURE_GIN).exists():
      return root
  pytest.skip(f'{ARCHITECTURE_GIN} not found; set FLAXFORMER_GIN_ROOT to a flaxformer checkout.')


def _train(run_gin: str, gin_file: str, model_dir: pathlib.Path, *bindings: str) -> str:
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  cmd = [sys.executable, '-m', 't5x.train',
         f'--gin_search_paths={GIN_DIR},{_flaxformer_gin_root()}',
         f'--gin_file=t5x/configs/runs/{run_gin}', f'--gin_file={ARCHITECTURE_GIN}',
         f'--gin_file={gin_file}',
         f"--gin.MODEL_DIR='{model_dir}'", '--gin.utils.SaveCheckpointConfig.period=20',
         *[f'--gin.{b}' for b in bindings], '--alsologtostderr']
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
  log = proc.stdout + proc.stderr
  assert proc.returncode == 0, log[-6000:]
  return log


def _train_metric(log: str, name: str) -> dict[int, float]:
  """``{step: value}`` of a train metric from T5X's log (averaged since the last report)."""
  pattern = rf'\[(\d+)\] collection=train .*?\b{name}=([0-9.]+)'
  return {int(s): float(v) for s, v in re.findall(pattern, log)}


def _flat(tree, prefix=''):
  out = {}
  for k, v in tree.items():
    path = f'{prefix}/{k}' if prefix else k
    out.update(_flat(v, path) if isinstance(v, dict) else {path: np.asarray(v)})
  return out


def _state(ckpt: pathlib.Path) -> dict[str, np.ndarray]:
  """A T5X (Orbax) checkpoint's ``state`` as ``{path: numpy array}``."""
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(ckpt / 'state').item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return _flat(checkpointer.restore(ckpt / 'state', restore_args=args))


def _params(ckpt: pathlib.Path) -> dict[str, np.ndarray]:
  return {k.removeprefix('target/'): v for k, v in _state(ckpt).items()
          if k.startswith('target/')}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('t5x')
  logs = {'base': _train('pretrain.gin', 'tiny_base_cpu.gin', root / 'base')}
  init = f"INITIAL_CHECKPOINT_PATH='{root / 'base' / f'checkpoint_{BASE_STEPS}'}'"
  logs['lora'] = _train('finetune.gin', 'tiny_lora_rite_cpu.gin', root / 'lora', init,
                        'TRAIN_STEPS=60')
  logs['resume'] = _train('finetune.gin', 'tiny_lora_rite_cpu.gin', root / 'lora', init,
                          'TRAIN_STEPS=100')
  return root, logs


def test_finetune_from_lora_free_checkpoint_trains_only_lora(runs):
  root, logs = runs
  base = _params(root / 'base' / f'checkpoint_{BASE_STEPS}')
  assert not any('lora_' in k for k in base)
  # T5X saves the restored state first: LoRA factors at their initialization.
  first, last = _params(root / 'lora' / 'checkpoint_20'), _params(root / 'lora' / 'checkpoint_60')
  assert not np.any(first['encoder/layers_0/attention/query/lora_b'])
  lora_keys = sorted(k for k in last if k.rsplit('/', 1)[-1] in ('lora_a', 'lora_b'))
  # 2 enc layers × (q,k,v,o + wi_0,wi_1,wo) + 2 dec layers × (2×4 + 3), two factors each.
  assert len(lora_keys) == 2 * (2 * 7 + 2 * 11)
  assert set(last) - set(lora_keys) == set(base)
  for k, v in base.items():
    np.testing.assert_array_equal(last[k], v, err_msg=f'frozen base param {k} changed')
  for k in lora_keys:
    assert not np.array_equal(first[k], last[k]), f'LoRA leaf {k} did not change'
  # Pre-training sums the loss over tokens; lora_rite.gin makes it a per-token mean.
  base_loss = _train_metric(logs['base'], 'loss_per_nonpadding_target_token')[BASE_STEPS]
  losses = _train_metric(logs['lora'], 'loss')
  assert max(losses.values()) < base_loss - 0.5, (base_loss, losses)
  base_acc = _train_metric(logs['base'], 'accuracy')[BASE_STEPS]
  assert max(_train_metric(logs['lora'], 'accuracy').values()) > base_acc + 0.05


def _rite_count(ckpt: pathlib.Path) -> float:
  (count,) = [v for k, v in _state(ckpt).items()
              if k.endswith('lora_rite/inner_state/0/count')]
  return float(count)


def test_resume_continues_from_checkpoint(runs):
  root, logs = runs
  losses = _train_metric(logs['resume'], 'loss')
  assert sorted(losses) == [80, 100], losses  # resumed at 60, nothing re-run from the base
  # LoRA-RITE's step counter continues (T5X hands integer counters back as float32).
  assert _rite_count(root / 'lora' / 'checkpoint_60') == 40
  assert _rite_count(root / 'lora' / 'checkpoint_100') == 80
  at_60, at_80 = _params(root / 'lora' / 'checkpoint_60'), _params(root / 'lora' / 'checkpoint_80')
  base = _params(root / 'base' / f'checkpoint_{BASE_STEPS}')
  for k, v in at_80.items():
    if k in base:
      np.testing.assert_array_equal(v, base[k], err_msg=f'frozen base param {k} changed')
    else:  # factors moved on
      assert not np.array_equal(v, at_60[k]), k
  base_acc = _train_metric(logs['base'], 'accuracy')[BASE_STEPS]
  assert _train_metric(logs['resume'], 'accuracy')[100] > base_acc, logs['resume'][-3000:]
