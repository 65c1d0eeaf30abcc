"""The r×r numerics of LoRA-RITE: bases, moments, preconditioner, scalings.

Every function works on stacks of small matrices: ``(batch, r, r)`` statistics and
``(batch,)`` per-adapter scalars, where the batch axis holds independent adapters
(scanned layers, experts, or adapters of equal shape stacked together so that
many tiny problems run as one batched call). Factor-sized arrays never appear
here: :mod:`.thin` forms the thin products, :mod:`.core` strings the steps
together. Names follow the paper and docs/algorithm.md §3 (steps 1–12).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rite_optax.thin import mm as _mm
from rite_optax.thin import symmetric


def compute_dtype(dtype) -> jnp.dtype:
  """float64 for float64 params, float32 for everything else (bf16 included)."""
  return jnp.dtype(jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32)


def bias_corrected_decay(count: jax.Array, decay: jax.Array) -> jax.Array:
  """β̂(t) = β(1-βᵗ)/(1-βᵗ⁺¹) for 0-based step t: β̂(0) = 0, β̂(∞) = β.

  The EMA ``m ← (1-β̂)g + β̂m`` with this decay needs no separate bias
  correction (Adafactor, Shazeer & Stern 2018, §7.1).
  """
  return decay * (1.0 - decay**count) / (1.0 - decay ** (count + 1.0))


def gram_pseudo_inverse(
    gram_eigh: tuple[jax.Array, jax.Array], dtype
) -> tuple[jax.Array, jax.Array]:
  """R₁⁺ = W Σ⁺ from ``xᵀx = W Σ² Wᵀ``, so that ``U₁ = x R₁⁺`` is a basis of x.

  First half of :func:`rite_optax.core.basis`'s recipe. Directions with
  ``σ² ≤ r·eps·σ²_max`` (rank deficiency, including the all-zero ``lora_b`` of
  standard LoRA init) get ``1/σ = 0``: the pseudo-inverse, and a zero column in U₁.

  Returns:
    ``(R₁⁺ (batch, r, r), kept directions (batch, r) bool)``.
  """
  sigma2, w = gram_eigh
  sigma2 = jnp.maximum(sigma2, 0.0)
  rank_tol = w.shape[-1] * jnp.finfo(dtype).eps
  keep = sigma2 > rank_tol * jnp.max(sigma2, axis=-1, keepdims=True)
  inv_sigma = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, sigma2, 1.0)), 0.0)
  # W diag(1/σ) as a matmul: its result is sliced per factor (see Thin.times).
  return matmul_small(w, inv_sigma[..., None] * jnp.eye(w.shape[-1], dtype=w.dtype)), keep


def orthonormality_correction(u1_gram: jax.Array, keep: jax.Array) -> jax.Array:
  """Y ≈ (U₁ᵀU₁)^-½ on the kept directions, identity elsewhere, ``(batch, r, r)``.

  The Gram matrix squares the condition number, so ``U₁ᵀU₁ = I + E`` with
  ``‖E‖ = O(eps·κ²)``. Two Newton–Schulz steps leave an error O(‖E‖⁴), so
  ``U = U₁ Y`` is orthonormal to O(eps) for κ up to ~eps^-⅜ (1e6 in float64,
  400 in float32) and much better than U₁ beyond. Where ``‖E‖ ≥ ½`` the
  iteration may diverge and Y = I keeps U₁.
  """
  eye = jnp.eye(u1_gram.shape[-1], dtype=u1_gram.dtype)
  kept_eye = eye * keep[..., None, :]
  y = kept_eye
  for _ in range(2):  # Y ← ½ Y (3I - G Y²): quadratic convergence to G^-½
    y = 0.5 * _mm('brs,bst->brt', y, 3.0 * kept_eye - _mm('brs,bst,btu->bru', u1_gram, y, y))
  converges = jnp.max(jnp.abs(u1_gram - kept_eye), axis=(-2, -1), keepdims=True) < 0.5
  ok = converges & jnp.all(jnp.isfinite(y), axis=(-2, -1), keepdims=True)
  return jnp.where(ok, y + (eye - kept_eye), eye)


def matmul_small(x: jax.Array, y: jax.Array) -> jax.Array:
  """``(batch, r, s) @ (batch, s, t)``."""
  return _mm('brs,bst->brt', x, y)


def unmagnified_gram(grad_gram: jax.Array, partner_r_pinv: jax.Array) -> jax.Array:
  """ḡᵀḡ = R_B⁺ᵀ (∇Aᵀ∇A) R_B⁺, from the gradient's r×r Gram: ḡ is never formed."""
  return symmetric(_mm('bsr,bst,btu->bru', partner_r_pinv, grad_gram, partner_r_pinv))


