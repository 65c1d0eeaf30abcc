"""The LoRA-RITE step, numbered as in docs/algorithm.md §3: the math, and only the math.

Pure functions from NamedTuples to NamedTuples, for one *side* (the ``a`` or the
``b`` factors) of a group of same-shape adapters, and a side's *partner* (the other
side of the same adapters). The step has three phases:

1. per side, factor-sized reads reduced to r×r matrices (:func:`grams`,
   :func:`pseudo_inverse`, :func:`basis`, :func:`unmagnified`): steps 1 and 2;
2. global scalars over every side of every group (:func:`kept`,
   :func:`global_scalars`): steps 3 and 4;
3. per side, the transport and the new basis (:func:`transport`,
   :func:`new_basis`), r×r algebra (:func:`second_moment`, :func:`escaped_mass`,
   :func:`preconditioner`), then one factor-sized pass per output (:func:`write`):
   steps 5–11.

Nothing factor-sized crosses the global reduction: phase 1 keeps only r×r
matrices, and phase 3 forms the new basis ``U = X R⁺`` from the factor again.
Eigendecompositions and the Gram of ``X R₁⁺`` come in as arguments: :mod:`.engine` forms them as :mod:`.steering` says, across groups.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rite_optax import factor_math as fm
from rite_optax.thin import Thin, mm, stack


class Eigh(NamedTuple):
  """A batched symmetric eigendecomposition ``M = Q diag(λ) Qᵀ``."""

  values: jax.Array  # λ ascending, (B, r)
  vectors: jax.Array  # Q, (B, r, r)


class SecondMomentEighs(NamedTuple):
  """Step 7–8's eigendecompositions of one side's V: after the step, and (with
  ``apply_escape``, else None) before it and transported."""

  new: Eigh
  old: Eigh | None
  transported: Eigh | None


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
  """One side of a group: its factors X, their gradients and their state (the fields
  of ``ScaleByLoraRiteState``, by the same names)."""

  x: Thin  # the factors (A on the a side), as stored in the params
  grad: Thin  # ∇X
  first_moment: Thin  # M, the first moment in the partner's basis
  basis: Thin  # U_prev, X's orthonormal basis at the last applied step
  second_moment: jax.Array  # V (B, r, r)
  escaped_mass: jax.Array  # ρ (B,)


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


class SecondMoments(NamedTuple):
  """Step 6: V transported and V after (V before is ``Side.second_moment``; after =
  before on a skipped step)."""

  transported: jax.Array
  new: jax.Array


class Written(NamedTuple):
  """Steps 9–11's factor-sized outputs for one side, in the factors' layout."""

  delta: Thin  # Δ, the update before the learning rate
  first_moment: Thin  # M


def grams(side: Side) -> Grams:
  """Phase 1: the r×r reductions of the factor and of its gradient."""
  return Grams(x=side.x.gram(), grad=side.grad.gram())


def pseudo_inverse(x_gram_eigh: Eigh, dtype) -> tuple[jax.Array, jax.Array]:
  """Step 1, first half: R₁⁺ and the kept directions from the eigh of XᵀX, so that
  ``U₁ = X R₁⁺`` is a basis of span(X) (see :func:`basis`)."""
  return fm.gram_pseudo_inverse(x_gram_eigh, dtype)


def basis(r1_pinv: jax.Array, keep: jax.Array, u1_gram: jax.Array) -> jax.Array:
  """Step 1: R⁺ with ``X = U R``, U orthonormal on span(X), from ``U₁ᵀU₁``, the Gram of
  ``U₁ = X R₁⁺``. U₁ is formed only to measure its orthonormality, then freed: the
  basis itself, ``U = X R⁺``, is formed after the global reduction (:func:`new_basis`)."""
  return fm.matmul_small(r1_pinv, fm.orthonormality_correction(u1_gram, keep))


def unmagnified(own: Grams, partner_r_pinv: jax.Array) -> Seen:
  """Step 2 for one side, from r×r matrices only: ḡ itself is never formed."""
  gbar_gram = fm.unmagnified_gram(own.grad, partner_r_pinv)
  return Seen(gbar_gram=gbar_gram, squared_norm=fm.squared_norm(gbar_gram))


def kept(seen: Seen, size: int, hyper: Hyper) -> jax.Array:
  """Step 3: 1 for each adapter whose RMS(ḡ) is within ``update_skipping``, else 0."""
  return fm.kept_by_skipping(
      seen.squared_norm, size, jnp.asarray(hyper.update_skipping, seen.squared_norm.dtype))


def global_scalars(seen: list[Seen], kept_: list[jax.Array], hyper: Hyper, dtype,
                   inputs_ok: jax.Array) -> Scalars:
  """Step 4: whether the step is applied, and the global clip scale, from every side's
  unmagnified gradient statistics and step 3's verdict.

  ``inputs_ok``: every gradient and every R⁺ finite, and whatever the caller folds
  in (the fallback leaves' gradients, the learning rates, traced options). A huge
  but finite gradient whose statistics overflow is not a bad input: its RMS(ḡ)
  is beyond any skipping threshold, so step 3 zeroes that adapter. The step is
  applied when its inputs are sound and the norm of the kept ḡ is finite (it is
  not only when nothing skips an overflowing adapter).
  """
  grad_norm = jnp.sqrt(sum(jnp.sum(jnp.where(k > 0, sn.squared_norm, 0.0)).astype(dtype)
                           for sn, k in zip(seen, kept_, strict=True)))
  finite = inputs_ok & jnp.isfinite(grad_norm)
  clip = jnp.asarray(hyper.clip_unmagnified_grad, grad_norm.dtype)
  clip_scale = jnp.where(
      (clip > 0) & (grad_norm > clip), clip / jnp.where(grad_norm > 0, grad_norm, 1.0), 1.0)
  skipped = jnp.sum(jnp.concatenate([jnp.ravel(k == 0) for k in kept_]), dtype=jnp.int32)
  return Scalars(finite, grad_norm, clip_scale, skipped)


def gradient_scale(kept_: jax.Array, clip_scale: jax.Array, applied: jax.Array) -> jax.Array:
  """ḡ's factor per adapter, ``(B,)``: skip × clip, and 0 where the step is not
  ``applied`` (a flag, or one per adapter), so that every r×r quantity stays finite
  (eigh never sees a NaN)."""
  return jnp.where(applied, kept_ * clip_scale.astype(kept_.dtype), 0.0)


def transport(partner: Side, partner_r_pinv: jax.Array) -> list[jax.Array]:
  """Step 5: P = U_Bᵀ U_B,prev = R_B⁺ᵀ (X_Bᵀ U_B,prev), one ``(batch_i, r, r)`` per piece
  of the partner.

  Formed from X_B and R_B⁺, not from U_B: the new basis need not exist before
  the old one is read, so it can overwrite it.
  """
  return [mm('bsr,bst->brt', r, c) for r, c in zip(
      partner.x.split(partner_r_pinv), partner.x.cross(partner.basis), strict=True)]


def new_basis(x: Thin, r_pinv: jax.Array) -> Thin:
  """Step 1's basis to store, U = X R⁺ (on a skipped step the state keeps U_prev: the
  next step transports from the last applied step's basis)."""
  return x.times(r_pinv)


def second_moment(side: Side, seen: Seen, transport_: list[jax.Array], scale: jax.Array,
                  b2_hat: jax.Array, finite: jax.Array) -> SecondMoments:
  """Step 6: V ← (1-β̂₂)·(c·k)²·ḡᵀḡ/m + β̂₂·sym(P V Pᵀ); unchanged on a skipped step.
  An adapter whose scale is 0 adds nothing, even where its ḡᵀḡ overflowed."""
  transported = fm.transported_second_moment(side.second_moment, stack(transport_))
  used = (scale > 0)[:, None, None]
  gbar_gram = jnp.where(used, seen.gbar_gram * jnp.square(scale)[:, None, None], 0.0)
  new = fm.second_moment(transported, gbar_gram, side.x.rows, b2_hat)
  return SecondMoments(transported, jnp.where(finite, new, side.second_moment))


def escaped_mass(side: Side, v: SecondMoments, eighs: SecondMomentEighs, b2_hat: jax.Array,
                 finite: jax.Array, hyper: Hyper) -> jax.Array:
  """Step 7: ρ ← β̂₂·(ρ + e) with ``apply_escape``, else 0; unchanged on a skipped step
  (without ``apply_escape`` the state's zeros are passed through)."""
  if not hyper.apply_escape:
    return side.escaped_mass
  e = fm.escaped_mass(side.second_moment, v.transported, eighs.old.values,
                      eighs.transported.values)
  return jnp.where(finite, b2_hat * (side.escaped_mass + e), side.escaped_mass)


def preconditioner(v_eigh: Eigh, rho: jax.Array, partner_r_pinv: jax.Array,
                   scale: jax.Array, hyper: Hyper) -> jax.Array:
  """Step 8, folded: K = R_B⁺ V^-½ (c·k), so that S = ḡ V^-½ = ∇A K (ḡ is never formed).
  ρ is 0 in the math without ``apply_escape``."""
  rho = rho if hyper.apply_escape else jnp.zeros_like(rho)
  inv_root = fm.inverse_root(v_eigh, rho, jnp.asarray(hyper.eps, rho.dtype), hyper.relative_eps)
  return fm.matmul_small(partner_r_pinv, inv_root * scale[:, None, None])


def write(side: Side, transport_: list[jax.Array], partner_r_pinv: jax.Array, k: jax.Array,
          b1_hat: jax.Array, finite: jax.Array, hyper: Hyper) -> Written:
  """Steps 9–11: one factor-sized pass per output, M and Δ.

  A skipped step writes M unchanged and Δ = 0 with no factor-sized select: there
  the transport is I, β̂₁ is 1, and Δ's scale and the weight decay are 0, so
  ``M ← M I`` and ``Δ ← M (0·R_B⁺)ᵀ + 0·X`` (exact in floating point).
  """
  dtype = k.dtype
  eye = jnp.eye(k.shape[-1], dtype=dtype)
  transport_ = [jnp.where(finite, p, eye) for p in transport_]
  b1_hat = jnp.where(finite, b1_hat, 1.0)
  s = side.grad.times(k)  # step 8: S = ∇A K
  moment = side.first_moment.times_t(transport_).map(  # step 9
      lambda m, s: jnp.where(finite, (1.0 - b1_hat) * s, 0.0) + b1_hat * m, s)
  # Step 11, Δ = c·M (R_B⁺)ᵀ (+ weight_decay·X), with the per-adapter scale c (the
  # capping of step 10, the same as capping M, which the state keeps; 0 on a
  # skipped step, where M is finite) folded into R_B⁺: no pass of its own.
  c = jnp.where(finite, 1.0, 0.0).astype(dtype)
  if hyper.update_capping is not None:
    c = c * fm.capping_scale(moment.mean_square(), jnp.asarray(hyper.update_capping, dtype))
  delta = moment.times_t(partner_r_pinv * jnp.broadcast_to(c, k.shape[:1])[:, None, None])
  if hyper.weight_decay is not None:
    wd = jnp.where(finite, jnp.asarray(hyper.weight_decay, dtype), 0.0)
    delta = delta.map(lambda d, x: d + wd * x, side.x)
  return Written(delta, moment)
