"""The LoRA-RITE math for one side of a stack of adapters.

Every function works on canonical stacks: factors are ``(batch, rows, r)``, the
r×r statistics ``(batch, r, r)`` and per-adapter scalars ``(batch,)``; the batch
axis holds independent adapters (scanned layers, experts, or pairs of equal shape
stacked together so that many tiny r×r problems run as one batched call).

Names follow the paper and ``ALGORITHM.md``: the *unmagnified gradient*
``ḡ_A = ∇A R_B⁺`` is the gradient seen in an orthonormal basis of the other
factor, *basis transport* ``P = U_Bᵀ U_B,prev`` carries the moments from the last
step's basis into this one, and the *escaped mass* is the second-moment mass that
transport loses.

Precision: callers pass float32 or float64 arrays; every contraction runs at
``Precision.HIGHEST`` so that float32 on TPU/GPU is not silently bf16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def compute_dtype(dtype) -> jnp.dtype:
  """float64 for float64 params, float32 for everything else (bf16 included)."""
  return jnp.dtype(jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32)


def _mm(spec: str, *operands: jax.Array) -> jax.Array:
  return jnp.einsum(spec, *operands, precision=HIGHEST)


def symmetrize(x: jax.Array) -> jax.Array:
  return 0.5 * (x + jnp.swapaxes(x, -1, -2))


def bias_corrected_decay(count: jax.Array, decay: jax.Array) -> jax.Array:
  """β̂(t) = β(1-βᵗ)/(1-βᵗ⁺¹) for 0-based step t: β̂(0) = 0, β̂(∞) = β.

  The EMA ``m ← (1-β̂)g + β̂m`` with this decay needs no separate bias
  correction (Adafactor, Shazeer & Stern 2018, §7.1).
  """
  return decay * (1.0 - decay**count) / (1.0 - decay ** (count + 1.0))


def orthonormal_basis(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """An orthonormal basis U of the columns of x and R⁺ with ``x = U R``.

  Matmul-only, so on a mesh only r×r Gram matrices cross devices
  (ALGORITHM.md §4: any orthonormal basis gives the same update):

  1. ``xᵀx = W Σ² Wᵀ`` (batched r×r eigh), ``U₁ = x W Σ⁺``. Directions with
     ``σ² ≤ r·eps·σ²_max`` (rank deficiency, including the all-zero ``lora_b``
     of standard LoRA init) get ``1/σ = 0``: the pseudo-inverse, and a zero
     column in U.
  2. The Gram matrix squares the condition number, so ``U₁ᵀU₁ = I + O(eps·κ²)``.
     As in CholeskyQR2, ``U₁ᵀU₁ = L Lᵀ`` and ``U = U₁ L⁻ᵀ`` restore orthonormality
     to O(eps) for κ up to ~eps^-½ (1e8 in float64, 3e3 in float32). Where that
     Cholesky fails the first-pass basis is kept.

  Args:
    x: ``(batch, rows, r)``.

  Returns:
    ``(U, R⁺)`` of shapes ``(batch, rows, r)`` and ``(batch, r, r)``.
  """
  r = x.shape[-1]
  sigma2, w = jnp.linalg.eigh(symmetrize(_mm('bnr,bns->brs', x, x)))
  sigma2 = jnp.maximum(sigma2, 0.0)
  rank_tol = r * jnp.finfo(x.dtype).eps
  keep = sigma2 > rank_tol * jnp.max(sigma2, axis=-1, keepdims=True)
  inv_sigma = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, sigma2, 1.0)), 0.0)
  r1_pinv = w * inv_sigma[..., None, :]
  u1 = _mm('bnr,brs->bns', x, r1_pinv)

  # Dropped directions are exact zero columns of U₁: a unit diagonal there
  # keeps the Cholesky factor invertible without mixing them in.
  gram1 = symmetrize(_mm('bnr,bns->brs', u1, u1))
  gram1 = gram1 + jnp.eye(r, dtype=x.dtype) * (~keep)[..., None, :]
  chol = jnp.linalg.cholesky(gram1)
  r2_inv = jax.scipy.linalg.solve_triangular(
      chol, jnp.broadcast_to(jnp.eye(r, dtype=x.dtype), chol.shape), lower=True
  )
  r2_inv = jnp.swapaxes(r2_inv, -1, -2)  # L⁻ᵀ
  ok = jnp.all(jnp.isfinite(r2_inv), axis=(-2, -1), keepdims=True)
  r2_inv = jnp.where(ok, r2_inv, jnp.eye(r, dtype=x.dtype))
  return _mm('bnr,brs->bns', u1, r2_inv), _mm('brs,bst->brt', r1_pinv, r2_inv)


def unmagnified_gradient(grad: jax.Array, partner_r_pinv: jax.Array) -> jax.Array:
  """ḡ_A = ∇A R_B⁺ (= ∇Z U_B): the gradient free of the other factor's scale."""
  return _mm('bnr,brs->bns', grad, partner_r_pinv)


