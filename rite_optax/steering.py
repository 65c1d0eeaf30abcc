"""How the step is steered through XLA: every choice that changes the program, not the math.

:mod:`.core` is the math of one side of a group of adapters and knows nothing of
XLA; :mod:`.engine` runs it over a param tree and takes each of the decisions
below from here. Each exists because XLA, left to itself, emits a step that moves
more bytes, holds more temporaries, compiles longer or deadlocks; each has a test
in ``tests/test_engine.py`` that fails without it, and its measurements are in
``benchmarks/results/steering.md``.

- **sizes** (:data:`GROUP_PAIRS`, :data:`STACK_BELOW`): how many adapters share
  one stack of r×r statistics, and which factors are small enough to concatenate;
- **ordering by data** (:func:`after`, :func:`link`, :func:`in_order`,
  :func:`product_gram`): one piece's factor-sized products are consumed before
  the next piece's are formed, so that XLA's temporaries stay about one factor;
- **in-place writes** (:func:`gated`, :func:`corners`, :func:`links`): data
  dependencies that let the new bases and the params overwrite their donated
  buffers instead of copying them;
- **branches instead of selects** (:func:`branch`, :func:`gradients_finite`):
  factor-sized work that runs only when it is needed;
- **eigh batching and ordering** (:func:`eigh_each`): one batched call per rank,
  one call at a time, and a sequential loop on CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from rite_optax.core import Eigh
from rite_optax.thin import Thin, stack, symmetric, unstack

GROUP_PAIRS = 16
"""The most adapters in one group. A group's r×r statistics are stacked and each
factor reads its own slice of each stack; XLA's cost model counts such a slice as
a read of the whole stack and fuses the r×r algebra into the factor's own kernels,
so both the counted bytes and the program would grow with group² beyond a few
dozen adapters. The eighs of all groups still run as one batched call per rank."""

STACK_BELOW = 1 << 12
"""Factors with fewer elements than this (per adapter) are concatenated into one
piece per side: for tiny factors a copy costs less than a kernel of its own; for
larger ones the copies cost more than the kernels they save."""


def after(x: jax.Array, link_: jax.Array) -> jax.Array:
  """``x``, unchanged, made to depend on the scalar ``link_``: XLA computes ``x``
  (and what uses it) only once ``link_`` exists. This orders work by data, the
  only order XLA's CPU scheduler keeps (it drops ``optimization_barrier``s).
  ``0·link`` is 0, or NaN for a non-finite link, and the select makes that 0 too."""
  zero = jax.lax.mul(jnp.asarray(link_, x.dtype), jnp.zeros((), x.dtype))
  return jax.lax.add(x, jax.lax.select(jax.lax.ne(zero, zero), jnp.zeros((), x.dtype), zero))


def link(x: Thin) -> jax.Array:
  """A scalar that exists once the first piece of ``x`` does: the sum of its first
  column over its adapters. Not a corner: a mesh shards the rows and the adapters,
  and a corner of a sharded array is read by gathering or masking it; a column sum
  is a scalar all-reduce. (XLA's cost model counts the column as a read of the
  whole piece.)"""
  p = x.pieces[0]
  return jnp.sum(p[:, 0, :] if x.rank_major else p[:, :, 0])


def product_gram(x: Thin, small: jax.Array) -> jax.Array:
  """(X S)ᵀ (X S) per adapter, stacked, for a stacked ``(B, r, s)`` S, with each
  X S formed, reduced and freed before the next piece's is formed. Left to itself,
  XLA's scheduler forms every X S first and holds them all: temp the size of the
  params."""
  grams, previous = [], None
  for piece, s in zip(x.pieces, x.split(small), strict=True):
    u = Thin((piece,), x.rank_major).times(s if previous is None else after(s, previous[0, 0, 0]))
    grams.append(previous := u.cross(u)[0])
  return symmetric(stack(grams))


def in_order(p: jax.Array, partner_r_pinv: jax.Array, k: jax.Array,
             previous: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A piece's r×r operands of steps 9–11 (P, R_B⁺, K), unchanged, made to depend on
  ``previous``, the previous piece's :func:`link` of Δ (None for the first piece).

  Left to itself, XLA's scheduler forms every piece's factor-sized products
  (∇X K, M Pᵀ, M R⁺ᵀ) before it consumes any, and holds them all at once: XLA
  temp the size of the params. Chained, about one piece's products are alive at
  a time. K carries the link and P and R_B⁺ take it from K, through a sum over
  the adapters (a slice of one adapter of a batch-sharded stack would be a
  cross-device read).
  """
  if previous is None:
    return p, partner_r_pinv, k
  k = after(k, previous)
  k_link = jnp.sum(k[:, 0, 0])
  return after(p, k_link), after(partner_r_pinv, k_link), k


