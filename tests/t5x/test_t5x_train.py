"""Real ``python -m t5x.train`` runs of gin/tiny_*_cpu.gin on 2 simulated CPU devices (the
session's ``runs`` fixture in tests/t5x/conftest.py): LoRA-only training and resume.

Skipped without t5x, flaxformer and seqio.
"""

import pathlib
import re

import numpy as np
import pytest

pytest.importorskip('t5x')
pytest.importorskip('flaxformer')
pytest.importorskip('seqio')

import jax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from tests.t5x.conftest import BASE_STEPS  # noqa: E402

pytestmark = pytest.mark.t5x


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


def test_lora_rite_diagnostics_are_logged_with_the_training_metrics(runs):
  """gin/lora_rite.gin makes T5X log rite_optax.diagnostics as lora_rite/<name>."""
  _, logs = runs
  steps = _train_metric(logs['lora'], 'lora_rite/step')
  assert steps and steps[max(steps)] == max(steps) - BASE_STEPS, steps  # steps since the base
  assert set(_train_metric(logs['resume'], 'lora_rite/step')) == {80, 100}
  for name in ('skipped_steps', 'skipped_factors', 'skipped_factors_total', 'grad_norm',
               'clip_scale'):
    assert _train_metric(logs['lora'], f'lora_rite/{name}'), name
  # A per-token mean loss: update skipping leaves the factors alone, the norm is real.
  assert max(_train_metric(logs['lora'], 'lora_rite/skipped_factors_total').values()) == 0
  assert min(_train_metric(logs['lora'], 'lora_rite/grad_norm').values()) > 0
  assert all(0 < c <= 1 for c in _train_metric(logs['lora'], 'lora_rite/clip_scale').values())
