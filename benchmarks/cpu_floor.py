"""How fast a LoRA-RITE step could be on this CPU, next to optax.adam's step.

    python -m benchmarks.cpu_floor                        # xxl_attn_r16
    python -m benchmarks.cpu_floor --workload xxl_attn_mlp_r16

Measured in one process, on one workload of benchmarks/step_time.py:

- optax.adam's step, timed as step_time.py times it;
- the float32 matmul peak of this machine (a 2048² XLA dot at HIGHEST precision);
- the thin arithmetic of a step at that peak. Per factor (rows × r) and step,
  rite_optax forms 9 products of a factor-sized array with an r×r matrix (the
  Gram matrices of X, ∇X and U₁, U₁ = X R₁⁺, U = U₁Y, the transport, ∇X·K, M·Pᵀ
  and M·R), 2r flop per factor element each: 18·r flop per element;
- the r×r eigendecompositions of a step (two per factor: Gram and second moment),
  run as rite_optax runs them on CPU;
- if ``c++`` with OpenMP is found, the same 9 products hand-fused into three
  passes per factor (benchmarks/fused_passes.cc, built with ``-O3 -march=native``):
  the step's factor-sized work with the least memory traffic (10 factor-sized
  reads and writes where Adam has 7). It treats every factor as row-major.

The floor is the arithmetic at peak plus the eigendecompositions: a step cannot
be faster on this machine without a cheaper algorithm.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import optax

from benchmarks import step_time
from rite_optax import steering

PRODUCTS_PER_FACTOR = 9
FUSED_SOURCE = pathlib.Path(__file__).with_name('fused_passes.cc')


def best_ms(fn, *args, reps: int) -> float:
  """Fastest of ``reps`` timed calls, after one untimed call (compiles)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return min(times)


def matmul_peak_flops(size: int = 2048, reps: int = 10) -> float:
  """float32 flop/s of XLA's best case: a large square matmul."""
  a = jnp.ones((size, size), jnp.float32)
  dot = jax.jit(lambda a: jnp.dot(a, a, precision=jax.lax.Precision.HIGHEST))
  return 2 * size**3 / (best_ms(dot, a, reps=reps) / 1e3)


def eigh_ms(factors: int, rank: int, reps: int) -> float:
  """One step's r×r eigendecompositions: a Gram and a second moment per factor."""
  a = jax.random.normal(jax.random.key(0), (factors, rank, rank), jnp.float32)
  batch = a @ jnp.swapaxes(a, -1, -2)  # symmetric positive definite, like Grams and V
  eigh = jax.jit(lambda b: steering.eigh_each([b]))
  return 2 * best_ms(eigh, batch, reps=reps)


def build_fused(rank: int, directory: str) -> tuple[pathlib.Path | None, str]:
  """Compiles fused_passes.cc for ``rank``: ``(binary, '')`` or ``(None, why not)``."""
  compiler = shutil.which(os.environ.get('CXX', 'c++'))
  if compiler is None:
    return None, 'no C++ compiler (set CXX)'
  binary = pathlib.Path(directory) / f'fused_passes_r{rank}'
  built = subprocess.run([compiler, '-O3', '-march=native', '-fopenmp', f'-DRANK={rank}',
                          str(FUSED_SOURCE), '-o', str(binary)], capture_output=True, text=True)
  if built.returncode != 0:
    return None, f'{compiler} failed: {built.stderr.strip()[-500:]}'
  return binary, ''


def fused_pass_times(binary: pathlib.Path, rows: list[int], reps: int) -> dict[str, list[float]]:
  """Per-pass times (ms) of ``reps`` repetitions over factors of the given row counts."""
  groups = [f'{n}:{count}' for n, count in collections.Counter(rows).items()]
  out = subprocess.run([str(binary), 'bench', str(reps), *groups],
                       check=True, capture_output=True, text=True).stdout
  return json.loads(out)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workload', default='xxl_attn_r16', choices=list(step_time.WORKLOADS))
  parser.add_argument('--steps', type=int, default=10, help='timed repetitions (median; the fastest for the matmul peak and eigh)')
  args = parser.parse_args(argv)

  workload = step_time.WORKLOADS[args.workload]
  rank = workload.rank
  rows = [n for shape in workload.shapes() for n in shape]  # lora_a (in, r), lora_b (r, out)
  elements = sum(rows) * rank

  params = step_time.make_params(workload)
  grads = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params)
  adam = step_time.time_optimizer(optax.adam(1e-3), params, grads, warmup=2, steps=args.steps)
  del params, grads
  peak = matmul_peak_flops()
  arithmetic_ms = PRODUCTS_PER_FACTOR * 2 * rank * elements / peak * 1e3
  eigh = eigh_ms(len(rows), rank, args.steps)

  table = [('optax.adam step (median)', adam['median']),
           (f'thin arithmetic of a step at the matmul peak ({PRODUCTS_PER_FACTOR * 2 * rank} '
            f'flop × {elements / 1e6:.1f} M elements at {peak / 1e9:.0f} Gflop/s)', arithmetic_ms),
           (f'r×r eigh of a step, as run on CPU ({2 * len(rows)} matrices {rank}×{rank})', eigh),
           ('floor: arithmetic at peak + eigh', arithmetic_ms + eigh)]
  with tempfile.TemporaryDirectory() as directory:
    binary, why_not = build_fused(rank, directory)
    if binary is None:
      print(f'fused C++ passes not measured: {why_not}')
    else:
      passes = fused_pass_times(binary, rows, args.steps)
      medians = [statistics.median(passes[f'pass{i}']) for i in (1, 2, 3)]
      table += [(f'fused C++ pass {i} (median, {passes["threads"]} threads)', ms)
                for i, ms in enumerate(medians, 1)]
      table.append(('fused C++ passes + eigh', sum(medians) + eigh))

  print(f'# {args.workload}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
        f'jax {jax.__version__}, optax {optax.__version__}')
  print('| | ms | × adam |\n|---|---|---|')
  for label, ms in table:
    print(f'| {label} | {ms:.1f} | {ms / adam["median"]:.2f} |')


if __name__ == '__main__':
  main()
