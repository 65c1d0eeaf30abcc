"""LoRA-RITE in Tunix: a tiny random Gemma 3 with qwix LoRA, trained by ``PeftTrainer``.

Tunix (``google-tunix``) builds LoRA with qwix: every adapted weight ``w`` gets
``w_lora_a`` / ``w_lora_b`` leaves of type ``nnx.LoRAParam`` in the base weight's
dtype, einsum weights keep several output dims in ``lora_b`` (Gemma's ``q_einsum``
gives ``(r, N, H)``), ``PeftTrainer`` builds ``nnx.Optimizer(model, tx,
wrt=nnx.LoRAParam)`` and checkpoints the LoRA params and the optimizer state with
Orbax. These tests swap its optimizer for ``rite_optax.lora_rite`` and check that
a user gets a working, resumable run. Skipped without tunix (the ``tunix`` extra).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rite_optax

pytestmark = pytest.mark.tunix

qwix = pytest.importorskip('qwix', reason='needs qwix (pip install "rite_optax[tunix]")')
pytest.importorskip('tunix', reason='needs google-tunix (pip install "rite_optax[tunix]")')

from flax import nnx  # noqa: E402
from tunix.models.gemma3 import model as gemma3  # noqa: E402
from tunix.sft import peft_trainer  # noqa: E402
from tunix.sft import utils as sft_utils  # noqa: E402

RANK = 3  # differs from every model dim, so a wrong rank axis cannot match by size
VOCAB, SEQ, BATCH = 64, 16, 8
USED = 8  # the task's sequences use tokens 0..7 of the 64
LORA_MODULES = '.*q_einsum|.*kv_einsum|.*attn_vec_einsum|.*gate_proj|.*up_proj|.*down_proj'
BASE = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def tiny_config(param_dtype):
  """Gemma 3 270M's config with every size shrunk: 2 layers, GQA (4 query, 2 kv heads)."""
  return dataclasses.replace(
      gemma3.ModelConfig.gemma3_270m(), num_layers=2, num_embed=VOCAB, embed_dim=32,
      hidden_dim=64, num_heads=4, head_dim=8, num_kv_heads=2, sliding_window_size=SEQ,
      param_dtype=param_dtype)


def lora_gemma(param_dtype=jnp.float32, lora_seed=1):
  """A randomly initialised tiny Gemma 3 with qwix LoRA on attention and MLP.

  Tunix initialises the MLP kernels to zero (a checkpoint overwrites them); with
  zero gate/up/down kernels every MLP LoRA gradient is zero, so they are drawn
  at random here, as a pretrained base would have them. The embedding is drawn
  with std 0.2 instead of 1: Gemma 3 normalises each block's output to unit RMS,
  and an embedding of RMS sqrt(32) would drown what the adapters add.
  """
  model = gemma3.Gemma3(tiny_config(param_dtype), rngs=nnx.Rngs(0))
  keys = iter(jax.random.split(jax.random.key(2), 16))
  emb = model.embedder.input_embedding
  emb.value = (0.2 * jax.random.normal(next(keys), emb.value.shape)).astype(param_dtype)
  for layer in model.layers:
    for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
      k = proj.kernel
      k.value = (jax.random.normal(next(keys), k.value.shape) / np.sqrt(k.value.shape[0])
                 ).astype(param_dtype)
  provider = qwix.LoraProvider(module_path=LORA_MODULES, rank=RANK, alpha=2.0 * RANK)
  return qwix.apply_lora_to_model(
      model, provider, rngs=nnx.Rngs(lora_seed), **model.get_model_input())


def batches(n, seed):
  """An embedded task: sequences walk a fixed random cycle through tokens 0..USED-1."""
  perm = np.random.default_rng(0).permutation(USED)
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    tokens = np.empty((BATCH, SEQ), np.int32)
    tokens[:, 0] = rng.integers(0, USED, BATCH)
    for t in range(1, SEQ):
      tokens[:, t] = perm[tokens[:, t - 1]]
    out.append(peft_trainer.TrainingInput(
        input_tokens=tokens, input_mask=np.ones((BATCH, SEQ), bool)))
  return out


