"""After the tiny LoRA-RITE fine-tune (tests/t5x/conftest.py's ``runs``): metrics in the
fine-tune's periodic inference evaluation and in ``t5x.eval``, ``t5x.infer`` from the gin
alone, and adapters exported, applied back onto the base and merged into it.

Skipped without t5x, flaxformer and seqio.
"""

import ast
import json
import pathlib

import numpy as np
import pytest

pytest.importorskip('t5x')
pytest.importorskip('flaxformer')
pytest.importorskip('seqio')

import jax.numpy as jnp  # noqa: E402

import gin  # noqa: E402
from t5x_configs import adapters, metrics  # noqa: E402
from tests.t5x.conftest import ARCHITECTURE_GIN, GIN_DIR, flaxformer_gin_root, t5x  # noqa: E402

pytestmark = pytest.mark.t5x

TASK = 'rite_optax_synthetic_reverse'
STEP = 60


def _jsonl(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _logged_metrics(log: str, step: int) -> dict[str, float]:
  """seqio's logged ``<task>/<metric> at step N: value`` lines."""
  out = {}
  for name in ('exact_match', 'rougeL'):
    marker = f'{TASK}/{name} at step {step}: '
    (line,) = [ln for ln in log.splitlines() if marker in ln]
    out[name] = float(line.split(marker)[1])
  return out


@pytest.fixture(scope='module')
def exported(runs, tmp_path_factory):
  """The adapter file of checkpoint_60 and the merged / re-applied checkpoints built from it."""
  root, _ = runs
  out = tmp_path_factory.mktemp('adapters')
  ckpt = root / 'lora' / f'checkpoint_{STEP}'
  path = out / 'adapters.npz'
  # The commands as a user runs them (in-process: one import of Orbax for all three).
  assert adapters.main(['export', f'--checkpoint={ckpt}', f'--output={path}']) == 0
  assert adapters.main(['merge', f'--adapters={path}', f'--output={out / "merged"}']) == 0
  assert adapters.main(['apply', f'--adapters={path}', f'--output={out / "applied"}']) == 0
  return {'file': path, 'lora': ckpt, 'merged': out / 'merged' / f'checkpoint_{STEP}',
          'applied': out / 'applied' / f'checkpoint_{STEP}', 'base': root / 'base' / 'checkpoint_20'}


def test_finetune_inference_eval_logs_exact_match_and_rouge_l(runs):
  root, logs = runs
  written = _jsonl(root / 'lora' / 'inference_eval' / f'{TASK}-metrics.jsonl')
  assert [m['step'] for m in written] == [40, 60, 80, 100]
  # The logged values are our metrics on the written (stripped) predictions and targets.
  for step in (40, 60):
    preds = _jsonl(root / 'lora' / 'inference_eval' / f'{TASK}-{step:06d}.jsonl')
    assert len(preds) == 64  # the whole validation split
    targets, predictions = [p['target'] for p in preds], [p['prediction'] for p in preds]
    expected = {**metrics.exact_match(targets, predictions), **metrics.rouge_l(targets, predictions)}
    # The log rounds to 3 decimals; metrics.jsonl has the values.
    assert _logged_metrics(logs['lora'], step) == pytest.approx(expected, abs=1e-3)
    assert {k: v for k, v in written[step // 20 - 2].items() if k != 'step'} == pytest.approx(
        expected)


def test_t5x_eval_reports_metrics_from_the_gin_alone(runs, tmp_path):
  root, _ = runs
  log = t5x('eval', 'eval.gin', 'tiny_lora_eval_cpu.gin',
            f"CHECKPOINT_PATH='{root / 'lora' / f'checkpoint_{STEP}'}'",
            f"EVAL_OUTPUT_DIR='{tmp_path}'")
  (written,) = _jsonl(tmp_path / 'inference_eval' / f'{TASK}-metrics.jsonl')
  assert set(written) == {'step', 'exact_match', 'rougeL'}
  assert _logged_metrics(log, STEP) == pytest.approx(
      {k: written[k] for k in ('exact_match', 'rougeL')}, abs=1e-3)
  # Same checkpoint, same greedy decoding and data as the fine-tune's eval at that step.
  (during_training,) = [m for m in _jsonl(root / 'lora' / 'inference_eval' / f'{TASK}-metrics.jsonl')
                        if m['step'] == STEP]
  assert written == during_training
  print(f't5x.eval of checkpoint_{STEP}: {written}')


def _infer(gin_file: str, ckpt: pathlib.Path, out: pathlib.Path) -> list[str]:
  t5x('infer', 'infer.gin', gin_file, f"CHECKPOINT_PATH='{ckpt}'", f"INFER_OUTPUT_DIR='{out}'")
  return [r['prediction'] for r in _jsonl(out / f'{TASK}-predict.jsonl-00000-of-00001')]


def test_infer_from_gin_alone_and_merged_predictions_equal_lora(runs, exported, tmp_path):
  root, _ = runs
  at_step = _jsonl(root / 'lora' / 'inference_eval' / f'{TASK}-{STEP:06d}.jsonl')
  lora_preds = [p['prediction'] for p in at_step]
  # LoRA gin on base + exported adapters; LoRA-free gin on the merged checkpoint.
  applied = _infer('tiny_lora_infer_cpu.gin', exported['applied'], tmp_path / 'applied')
  merged = _infer('tiny_infer_cpu.gin', exported['merged'], tmp_path / 'merged')
  assert applied == lora_preds
  assert merged == lora_preds


def _logits(gin_file: str, ckpt: pathlib.Path, batch) -> np.ndarray:
  """Teacher-forced logits of the model ``gin_file`` builds, with ``ckpt``'s params."""
  params = adapters._unflatten(adapters.read_params(str(ckpt)))  # pylint: disable=protected-access
  gin.clear_config(clear_constants=True)
  try:
    gin.add_config_file_search_path(str(GIN_DIR))
    gin.add_config_file_search_path(flaxformer_gin_root())
    gin.parse_config_files_and_bindings([ARCHITECTURE_GIN, gin_file], [], finalize_config=False)
    module = gin.query_parameter('%ARCHITECTURE').scoped_configurable_fn()
    # Sub-module factories read gin when called: apply inside the config.
    logits = module.apply({'params': params}, *batch, enable_dropout=False)
  finally:
    gin.clear_config(clear_constants=True)
  return np.asarray(logits, np.float32)


def test_merged_logits_equal_lora_logits(exported):
  rng = np.random.default_rng(0)
  tokens = lambda n: jnp.asarray(rng.integers(3, 259, (4, n)), jnp.int32)
  batch = (tokens(24), tokens(12), tokens(12))
  lora_logits = _logits('tiny_lora_cpu.gin', exported['lora'], batch)
  merged_logits = _logits('tiny_model_cpu.gin', exported['merged'], batch)
  base_logits = _logits('tiny_model_cpu.gin', exported['base'], batch)
  diff = float(np.abs(merged_logits - lora_logits).max())
  print(f'max |merged - LoRA| logit difference: {diff:.3g} '
        f'(|LoRA - base| {np.abs(lora_logits - base_logits).max():.3g})')
  np.testing.assert_allclose(merged_logits, lora_logits, rtol=1e-5, atol=1e-4)
  # The adapters matter: a merge that dropped or mis-scaled them could not pass.
  assert np.abs(lora_logits - base_logits).max() > 0.1
  assert lora_logits.shape == (4, 12, 384)


def test_adapter_file_holds_only_the_factors(exported):
  lora_params = adapters.read_params(str(exported['lora']))
  factors = {k: v for k, v in lora_params.items() if k.endswith(('/lora_a', '/lora_b'))}
  loaded, meta = adapters.load_adapters(str(exported['file']))
  assert sorted(loaded) == sorted(factors) and len(factors) == 72
  for k, v in factors.items():
    np.testing.assert_array_equal(loaded[k], v)
  assert (meta['rank'], meta['alpha'], meta['step']) == (4, 8.0, STEP)
  assert meta['base_checkpoint'] == str(exported['base'])
  assert meta['targets'] == gin_targets()
  data, size = adapters.factor_bytes(factors), exported['file'].stat().st_size
  print(f'adapter file {size} bytes for {data} bytes of factors '
        f'(full checkpoint params: {adapters.factor_bytes(lora_params)} bytes)')
  assert data < size < data + 400 * (len(factors) + 1) + 4096
  # The merged checkpoint is the base's tree: no factors, same keys and shapes.
  base, merged = (adapters.read_params(str(exported[k])) for k in ('base', 'merged'))
  assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in base.items()}


def gin_targets() -> list[str]:
  text = (GIN_DIR / 'lora.gin').read_text()
  line = next(ln for ln in text.splitlines() if ln.startswith('LORA_TARGETS = '))
  return ast.literal_eval(line.removeprefix('LORA_TARGETS = '))
