"""Runs the LoRA-RITE step (:mod:`.core`) over a paired param tree.

The executor groups adapters whose factors have equal compute shapes, layouts
and dtype, gathers each group's two sides (:class:`core.Side`) as a :class:`Pair`,
calls the core phase by phase and writes the results back into params-structured
leaves. Each side's partner is the other side of its pair (:meth:`Pair.swapped`).
Every decision about layout and scheduling comes from :mod:`.steering`: group and
stack sizes, eigh batching, the ordering links and the branches.
"""

from __future__ import annotations

import collections
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rite_optax import core, steering
from rite_optax import factor_math as fm
from rite_optax import pairing as pairing_lib
from rite_optax.thin import Thin, stack, unstack

STATE = ('first_moment', 'basis', 'second_moment', 'escaped_mass')
"""The factor state, by the names of ``ScaleByLoraRiteState`` and :class:`core.Side`."""


class Leaves(NamedTuple):
  """The step's inputs (or outputs), each a list over the params' flat leaves."""

  factors: list[Any]  # params (inputs) / updates (outputs)
  grads: list[Any]
  first_moment: list[Any]
  basis: list[Any]
  second_moment: list[Any]
  escaped_mass: list[Any]


class Pair(NamedTuple):
  """One value per side of a group: ``a`` for the ``lora_a`` factors, ``b`` for ``lora_b``."""

  a: Any
  b: Any

  def swapped(self) -> Pair:
    """Each side's partner's value: ``(b, a)``."""
    return Pair(self.b, self.a)


def both(fn, *pairs: Pair) -> Pair:
  """``fn`` applied to the ``a`` values of ``pairs``, and to their ``b`` values."""
  return Pair(fn(*(p.a for p in pairs)), fn(*(p.b for p in pairs)))


def _eigh_pairs(matrices: list[Pair]) -> list[Pair]:
  """:func:`steering.eigh_each` of every side's matrix, one call per rank for all."""
  flat = steering.eigh_each([m for pair in matrices for m in pair])
  return [Pair(*flat[2 * i:2 * i + 2]) for i in range(len(matrices))]


class Group(NamedTuple):
  """Adapters whose ``a`` factors, and whose ``b`` factors, share one compute shape."""

  views: Pair  # of tuple[pairing_lib.FactorView, ...]
  dtype: Any  # the compute dtype


def groups(pairs: list[pairing_lib.FactorPair]) -> list[Group]:
  """Groups pairs by (compute shape without batch, layout) of both factors and dtype,
  at most :data:`steering.GROUP_PAIRS` pairs per group."""
  by_key = collections.defaultdict(list)
  for pair in pairs:
    key = tuple((v.compute_shape[1:], v.rank_major) for v in (pair.a, pair.b))
    by_key[key + (fm.compute_dtype(pair.a.dtype),)].append(pair)
  size = steering.GROUP_PAIRS
  chunks = [ps[i:i + size] for ps in by_key.values() for i in range(0, len(ps), size)]
  return [Group(Pair(tuple(p.a for p in ps), tuple(p.b for p in ps)),
                fm.compute_dtype(ps[0].a.dtype)) for ps in chunks]


def _stacked(views) -> bool:
  return views[0].rows * views[0].rank < steering.STACK_BELOW and len(views) > 1


def _side(views, dtype, leaves: Leaves) -> core.Side:
  """Gathers one side of a group: thin pieces in compute layout, stacked r×r state."""
  def thin(xs):
    pieces = [v.to_compute(xs[v.index]).astype(dtype) for v in views]
    return Thin((stack(pieces),) if _stacked(views) else tuple(pieces), views[0].rank_major)
  small = lambda xs, trailing: stack([
      xs[v.index].reshape((v.canonical_shape[0], *trailing)).astype(dtype) for v in views])
  r = views[0].rank
  return core.Side(x=thin(leaves.factors), grad=thin(leaves.grads),
                   first_moment=thin(leaves.first_moment), basis=thin(leaves.basis),
                   second_moment=small(leaves.second_moment, (r, r)),
                   escaped_mass=small(leaves.escaped_mass, ()))


def _per_view(views, x: Thin | jax.Array) -> list[jax.Array]:
  """One ``(batch_i, ...)`` array per view, from a side's pieces or from a stack."""
  if isinstance(x, Thin) and not _stacked(views):
    return list(x.pieces)
  return unstack(x.pieces[0] if isinstance(x, Thin) else x,
                 [v.canonical_shape[0] for v in views])


