"""The notebooks: committed clean, Colab-ready, and each runs top to bottom on CPU."""

import json
import os
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / 'notebooks').glob('*.ipynb'))
EXECUTED = ('01_quickstart.ipynb', '02_scaling_out.ipynb', '03_t5x.ipynb', '04_tunix_gemma.ipynb')
COLAB = 'https://colab.research.google.com/github/rite-optax/rite_optax/blob/main/notebooks/'
INSTALL = re.compile(
    r'%pip install -q "rite_optax\[notebooks[a-z,]*\] @ git\+https://github.com/rite-optax/rite_optax"')


def cells(path):
  return json.loads(path.read_text())['cells']


def source(cell):
  return ''.join(cell['source'])


def test_the_executed_notebooks_exist():
  assert set(EXECUTED) <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_clean_and_colab_ready(path):
  nb_cells = cells(path)
  assert f'{COLAB}{path.name}' in source(nb_cells[0]), 'first cell needs the Open in Colab badge'
  code = [c for c in nb_cells if c['cell_type'] == 'code']
  for cell in code:
    assert cell['outputs'] == [] and cell['execution_count'] is None, 'clear the outputs'
  install = source(code[0])
  assert INSTALL.search(install)
  # Skipped where rite_optax is importable (CI, a dev checkout): no network needed there.
  assert "if importlib.util.find_spec('rite_optax') is None:" in install


def test_scaling_out_simulates_devices_before_jax_starts():
  code = [source(c) for c in cells(REPO / 'notebooks' / '02_scaling_out.ipynb')
          if c['cell_type'] == 'code']
  first_jax = next(i for i, text in enumerate(code) if 'import jax' in text)
  text = code[first_jax]
  assert text.index('--xla_force_host_platform_device_count=8') < text.index('import jax')
  assert all('import jax' not in t and 'import flax' not in t for t in code[:first_jax])


@pytest.mark.slow
@pytest.mark.parametrize('name', EXECUTED)
def test_notebook_executes(name, monkeypatch):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  pytest.importorskip('ipykernel')
  if name == '03_t5x.ipynb':
    pytest.importorskip('gin')  # gin-config's parser; T5X itself is not needed
  if name == '04_tunix_gemma.ipynb':
    # The 'tunix' extra (.ci/tunix.sh); the notebook then runs its tiny, download-free mode.
    pytest.importorskip('tunix', reason='needs google-tunix (pip install "rite_optax[tunix]")')
    pytest.importorskip('qwix', reason='needs qwix (pip install "rite_optax[tunix]")')
    monkeypatch.setenv('RITE_OPTAX_NOTEBOOK_MODE', 'tiny')
  # As in a checkout: the kernel starts in notebooks/ (03 finds gin/ there),
  # imports rite_optax from this checkout, installed or not, and starts without
  # the test suite's simulated devices.
  monkeypatch.setenv(
      'PYTHONPATH', os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')])))
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  notebook = nbformat.read(REPO / 'notebooks' / name, as_version=4)
  client = nbclient.NotebookClient(
      notebook, timeout=600, kernel_name='python3',
      resources={'metadata': {'path': str(REPO / 'notebooks')}})
  client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
  outputs = [o for c in notebook.cells if c.cell_type == 'code' for o in c.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  assert any(o.output_type == 'stream' for o in outputs)
