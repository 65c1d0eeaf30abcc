"""The LoRA-RITE step, numbered as in docs/algorithm.md §3.

Pure functions from NamedTuples to NamedTuples, for one *side* (the ``a`` or the
``b`` factors) of a group of same-shape adapters. The step has three phases:

1. per side, factor-sized reads reduced to r×r matrices (:func:`grams`,
   :func:`basis`, :func:`unmagnified`): steps 1 and 2;
2. global scalars over every side of every group (:func:`global_scalars`):
   steps 3 and 4;
3. per side, the transport and the new basis (:func:`transport`,
   :func:`kept_basis`), r×r algebra (:func:`second_moment`,
   :func:`preconditioner`), then one factor-sized pass per output
   (:func:`write`): steps 5–11.

Nothing factor-sized crosses the global reduction: phase 1 keeps only r×r
matrices, and phase 3 forms the new basis ``U = X R⁺`` from the factor again.
Eigendecompositions come in as arguments, so that the caller
(:mod:`.engine`) can batch and order them across groups.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rite_optax import factor_math as fm
from rite_optax.thin import Thin, mm, stack

Eigh = tuple[jax.Array, jax.Array]  # (eigenvalues ascending (B, r), eigenvectors (B, r, r))


class Hyper(NamedTuple):
  """The transformation's options (see :func:`rite_optax.scale_by_lora_rite`)."""

  b1: float
  b2: float
  eps: float
  relative_eps: bool
  clip_unmagnified_grad: float
  update_skipping: float
  update_capping: float | None  # None: off, and no pass over M to measure it
  weight_decay: float | None  # None: off, and no pass over X to add it
  apply_escape: bool


class Side(NamedTuple):
  """One side of a group: its factors X, their gradients and their state."""

  x: Thin  # the factors (A on the a side), as stored in the params
  grad: Thin  # ∇X
  moment: Thin  # M, the first moment in the partner's basis
  basis: Thin  # U_prev, X's orthonormal basis at the last applied step
  second: jax.Array  # V (B, r, r)
  escaped: jax.Array  # ρ (B,)


class Grams(NamedTuple):
  """Phase 1's factor-sized reads, reduced to r×r."""

  x: jax.Array  # XᵀX (step 1)
  grad: jax.Array  # ∇Xᵀ∇X (step 2)


class Seen(NamedTuple):
  """Step 2 for one side, r×r: its unmagnified gradient's statistics."""

  gbar_gram: jax.Array  # ḡᵀḡ = R_B⁺ᵀ (∇Aᵀ∇A) R_B⁺
  squared_norm: jax.Array  # ‖ḡ‖²_F (B,)


class Scalars(NamedTuple):
  """Step 4: one value for the whole step."""

  finite: jax.Array  # the step is applied: its inputs are sound, the kept ḡ finite
  grad_norm: jax.Array  # ‖ḡ‖ over all kept factors, before clipping
  clip_scale: jax.Array  # c
  skipped_factors: jax.Array  # int32: factors zeroed by update skipping (step 3)


class SecondMoment(NamedTuple):
  """Step 6: V transported and V after (V before is ``Side.second``; after = before on a
  skipped step)."""

  transported: jax.Array
  new: jax.Array


class Written(NamedTuple):
  """Step 11's outputs for one side, in the factors' layout."""

  delta: Thin  # Δ, the update before the learning rate
  moment: Thin  # M
  basis: Thin  # U
  second: jax.Array  # V
  escaped: jax.Array  # ρ


def grams(side: Side) -> Grams:
  """Phase 1: the r×r reductions of the factor and of its gradient."""
  return Grams(x=side.x.gram(), grad=side.grad.gram())


def basis(x: Thin, x_gram_eigh: Eigh) -> jax.Array:
  """Step 1: R⁺ with ``X = U R``, U orthonormal on span(X), from the eigh of XᵀX.

  ``U₁ = X R₁⁺`` is formed once to measure its orthonormality (its Gram), then
  freed: the basis itself, ``U = X R⁺``, is formed after the global reduction
  (:func:`new_basis`).
  """
  r1_pinv, keep = fm.gram_pseudo_inverse(x_gram_eigh, x.pieces[0].dtype)
  y = fm.orthonormality_correction(x.product_gram(r1_pinv), keep)
  return fm.matmul_small(r1_pinv, y)


