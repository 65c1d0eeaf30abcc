"""The LoRA-RITE math for one side of a stack of adapters.

Every function works on canonical stacks: factors are ``(batch, rows, r)``, the
r×r statistics ``(batch, r, r)`` and per-adapter scalars ``(batch,)``; the batch
axis holds independent adapters (scanned layers, experts, or pairs of equal shape
stacked together so that many tiny r×r problems run as one batched call).

Names follow the paper and ``docs/algorithm.md`` §3 (steps 1–12): the *unmagnified gradient*
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
import numpy as np

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


def gram(x: jax.Array, rank_major: bool = False) -> jax.Array:
  """Xᵀ X, ``(batch, r, r)``: on a mesh, an r×r all-reduce.

  Thin factor-sized arrays come in the layout they are stored in, so that no
  transpose is ever materialised: ``(batch, rows, r)`` or, when ``rank_major``,
  ``(batch, r, rows)`` (the layout of ``lora_b (r, n)``).
  """
  return symmetrize(cross_gram(x, x, rank_major))


def grams(xs: list[jax.Array], rank_major: bool = False) -> jax.Array:
  """:func:`gram` of each piece, stacked ``(batch, r, r)``.

  Symmetrized once on the stack: per piece it would cost one more small kernel
  per factor, and XLA's compile time grows faster than linearly with their count.
  """
  return symmetrize(stack([cross_gram(x, x, rank_major) for x in xs]))


def cross_gram(x: jax.Array, y: jax.Array, rank_major: bool = False) -> jax.Array:
  """Xᵀ Y, ``(batch, r, r)``, for thin X and Y in the same layout."""
  return _mm('brn,bsn->brs' if rank_major else 'bnr,bns->brs', x, y)


def matmul(x: jax.Array, small: jax.Array, rank_major: bool = False) -> jax.Array:
  """X S for thin X and ``small`` S ``(batch, r, s)``, in X's layout."""
  return _mm('brs,brn->bsn', small, x) if rank_major else _mm('bnr,brs->bns', x, small)


def matmul_t(x: jax.Array, small: jax.Array, rank_major: bool = False) -> jax.Array:
  """X Sᵀ for thin X and ``small`` S ``(batch, s, r)``, in X's layout."""
  return _mm('bsr,brn->bsn', small, x) if rank_major else _mm('bnr,bsr->bns', x, small)


def _eigh(batch: jax.Array) -> tuple[jax.Array, jax.Array]:
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


def eigh_each(matrices: list[jax.Array]) -> list[tuple[jax.Array, jax.Array]]:
  """Symmetric eigendecompositions of many ``(batch, r, r)`` stacks.

  Stacks of equal r are concatenated into one call (:func:`_eigh`), and the
  calls for different r are ordered one after another, so a step never runs two
  eigh calls at once.

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
    if previous is not None:  # a data dependency orders the calls
      batch, _ = jax.lax.optimization_barrier((batch, previous))
    lam, vecs = _eigh(batch)
    previous = lam
    offset = 0
    for i in indices:
      size = matrices[i].shape[0]
      results[i] = (lam[offset:offset + size], vecs[offset:offset + size])
      offset += size
  return results


def gram_pseudo_inverse(
    gram_eigh: tuple[jax.Array, jax.Array], dtype
) -> tuple[jax.Array, jax.Array]:
  """R₁⁺ = W Σ⁺ from ``xᵀx = W Σ² Wᵀ``, so that ``U₁ = x R₁⁺`` is a basis of x.

  First half of :func:`orthonormal_basis`'s recipe. Directions with
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
  return w * inv_sigma[..., None, :], keep


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


def stack(pieces: list[jax.Array]) -> jax.Array:
  """Concatenates per-factor pieces along the batch axis (no copy for one)."""
  return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=0)


def split_like(stacked: jax.Array, pieces: list[jax.Array]) -> list[jax.Array]:
  """Splits a ``(batch, ...)`` stack into the batch sizes of ``pieces``."""
  offsets = np.cumsum([p.shape[0] for p in pieces])[:-1].tolist()
  return jnp.split(stacked, offsets, axis=0) if offsets else [stacked]


def orthonormal_bases(
    xs: list[jax.Array], gram_eigh: tuple[jax.Array, jax.Array], rank_major: bool = False
) -> tuple[list[jax.Array], jax.Array]:
  """Orthonormal bases U of the columns of each x and R⁺ with ``x = U R``.

  Matmul-only given the eigendecomposition of the Gram matrices ``xᵀx``, so on a
  mesh only r×r matrices cross devices (docs/algorithm.md §4a: any orthonormal
  basis gives the same update): ``U₁ = x R₁⁺`` (:func:`gram_pseudo_inverse`), then
  ``U = U₁ Y`` (:func:`orthonormality_correction`) and ``R⁺ = R₁⁺ Y``.

  Thin arrays stay separate pieces (each factor's own buffer: stacking them
  would copy every factor), while their r×r matrices are stacked so that the
  small linear algebra of all pieces runs as one batched call.

  Args:
    xs: pieces ``(batch_i, rows, r)``, or ``(batch_i, r, rows)`` when ``rank_major``.
    gram_eigh: ``(σ², W)`` of the stacked :func:`gram` s of ``xs``, from
      :func:`eigh_each`.
    rank_major: the layout of the pieces (see :func:`gram`).

  Returns:
    ``(U pieces in the layout of xs, stacked R⁺ (batch, r, r))``.
  """
  r1_pinv, keep = gram_pseudo_inverse(gram_eigh, xs[0].dtype)
  u1 = [matmul(x, p, rank_major) for x, p in zip(xs, split_like(r1_pinv, xs), strict=True)]
  y = orthonormality_correction(grams(u1, rank_major), keep)
  bases = [matmul(u, p, rank_major) for u, p in zip(u1, split_like(y, xs), strict=True)]
  return bases, matmul_small(r1_pinv, y)


