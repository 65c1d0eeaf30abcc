"""The main job (``python -m rite_optax``) end to end, with tiny flags."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip('flax')
pytest.importorskip('matplotlib')
pytest.importorskip('tqdm')

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_help_documents_every_flag(capsys):
  from rite_optax import __main__

  with pytest.raises(SystemExit) as exit_info:
    __main__.main(['--help'])
  assert exit_info.value.code == 0
  text = capsys.readouterr().out
  for flag in ('--steps', '--rank', '--rite-lr', '--adam-lr', '--scales', '--batch-size',
               '--out-dir', '--seed'):
    assert flag in text


def test_bad_scales_are_rejected(capsys):
  from rite_optax import __main__

  with pytest.raises(SystemExit) as exit_info:
    __main__.main(['--scales', '1,0'])
  assert exit_info.value.code == 2
  assert 'scales must be positive' in capsys.readouterr().err


def test_demo_runs_and_lora_rite_learns(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  proc = subprocess.run(
      [sys.executable, '-m', 'rite_optax', '--steps', '40', '--scales', '0.1,1,10',
       '--rank', '2', '--out-dir', str(tmp_path)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout

  header = next(line for line in out.splitlines() if line.startswith('optimizer'))
  for column in ('peak lr', 'final loss (s=1)', 'worst/best over s', 'steps/s',
                 'state bytes'):
    assert column in header
  rows = {line.split()[0]: line.split() for line in out.splitlines()
          if line.split()[:1] in (['lora_rite'], ['adam'])}
  assert set(rows) == {'lora_rite', 'adam'}
  assert 'lora_rite s=10' in proc.stderr  # tqdm progress bars

  for name in ('loss_curves.png', 'invariance.png'):
    png = (tmp_path / name).read_bytes()
    assert png.startswith(b'\x89PNG\r\n\x1a\n') and len(png) > 10_000, name
    assert f'wrote {tmp_path / name}' in out

  results = json.loads((tmp_path / 'results.json').read_text())
  runs = {(r['optimizer'], r['scale']): r for r in results['runs']}
  assert set(runs) == {(o, s) for o in ('lora_rite', 'adam') for s in (0.1, 1.0, 10.0)}
  rite = [runs['lora_rite', s]['final_loss'] for s in (0.1, 1.0, 10.0)]
  assert rite[1] < 0.7 * results['initial_loss']
  # Rescaled factors give the same trajectory under LoRA-RITE, not under Adam.
  assert max(rite) / min(rite) < 1.001
  adam = [runs['adam', s]['final_loss'] for s in (0.1, 1.0, 10.0)]
  assert max(adam) / min(adam) > 1.1
  assert all(len(r['losses']) == 40 for r in runs.values())
  assert runs['lora_rite', 1.0]['state_bytes'] > 0 and runs['adam', 1.0]['state_bytes'] > 0