def gated(flag: jax.Array, links_: list[jax.Array]) -> jax.Array:
  """``flag`` per adapter, ``(B,)``, made to depend on each piece's ``(batch_i,)``
  links (finite for finite state), so that the work that produced them runs
  before the work the flag gates.

  XLA overwrites a donated input in place only if it can prove, from data
  dependencies alone (an ``optimization_barrier`` is not enough), that every
  other read of it comes first; otherwise it copies the input, one more
  factor-sized write and read per factor. U_prev is read by the transport
  ``P = R⁺ᵀ (Xᵀ U_prev)`` before the branch that overwrites it with U: the
  branch's predicate depends on a corner of every piece's P (:func:`corners`).
  X is read by that branch before the params are updated: the gradient scale,
  and through it every update, depends on a link of every new basis
  (:func:`links`). One link per piece, never one sum over the stack: a scalar
  that every piece reads is fused into each piece's kernel, and the program
  would grow with pieces².
  """
  return flag & jnp.isfinite(stack(links_))


def corners(small: list[jax.Array]) -> list[jax.Array]:
  """Each r×r piece's first entry, one per adapter."""
  return [x[:, 0, 0] for x in small]


def links(x: Thin) -> list[jax.Array]:
  """Each piece's :func:`link`, broadcast to one per adapter."""
  return [jnp.broadcast_to(link(Thin((p,), x.rank_major)), p.shape[:1]) for p in x.pieces]


def branch(applied: jax.Array, new: Callable[[], Thin], kept: Thin) -> Thin:
  """``new()`` where ``applied``, else ``kept``, as a branch, not a select: a select
  would read both and write the result (three factor-sized passes after forming
  the new value); the branch forms it straight into the stored buffer, or leaves
  the old one untouched."""
  pieces = jax.lax.cond(applied, lambda: new().pieces, lambda: kept.pieces)
  return Thin(tuple(pieces), kept.rank_major)


def all_finite(smalls: list[jax.Array]) -> jax.Array:
  """Whether every entry of the arrays is finite: each array's largest magnitude (NaN
  propagates through the max), one check over all of them."""
  return jnp.all(jnp.isfinite(jnp.stack([jnp.max(jnp.abs(x)) for x in smalls])))


def gradients_finite(grad_grams: list[jax.Array], grads: list[jax.Array]) -> jax.Array:
  """Whether every factor gradient is finite, read off the r×r Grams ∇Xᵀ∇X.

  A non-finite entry of ∇X makes a diagonal entry of its Gram non-finite, so finite
  Grams prove finite gradients; but a huge finite gradient (above ~1e19 in
  float32) overflows its Gram too. Only then, in a branch not taken otherwise,
  are the gradients themselves read, as they were passed in (a view in the
  compute layout would be a copy made whether or not the branch runs), each
  reduced to its largest magnitude: an elementwise ``isfinite`` there costs a
  predicate buffer per factor in XLA's temp.
  """
  return jax.lax.cond(all_finite(grad_grams), lambda: jnp.array(True),
                      lambda: all_finite(grads))


def _eigh(batch: jax.Array) -> Eigh:
  """A batched symmetric eigh that cannot deadlock jaxlib's CPU thread pool.

  On CPU, jaxlib (0.10) runs a batched eigh as LAPACK calls spread over the
  intra-op thread pool and blocks until they finish; two such calls at once
  (two calls in one program, or one per simulated device of a mesh) can leave
  every pool thread waiting. On CPU the matrices are therefore decomposed one
  after another in a loop (``lax.map``), each call inline; elsewhere (GPU, TPU)
  in one batched call.
  """
  return Eigh(*jax.lax.platform_dependent(
      batch, cpu=lambda b: jax.lax.map(jnp.linalg.eigh, b), default=jnp.linalg.eigh))


def eigh_each(matrices: list[jax.Array]) -> list[Eigh]:
  """Symmetric eigendecompositions of many ``(batch, r, r)`` stacks, in input order.

  Stacks of equal r are concatenated into one call (:func:`_eigh`), and the
  calls for different r are chained by a data dependency
  (``optimization_barrier``), so a step never runs two eigh calls at once.
  """
  by_rank: dict[int, list[int]] = {}
  for i, m in enumerate(matrices):
    by_rank.setdefault(m.shape[-1], []).append(i)
  results: dict[int, Eigh] = {}
  previous = None
  for indices in by_rank.values():
    batch = stack([matrices[i] for i in indices])
    if previous is not None:
      batch, _ = jax.lax.optimization_barrier((batch, previous))
    values, vectors = _eigh(batch)
    previous = values
    sizes = [matrices[i].shape[0] for i in indices]
    pieces = zip(unstack(values, sizes), unstack(vectors, sizes), strict=True)
    results.update((i, Eigh(*piece)) for i, piece in zip(indices, pieces, strict=True))
  return [results[i] for i in range(len(matrices))]
