"""Smoke test of python -m benchmarks.compare --quick: it runs and writes its outputs."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compare_quick_writes_table_plots_and_invariance(tmp_path):
  out = tmp_path / 'compare'
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run(
      [sys.executable, '-m', 'benchmarks.compare',
       '--quick', '--optimizers', 'lora_rite,adam',
       '--out', str(out)],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ('results.md', 'results.json', 'lr_sweep.png', 'curves.png',
               'invariance.png'):
    assert (out / name).stat().st_size > 0, name
  assert list(out.glob('pretrained_lm_*.npz'))
  data = json.loads((out / 'results.json').read_text())
  teacher, lm = data['results'].values()
  assert set(teacher) == {'lora_rite', 'adam'}
  for r in lm.values():
    assert 0.0 <= r['best_accuracy_mean'] <= 1.0
  # LoRA-RITE is invariant to a·s, b/s: the quick run must show it.
  rite = teacher['lora_rite']['invariance']
  assert rite['scale_spread_log10'] < 1e-3, rite
  assert rite['rotation_max_rel_diff'] < 1e-3, rite
  assert teacher['adam']['invariance']['scale_spread_log10'] > 1e-2
  table = (out / 'results.md').read_text()
  assert '| lora_rite |' in table and 'spread over s' in table