def _pieces(side: core.Side) -> list[core.Side]:
  """A side cut into one side per piece, its r×r state sliced to the piece's adapters."""
  cut = lambda x: [Thin((p,), x.rank_major) for p in x.pieces]
  thins = (side.x, side.grad, side.first_moment, side.basis)
  smalls = (side.x.split(side.second_moment), side.x.split(side.escaped_mass))
  return [core.Side(*fields) for fields in zip(*map(cut, thins), *smalls, strict=True)]


def _decomposed(tree):
  """The eigh of every matrix in ``tree``, in ``tree``'s structure, all in one
  :func:`steering.eigh_each` (calls at once could deadlock on CPU)."""
  matrices, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, steering.eigh_each(matrices))


def _flat(pairs: list[Pair]) -> list[Any]:
  return [x for pair in pairs for x in pair]


def _basis(side: core.Side, x_gram_eigh: core.Eigh) -> jax.Array:
  """Step 1's R⁺, with U₁ = X R₁⁺ formed piece after piece (:func:`steering.product_gram`)."""
  r1_pinv, keep = core.pseudo_inverse(x_gram_eigh, side.x.pieces[0].dtype)
  return core.basis(r1_pinv, keep, steering.product_gram(side.x, r1_pinv))


def _joined(pieces: list[Thin]) -> Thin:
  """One side's pieces, each a one-piece :class:`Thin`, as one."""
  return Thin(tuple(x.pieces[0] for x in pieces), pieces[0].rank_major)


class Moved(NamedTuple):
  """Steps 5–6 for one side."""

  transport: list[jax.Array]  # P, one (batch_i, r, r) per piece
  basis: Thin  # U to store (U_prev on a skipped step)
  scale: jax.Array  # ḡ's factor per adapter, (B,)
  second_moment: core.SecondMoments


def _steps_5_6(side: Pair, r_pinv: Pair, seen: Pair, kept: Pair,
               scalars: core.Scalars, b2_hat) -> Pair:
  """Steps 5–6 for a group's two sides: transports, new bases and V."""
  finite = scalars.finite
  transport = both(core.transport, side.swapped(), r_pinv.swapped())
  # U overwrites U_prev once the partner's transport has read it, and the updates
  # (through the scale) follow U, which reads X: steering.gated.
  basis = both(lambda s, rp, read: steering.branch(
      jnp.all(steering.gated(finite, steering.corners(read))),
      lambda: core.new_basis(s.x, rp), s.basis), side, r_pinv, transport.swapped())
  scale = both(lambda k, u: core.gradient_scale(
      k, scalars.clip_scale, steering.gated(finite, steering.links(u))), kept, basis)
  second = both(lambda s, sn, p, c: core.second_moment(s, sn, p, c, b2_hat, finite),
                side, seen, transport, scale)
  return both(Moved, transport, basis, scale, second)


def _steps_7_11(hyper, side: Pair, r_pinv: Pair, moved: Pair, eighs: Pair, b1_hat, b2_hat,
                finite, previous) -> tuple[Pair, jax.Array]:
  """Steps 7–11 for a group's two sides, one piece after another
  (:func:`steering.in_order`, chained from ``previous``). Returns each side as
  :class:`core.Side` with ``x`` holding Δ and the other fields the new state, and
  the link of the last piece."""
  out = []
  for own, partner_r_pinv, m, e in zip(side, r_pinv.swapped(), moved, eighs, strict=True):
    rho = core.escaped_mass(own, m.second_moment, e, b2_hat, finite, hyper)
    k = core.preconditioner(e.new, rho, partner_r_pinv, m.scale, hyper)
    written = []
    for piece, *small in zip(_pieces(own), m.transport, own.x.split(partner_r_pinv),
                             own.x.split(k), strict=True):
      p, piece_r_pinv, piece_k = steering.in_order(*small, previous)
      written.append(core.write(piece, [p], piece_r_pinv, piece_k, b1_hat, finite, hyper))
      previous = steering.link(written[-1].delta)
    out.append(core.Side(x=_joined([w.delta for w in written]), grad=own.grad,
                         first_moment=_joined([w.first_moment for w in written]),
                         basis=m.basis, second_moment=m.second_moment.new, escaped_mass=rho))
  return Pair(*out), previous


