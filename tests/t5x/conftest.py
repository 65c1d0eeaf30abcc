"""Shared by tests/t5x: real ``python -m t5x.{train,eval,infer}`` runs of gin/tiny_*_cpu.gin
on 2 simulated CPU devices, and the session's base + LoRA fine-tune + resume runs.

flaxformer's gin files are looked up next to the installed package or under
``$FLAXFORMER_GIN_ROOT`` (a flaxformer source checkout: the folder that contains
``flaxformer/``). Nothing here imports T5X: the test modules skip without it.
"""

import os
import pathlib
import subprocess
import sys

import pytest

GIN_DIR = pathlib.Path(__file__).resolve().parents[2] / 'gin'
ARCHITECTURE_GIN = 'flaxformer/t5x/configs/t5/architectures/t5_1_1_flaxformer.gin'
BASE_STEPS = 20


def flaxformer_gin_root() -> str:
  import flaxformer  # pylint: disable=g-import-not-at-top

  candidates = [os.environ.get('FLAXFORMER_GIN_ROOT', ''),
                str(pathlib.Path(flaxformer.__file__).resolve().parents[1])]
  for root in candidates:
    if root and (pathlib.Path(root) / ARCHITECTURE_GIN).exists():
      return root
  pytest.skip(f'{ARCHITECTURE_GIN} not found; set FLAXFORMER_GIN_ROOT to a flaxformer checkout.')


def t5x(script: str, run_gin: str, gin_file: str, *bindings: str) -> str:
  """Runs ``python -m t5x.<script>`` with T5X's ``runs/<run_gin>``, the tiny architecture and
  ``gin_file``; returns its log (asserting exit code 0)."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  cmd = [sys.executable, '-m', f't5x.{script}',
         f'--gin_search_paths={GIN_DIR},{flaxformer_gin_root()}',
         f'--gin_file=t5x/configs/runs/{run_gin}', f'--gin_file={ARCHITECTURE_GIN}',
         f'--gin_file={gin_file}', *[f'--gin.{b}' for b in bindings], '--alsologtostderr']
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
  log = proc.stdout + proc.stderr
  assert proc.returncode == 0, log[-6000:]
  return log


def train(run_gin: str, gin_file: str, model_dir: pathlib.Path, *bindings: str) -> str:
  return t5x('train', run_gin, gin_file, f"MODEL_DIR='{model_dir}'",
             'utils.SaveCheckpointConfig.period=20', *bindings)


@pytest.fixture(scope='session')
def runs(tmp_path_factory):
  """``(root, logs)``: root/base (LoRA-free, 20 steps), root/lora (LoRA-RITE from it to step
  60, then resumed to 100)."""
  root = tmp_path_factory.mktemp('t5x')
  logs = {'base': train('pretrain.gin', 'tiny_base_cpu.gin', root / 'base')}
  init = f"INITIAL_CHECKPOINT_PATH='{root / 'base' / f'checkpoint_{BASE_STEPS}'}'"
  logs['lora'] = train('finetune.gin', 'tiny_lora_rite_cpu.gin', root / 'lora', init,
                       'TRAIN_STEPS=60')
  logs['resume'] = train('finetune.gin', 'tiny_lora_rite_cpu.gin', root / 'lora', init,
                         'TRAIN_STEPS=100')
  return root, logs
