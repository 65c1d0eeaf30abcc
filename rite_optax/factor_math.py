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


def gram(x: jax.Array) -> jax.Array:
  """xᵀx, ``(batch, rows, r) -> (batch, r, r)``: on a mesh, an r×r all-reduce."""
  return symmetrize(_mm('bnr,bns->brs', x, x))


def eigh_each(matrices: list[jax.Array]) -> list[tuple[jax.Array, jax.Array]]:
  """Batched symmetric eigendecompositions of many ``(batch, r, r)`` stacks.

  Stacks of equal r are concatenated into one call, and the calls for different
  r are ordered one after another. On CPU, jaxlib runs a batched eigh as a
  LAPACK loop spread over the intra-op thread pool; two such calls running at
  once can deadlock that pool (seen with jax 0.10.2 on 2 cores), and one big
  call is also faster than many small ones.

  Returns:
    ``(eigenvalues ascending, eigenvectors)`` per input, in input order.
  """
  by_rank: dict[int, list[int]] = {}
  for i, m in enumerate(matrices):
    by_rank.setdefault(m.shape[-1], []).append(i)
  results: list = [None] * len(matrices)
  previous = None
  for indices in by_rank.values():
    batch = jnp.concatenate([matrices[i] for i in indices], axis=0)
    if previous is not None:  # a data dependency orders the LAPACK calls
      batch, _ = jax.lax.optimization_barrier((batch, previous))
    lam, vecs = jnp.linalg.eigh(batch)
    previous = lam
    offset = 0
    for i in indices:
      size = matrices[i].shape[0]
      results[i] = (lam[offset:offset + size], vecs[offset:offset + size])
      offset += size
  return results


def orthonormal_basis(
    x: jax.Array, gram_eigh: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
  """An orthonormal basis U of the columns of x and R⁺ with ``x = U R``.

  Matmul-only given the eigendecomposition of the Gram matrix, so on a mesh
  only r×r matrices cross devices (ALGORITHM.md §4: any orthonormal basis gives
  the same update):

  1. ``xᵀx = W Σ² Wᵀ``, ``U₁ = x W Σ⁺``. Directions with ``σ² ≤ r·eps·σ²_max``
     (rank deficiency, including the all-zero ``lora_b`` of standard LoRA init)
     get ``1/σ = 0``: the pseudo-inverse, and a zero column in U.
  2. The Gram matrix squares the condition number: ``U₁ᵀU₁ = I + E`` with
     ``‖E‖ = O(eps·κ²)``. Two Newton–Schulz steps on the r×r matrix give
     ``Y ≈ (I + E)^-½`` with error O(‖E‖⁴), and ``U = U₁ Y`` is orthonormal to
     O(eps) for κ up to ~eps^-⅜ (1e6 in float64, 400 in float32) and much better
     than U₁ beyond. Where ``‖E‖ ≥ ½`` the iteration may diverge; U₁ is kept.

  Args:
    x: ``(batch, rows, r)``.
    gram_eigh: ``(σ², W)`` of :func:`gram` ``(x)``, from :func:`eigh_each`.

  Returns:
    ``(U, R⁺)`` of shapes ``(batch, rows, r)`` and ``(batch, r, r)``.
  """
  sigma2, w = gram_eigh
  r = x.shape[-1]
  sigma2 = jnp.maximum(sigma2, 0.0)
  rank_tol = r * jnp.finfo(x.dtype).eps
  keep = sigma2 > rank_tol * jnp.max(sigma2, axis=-1, keepdims=True)
  inv_sigma = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, sigma2, 1.0)), 0.0)
  r1_pinv = w * inv_sigma[..., None, :]
  u1 = _mm('bnr,brs->bns', x, r1_pinv)

  # Dropped directions are exact zero columns of U₁; E is zero there too.
  eye = jnp.eye(r, dtype=x.dtype)
  kept_eye = eye * keep[..., None, :]
  gram1 = gram(u1)
  y = kept_eye
  for _ in range(2):  # Y ← ½ Y (3I - G Y²), quadratic convergence to G^-½
    y = 0.5 * _mm('brs,bst->brt', y, 3.0 * kept_eye - _mm('brs,bst,btu->bru', gram1, y, y))
  converges = jnp.max(jnp.abs(gram1 - kept_eye), axis=(-2, -1), keepdims=True) < 0.5
  y = jnp.where(converges & jnp.all(jnp.isfinite(y), axis=(-2, -1), keepdims=True),
                y + (eye - kept_eye), eye)
  return _mm('bnr,brs->bns', u1, y), _mm('brs,bst->brt', r1_pinv, y)


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
  """Q diag(1/(sqrt(λ + ρ) + ε)) Qᵀ for V = QΛQᵀ, λ clamped at 0.

  With ``relative_eps`` the ε is ``eps·sqrt(λ_max)``: relative to the largest
  singular value of the unmagnified gradient statistics, so that the update is
  invariant to the scale of the loss. Where V = 0 (a skipped adapter, or the
  ``lora_a`` side at LoRA init) ḡ is zero too and the plain ``eps`` keeps the
  preconditioner finite.
  """
  lam, q = v_eigh
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
