"""Multi-controller JAX: every process must derive the same pair plan.

On a TPU pod slice or a multi-node GPU job each host runs its own Python process,
and each traces the step from its own param tree and pairing. If one host's tree
differs (a config drift: one more adapter, another rank, another pairing), the
processes trace different programs and JAX hangs in the first collective, or
fails far from the cause. :func:`check_same_plan` compares, at ``init``, every
leaf's path, role, shape and dtype across processes, and raises on every
process, naming the first leaf that differs.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax

from rite_optax import pairing as pairing_lib


def plan(tree: Any, paired: pairing_lib.PairedTree) -> list[str]:
  """One line per flattened leaf: its path, role in the pairing, shape and dtype."""
  roles = {v.index: role for p in paired.pairs for role, v in (('a', p.a), ('b', p.b))}
  leaves = jax.tree_util.tree_leaves(tree)
  return [f'{path} {roles.get(i, "unpaired")} {tuple(getattr(leaf, "shape", ()))}'
          f' {getattr(leaf, "dtype", type(leaf).__name__)}'
          for i, (path, leaf) in enumerate(zip(paired.paths, leaves, strict=True))]


_calls = itertools.count()
TIMEOUT_S = 60


def _client():
  """The distributed runtime's key-value store (as Orbax and MaxText use it), or None
  without ``jax.distributed.initialize``."""
  from jax._src import distributed  # noqa: PLC0415

  return distributed.global_state.client


def check_same_plan(tree: Any, paired: pairing_lib.PairedTree,
                    pairing: pairing_lib.Pairing) -> None:
  """Raises ``ValueError`` on every process unless all derived the same plan.

  A no-op with one process. Each process publishes its plan in the distributed
  runtime's key-value store and reads every other's: host data only, so it works
  while ``init`` is traced (``jax.jit(tx.init)``, ``jax.eval_shape``), and a
  process that never publishes is reported after :data:`TIMEOUT_S` seconds
  instead of hanging. Calls are matched by their order on each process, as
  every SPMD program initialises its optimizers in the same order.
  """
  if jax.process_count() == 1 or (client := _client()) is None:
    return
  call = next(_calls)
  lines = [f'pairing {pairing.name!r}'] + plan(tree, paired)
  me = jax.process_index()
  client.key_value_set(f'rite_optax/plan/{call}/{me}', '\n'.join(lines))
  for other in range(jax.process_count()):
    if other == me:
      continue
    try:
      theirs = client.blocking_key_value_get(f'rite_optax/plan/{call}/{other}',
                                             TIMEOUT_S * 1000).split('\n')
    except Exception as e:  # the runtime raises its own error types
      raise ValueError(
          f'process {other} did not publish its LoRA pair plan within {TIMEOUT_S} s of'
          f' process {me}: every process must initialise the same optimizers in the same'
          ' order.') from e
    if theirs != lines:
      raise _mismatch(me, other, lines, theirs)


def _mismatch(me: int, other: int, lines: list[str], theirs: list[str]) -> ValueError:
  index = next(i for i, (a, b) in enumerate(zip(lines + [''], theirs + [''], strict=False))
               if a != b)
  show = lambda xs: xs[index] if index < len(xs) else '<no such leaf>'
  return ValueError(
      f'process {me} and process {other} derived different LoRA pair plans'
      f' ({len(lines) - 1} vs {len(theirs) - 1} leaves); they first differ at entry'
      f' {index}: here {show(lines)}, there {show(theirs)}. Every process must build'
      ' the same param tree and pairing: otherwise they trace different programs and'
      ' hang in a collective.')