def rms(x: jax.Array) -> jax.Array:
  """Root mean square per adapter: ``(batch, rows, r) -> (batch,)``."""
  return jnp.sqrt(jnp.mean(jnp.square(x), axis=(-2, -1)))


def skip_large(gbar: jax.Array, threshold: jax.Array) -> jax.Array:
  """Zeroes the adapters whose RMS(ḡ) exceeds ``threshold`` (``≤ 0`` disables)."""
  skip = (threshold > 0) & (rms(gbar) > threshold)
  return jnp.where(skip[:, None, None], 0.0, gbar)


def basis_transport(basis: jax.Array, prev_basis: jax.Array) -> jax.Array:
  """P = Uᵀ U_prev, ``(batch, r, r)``: moves last step's moments into U."""
  return _mm('bnr,bns->brs', basis, prev_basis)


def transported_second_moment(v: jax.Array, transport: jax.Array) -> jax.Array:
  """Ṽ = sym(P V Pᵀ)."""
  return symmetrize(_mm('brs,bst,but->bru', transport, v, transport))


def second_moment(
    v_transported: jax.Array, gbar: jax.Array, b2_hat: jax.Array
) -> jax.Array:
  """V ← (1-β̂₂)·sym(ḡᵀḡ/rows) + β̂₂·Ṽ."""
  fresh = symmetrize(_mm('bnr,bns->brs', gbar, gbar)) / gbar.shape[-2]
  return (1.0 - b2_hat) * fresh + b2_hat * v_transported


def escaped_mass(v_old: jax.Array, v_transported: jax.Array) -> jax.Array:
  """Second-moment mass lost by transport, ``(batch,)``.

  ``min(max(0, maxᵢ λᵢ↑(V_old) - λᵢ↑(Ṽ)), max(0, tr V_old - tr Ṽ))``.
  """
  eig_gap = jnp.max(
      jnp.linalg.eigvalsh(v_old) - jnp.linalg.eigvalsh(v_transported), axis=-1
  )
  trace_gap = jnp.trace(v_old, axis1=-2, axis2=-1) - jnp.trace(
      v_transported, axis1=-2, axis2=-1
  )
  return jnp.minimum(jnp.maximum(eig_gap, 0.0), jnp.maximum(trace_gap, 0.0))


def inverse_root(
    v: jax.Array, rho: jax.Array, eps: jax.Array, relative_eps: bool
) -> jax.Array:
  """Q diag(1/(sqrt(λ + ρ) + ε)) Qᵀ for V = QΛQᵀ, λ clamped at 0.

  With ``relative_eps`` the ε is ``eps·sqrt(λ_max)``: relative to the largest
  singular value of the unmagnified gradient statistics, so that the update is
  invariant to the scale of the loss. Where V = 0 (a skipped adapter, or the
  ``lora_a`` side at LoRA init) ḡ is zero too and the plain ``eps`` keeps the
  preconditioner finite.
  """
  lam, q = jnp.linalg.eigh(v)
  lam = jnp.maximum(lam, 0.0)
  if relative_eps:
    lam_max = jnp.max(lam, axis=-1, keepdims=True)
    eps = jnp.where(lam_max > 0, eps * jnp.sqrt(lam_max), eps)
  scale = 1.0 / (jnp.sqrt(lam + rho[:, None]) + eps)
  return symmetrize(_mm('brs,bs,bts->brt', q, scale, q))


def precondition(gbar: jax.Array, inv_root: jax.Array) -> jax.Array:
  """S = ḡ · V^{-1/2}."""
  return _mm('bnr,brs->bns', gbar, inv_root)


def first_moment(
    m: jax.Array, transport: jax.Array, s: jax.Array, b1_hat: jax.Array
) -> jax.Array:
  """M ← (1-β̂₁)·S + β̂₁·M Pᵀ."""
  return (1.0 - b1_hat) * s + b1_hat * _mm('bnr,bsr->bns', m, transport)


def cap(m: jax.Array, capping: jax.Array) -> jax.Array:
  """M / max(1, RMS(M)/cap) per adapter; ``capping ≤ 0`` disables."""
  safe_cap = jnp.where(capping > 0, capping, 1.0)
  denom = jnp.where(capping > 0, jnp.maximum(1.0, rms(m) / safe_cap), 1.0)
  return m / denom[:, None, None]


def to_parameter_space(m: jax.Array, partner_r_pinv: jax.Array) -> jax.Array:
  """Δ_A = M (R_B⁺)ᵀ: back from the unmagnified basis to the factor's own."""
  return _mm('bnr,bsr->bns', m, partner_r_pinv)