def unmagnified(own: Grams, partner_r_pinv: jax.Array) -> Seen:
  """Step 2 for one side, from r×r matrices only: ḡ itself is never formed."""
  gbar_gram = fm.unmagnified_gram(own.grad, partner_r_pinv)
  return Seen(gbar_gram=gbar_gram, squared_norm=fm.squared_norm(gbar_gram))


def kept(seen: Seen, size: int, hyper: Hyper) -> jax.Array:
  """Step 3: 1 for each adapter whose RMS(ḡ) is within ``update_skipping``, else 0."""
  return fm.kept_by_skipping(
      seen.squared_norm, size, jnp.asarray(hyper.update_skipping, seen.squared_norm.dtype))


def global_scalars(squared: list[jax.Array], kept_: list[jax.Array], hyper: Hyper,
                   dtype, inputs_ok: jax.Array) -> Scalars:
  """Step 4: whether the step is applied, and the global clip scale.

  ``inputs_ok``: every gradient and every R⁺ finite, and whatever the caller folds
  in (the fallback leaves' gradients, the learning rates, traced options). A huge
  but finite gradient whose statistics overflow is not a bad input: its RMS(ḡ)
  is beyond any skipping threshold, so step 3 zeroes that adapter. The step is
  applied when its inputs are sound and the norm of the kept ḡ is finite (it is
  not only when nothing skips an overflowing adapter). Each total over all
  groups is one operation, not a chain of additions: XLA copies cheap scalar
  arithmetic into every kernel that reads its result, and the program would grow
  with groups × pieces.
  """
  # The last entry of a cumulative sum over the groups: XLA keeps that as one
  # operation, where it would turn a plain sum into a chain of additions.
  total = lambda xs: jnp.cumsum(jnp.stack([jnp.sum(x).astype(dtype) for x in xs]))[-1]
  grad_norm = jnp.sqrt(total(jnp.where(k > 0, sq, 0.0) for k, sq in zip(kept_, squared,
                                                                        strict=True)))
  finite = inputs_ok & jnp.isfinite(grad_norm)
  clip = jnp.asarray(hyper.clip_unmagnified_grad, dtype)
  clip_scale = jnp.where(
      (clip > 0) & (grad_norm > clip), clip / jnp.where(grad_norm > 0, grad_norm, 1.0), 1.0)
  skipped = jnp.sum(jnp.concatenate([jnp.ravel(k == 0) for k in kept_]), dtype=jnp.int32)
  return Scalars(finite, grad_norm, clip_scale, skipped)


def gradient_scale(kept_: jax.Array, scalars: Scalars) -> jax.Array:
  """ḡ's factor per adapter, ``(B,)``: skip × clip, and 0 on a skipped step so that
  every r×r quantity stays finite (eigh never sees a NaN)."""
  return jnp.where(scalars.finite, kept_ * scalars.clip_scale.astype(kept_.dtype), 0.0)


def second_moment(side: Side, seen: Seen, transport_: list[jax.Array], scale: jax.Array,
                  b2_hat: jax.Array, finite: jax.Array) -> SecondMoment:
  """Step 6: V ← (1-β̂₂)·(c·k)²·ḡᵀḡ/m + β̂₂·sym(P V Pᵀ); unchanged on a skipped step.
  An adapter whose scale is 0 adds nothing, even where its ḡᵀḡ overflowed."""
  transported = fm.transported_second_moment(side.second, stack(transport_))
  used = (scale > 0)[:, None, None]
  gbar_gram = jnp.where(used, seen.gbar_gram * jnp.square(scale)[:, None, None], 0.0)
  new = fm.second_moment(transported, gbar_gram, side.x.rows, b2_hat)
  return SecondMoment(transported, jnp.where(finite, new, side.second))


def escaped_mass(side: Side, v: SecondMoment, old_eigh: Eigh | None,
                 transported_eigh: Eigh | None, b2_hat: jax.Array,
                 hyper: Hyper) -> jax.Array:
  """Step 7: ρ ← β̂₂·(ρ + e) with ``apply_escape``, else 0."""
  if not hyper.apply_escape:
    return jnp.zeros_like(side.escaped)
  e = fm.escaped_mass(side.second, v.transported, old_eigh[0], transported_eigh[0])
  return b2_hat * (side.escaped + e)


