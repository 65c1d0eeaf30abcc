"""LoRA fine-tuning problems for benchmarks/compare.py, built without downloads.

Every problem trains only LoRA factors (``{'<layer>': {'lora_a', 'lora_b'}}``,
``delta = lora_a @ lora_b``, ``lora_b`` initialised to zero) on top of frozen
base weights, and draws fresh training data from a key each step.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm


@dataclasses.dataclass(frozen=True)
class Problem:
  """A LoRA fine-tuning problem.

  Attributes:
    name: label used in tables and plots.
    init_lora: ``key -> lora params`` (``lora_a`` random, ``lora_b`` zero).
    loss: ``(lora params, key) -> scalar`` on a fresh training batch.
    evaluate: ``lora params -> {metric: scalar}`` on held-out data; always has
      ``'loss'``.
    steps: training steps.
  """

  name: str
  init_lora: Callable[[jax.Array], Any]
  loss: Callable[[Any, jax.Array], jax.Array]
  evaluate: Callable[[Any], dict[str, jax.Array]]
  steps: int


def _lora_init(key, shapes, rank):
  params = {}
  for i, (name, (m, n)) in enumerate(shapes.items()):
    a = jax.random.normal(jax.random.fold_in(key, i), (m, rank)) / np.sqrt(m)
    params[name] = {'lora_a': a, 'lora_b': jnp.zeros((rank, n))}
  return params


def _dense(x, w, lora):
  return x @ w + (x @ lora['lora_a']) @ lora['lora_b']


def teacher_mlp(
    widths: tuple[int, ...], rank: int, teacher_rank: int, batch: int,
    steps: int, seed: int = 0,
) -> Problem:
  """A frozen random tanh MLP; the teacher adds low-rank deltas to every layer.

  The student fits the teacher with one LoRA adapter per layer (layers of
  different shapes) on fresh Gaussian inputs. The loss is the MSE divided by
  the held-out MSE of the base model, so it starts at 1.
  """
  key = jax.random.key(seed)
  shapes = {f'layer{i}': (widths[i], widths[i + 1])
            for i in range(len(widths) - 1)}
  base, teacher = {}, {}
  for i, (name, (m, n)) in enumerate(shapes.items()):
    k_w, k_u, k_v = jax.random.split(jax.random.fold_in(key, i), 3)
    base[name] = jax.random.normal(k_w, (m, n)) / np.sqrt(m)
    u = jax.random.normal(k_u, (m, teacher_rank)) / np.sqrt(m)
    v = jax.random.normal(k_v, (teacher_rank, n))
    teacher[name] = base[name] + u @ v * np.sqrt(1.0 / teacher_rank)
  no_lora = {name: {'lora_a': jnp.zeros((m, 1)), 'lora_b': jnp.zeros((1, n))}
             for name, (m, n) in shapes.items()}

  def forward(weights, lora, x):
    names = list(shapes)
    for i, name in enumerate(names):
      x = _dense(x, weights[name], lora[name])
      if i < len(names) - 1:
        x = jnp.tanh(x)
    return x

  x_eval = jax.random.normal(jax.random.fold_in(key, 10_000),
                             (2048, widths[0]))
  y_eval = forward(teacher, no_lora, x_eval)
  norm = float(jnp.mean((forward(base, no_lora, x_eval) - y_eval) ** 2))

  def mse(lora, x):
    return jnp.mean((forward(base, lora, x) - forward(teacher, no_lora, x)) ** 2)

  def loss(lora, key):
    return mse(lora, jax.random.normal(key, (batch, widths[0]))) / norm

  def evaluate(lora):
    return {'loss': jnp.mean((forward(base, lora, x_eval) - y_eval) ** 2) / norm}

  return Problem(
      name=f'teacher MLP {"-".join(map(str, widths))}, r={rank}',
      init_lora=lambda k: _lora_init(k, shapes, rank),
      loss=loss, evaluate=evaluate, steps=steps)


# --- A small causal transformer LM on synthetic Markov languages. ---------


@dataclasses.dataclass(frozen=True)
class LMConfig:
  vocab: int = 32
  seq: int = 24
  dim: int = 48
  layers: int = 2
  heads: int = 4
  batch: int = 16
  pretrain_steps: int = 800
  rank: int = 4
  steps: int = 200
  task_prob: float = 0.7


def _layer_norm(x):
  mean = x.mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5)


def _lm_shapes(cfg: LMConfig) -> dict[str, tuple[int, int]]:
  d = cfg.dim
  shapes = {}
  for i in range(cfg.layers):
    shapes.update({f'l{i}_q': (d, d), f'l{i}_k': (d, d), f'l{i}_v': (d, d),
                   f'l{i}_o': (d, d), f'l{i}_up': (d, 4 * d),
                   f'l{i}_down': (4 * d, d)})
  return shapes


_LORA_TARGETS = ('q', 'v', 'o', 'up', 'down')


def _lm_forward(cfg, base, lora, tokens):
  d, h = cfg.dim, cfg.heads
  t = tokens.shape[-1]
  x = base['embed'][tokens] + base['pos'][:t]
  mask = jnp.tril(jnp.ones((t, t), bool))
  for i in range(cfg.layers):
    def proj(name, y, i=i):
      key = f'l{i}_{name}'
      return _dense(y, base[key], lora[key]) if key in lora else y @ base[key]
    y = _layer_norm(x)
    q, k, v = (proj(n, y).reshape(*y.shape[:-1], h, d // h) for n in 'qkv')
    att = jnp.einsum('...thd,...shd->...hts', q, k) / np.sqrt(d // h)
    att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
    y = jnp.einsum('...hts,...shd->...thd', att, v).reshape(x.shape)
    x = x + proj('o', y)
    x = x + proj('down', jax.nn.gelu(proj('up', _layer_norm(x))))
  return _layer_norm(x) @ base['embed'].T


def _sample(transition, key, batch, seq):
  """Sequences of a first-order Markov chain with row-stochastic ``transition``."""
  k0, k1 = jax.random.split(key)
  first = jax.random.randint(k0, (batch,), 0, transition.shape[0])

  def step(tok, k):
    nxt = jax.random.categorical(k, jnp.log(transition[tok] + 1e-30))
    return nxt, nxt

  _, rest = jax.lax.scan(step, first, jax.random.split(k1, seq - 1))
  return jnp.concatenate([first[None], rest], 0).T


def _languages(cfg: LMConfig, seed: int):
  """The pretraining language and the shifted fine-tuning language."""
  rng = np.random.default_rng(seed)
  v = cfg.vocab
  pretrain = np.full((v, v), 0.02 / v)
  for i in range(v):
    successors = rng.choice(v, 4, replace=False)
    pretrain[i, successors] += 0.98 * rng.dirichlet(np.ones(4))
  # The task: token i is followed by perm[i] with probability task_prob.
  perm = rng.permutation(v)
  shifted = (1 - cfg.task_prob) * pretrain
  shifted[np.arange(v), perm] += cfg.task_prob
  return jnp.asarray(pretrain), jnp.asarray(shifted)


def _cross_entropy(logits, tokens):
  return optax.softmax_cross_entropy_with_integer_labels(
      logits[:, :-1], tokens[:, 1:]).mean()


def _pretrain(cfg: LMConfig, transition, seed: int, cache_dir: str):
  """Full-parameter Adam pretraining on the first language, cached as .npz."""
  tag = '_'.join(f'{k}{v}' for k, v in dataclasses.asdict(cfg).items()
                 if k not in ('rank', 'steps', 'task_prob'))
  path = os.path.join(cache_dir, f'pretrained_lm_{tag}_seed{seed}.npz')
  if os.path.exists(path):
    with np.load(path) as f:
      return {k: jnp.asarray(f[k]) for k in f.files}
  key = jax.random.key(seed + 1)
  shapes = _lm_shapes(cfg)
  base = {name: jax.random.normal(jax.random.fold_in(key, i), s) / np.sqrt(s[0])
          for i, (name, s) in enumerate(shapes.items())}
  base['embed'] = jax.random.normal(jax.random.fold_in(key, 1000),
                                    (cfg.vocab, cfg.dim))
  base['pos'] = 0.1 * jax.random.normal(jax.random.fold_in(key, 1001),
                                        (cfg.seq, cfg.dim))
  tx = optax.adam(optax.cosine_decay_schedule(3e-3, cfg.pretrain_steps))
  state = tx.init(base)

  def loss(params, k):
    tokens = _sample(transition, k, 4 * cfg.batch, cfg.seq)
    return _cross_entropy(_lm_forward(cfg, params, {}, tokens), tokens)

  @jax.jit
  def chunk(params, state, keys):
    def step(carry, k):
      params, state = carry
      value, grads = jax.value_and_grad(loss)(params, k)
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), value
    (params, state), values = jax.lax.scan(step, (params, state), keys)
    return params, state, values

  keys = jax.random.split(jax.random.fold_in(key, 2000), cfg.pretrain_steps)
  chunks = np.array_split(np.arange(cfg.pretrain_steps), 10)
  for idx in tqdm(chunks, desc='pretraining the base LM', leave=False):
    base, state, values = chunk(base, state, keys[idx])
  os.makedirs(cache_dir, exist_ok=True)
  np.savez(path, **{k: np.asarray(v) for k, v in base.items()})
  tqdm.write(f'pretrained LM: final train loss {float(values[-1]):.3f},'
             f' cached at {path}')
  return base


def shifted_lm(cfg: LMConfig, cache_dir: str, seed: int = 0) -> Problem:
  """LoRA fine-tuning of a pretrained LM on a shifted language.

  The base LM is pretrained here on one Markov language (cached in
  ``cache_dir``); LoRA adapters on q, v, o and both MLP matrices of every layer
  adapt it to a language where token ``i`` is followed by ``perm[i]`` with
  probability ``task_prob``. Metrics: held-out next-token cross-entropy
  (``'loss'``) and top-1 next-token accuracy (``'accuracy'``; the Bayes
  ceiling is about ``task_prob``).
  """
  pretrain_lang, task_lang = _languages(cfg, seed)
  base = _pretrain(cfg, pretrain_lang, seed, cache_dir)
  shapes = {k: s for k, s in _lm_shapes(cfg).items()
            if k.split('_')[1] in _LORA_TARGETS}
  eval_tokens = _sample(task_lang, jax.random.key(seed + 7), 512, cfg.seq)

  def loss(lora, key):
    tokens = _sample(task_lang, key, cfg.batch, cfg.seq)
    return _cross_entropy(_lm_forward(cfg, base, lora, tokens), tokens)

  def evaluate(lora):
    logits = _lm_forward(cfg, base, lora, eval_tokens)
    hits = jnp.argmax(logits[:, :-1], -1) == eval_tokens[:, 1:]
    return {'loss': _cross_entropy(logits, eval_tokens),
            'accuracy': hits.mean()}

  return Problem(
      name=f'shifted-language LM (d={cfg.dim}, {cfg.layers} layers, r={cfg.rank})',
      init_lora=lambda k: _lora_init(k, shapes, cfg.rank),
      loss=loss, evaluate=evaluate, steps=cfg.steps)
