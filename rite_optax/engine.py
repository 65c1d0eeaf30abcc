"""Runs the LoRA-RITE step (:mod:`.core`) over a paired param tree.

The executor groups adapters whose factors have equal compute shapes, layouts
and dtype, gathers each group's two sides (:class:`core.Side`), calls the core
phase by phase and scatters the results back into params-structured leaves. It
owns every decision about layout and scheduling, so that :mod:`.core` is only
the math:

- **layout**: each factor stays a separate piece in its stored layout
  (:meth:`FactorView.to_compute`) and only r×r statistics are stacked, except
  for tiny factors, which are concatenated (:data:`STACK_BELOW`);
- **in-place writes** (:func:`_read_first`): a data dependency that lets the new
  bases overwrite their donated buffers instead of copying them;
- **eigh batching and ordering** (:func:`eigh_each`): every eigendecomposition
  of one phase runs as one batched call per rank, and the calls run one after
  another; on CPU each batched call is a sequential loop (see :func:`_eigh`).
"""

from __future__ import annotations

import collections
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rite_optax import core
from rite_optax import factor_math as fm
from rite_optax import pairing as pairing_lib
from rite_optax.thin import Thin, stack, unstack


class Leaves(NamedTuple):
  """The step's inputs (or outputs), each a list over the params' flat leaves."""

  factors: list[Any]  # params (inputs) / updates (outputs)
  grads: list[Any]
  moments: list[Any]
  bases: list[Any]
  seconds: list[Any]
  escapes: list[Any]


class Group(NamedTuple):
  """Adapters whose ``a`` factors, and whose ``b`` factors, share one compute shape."""

  a: tuple[pairing_lib.FactorView, ...]
  b: tuple[pairing_lib.FactorView, ...]
  dtype: Any  # the compute dtype


def groups(pairs: list[pairing_lib.FactorPair]) -> list[Group]:
  """Groups pairs by (compute shape without batch, layout) of both factors and dtype."""
  by_key = collections.defaultdict(list)
  for pair in pairs:
    key = tuple((v.compute_shape[1:], v.rank_major) for v in (pair.a, pair.b))
    by_key[key + (fm.compute_dtype(pair.a.dtype),)].append(pair)
  return [Group(tuple(p.a for p in ps), tuple(p.b for p in ps), fm.compute_dtype(ps[0].a.dtype))
          for ps in by_key.values()]


def _eigh(batch: jax.Array) -> core.Eigh:
  """A batched symmetric eigh that cannot deadlock jaxlib's CPU thread pool.

  On CPU, jaxlib (0.10) runs a batched eigh as LAPACK calls spread over the
  intra-op thread pool and blocks until they finish; two such calls at once
  (two calls in one program, or one per simulated device of a mesh) can leave
  every pool thread waiting (seen on 2 cores from 32 stacked adapters, and in
  8-device meshes). On CPU the matrices are therefore decomposed one after
  another in a loop (``lax.map``), each call inline; elsewhere (GPU, TPU) in
  one batched call.
  """
  return jax.lax.platform_dependent(
      batch, cpu=lambda b: jax.lax.map(jnp.linalg.eigh, b), default=jnp.linalg.eigh)


def eigh_each(matrices: list[jax.Array]) -> list[core.Eigh]:
  """Symmetric eigendecompositions of many ``(batch, r, r)`` stacks, in input order.

  Stacks of equal r are concatenated into one call (:func:`_eigh`), and the
  calls for different r are chained by a data dependency
  (``optimization_barrier``), so a step never runs two eigh calls at once.
  """
  by_rank: dict[int, list[int]] = {}
  for i, m in enumerate(matrices):
    by_rank.setdefault(m.shape[-1], []).append(i)
  results: list = [None] * len(matrices)
  previous = None
  for indices in by_rank.values():
    batch = stack([matrices[i] for i in indices])
    if previous is not None:
      batch, _ = jax.lax.optimization_barrier((batch, previous))
    lam, vecs = _eigh(batch)
    previous = lam
    sizes = [matrices[i].shape[0] for i in indices]
    pieces = zip(unstack(lam, sizes), unstack(vecs, sizes), strict=True)
    for i, piece in zip(indices, pieces, strict=True):
      results[i] = piece
  return results


def _read_first(finite: jax.Array, reads: list[jax.Array]) -> list[jax.Array]:
  """``finite`` per piece, made to depend on that piece's ``read``: orders a read
  before an in-place write.

  The new basis overwrites its donated input U_prev in place only if every other
  read of U_prev comes first, and XLA proves that order from data dependencies
  alone (an ``optimization_barrier`` is not enough); otherwise it copies every
  U_prev first: one more factor-sized write and read per factor. The transport
  ``P = Uᵀ U_prev`` reads U_prev and nothing orders it before the basis write,
  so each piece's write flag is made to depend on a corner of its P (finite for
  finite params and state). One corner per piece, not a sum over the stack: a
  scalar shared by every piece is fused into each piece's kernel, and the
  program would grow with pieces². The params need no such help: every read
  of X is upstream of every update through the batched eigh of V.
  """
  return [finite & jnp.isfinite(p[:, 0, 0]) for p in reads]


STACK_BELOW = 1 << 12
"""Factors with fewer elements than this (per adapter) are concatenated into one
piece per side: for tiny factors a copy costs less than a kernel of its own.
200 pairs of 64×8 (512 elements): 25 ms a step and 35 s to compile stacked,
51 ms and 65 s one piece per factor (the latter on a busier machine). Not above:
288 mT5-XXL attention pairs at r = 4 (16384 elements) stacked took 226 ms a step
instead of 105, with 180 MB of XLA temp for a 72 MB state."""


def _stacked(views) -> bool:
  return views[0].rows * views[0].rank < STACK_BELOW and len(views) > 1