def model_input(x):
  """TrainingInput -> the keyword arguments of Tunix's default loss."""
  return {'input_tokens': x.input_tokens, 'input_mask': x.input_mask,
          'positions': sft_utils.build_positions_from_mask(x.input_mask),
          'attention_mask': sft_utils.make_causal_attn_mask(x.input_mask)}


@nnx.jit
def next_token_loss(model, input_tokens, input_mask, positions, attention_mask):
  logits, _ = model(input_tokens, positions, None, attention_mask)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
  target = jnp.take_along_axis(logp, input_tokens[:, 1:, None], axis=-1)[..., 0]
  return -jnp.mean(target)


def held_out_loss(model):
  return float(next_token_loss(model, **model_input(batches(1, seed=99)[0])))


def copy(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), nnx.to_pure_dict(tree))


def leaves(tree):
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def trainer_for(model, tx, steps, ckpt_dir=None):
  config = peft_trainer.TrainingConfig(
      eval_every_n_steps=10_000, max_steps=steps, checkpoint_root_directory=ckpt_dir)
  return peft_trainer.PeftTrainer(model, tx, config).with_gen_model_input_fn(model_input)


def test_describe_lists_every_qwix_pair_with_its_rank_axis():
  model = lora_gemma()
  lora = nnx.state(model, nnx.LoRAParam)
  text = rite_optax.describe(lora, 'qwix', print_output=False)
  paired = rite_optax.pair_leaves(lora, 'qwix')
  assert text.startswith("pairing 'qwix': 12 pairs, 0 unpaired leaves")
  # Every LoRAParam leaf is a factor of some pair; nothing falls back to AdamW.
  assert not paired.unpaired and len(paired.factor_indices) == len(jax.tree.leaves(lora))
  d, h, n, k, f = 32, 8, 4, 2, 64
  expected = {  # qwix: a (dims shared with the input..., r), b (r, output-only dims...)
      'attn/q_einsum/w': ((d, RANK), (RANK, n, h)),               # 'BTD,NDH->BTNH'
      'attn/kv_einsum/w': ((d, RANK), (RANK, 2, k, h)),           # 'BSD,CKDH->CBSKH'
      'attn/attn_vec_einsum/w': ((n, h, RANK), (RANK, d)),        # 'BTNH,NHD->BTD'
      'mlp/gate_proj/kernel': ((d, RANK), (RANK, f)),             # nnx.Linear via dot_general
      'mlp/up_proj/kernel': ((d, RANK), (RANK, f)),
      'mlp/down_proj/kernel': ((f, RANK), (RANK, d)),
  }
  got = {p.key: p for p in paired.pairs}
  assert set(got) == {f'layers/{i}/{name}' for i in range(2) for name in expected}
  for key, pair in got.items():
    a_shape, b_shape = expected[key.split('/', 2)[2]]
    assert (pair.a.path, pair.b.path) == (f'{key}_lora_a', f'{key}_lora_b')
    assert (pair.a.shape, pair.b.shape) == (a_shape, b_shape)
    assert (pair.a.rank_axis, pair.b.rank_axis) == (len(a_shape) - 1, 0), key
    assert pair.a.canonical_shape == (1, np.prod(a_shape[:-1]), RANK)
    assert pair.b.canonical_shape == (1, np.prod(b_shape[1:]), RANK)
    assert (f'  {key}: a {key}_lora_a {a_shape} rank axis {len(a_shape) - 1} |'
            f' b {key}_lora_b {b_shape} rank axis 0') in text


