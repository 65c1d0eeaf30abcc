"""The Gemma 3 270M comparison's cost rows and its report (see ``benchmarks/gemma_lora.py``).

- ``cost(out)``: compile time (lower + compile) of the whole jitted train step and the median
  wall time of interleaved steps, per optimizer, full vocabulary and the sweep's restricted
  softmax, batch 4 × 64; written to ``OUT/cost.json``.
- ``report(out)``: ``OUT/results.md``, ``OUT/results.json`` and the plots, from
  ``OUT/runs/*.json`` and ``OUT/cost.json``.
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np

from benchmarks import gemma_lora as gl

REPEATS = 7
LABELS = {'lora_rite': 'LoRA-RITE', 'adamw': 'optax.adamw', 'lora_plus': 'LoRA+ (ratio 16)'}


def _time_compile(trainer, args) -> float:
  start = time.perf_counter()
  trainer.step.lower(*args).compile()
  return time.perf_counter() - start


def cost(out: pathlib.Path) -> dict:
  """Compile and step time for every optimizer, both softmaxes, steps interleaved."""
  import jax

  ready = gl.setup()
  task = ready.tasks['pydoc']
  batch = task.train.tokens[:gl.BATCH], task.train.mask[:gl.BATCH]
  rows, steps = [], {}
  for softmax, vocab in (('full', None), ('restricted', ready.vocab)):
    tokens = batch[0] if vocab is None else np.searchsorted(vocab, batch[0]).astype(np.int32)
    for name in gl.OPTIMIZERS:
      trainer = gl.trainer(ready.model, name, vocab)
      _, lora = gl.init_lora(ready.base, 0)
      args = (lora, trainer.tx.init(lora), trainer.frozen, tokens, batch[1], np.float32(1e-4))
      rows.append({'optimizer': name, 'softmax': softmax,
                   'compile_s': _time_compile(trainer, args)})
      steps[name, softmax] = (trainer, list(args))
      jax.block_until_ready(trainer.step(*args))  # warm
    times = {key: [] for key in steps if key[1] == softmax}
    for _ in range(REPEATS):
      for key in times:
        trainer, args = steps[key]
        start = time.perf_counter()
        args[0], args[1], loss = trainer.step(*args)
        jax.block_until_ready(loss)
        times[key].append(time.perf_counter() - start)
    for row in rows:
      if row['softmax'] == softmax:
        row['step_s'] = float(np.median(times[row['optimizer'], softmax]))
    steps.clear()
  result = {'rows': rows, 'machine': gl.machine(), 'repeats': REPEATS,
            'batch': f'{gl.BATCH} x 64'}
  out.mkdir(parents=True, exist_ok=True)
  (out / 'cost.json').write_text(json.dumps(result, indent=1))
  print(json.dumps(result, indent=1))
  return result


def _mean_std(values) -> str:
  values = np.asarray(values, float)
  return f'{values.mean():.4f} ± {values.std(ddof=1) if len(values) > 1 else 0:.4f}'


def _value(record, metric) -> float:
  return record['final'][metric]


def _sweep_table(done, task, metric) -> list[str]:
  seed0 = [r for r in done.values() if r['run']['task'] == task and r['run']['seed'] == 0
           and r['run']['scale'] == 1.0]
  if not seed0:
    return ['(no run yet)']
  lrs = sorted({r['run']['lr'] for r in seed0})
  lines = [f'Before training (the base model): {seed0[0]["evals"][0][metric]:.4f}.', '',
           '| optimizer | ' + ' | '.join(f'{lr:g}' for lr in lrs) + ' |',
           '|---|' + '---:|' * len(lrs)]
  for name in gl.OPTIMIZERS:
    cells = []
    for lr in lrs:
      record = done.get(gl.Run(task, name, lr).name)
      cells.append('' if record is None else f'{_value(record, metric):.4f}')
    lines.append(f'| {LABELS[name]} | ' + ' | '.join(cells) + ' |')
  return lines


def _seeds_table(done, task, metric) -> tuple[list[str], dict]:
  lines = ['| optimizer | best LR | seeds | held-out loss | exact match |', '|---|---:|---:|---:|---:|']
  summary = {}
  for name in gl.OPTIMIZERS:
    lr = gl.best_lr(done, task, name, metric)
    if lr is None:
      continue
    records = [done[gl.Run(task, name, lr, seed).name] for seed in gl.SEEDS
               if gl.Run(task, name, lr, seed).name in done]
    losses = [_value(r, 'loss') for r in records]
    matches = [_value(r, 'exact_match') for r in records]
    summary[name] = {'lr': lr, 'seeds': len(records), 'loss': losses, 'exact_match': matches}
    match = _mean_std(matches) if task == 'names' else '–'
    lines.append(f'| {LABELS[name]} | {lr:g} | {len(records)} | {_mean_std(losses)} | {match} |')
  return lines, summary


def _invariance_table(done) -> list[str]:
  lines = ['| optimizer | LR | s = 0.1 | s = 1 | s = 10 | max change |', '|---|---:|---:|---:|---:|---:|']
  for name in ('lora_rite', 'adamw'):
    lr = gl.best_lr(done, 'pydoc', name, 'loss')
    if lr is None:
      continue
    runs = [done.get(gl.Run('pydoc', name, lr, 0, s).name) for s in (0.1, 1.0, 10.0)]
    if not all(runs):
      continue
    losses = [_value(r, 'loss') for r in runs]
    lines.append(f'| {LABELS[name]} | {lr:g} | ' + ' | '.join(f'{x:.4f}' for x in losses)
                 + f' | {max(abs(x - losses[1]) for x in losses):.1e} |')
  return lines


def _plots(done, out: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for ax, task, metric in ((axes[0], 'pydoc', 'loss'), (axes[1], 'names', 'exact_match')):
    for name in gl.OPTIMIZERS:
      points = sorted((r['run']['lr'], _value(r, metric)) for r in done.values()
                      if r['run']['task'] == task and r['run']['optimizer'] == name
                      and r['run']['seed'] == 0 and r['run']['scale'] == 1.0)
      if points:
        ax.plot(*zip(*points, strict=True), 'o-', label=LABELS[name])
    ax.set(xscale='log', xlabel='peak learning rate', ylabel=f'held-out {metric}',
           title=f'{task}: seed 0, {gl.STEPS} steps')
    if ax.lines:
      ax.legend()
  for name in gl.OPTIMIZERS:
    lr = gl.best_lr(done, 'pydoc', name, 'loss')
    record = lr and done.get(gl.Run('pydoc', name, lr).name)
    if record:
      axes[2].plot(record['train_loss'], label=f'{LABELS[name]} (lr {lr:g})', alpha=0.8)
  axes[2].set(xlabel='step', ylabel='train loss (restricted softmax)', title='pydoc, best LR')
  if axes[2].lines:
    axes[2].legend()
  fig.tight_layout()
  fig.savefig(out / 'gemma_lora.png', dpi=90)
  plt.close(fig)


def report(out: pathlib.Path) -> str:
  """Writes OUT/results.md, OUT/results.json and OUT/gemma_lora.png; returns the markdown."""
  done = gl.load_runs(out)
  cost_path = out / 'cost.json'
  costs = json.loads(cost_path.read_text()) if cost_path.exists() else None
  pending = [r.name for r in gl.plan(done) if r.name not in done]
  pydoc_seeds, pydoc_summary = _seeds_table(done, 'pydoc', 'loss')
  names_seeds, names_summary = _seeds_table(done, 'names', 'exact_match')
  machine = next(iter(done.values()))['machine'] if done else ''
  lines = [
      '# Gemma 3 270M, LoRA r=16 on attention + MLP: LoRA-RITE vs AdamW vs LoRA+', '',
      f'Reproduce: `python -m benchmarks.gemma_lora sweep --out {out}` (resumable), then '
      f'`... cost` and `... report`. Machine: {machine}. {len(done)} runs, '
      f'{sum(r["wall_s"] for r in done.values()) / 60:.0f} min of sweep wall time; '
      f'{len(pending)} runs of the plan not done yet.', '',
      f'Every run: {gl.STEPS} steps, batch {gl.BATCH} × 64 tokens, warmup {gl.WARMUP} steps '
      'then cosine to 10%, the same adapter init per seed. **Training used a softmax '
      'restricted to the 6k token ids of the two tasks; every number below is held-out and '
      'over the full 262k vocabulary.**', '',
      '## pydoc: held-out loss (nats/token) by peak learning rate, seed 0', '',
      *_sweep_table(done, 'pydoc', 'loss'), '', '### at each optimizer\'s best LR', '',
      *pydoc_seeds, '',
      '## names: held-out exact match by peak learning rate, seed 0', '',
      *_sweep_table(done, 'names', 'exact_match'), '', '### at each optimizer\'s best LR', '',
      *names_seeds, '',
      '## Invariance: pydoc from (s·A, B/s), held-out loss', '', *_invariance_table(done), '',
  ]
  if costs:
    lines += ['## Cost of a whole train step', '', f'{costs["machine"]}; batch {costs["batch"]}, '
              f'median of {costs["repeats"]} interleaved steps.', '',
              '| optimizer | softmax | compile (s) | step (s) |', '|---|---|---:|---:|']
    lines += [f'| {LABELS[r["optimizer"]]} | {r["softmax"]} | {r["compile_s"]:.1f} | '
              f'{r["step_s"]:.2f} |' for r in costs['rows']]
  text = '\n'.join(lines) + '\n'
  (out / 'results.md').write_text(text)
  (out / 'results.json').write_text(json.dumps(
      {'pydoc': pydoc_summary, 'names': names_summary, 'cost': costs, 'pending': pending},
      indent=1))
  if done:
    _plots(done, out)
  return text