def _side(views, dtype, leaves: Leaves) -> core.Side:
  """Gathers one side of a group: thin pieces in compute layout, stacked r×r state."""
  def thin(xs):
    pieces = [v.to_compute(xs[v.index]).astype(dtype) for v in views]
    return Thin((stack(pieces),) if _stacked(views) else tuple(pieces), views[0].rank_major)
  small = lambda xs, trailing: stack([
      xs[v.index].reshape((v.canonical_shape[0], *trailing)).astype(dtype) for v in views])
  r = views[0].rank
  return core.Side(x=thin(leaves.factors), grad=thin(leaves.grads),
                   moment=thin(leaves.moments), basis=thin(leaves.bases),
                   second=small(leaves.seconds, (r, r)), escaped=small(leaves.escapes, ()))


def _per_view(views, x: Thin | jax.Array) -> list[jax.Array]:
  """One ``(batch_i, ...)`` array per view, from a side's pieces or from a stack."""
  if isinstance(x, Thin) and not _stacked(views):
    return list(x.pieces)
  return unstack(x.pieces[0] if isinstance(x, Thin) else x,
                 [v.canonical_shape[0] for v in views])


def _scatter(views, written: core.Written, inputs: Leaves, outputs: Leaves,
             updates_dtype) -> None:
  """Writes one side's results into ``outputs`` (params-structured lists)."""
  pieces = zip(views, *(_per_view(views, x) for x in written), strict=True)
  for view, delta, m, u, v, rho in pieces:
    i = view.index
    outputs.factors[i] = view.from_compute(delta).astype(
        inputs.factors[i].dtype if updates_dtype is None else updates_dtype)
    outputs.moments[i] = view.from_compute(m).astype(inputs.moments[i].dtype)
    outputs.bases[i] = view.from_compute(u).astype(inputs.bases[i].dtype)
    outputs.seconds[i] = v.reshape(inputs.seconds[i].shape).astype(inputs.seconds[i].dtype)
    outputs.escapes[i] = rho.reshape(inputs.escapes[i].shape).astype(inputs.escapes[i].dtype)


def step(hyper: core.Hyper, pairs, leaves: Leaves, count: jax.Array, dtype,
         updates_in_param_dtype: bool, others_finite: jax.Array) -> tuple[Leaves, core.Scalars]:
  """One LoRA-RITE step over every pair: phase 1, global scalars, phase 3.

  Returns:
    ``(outputs, scalars)``: ``outputs.factors`` holds the updates (in the param
    dtype, or with ``updates_in_param_dtype=False`` in the compute dtype), the
    other fields the new state leaves; non-factor leaves are passed through.
  """
  gs = groups(pairs)
  sides = [_side(views, g.dtype, leaves) for g in gs for views in (g.a, g.b)]
  grams = [core.grams(s) for s in sides]
  r_pinv = [core.basis(s.x, e)
            for s, e in zip(sides, eigh_each([g.x for g in grams]), strict=True)]
  seen = [core.unmagnified(grams[i], r_pinv[_partner(i)]) for i in range(len(sides))]
  kept = [core.kept(sn, s.x.rows * sn.gbar_gram.shape[-1], hyper)
          for s, sn in zip(sides, seen, strict=True)]
  scalars = core.global_scalars(
      [sn.squared_norm for sn in seen], kept, hyper, dtype, others_finite)
  written = _phase3(hyper, sides, seen, r_pinv, kept, scalars, count)

  outputs = Leaves(*(list(x) for x in leaves))
  views = [(vs, g.dtype) for g in gs for vs in (g.a, g.b)]
  for (vs, group_dtype), w in zip(views, written, strict=True):
    _scatter(vs, w, leaves, outputs, None if updates_in_param_dtype else group_dtype)
  return outputs, scalars


def _partner(i: int) -> int:
  """Sides are listed a, b, a, b, …: a group's a side and b side are partners."""
  return i ^ 1


def _phase3(hyper, sides, seen, r_pinv, kept, scalars, count) -> list[core.Written]:
  """Steps 5–11 for every side, with all eighs of V batched in one call per rank."""
  hats = [tuple(fm.bias_corrected_decay(count.astype(s.second.dtype),
                                        jnp.asarray(b, s.second.dtype)) for b in (hyper.b1, hyper.b2))
          for s in sides]
  scales = [core.gradient_scale(k, scalars) for k in kept]
  bases = [core.new_basis(s.x, p) for s, p in zip(sides, r_pinv, strict=True)]
  transports = [core.transport(bases[_partner(i)], sides[_partner(i)].basis)
                for i in range(len(sides))]
  vs = [core.second_moment(s, sn, p, scale, b2_hat, scalars.finite)
        for s, sn, p, scale, (_, b2_hat) in zip(sides, seen, transports, scales, hats, strict=True)]
  n = len(sides)
  to_decompose = [v.new for v in vs]
  if hyper.apply_escape:
    to_decompose += [s.second for s in sides] + [v.transported for v in vs]
  decomposed = eigh_each(to_decompose) + [None] * (2 * n if not hyper.apply_escape else 0)
  written = []
  for i, (s, v, scale, (b1_hat, b2_hat)) in enumerate(zip(sides, vs, scales, hats, strict=True)):
    rho = core.escaped_mass(s, v, decomposed[n + i], decomposed[2 * n + i], b2_hat, hyper)
    k = core.preconditioner(decomposed[i], rho, r_pinv[_partner(i)], scale, hyper)
    basis = core.kept_basis(
        bases[i], s.basis, _read_first(scalars.finite, transports[_partner(i)]))
    written.append(core.write(s, transports[i], r_pinv[_partner(i)], k, v, rho, b1_hat,
                              scalars.finite, basis, hyper))
  return written