def preconditioner(v_eigh: Eigh, rho: jax.Array, partner_r_pinv: jax.Array,
                   scale: jax.Array, hyper: Hyper) -> jax.Array:
  """Step 8, folded: K = R_B⁺ V^-½ (c·k), so that S = ḡ V^-½ = ∇A K (ḡ is never formed)."""
  inv_root = fm.inverse_root(v_eigh, rho, jnp.asarray(hyper.eps, rho.dtype), hyper.relative_eps)
  return fm.matmul_small(partner_r_pinv, inv_root * scale[:, None, None])


def transport(partner_x: Thin, partner_r_pinv: jax.Array,
              partner_basis_prev: Thin) -> list[jax.Array]:
  """Step 5: P = U_Bᵀ U_B,prev = R_B⁺ᵀ (X_Bᵀ U_B,prev), one ``(batch_i, r, r)`` per piece.

  Formed from X_B and R_B⁺, not from U_B: the new basis need not exist before
  the old one is read, so it can overwrite it (:func:`kept_basis`).
  """
  return [mm('bsr,bst->brt', r, c) for r, c in zip(
      partner_x.split(partner_r_pinv), partner_x.cross(partner_basis_prev), strict=True)]


def kept_basis(x: Thin, r_pinv: jax.Array, prev: Thin, applied: jax.Array) -> Thin:
  """Step 1's basis U = X R⁺ to store, or U_prev on a skipped step (the next step
  transports from the last applied step's basis).

  A branch, not a select: a select would read U and U_prev and write the result
  (three factor-sized passes after forming U); the branch forms U straight into
  the stored basis, or keeps U_prev untouched.
  """
  pieces = jax.lax.cond(applied, lambda: x.times(r_pinv).pieces, lambda: prev.pieces)
  return Thin(tuple(pieces), x.rank_major)


def write(side: Side, transport_: list[jax.Array], partner_r_pinv: jax.Array, k: jax.Array,
          second: jax.Array, rho: jax.Array, b1_hat: jax.Array, finite: jax.Array,
          basis_: Thin, hyper: Hyper) -> Written:
  """Steps 9–11: one factor-sized pass per output, given the new basis and V
  (``second``, step 6).

  A skipped step writes M unchanged and Δ = 0 with no factor-sized select: there
  the transport is I, β̂₁ is 1, and Δ's scale and the weight decay are 0, so
  ``M ← M I`` and ``Δ ← M (0·R_B⁺)ᵀ + 0·X`` (exact in floating point).
  """
  dtype = rho.dtype
  eye = jnp.eye(k.shape[-1], dtype=dtype)
  transport_ = [jnp.where(finite, p, eye) for p in transport_]
  b1_hat = jnp.where(finite, b1_hat, 1.0)
  s = side.grad.times(k)  # step 8: S = ∇A K
  moment = side.moment.times_t(transport_).map(  # step 9
      lambda m, s: jnp.where(finite, (1.0 - b1_hat) * s, 0.0) + b1_hat * m, s)
  # Step 11, Δ = c·M (R_B⁺)ᵀ (+ weight_decay·X), with the per-adapter scale c (the
  # capping of step 10, the same as capping M, which the state keeps; 0 on a
  # skipped step, where M is finite) folded into R_B⁺: no pass of its own.
  c = jnp.where(finite, 1.0, 0.0)
  if hyper.update_capping is not None:
    c = c * fm.capping_scale(moment.mean_square(), jnp.asarray(hyper.update_capping, dtype))
  delta = moment.times_t(partner_r_pinv * jnp.broadcast_to(c, rho.shape)[:, None, None])
  if hyper.weight_decay is not None:
    wd = jnp.where(finite, jnp.asarray(hyper.weight_decay, dtype), 0.0)
    delta = delta.map(lambda d, x: d + wd * x, side.x)
  # Without apply_escape ρ is 0 in the math and its state (zeros) is passed through.
  escaped = jnp.where(finite, rho, side.escaped) if hyper.apply_escape else side.escaped
  return Written(delta, moment, basis_, second, escaped)