def orthonormal_basis(
    x: jax.Array, gram_eigh: tuple[jax.Array, jax.Array], rank_major: bool = False
) -> tuple[jax.Array, jax.Array]:
  """:func:`orthonormal_bases` of a single stack: ``(U, R⁺)``."""
  (basis,), r_pinv = orthonormal_bases([x], gram_eigh, rank_major)
  return basis, r_pinv


def matmul_small(x: jax.Array, y: jax.Array) -> jax.Array:
  """``(batch, r, s) @ (batch, s, t)``."""
  return _mm('brs,bst->brt', x, y)


def unmagnified_gradient(
    grad: jax.Array, partner_r_pinv: jax.Array, rank_major: bool = False
) -> jax.Array:
  """ḡ_A = ∇A R_B⁺ (= ∇Z U_B): the gradient free of the other factor's scale."""
  return matmul(grad, partner_r_pinv, rank_major)


def unmagnified_gram(grad_gram: jax.Array, partner_r_pinv: jax.Array) -> jax.Array:
  """ḡᵀḡ = R_B⁺ᵀ (∇Aᵀ∇A) R_B⁺, from the gradient's r×r Gram: ḡ is never formed."""
  return symmetrize(_mm('bsr,bst,btu->bru', partner_r_pinv, grad_gram, partner_r_pinv))


def rms(x: jax.Array) -> jax.Array:
  """Root mean square per adapter: ``(batch, rows, r) -> (batch,)``, any layout."""
  return jnp.sqrt(jnp.mean(jnp.square(x), axis=(-2, -1)))


def squared_norm(gbar_gram: jax.Array) -> jax.Array:
  """‖ḡ‖²_F per adapter from its r×r Gram matrix: ``tr(ḡᵀḡ)``, ``(batch,)``."""
  return jnp.trace(gbar_gram, axis1=-2, axis2=-1)


def kept_by_skipping(
    squared: jax.Array, size: int, threshold: jax.Array
) -> jax.Array:
  """1 for adapters whose RMS(ḡ) ≤ ``threshold`` (or ``threshold ≤ 0``), else 0."""
  skip = (threshold > 0) & (squared / size > jnp.square(threshold))
  return jnp.where(skip, 0.0, 1.0).astype(squared.dtype)


def basis_transport(
    basis: jax.Array, prev_basis: jax.Array, rank_major: bool = False
) -> jax.Array:
  """P = Uᵀ U_prev, ``(batch, r, r)``: moves last step's moments into U."""
  return cross_gram(basis, prev_basis, rank_major)


def transported_second_moment(v: jax.Array, transport: jax.Array) -> jax.Array:
  """Ṽ = sym(P V Pᵀ)."""
  return symmetrize(_mm('brs,bst,but->bru', transport, v, transport))


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
  return symmetrize(_mm('brs,bs,bts->brt', q, scale, q))


def precondition(gbar: jax.Array, inv_root: jax.Array, rank_major: bool = False) -> jax.Array:
  """S = ḡ · V^{-1/2}."""
  return matmul(gbar, inv_root, rank_major)


def first_moment(
    m: jax.Array, transport: jax.Array, s: jax.Array, b1_hat: jax.Array,
    rank_major: bool = False,
) -> jax.Array:
  """M ← (1-β̂₁)·S + β̂₁·M Pᵀ."""
  return (1.0 - b1_hat) * s + b1_hat * matmul_t(m, transport, rank_major)


def capping_scale(m: jax.Array, capping: jax.Array) -> jax.Array:
  """1 / max(1, RMS(M)/cap) per adapter, ``(batch,)``; ``capping ≤ 0`` disables."""
  return _capping_scale(rms(m), capping)


def _capping_scale(m_rms: jax.Array, capping: jax.Array) -> jax.Array:
  safe_cap = jnp.where(capping > 0, capping, 1.0)
  return jnp.where(capping > 0, 1.0 / jnp.maximum(1.0, m_rms / safe_cap), 1.0)


def capping_scale_each(ms: list[jax.Array], capping: jax.Array) -> jax.Array:
  """:func:`capping_scale` of pieces, stacked ``(batch,)``."""
  return _capping_scale(stack([rms(m) for m in ms]), capping)


def to_parameter_space(
    m: jax.Array, partner_r_pinv: jax.Array, rank_major: bool = False
) -> jax.Array:
  """Δ_A = M (R_B⁺)ᵀ: back from the unmagnified basis to the factor's own."""
  return matmul_t(m, partner_r_pinv, rank_major)