def _phase3(hyper, gs: list[Group], sides, r_pinv, seen, kept, scalars, count) -> list[Pair]:
  """Steps 5–11 for every group, with every eigh of V in one batched call per rank."""
  hats = [tuple(fm.bias_corrected_decay(count.astype(g.dtype), jnp.asarray(b, g.dtype))
                for b in (hyper.b1, hyper.b2)) for g in gs]
  moved = [_steps_5_6(*args, scalars, b2_hat) for *args, (_, b2_hat)
           in zip(sides, r_pinv, seen, kept, hats, strict=True)]
  escape = hyper.apply_escape
  eighs = _decomposed([both(lambda s, m: core.SecondMomentEighs(
      m.second_moment.new, s.second_moment if escape else None,
      m.second_moment.transported if escape else None), s, mv)
      for s, mv in zip(sides, moved, strict=True)])
  out, previous = [], None
  for s, rp, mv, e, (b1_hat, b2_hat) in zip(sides, r_pinv, moved, eighs, hats, strict=True):
    new, previous = _steps_7_11(hyper, s, rp, mv, e, b1_hat, b2_hat, scalars.finite, previous)
    out.append(new)
  return out


def _rows(views, new: core.Side, leaves: Leaves, updates_dtype) -> dict[int, tuple]:
  """One side's results, params-structured: leaf index -> (update, *STATE), each in
  its leaf's layout and dtype (the update in ``updates_dtype`` unless None)."""
  columns = (new.x, new.first_moment, new.basis, new.second_moment, new.escaped_mass)
  rows = {}
  for view, delta, m, u, v, rho in zip(views, *(_per_view(views, x) for x in columns),
                                       strict=True):
    i = view.index
    like = lambda x, field, i=i: x.astype(getattr(leaves, field)[i].dtype)
    update_dtype = leaves.factors[i].dtype if updates_dtype is None else updates_dtype
    rows[i] = (view.from_compute(delta).astype(update_dtype),
               like(view.from_compute(m), 'first_moment'), like(view.from_compute(u), 'basis'),
               like(v.reshape(leaves.second_moment[i].shape), 'second_moment'),
               like(rho.reshape(leaves.escaped_mass[i].shape), 'escaped_mass'))
  return rows


def step(hyper: core.Hyper, pairs, leaves: Leaves, count: jax.Array, dtype,
         updates_in_param_dtype: bool, others_ok: jax.Array) -> tuple[Leaves, core.Scalars]:
  """One LoRA-RITE step over every pair: phase 1, global scalars, phase 3.

  Returns:
    ``(outputs, scalars)``: ``outputs.factors`` holds the updates (in the param
    dtype, or with ``updates_in_param_dtype=False`` in the compute dtype), the
    state fields the new state leaves; non-factor leaves are passed through.
  """
  gs = groups(pairs)
  sides = [both(lambda views, g=g: _side(views, g.dtype, leaves), g.views) for g in gs]
  grams = [both(core.grams, s) for s in sides]
  x_eighs = _decomposed([both(lambda g: g.x, gr) for gr in grams])
  r_pinv = [both(_basis, s, e) for s, e in zip(sides, x_eighs, strict=True)]
  seen = [both(core.unmagnified, gr, rp.swapped()) for gr, rp in zip(grams, r_pinv, strict=True)]
  kept = [both(lambda s, sn: core.kept(sn, s.x.rows * sn.gbar_gram.shape[-1], hyper), s, sn)
          for s, sn in zip(sides, seen, strict=True)]
  factor_grads = [leaves.grads[v.index] for p in pairs for v in (p.a, p.b)]
  inputs_ok = (others_ok & steering.all_finite(_flat(r_pinv))
               & steering.gradients_finite([g.grad for g in _flat(grams)], factor_grads))
  scalars = core.global_scalars(_flat(seen), _flat(kept), hyper, dtype, inputs_ok)
  new = _phase3(hyper, gs, sides, r_pinv, seen, kept, scalars, count)

  rows = {}
  for g, side_pair in zip(gs, new, strict=True):
    for views, side in zip(g.views, side_pair, strict=True):
      rows.update(_rows(views, side, leaves, None if updates_in_param_dtype else g.dtype))
  fields = ('factors', *STATE)
  return leaves._replace(**{
      field: [rows[i][k] if i in rows else x for i, x in enumerate(getattr(leaves, field))]
      for k, field in enumerate(fields)}), scalars