def squared_norm(gbar_gram: jax.Array) -> jax.Array:
  """‖ḡ‖²_F per adapter from its r×r Gram matrix: ``tr(ḡᵀḡ)``, ``(batch,)``."""
  return jnp.trace(gbar_gram, axis1=-2, axis2=-1)


def kept_by_skipping(
    squared: jax.Array, size: int, threshold: jax.Array
) -> jax.Array:
  """1 for adapters whose RMS(ḡ) ≤ ``threshold`` (or ``threshold ≤ 0``), else 0; a
  ``squared`` that overflowed (inf, or NaN from inf - inf) is beyond the threshold."""
  skip = (threshold > 0) & ~(squared / size <= jnp.square(threshold))
  return jnp.where(skip, 0.0, 1.0).astype(squared.dtype)


def transported_second_moment(v: jax.Array, transport: jax.Array) -> jax.Array:
  """Ṽ = sym(P V Pᵀ)."""
  return symmetric(_mm('brs,bst,but->bru', transport, v, transport))


def second_moment(
    v_transported: jax.Array, gbar_gram: jax.Array, rows: int, b2_hat: jax.Array
) -> jax.Array:
  """V ← (1-β̂₂)·sym(ḡᵀḡ/rows) + β̂₂·Ṽ, given ``ḡᵀḡ``."""
  return (1.0 - b2_hat) * gbar_gram / rows + b2_hat * v_transported


def escaped_mass(
    v_old: jax.Array, v_transported: jax.Array, lam_old: jax.Array, lam_transported: jax.Array
) -> jax.Array:
  """Second-moment mass lost by transport, ``(batch,)``.

  ``min(max(0, maxᵢ λᵢ↑(V_old) - λᵢ↑(Ṽ)), max(0, tr V_old - tr Ṽ))``, given the
  ascending eigenvalues of both.
  """
  eig_gap = jnp.max(lam_old - lam_transported, axis=-1)
  trace_gap = jnp.trace(v_old, axis1=-2, axis2=-1) - jnp.trace(
      v_transported, axis1=-2, axis2=-1
  )
  return jnp.minimum(jnp.maximum(eig_gap, 0.0), jnp.maximum(trace_gap, 0.0))


def inverse_root(
    v_eigh: tuple[jax.Array, jax.Array], rho: jax.Array, eps: jax.Array, relative_eps: bool
) -> jax.Array:
  """Q diag(w) Qᵀ for V = QΛQᵀ (λ clamped at 0), w = 1/(sqrt(λ + ρ) + ε).

  Eigen-directions at rounding level, λ ≤ eps_dtype·λ_max, are exactly null
  (w = 0): in exact arithmetic ḡ has no component there, and in float32 what it
  has is rounding noise that 1/(√λ + ε) would blow up into a step
  (docs/algorithm.md §6.5). Where V = 0 (a skipped adapter, or the ``lora_a``
  side at LoRA init) every direction is null, so even ``eps = 0`` is finite.

  With ``relative_eps`` the ε is ``eps·sqrt(λ_max)``: relative to the largest
  singular value of the unmagnified gradient statistics, so that the update is
  invariant to the scale of the loss.
  """
  lam, q = v_eigh
  lam = jnp.maximum(lam, 0.0)
  lam_max = jnp.max(lam, axis=-1, keepdims=True)
  if relative_eps:
    eps = jnp.where(lam_max > 0, eps * jnp.sqrt(lam_max), eps)
  null = lam <= jnp.finfo(lam.dtype).eps * lam_max
  scale = jnp.where(null, 0.0, 1.0 / (jnp.sqrt(lam + rho[:, None]) + eps))
  return symmetric(_mm('brs,bs,bts->brt', q, scale, q))


def capping_scale(mean_square: jax.Array, capping: jax.Array) -> jax.Array:
  """1 / max(1, RMS(M)/cap) per adapter from RMS(M)², ``(batch,)``; ``capping ≤ 0`` disables."""
  safe_cap = jnp.where(capping > 0, capping, 1.0)
  return jnp.where(capping > 0, 1.0 / jnp.maximum(1.0, jnp.sqrt(mean_square) / safe_cap), 1.0)