def test_peft_trainer_trains_checkpoints_and_resumes(tmp_path):
  """lora_rite in PeftTrainer: loss falls, base unchanged, every factor moves, and a
  new trainer on the same checkpoint directory restores LoRA params and RITE state."""
  steps, ckpt = 12, str(tmp_path / 'ckpt')
  tx = lambda: rite_optax.lora_rite(3e-2, pairing='qwix')
  model = lora_gemma()
  base0, lora0 = copy(nnx.state(model, BASE)), copy(nnx.state(model, nnx.LoRAParam))
  loss0 = held_out_loss(model)
  trainer = trainer_for(model, tx(), steps, ckpt)
  trainer.train(batches(2 * steps, seed=1))
  assert trainer.train_steps == steps
  loss1 = held_out_loss(model)
  assert loss1 < 0.5 * loss0, (loss0, loss1)

  base1, lora1 = copy(nnx.state(model, BASE)), copy(nnx.state(model, nnx.LoRAParam))
  for path, x in leaves(base0).items():
    assert x.tobytes() == leaves(base1)[path].tobytes(), f'base weight {path} changed'
  assert len(leaves(lora0)) == 24
  for path, x in leaves(lora0).items():
    assert np.abs(leaves(lora1)[path] - x).max() > 0, f'LoRA factor {path} did not move'
  saved_opt = copy(nnx.state(trainer.optimizer, nnx.optimizer.OptState))

  # A new process: same base, other LoRA init, a fresh optimizer; the trainer restores.
  resumed_model = lora_gemma(lora_seed=7)
  fresh_opt = copy(nnx.state(nnx.Optimizer(resumed_model, tx(), wrt=nnx.LoRAParam),
                             nnx.optimizer.OptState))
  resumed = trainer_for(resumed_model, tx(), 2 * steps, ckpt)
  assert resumed.train_steps == steps
  restored_opt = copy(nnx.state(resumed.optimizer, nnx.optimizer.OptState))
  assert leaves(restored_opt).keys() == leaves(saved_opt).keys()
  # The comparison below can fail: the saved RITE state is not the fresh one.
  assert any(not np.array_equal(x, leaves(fresh_opt)[p]) for p, x in leaves(saved_opt).items())
  for path, x in leaves(saved_opt).items():
    np.testing.assert_array_equal(leaves(restored_opt)[path], x, err_msg=path)
  for path, x in leaves(lora1).items():
    np.testing.assert_array_equal(
        leaves(copy(nnx.state(resumed_model, nnx.LoRAParam)))[path], x, err_msg=path)

  resumed.train(batches(2 * steps, seed=1))  # skips the batches already seen
  assert resumed.train_steps == 2 * steps
  loss2 = held_out_loss(resumed_model)
  print(f'held-out loss: {loss0:.3f} at init, {loss1:.3f} after {steps} steps,'
        f' {loss2:.3f} after {2 * steps} (resumed at {steps})')
  assert loss2 < loss1, (loss0, loss1, loss2)


def test_bf16_base_trains_with_float32_math():
  """A bf16 base gives bf16 factors (qwix copies the dtype); lora_rite keeps them bf16,
  keeps its state in float32, and its bf16 update (preconditioner alone, or with the
  learning rate) is the float32 one rounded once."""
  model = lora_gemma(jnp.bfloat16)
  lora = nnx.state(model, nnx.LoRAParam)
  assert {x.dtype for x in jax.tree.leaves(lora)} == {jnp.dtype(jnp.bfloat16)}
  tx = rite_optax.lora_rite(3e-2, pairing='qwix')

  # One step on the real gradients, bf16 params vs the same values in float32.
  inputs = model_input(batches(1, seed=3)[0])
  grads = nnx.grad(next_token_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, **inputs)
  params, grads = nnx.to_pure_dict(lora), nnx.to_pure_dict(grads)
  f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
  state = tx.init(params)
  assert {x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)
          } == {jnp.dtype(jnp.float32)}, 'the RITE state is kept in float32'
  # The math runs in float32 and rounds once: bit for bit the float32 result.
  for rite in (rite_optax.scale_by_lora_rite(pairing='qwix'), tx):
    pre16, _ = jax.jit(rite.update)(grads, rite.init(params), params)
    pre32, _ = jax.jit(rite.update)(f32(grads), rite.init(f32(params)), f32(params))
    for (path, u16), u32 in zip(leaves(pre16).items(), leaves(pre32).values(), strict=True):
      assert u16.dtype == jnp.bfloat16, path
      np.testing.assert_array_equal(np.asarray(u16), np.asarray(u32.astype(jnp.bfloat16)),
                                    err_msg=path)
    assert max(float(jnp.abs(u).max()) for u in jax.tree.leaves(pre16)) > 0

  loss0 = held_out_loss(model)
  trainer = trainer_for(model, tx, steps=12)
  trainer.train(batches(12, seed=1))
  assert held_out_loss(model) < 0.5 * loss0
  assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))} == {
      jnp.dtype(jnp.bfloat16)}
