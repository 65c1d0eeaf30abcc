"""Optimizer-step time of lora_rite vs optax.adam on mT5 LoRA adapter workloads.

    python -m benchmarks.step_time                 # every workload below
    python -m benchmarks.step_time --workloads xxl_attn_r16 --steps 20

Every workload but ``*_scanned`` has one leaf pair per adapter (unscanned
layers, as in T5X/flaxformer); ``*_scanned`` stacks the layers on a leading
axis (``nn.scan``/``nnx.scan``), the same adapters in a dozen leaves.

For each workload, both optimizers run in this process on the same params:
one jitted step (``tx.update`` + ``optax.apply_updates`` over the whole tree,
params and state donated), ``--warmup`` untimed steps, then the median (and
min/max) of ``--steps`` timed steps, each ending in ``block_until_ready``.
Reported: ms/step, the ratio to optax.adam, optimizer-state bytes, XLA's
temporary buffer bytes for the step (its peak working memory beyond the
arguments and outputs, ``memory_analysis()``), and the bytes the compiled step
reads and writes (``cost_analysis()["bytes accessed"]``, the cost that matters on
memory-bound accelerators) with their ratio to optax.adam's.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rite_optax


@dataclasses.dataclass(frozen=True)
class Workload:
  """LoRA adapters on the projections of an encoder-decoder T5/mT5 model."""

  d_model: int
  d_attn: int  # heads × head dim
  d_ff: int
  layers: int  # per stack (encoder and decoder)
  rank: int
  mlp: bool
  scanned: bool = False  # layers stacked on a leading axis (one leaf per projection)

  def layer_shapes(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(in, out) of the adapted projections of one encoder and one decoder layer."""
    attn = [(self.d_model, self.d_attn)] * 3 + [(self.d_attn, self.d_model)]  # q k v o
    mlp = [(self.d_model, self.d_ff)] * 2 + [(self.d_ff, self.d_model)]  # wi_0 wi_1 wo
    encoder = attn + (mlp if self.mlp else [])
    decoder = attn + attn + (mlp if self.mlp else [])  # self + cross attention
    return encoder, decoder

  def shapes(self) -> list[tuple[int, int]]:
    """(in, out) of every adapted projection."""
    encoder, decoder = self.layer_shapes()
    return encoder * self.layers + decoder * self.layers

  def pairing(self) -> rite_optax.Pairing:
    return rite_optax.nnx(batch_axes=(0,) if self.scanned else ())


@dataclasses.dataclass(frozen=True)
class Uniform:
  """``pairs`` adapters of one shape, ``lora_a (rows, rank)`` and ``lora_b (rank, rows)``:
  many small leaves, where compile time rather than bandwidth dominates."""

  pairs: int
  rows: int
  rank: int
  scanned: bool = False

  def shapes(self) -> list[tuple[int, int]]:
    return [(self.rows, self.rows)] * self.pairs

  def pairing(self) -> rite_optax.Pairing:
    return rite_optax.nnx()


MT5_XXL = dict(d_model=4096, d_attn=4096, d_ff=10240, layers=24)
MT5_BASE = dict(d_model=768, d_attn=768, d_ff=2048, layers=12)
WORKLOADS = {
    'xxl_attn_r4': Workload(**MT5_XXL, rank=4, mlp=False),
    'xxl_attn_r16': Workload(**MT5_XXL, rank=16, mlp=False),
    'xxl_attn_r64': Workload(**MT5_XXL, rank=64, mlp=False),
    'xxl_attn_mlp_r16': Workload(**MT5_XXL, rank=16, mlp=True),
    'base_attn_mlp_r16': Workload(**MT5_BASE, rank=16, mlp=True),
    'xxl_attn_r16_scanned': Workload(**MT5_XXL, rank=16, mlp=False, scanned=True),
    'pairs200_64x8': Uniform(pairs=200, rows=64, rank=8),
}


def make_params(workload: Workload | Uniform, seed: int = 0):
  """LoRA factors in the nnx layout, both non-zero (a mid-training state).

  One leaf pair per projection, or, for ``scanned`` workloads, one per
  projection of a layer with the layers stacked on a leading axis.
  """
  key = jax.random.PRNGKey(seed)
  if workload.scanned:
    encoder, decoder = workload.layer_shapes()
    shapes, batch = encoder + decoder, (workload.layers,)
  else:
    shapes, batch = workload.shapes(), ()
  params = {}
  for i, (d_in, d_out) in enumerate(shapes):
    ka, kb = jax.random.split(jax.random.fold_in(key, i))
    params[f'proj_{i:03d}'] = {
        'lora_a': jax.random.normal(ka, (*batch, d_in, workload.rank)) / np.sqrt(d_in),
        'lora_b': jax.random.normal(kb, (*batch, workload.rank, d_out)) * 1e-2,
    }
  return params


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def time_optimizer(tx, params, grads, warmup: int, steps: int) -> dict:
  """Median/min/max ms of one donated, jitted optimizer step."""
  state = tx.init(params)
  state_bytes = tree_bytes(state)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = jax.tree.map(jnp.copy, params)
  t0 = time.perf_counter()
  compiled = step.lower(params, state, grads).compile()
  compile_s = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  temp_bytes = getattr(memory, 'temp_size_in_bytes', 0) if memory is not None else 0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list on older jax
  accessed_bytes = (cost or {}).get('bytes accessed', float('nan'))
  for _ in range(warmup):
    params, state = compiled(params, state, grads)
  jax.block_until_ready((params, state))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    params, state = compiled(params, state, grads)
    jax.block_until_ready((params, state))
    times.append((time.perf_counter() - t0) * 1e3)
  return dict(median=statistics.median(times), min=min(times), max=max(times),
              state_bytes=state_bytes, temp_bytes=temp_bytes, accessed_bytes=accessed_bytes,
              compile_s=compile_s)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workloads', nargs='+', default=list(WORKLOADS), choices=list(WORKLOADS))
  parser.add_argument('--steps', type=int, default=10, help='timed steps (median reported)')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps after compiling')
  args = parser.parse_args(argv)

  print(f'# {platform.processor() or platform.machine()}, {jax.device_count()} x '
        f'{jax.devices()[0].device_kind}, jax {jax.__version__}, optax {optax.__version__}')
  print('| workload | pairs | optimizer | median ms | min ms | max ms | × adam | state MB |'
        ' XLA temp MB | bytes accessed MB | bytes × adam | compile s |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|')
  for name in args.workloads:
    workload = WORKLOADS[name]
    params = make_params(workload)
    grads = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params)
    adam = time_optimizer(optax.adam(1e-3), params, grads, args.warmup, args.steps)
    rite = time_optimizer(rite_optax.lora_rite(1e-3, pairing=workload.pairing()), params, grads,
                          args.warmup, args.steps)
    for label, r in (('optax.adam', adam), ('lora_rite', rite)):
      print(f'| {name} | {len(workload.shapes())} | {label} | {r["median"]:.1f} | {r["min"]:.1f} |'
            f' {r["max"]:.1f} | {r["median"] / adam["median"]:.2f} | {r["state_bytes"] / 2**20:.1f} |'
            f' {r["temp_bytes"] / 2**20:.1f} | {r["accessed_bytes"] / 2**20:.0f} |'
            f' {r["accessed_bytes"] / adam["accessed_bytes"]:.2f} | {r["compile_s"]:.1f} |',
            flush=True)


if __name__ == '__main__':
  main()
