"""LoRA-RITE vs Adam, AdamW, LAMB, LoRA+ and Riemannian Adam on CPU, no downloads.

For every problem and optimizer: a log-grid learning-rate sweep over several
seeds (best LR = lowest mean held-out loss), then, on the teacher problem, the
invariance check: rerun at the best LR with ``lora_a·s``, ``lora_b/s`` for
``s`` in 1e-2…1e2 and with a random r×r rotation ``(a R, Rᵀ b)``; the
product ``a @ b`` is the same in every run.

Usage::

  python -m benchmarks.compare --out out/compare          # full run (docs/evidence.md)
  python -m benchmarks.compare --quick --out /tmp/compare  # smoke test

Writes ``results.md``, ``results.json`` and PNG plots to ``--out``; the
pretrained LM is cached there too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import matplotlib
import numpy as np
import optax
from tqdm import tqdm

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

import rite_optax
from benchmarks import _problems

OPTIMIZERS = {
    'lora_rite': lambda lr: rite_optax.lora_rite(lr),
    'adam': optax.adam,
    'adamw': lambda lr: optax.adamw(lr, weight_decay=1e-4),
    'lamb': optax.lamb,
    'lora_plus': lambda lr: rite_optax.lora_plus(lr, ratio=16.0),
    'riemannian_adam': rite_optax.riemannian_adam,
}

FULL = dict(
    lrs=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1), seeds=3,
    scales=(1e-2, 1e-1, 1.0, 1e1, 1e2),
    teacher=dict(widths=(64, 96, 128, 96, 32), rank=4, teacher_rank=4,
                 batch=128, steps=400),
    # 100 steps: long enough to learn the task, short enough to tell optimizers
    # apart (at 200 steps every Adam-like optimizer reaches the Bayes limit).
    lm=_problems.LMConfig(steps=100),
)
QUICK = dict(
    lrs=(1e-3, 1e-2, 1e-1), seeds=2, scales=(1e-1, 1.0, 1e1),
    teacher=dict(widths=(16, 24, 8), rank=2, teacher_rank=2, batch=32,
                 steps=30),
    lm=_problems.LMConfig(vocab=12, seq=8, dim=16, layers=1, heads=2, batch=8,
                          pretrain_steps=40, rank=2, steps=20),
)


def _transform(lora, scale, rotation):
  """``a → s·a R``, ``b → Rᵀ b / s``: the same ``a @ b``."""
  return {name: {'lora_a': scale * pair['lora_a'] @ rotation,
                 'lora_b': rotation.T @ pair['lora_b'] / scale}
          for name, pair in lora.items()}


def make_runner(problem: _problems.Problem, make_tx):
  """Jitted ``(lr[n], seed[n], scale[n], rotation[n]) -> (train losses, metrics)``."""

  def train(lr, seed, scale, rotation):
    key = jax.random.key(seed)
    params = _transform(problem.init_lora(key), scale, rotation)
    tx = make_tx(lr)
    state = tx.init(params)

    def step(carry, k):
      params, state = carry
      loss, grads = jax.value_and_grad(problem.loss)(params, k)
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), loss

    keys = jax.random.split(jax.random.fold_in(key, 1), problem.steps)
    (params, _), losses = jax.lax.scan(step, (params, state), keys)
    return losses, problem.evaluate(params)

  return jax.jit(jax.vmap(train))


def _finite(x):
  return np.where(np.isfinite(x), x, np.inf)


def _call(runner, width, *args):
  """Runs a batch of ``n <= width`` runs padded to ``width`` (no recompilation)."""
  n = len(args[0])
  padded = [np.concatenate([a, np.repeat(a[:1], width - n, 0)]) for a in args]
  return jax.tree.map(lambda x: np.asarray(x)[:n], runner(*padded))


def run_problem(problem, cfg, optimizers, invariance, progress):
  """LR sweep (and optionally the invariance runs) for every optimizer."""
  lrs, seeds = np.asarray(cfg['lrs'], np.float32), np.arange(cfg['seeds'])
  rank = jax.tree.leaves(problem.init_lora(jax.random.key(0)))[0].shape[-1]
  eye = np.eye(rank, dtype=np.float32)
  # Sweep and invariance runs share one batch width, hence one compilation.
  width = max(len(lrs), len(cfg['scales']) + 1) * len(seeds)
  results = {}
  for name in optimizers:
    make_tx = OPTIMIZERS[name]
    progress.set_postfix_str(f'{problem.name[:24]}: {name}')
    runner = make_runner(problem, make_tx)
    grid_lr, grid_seed = (a.ravel() for a in np.meshgrid(lrs, seeds,
                                                          indexing='ij'))
    n = grid_lr.size
    losses, metrics = _call(runner, width, grid_lr, grid_seed,
                            np.ones(n, np.float32),
                            np.broadcast_to(eye, (n, rank, rank)))
    metrics = {k: np.asarray(v).reshape(len(lrs), len(seeds))
               for k, v in metrics.items()}
    final = _finite(metrics['loss'])
    best = int(np.argmin(final.mean(1)))
    entry = {
        'lrs': lrs.tolist(),
        'final_loss': metrics['loss'].tolist(),
        'best_lr': float(lrs[best]),
        'best_loss_mean': float(final[best].mean()),
        'best_loss_std': float(final[best].std()),
        'curve': np.asarray(losses).reshape(len(lrs), len(seeds), -1)[best]
                 .mean(0).tolist(),
    }
    if 'accuracy' in metrics:
      entry['best_accuracy_mean'] = float(metrics['accuracy'][best].mean())
      entry['best_accuracy_std'] = float(metrics['accuracy'][best].std())
    progress.update()
    if invariance:
      scales = np.asarray(cfg['scales'], np.float32)
      rotation = np.linalg.qr(
          np.random.default_rng(123).normal(size=(rank, rank)))[0]
      rotation = rotation.astype(np.float32)
      inv_scale = np.concatenate([np.repeat(scales, len(seeds)),
                                  np.ones(len(seeds), np.float32)])
      inv_seed = np.concatenate([np.tile(seeds, len(scales)), seeds])
      inv_rot = np.concatenate([
          np.broadcast_to(eye, (len(scales) * len(seeds), rank, rank)),
          np.broadcast_to(rotation, (len(seeds), rank, rank))])
      _, inv_metrics = _call(
          runner, width, np.full(inv_seed.size, lrs[best], np.float32),
          inv_seed, inv_scale, inv_rot)
      inv_loss = np.asarray(inv_metrics['loss'])
      by_scale = inv_loss[:-len(seeds)].reshape(len(scales), len(seeds))
      rotated = inv_loss[-len(seeds):]
      unit = by_scale[list(scales).index(1.0)]
      entry['invariance'] = {
          'scales': scales.tolist(),
          'loss_by_scale': by_scale.tolist(),
          'loss_rotated': rotated.tolist(),
          # Spread over s: max/min of the seed-mean final loss, as a log10 range.
          'scale_spread_log10': float(np.log10(
              _finite(by_scale.mean(1)).max() / by_scale.mean(1).min())),
          'rotation_max_rel_diff': float(np.max(np.abs(rotated - unit) / unit)),
      }
      progress.update()
    results[name] = entry
  return results


def _format_table(all_results):
  lines = ['| problem | optimizer | best LR | final held-out loss | accuracy |',
           '|---|---|---|---|---|']
  for problem, results in all_results.items():
    for name, r in results.items():
      acc = (f"{r['best_accuracy_mean']:.4f} ± {r['best_accuracy_std']:.4f}"
             if 'best_accuracy_mean' in r else '')
      lines.append(f"| {problem} | {name} | {r['best_lr']:g} |"
                   f" {r['best_loss_mean']:.4g} ± {r['best_loss_std']:.2g} |"
                   f" {acc} |")
  return '\n'.join(lines)


def _format_invariance(results):
  scales = next(iter(results.values()))['invariance']['scales']
  head = ' | '.join(f's={s:g}' for s in scales)
  lines = [f'| optimizer | {head} | rotated | spread over s (log10 max/min)'
           ' | rotation max rel. diff |',
           '|---|' + '---|' * (len(scales) + 3)]
  for name, r in results.items():
    inv = r['invariance']
    cells = ' | '.join(f'{np.mean(v):.4g}' for v in inv['loss_by_scale'])
    lines.append(f"| {name} | {cells} | {np.mean(inv['loss_rotated']):.4g} |"
                 f" {inv['scale_spread_log10']:.3g} |"
                 f" {inv['rotation_max_rel_diff']:.2g} |")
  return '\n'.join(lines)


def _plots(all_results, invariance_problem, out):
  fig, axes = plt.subplots(1, len(all_results), figsize=(5.5 * len(all_results), 4))
  for ax, (problem, results) in zip(np.atleast_1d(axes), all_results.items(), strict=True):
    for name, r in results.items():
      ax.plot(r['lrs'], np.mean(_finite(np.asarray(r['final_loss'])), 1),
              marker='o', label=name)
    ax.set(xscale='log', yscale='log', xlabel='learning rate',
           ylabel='final held-out loss (seed mean)', title=problem)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'lr_sweep.png'), dpi=80)
  plt.close(fig)

  fig, axes = plt.subplots(1, len(all_results), figsize=(5.5 * len(all_results), 4))
  for ax, (problem, results) in zip(np.atleast_1d(axes), all_results.items(), strict=True):
    for name, r in results.items():
      ax.plot(r['curve'], label=f"{name} (lr={r['best_lr']:g})")
    ax.set(yscale='log', xlabel='step', ylabel='train loss (seed mean)',
           title=problem)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'curves.png'), dpi=80)
  plt.close(fig)

  results = all_results[invariance_problem]
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, r in results.items():
    inv = r['invariance']
    ax.plot(inv['scales'], np.mean(inv['loss_by_scale'], 1), marker='o',
            label=name)
  ax.set(xscale='log', yscale='log', xlabel='s (lora_a·s, lora_b/s)',
         ylabel='final held-out loss at best LR',
         title=f'Invariance: {invariance_problem}')
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'invariance.png'), dpi=80)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='out/compare', help='output directory')
  parser.add_argument('--quick', action='store_true',
                      help='tiny problems and grids (a smoke test, ~1 minute)')
  parser.add_argument('--optimizers', default=','.join(OPTIMIZERS),
                      help=f'comma-separated subset of {list(OPTIMIZERS)}')
  args = parser.parse_args(argv)
  optimizers = args.optimizers.split(',')
  unknown = sorted(set(optimizers) - set(OPTIMIZERS))
  if unknown:
    parser.error(f'unknown optimizers {unknown}; choose from {list(OPTIMIZERS)}')
  cfg = QUICK if args.quick else FULL
  os.makedirs(args.out, exist_ok=True)
  start = time.time()
  problems = [
      (_problems.teacher_mlp(**cfg['teacher']), True),
      (_problems.shifted_lm(cfg['lm'], cache_dir=args.out), False),
  ]
  total = sum((2 if inv else 1) * len(optimizers) for _, inv in problems)
  all_results = {}
  with tqdm(total=total, desc='runs') as progress:
    for problem, invariance in problems:
      all_results[problem.name] = run_problem(problem, cfg, optimizers,
                                              invariance, progress)
  wall = time.time() - start
  machine = (f'{platform.processor() or platform.machine()},'
             f' {os.cpu_count()} CPU cores, jax {jax.__version__},'
             f' optax {optax.__version__}')
  command = ' '.join(['python -m benchmarks.compare', *(argv or sys.argv[1:])])
  lr_grid = ', '.join(f'{lr:g}' for lr in cfg['lrs'])
  report = '\n\n'.join([
      f'Command: `{command}` ({wall / 60:.1f} min on {machine}).',
      f"Learning-rate grid: {lr_grid}; {cfg['seeds']} seeds; best LR ="
      ' lowest seed-mean held-out loss; mean ± std over seeds at the best LR.',
      _format_table(all_results),
      f'Invariance ({problems[0][0].name}, best LR, seed mean of the final'
      ' held-out loss):',
      _format_invariance(all_results[problems[0][0].name]),
  ])
  with open(os.path.join(args.out, 'results.md'), 'w') as f:
    f.write(report + '\n')
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump({'command': command, 'wall_s': wall, 'machine': machine,
               'results': all_results}, f)
  _plots(all_results, problems[0][0].name, args.out)
  print(report)
  return all_results


if __name__ == '__main__':
  main()
