"""Thin matrices: one side of a group of same-shape adapters, factor by factor.

LoRA-RITE touches factor-sized arrays only through a handful of products with
r×r matrices and r×r reductions (Gram matrices). :class:`Thin` offers exactly
those, so the step's math (:mod:`.core`) is written once, free of layouts:

- each factor stays its own piece, in the layout it is stored in
  (:meth:`FactorView.to_compute`: ``(batch_i, rows, r)``, or rank-major
  ``(batch_i, r, rows)`` for ``lora_b (r, n)``). Concatenating factors would copy
  every one of them, which costs more than the thin products themselves;
- r×r operands and results are stacked along the batch axis, ``(B, r, s)`` with
  ``B = Σ batch_i``, so the small linear algebra of a whole group runs as one
  batched call.

Every contraction runs at ``Precision.HIGHEST``, so that float32 on TPU/GPU is
not silently bf16 (docs/algorithm.md §6.1). On a mesh, a reduction over a
row-sharded factor is an r×r all-reduce.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST


def mm(spec: str, *operands: jax.Array) -> jax.Array:
  """``einsum`` at ``Precision.HIGHEST``. A product of two operands is emitted as the
  one ``dot_general`` it is: the same program, traced without einsum's path search
  and wrappers, which dominate the trace of a step with hundreds of factors."""
  if len(operands) != 2:
    return jnp.einsum(spec, *operands, precision=HIGHEST)
  dimensions, permutation = _dot_plan(spec)
  x, y = operands
  dtype = jnp.result_type(x, y)
  z = jax.lax.dot_general(x.astype(dtype), y.astype(dtype), dimensions, precision=HIGHEST)
  return z if permutation == tuple(range(z.ndim)) else jax.lax.transpose(z, permutation)


@functools.cache
def _dot_plan(spec: str):
  """``dot_general``'s dimension numbers for a two-operand einsum ``spec``, and the
  permutation from its result (batch, x's free, y's free axes) to the spec's output."""
  inputs, out = spec.split('->')
  a, b = inputs.split(',')
  batch = [c for c in a if c in b and c in out]
  contract = [c for c in a if c in b and c not in out]
  result = batch + [c for c in a if c not in b] + [c for c in b if c not in a]
  dimensions = (([a.index(c) for c in contract], [b.index(c) for c in contract]),
                ([a.index(c) for c in batch], [b.index(c) for c in batch]))
  return dimensions, tuple(result.index(c) for c in out)


def stack(pieces: list[jax.Array] | tuple[jax.Array, ...]) -> jax.Array:
  """Concatenates per-factor pieces along the batch axis (no copy for one)."""
  return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=0)


def unstack(stacked: jax.Array, sizes: list[int]) -> list[jax.Array]:
  """Splits a ``(Σ sizes, ...)`` stack along axis 0 into pieces of ``sizes``."""
  offsets = np.cumsum(sizes)[:-1].tolist()
  return jnp.split(stacked, offsets, axis=0) if offsets else [stacked]


def symmetric(g: jax.Array) -> jax.Array:
  """(G + Gᵀ)/2 over the last two axes."""
  return 0.5 * (g + jnp.swapaxes(g, -1, -2))


class Thin(NamedTuple):
  """Same-shape thin matrices X (``rows × r`` per adapter), one piece per factor."""

  pieces: tuple[jax.Array, ...]
  rank_major: bool

  @property
  def rows(self) -> int:
    return self.pieces[0].shape[-1 if self.rank_major else -2]

  def split(self, stacked: jax.Array) -> list[jax.Array]:
    """A ``(B, ...)`` stack -> one ``(batch_i, ...)`` slice per piece."""
    return unstack(stacked, [x.shape[0] for x in self.pieces])

  def cross(self, other: Thin) -> list[jax.Array]:
    """Xᵀ Y per adapter, one ``(batch_i, r, s)`` per piece (:func:`stack` them for
    batched r×r algebra; a piece's own product needs no slice of the stack)."""
    spec = 'brn,bsn->brs' if self.rank_major else 'bnr,bns->brs'
    return [mm(spec, x, y) for x, y in zip(self.pieces, other.pieces, strict=True)]

  def gram(self) -> jax.Array:
    """Xᵀ X per adapter, stacked ``(B, r, r)``, symmetrized once for the stack."""
    return symmetric(stack(self.cross(self)))

  def times(self, small: jax.Array | list[jax.Array]) -> Thin:
    """X S per adapter, for a stacked ``(B, r, s)`` S or one ``(batch_i, r, s)`` per piece."""
    spec = 'brs,brn->bsn' if self.rank_major else 'bnr,brs->bns'
    return self._product(spec, small)

  def times_t(self, small: jax.Array | list[jax.Array]) -> Thin:
    """X Sᵀ per adapter, for a stacked ``(B, s, r)`` S or one per piece. The
    transpose is the matmul's (contraction axes), never an array of its own."""
    spec = 'bsr,brn->bsn' if self.rank_major else 'bnr,bsr->bns'
    return self._product(spec, small)

  def _product(self, spec: str, small: jax.Array | list[jax.Array]) -> Thin:
    smalls = small if isinstance(small, list) else self.split(small)
    return self._with([mm(spec, s, x) if self.rank_major else mm(spec, x, s)
                       for x, s in zip(self.pieces, smalls, strict=True)])

  def scaled(self, per_adapter: jax.Array) -> Thin:
    """Each adapter's X times its entry of a ``(B,)`` stack."""
    return self._with([x * c[:, None, None]
                       for x, c in zip(self.pieces, self.split(per_adapter), strict=True)])

  def map(self, fn: Callable[..., jax.Array], *others: Thin) -> Thin:
    """``fn`` applied piece by piece to this and ``others`` (elementwise maths)."""
    return self._with([fn(*xs) for xs in zip(self.pieces, *(o.pieces for o in others),
                                             strict=True)])

  def mean_square(self) -> jax.Array:
    """RMS² per adapter, stacked ``(B,)``."""
    return stack([jnp.mean(jnp.square(x), axis=(-2, -1)) for x in self.pieces])

  def _with(self, pieces: list[jax.Array]) -> Thin:
    return Thin(tuple(pieces), self.rank_major)
