"""Runs the LoRA-RITE step (:mod:`.core`) over a paired param tree.

The executor groups adapters whose factors have equal compute shapes, layouts
and dtype (at most :data:`GROUP_PAIRS` per group), gathers each group's two sides (:class:`core.Side`), calls the core
phase by phase and scatters the results back into params-structured leaves. It
owns every decision about layout and scheduling, so that :mod:`.core` is only
the math:

- **layout**: each factor stays a separate piece in its stored layout
  (:meth:`FactorView.to_compute`) and only r×r statistics are stacked, except
  for tiny factors, which are concatenated (:data:`STACK_BELOW`);
- **in-place writes** (:func:`_after`): data dependencies that let the new
  bases and the params overwrite their donated buffers instead of copying them;
- **one piece at a time** (:func:`_in_order`, :meth:`Thin.product_gram`): the
  factor-sized products of one factor are consumed before the next factor's
  are formed, so that XLA's temporaries stay about one factor's size;
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
from rite_optax.thin import Thin, after, stack, unstack


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


GROUP_PAIRS = 16
"""The most adapters in one group. A group's r×r statistics are stacked, and each
factor reads its own slice of each stack; XLA's cost model counts such a slice
as a read of the whole stack, and fuses the r×r algebra into the factor's own
kernels, so both the counted bytes and the program grow with group² beyond a
few dozen adapters. Measured on 288 mT5-XXL attention pairs (r = 16): one group
per side 2.64× optax.adam's bytes, groups of 16: 2.30×, and the step 254 →
164 ms; 200 pairs of 64×8: compile 17 → 8 s. The eighs of all groups still run
as one batched call per rank (:func:`eigh_each`)."""


def groups(pairs: list[pairing_lib.FactorPair]) -> list[Group]:
  """Groups pairs by (compute shape without batch, layout) of both factors and dtype,
  at most :data:`GROUP_PAIRS` pairs per group."""
  by_key = collections.defaultdict(list)
  for pair in pairs:
    key = tuple((v.compute_shape[1:], v.rank_major) for v in (pair.a, pair.b))
    by_key[key + (fm.compute_dtype(pair.a.dtype),)].append(pair)
  chunks = [ps[i:i + GROUP_PAIRS] for ps in by_key.values()
            for i in range(0, len(ps), GROUP_PAIRS)]
  return [Group(tuple(p.a for p in ps), tuple(p.b for p in ps), fm.compute_dtype(ps[0].a.dtype))
          for ps in chunks]


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


def _after(flag: jax.Array, links: list[jax.Array]) -> jax.Array:
  """``flag`` per adapter, ``(B,)``, made to depend on each piece's ``(batch_i,)``
  links (finite for finite state): orders the work that produced them before
  the work gated by the flag, so that XLA can update donated buffers in place.
  One link per piece, never one sum over the stack: a scalar
  that every piece reads is fused into each piece's kernel, and the program
  would grow with pieces².

  XLA overwrites a donated input in place only if it can prove, from data
  dependencies alone (an ``optimization_barrier`` is not enough), that every
  other read of it comes first; otherwise it copies the input, one more
  factor-sized write and read per factor. U_prev is read by the transport
  ``P = R⁺ᵀ (Xᵀ U_prev)`` before the branch that overwrites it with U
  (:func:`core.kept_basis`): the branch's predicate (all of the flags) depends
  on a corner of every piece's P. X is read by that branch before the params
  are updated: the gradient scale, and through it every update, depends on a
  link of every new basis (:meth:`Thin.link`).
  """
  return flag & jnp.isfinite(stack(links))


def _corners(small: list[jax.Array]) -> list[jax.Array]:
  """Each r×r piece's first entry, one per adapter."""
  return [x[:, 0, 0] for x in small]


def _links(x: Thin) -> list[jax.Array]:
  """Each piece's :meth:`Thin.link`, one per adapter."""
  return [jnp.broadcast_to(Thin((p,), x.rank_major).link(), p.shape[:1]) for p in x.pieces]


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
  """Writes one piece's results (one factor's, or a stacked side's) into
  ``outputs`` (params-structured lists)."""
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
         updates_in_param_dtype: bool, others_ok: jax.Array) -> tuple[Leaves, core.Scalars]:
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
  factor_grads = [leaves.grads[v.index] for p in pairs for v in (p.a, p.b)]
  inputs_ok = others_ok & _all_finite(r_pinv) & _gradients_finite(grams, factor_grads)
  scalars = core.global_scalars([sn.squared_norm for sn in seen], kept, hyper, dtype, inputs_ok)
  written = _phase3(hyper, sides, seen, r_pinv, kept, scalars, count)

  outputs = Leaves(*(list(x) for x in leaves))
  views = [(vs, g.dtype) for g in gs for vs in (g.a, g.b)]
  for (vs, group_dtype), side_written in zip(views, written, strict=True):
    for j, w in enumerate(side_written):
      _scatter(vs if _stacked(vs) else vs[j:j + 1], w, leaves, outputs,
               None if updates_in_param_dtype else group_dtype)
  return outputs, scalars


def _all_finite(smalls: list[jax.Array]) -> jax.Array:
  """Whether every entry of the arrays is finite: each array's largest magnitude (NaN
  propagates through the max), one check over all of them."""
  return jnp.all(jnp.isfinite(jnp.stack([jnp.max(jnp.abs(x)) for x in smalls])))


def _gradients_finite(grams: list[core.Grams], grads: list[jax.Array]) -> jax.Array:
  """Whether every factor gradient is finite, read off the r×r Grams ∇Xᵀ∇X.

  A non-finite entry of ∇X makes a diagonal entry of its Gram non-finite, so finite
  Grams prove finite gradients; but a huge finite gradient (above ~1e19 in
  float32) overflows its Gram too. Only then, in a branch not taken otherwise,
  are the gradients themselves read, as they were passed in (a view in the
  compute layout would be a copy made whether or not the branch runs), each
  reduced to its largest magnitude (NaN-propagating): an elementwise ``isfinite``
  there costs a predicate buffer per factor in XLA's temp.
  """
  return jax.lax.cond(
      _all_finite([g.grad for g in grams]), lambda: jnp.array(True),
      lambda: _all_finite(grads))


def _partner(i: int) -> int:
  """Sides are listed a, b, a, b, …: a group's a side and b side are partners."""
  return i ^ 1


def _phase3(hyper, sides, seen, r_pinv, kept, scalars, count) -> list[list[core.Written]]:
  """Steps 5–11 for every side, with all eighs of V batched in one call per rank;
  the results per side and piece."""
  hats = [tuple(fm.bias_corrected_decay(count.astype(s.second.dtype),
                                        jnp.asarray(b, s.second.dtype)) for b in (hyper.b1, hyper.b2))
          for s in sides]
  transports = [core.transport(sides[j].x, r_pinv[j], sides[j].basis)
                for j in map(_partner, range(len(sides)))]
  bases = [core.kept_basis(s.x, r_pinv[i], s.basis,
                           jnp.all(_after(scalars.finite, _corners(transports[_partner(i)]))))
           for i, s in enumerate(sides)]
  scales = [core.gradient_scale(k, scalars._replace(finite=_after(scalars.finite, _links(u))))
            for k, u in zip(kept, bases, strict=True)]
  vs = [core.second_moment(s, sn, p, scale, b2_hat, scalars.finite)
        for s, sn, p, scale, (_, b2_hat) in zip(sides, seen, transports, scales, hats, strict=True)]
  n = len(sides)
  to_decompose = [v.new for v in vs]
  if hyper.apply_escape:
    to_decompose += [s.second for s in sides] + [v.transported for v in vs]
  decomposed = eigh_each(to_decompose) + [None] * (2 * n if not hyper.apply_escape else 0)
  written, link = [], None
  for i, (s, v, scale, (b1_hat, b2_hat)) in enumerate(zip(sides, vs, scales, hats, strict=True)):
    rho = core.escaped_mass(s, v, decomposed[n + i], decomposed[2 * n + i], b2_hat, hyper)
    k = core.preconditioner(decomposed[i], rho, r_pinv[_partner(i)], scale, hyper)
    side_written = []
    for piece, *small, second, rho_piece, basis in _pieces(
        s, transports[i], r_pinv[_partner(i)], k, v.new, rho, bases[i]):
      p, partner_r_pinv, k_piece = small if link is None else _in_order(*small, link)
      side_written.append(core.write(
          piece, [p], partner_r_pinv, k_piece, second, rho_piece, b1_hat, scalars.finite,
          basis, hyper))
      link = side_written[-1].delta.link()
    written.append(side_written)
  return written


def _pieces(side: core.Side, transport: list[jax.Array], partner_r_pinv: jax.Array,
            k: jax.Array, second: jax.Array, rho: jax.Array, basis: Thin):
  """Step 11's inputs for one side, one tuple per piece: (side, P, R_B⁺, K, V, ρ, U),
  each r×r stack sliced to the piece's adapters."""
  sizes = [x.shape[0] for x in side.x.pieces]
  one = lambda t, j: Thin((t.pieces[j],), t.rank_major)
  cuts = [unstack(a, sizes) for a in (side.second, side.escaped, partner_r_pinv, k, second, rho)]
  for j, (old_second, escaped, *small) in enumerate(zip(*cuts, strict=True)):
    piece = core.Side(one(side.x, j), one(side.grad, j), one(side.moment, j),
                      one(side.basis, j), old_second, escaped)
    yield (piece, transport[j], *small, one(basis, j))


def _in_order(p: jax.Array, partner_r_pinv: jax.Array, k: jax.Array,
              link: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A piece's r×r operands of step 11 (P, R_B⁺, K), unchanged, made to depend on
  ``link``, the previous piece's Δ (:meth:`Thin.link`).

  Left to itself, XLA's scheduler forms every piece's factor-sized products
  (∇X K, M Pᵀ, M R⁺ᵀ) before it consumes any, and holds them all at once: XLA
  temp the size of the params. Chained, about one piece's products are alive at
  a time. K carries the link and P and R_B⁺ take it from K, through a sum over
  the adapters (a slice of one adapter of a batch-sharded stack would be a
  cross-device read).
  """
  k = after(k, link)
  k_link = jnp.sum(k[:, 0, 0])
  return after(p, k_link), after(partner_r_pinv, k_link), k
