"""An independent float64 NumPy LoRA-RITE, written line by line from docs/algorithm.md §3 (steps 1–12).

Deliberately different from rite_optax's implementation: one adapter at a time,
Householder QR (``np.linalg.qr``) and ``np.linalg.pinv`` for the basis, plain
loops. Adapters are given canonically as ``A (m, r)`` and ``B (n, r)`` with
``Z = A Bᵀ``. Because the basis differs, the state is compared in Z-space.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Options:
  lr: float = 1e-2
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-6
  relative_eps: bool = False
  clip_unmagnified_grad: float = 1.0
  update_skipping: float = 1.0
  update_capping: float = 0.0
  weight_decay: float = 0.0
  apply_escape: bool = False
  balance_factors: bool = False


@dataclasses.dataclass
class SideState:
  m: np.ndarray  # first moment, (rows, r), in the partner's basis
  v: np.ndarray  # second moment (r, r)
  rho: float  # escaped mass
  basis: np.ndarray  # this factor's orthonormal basis from the last step


def init_side(rows: int, r: int) -> SideState:
  return SideState(np.zeros((rows, r)), np.zeros((r, r)), 0.0, np.zeros((rows, r)))


def bias_corrected(beta: float, t: int) -> float:
  return beta * (1 - beta**t) / (1 - beta ** (t + 1))


def sym(x):
  return (x + x.T) / 2


def rms(x):
  return np.sqrt(np.mean(x**2))


def step(factors, grads, states, t, o: Options):
  """One LoRA-RITE step over all adapters.

  Args:
    factors: list of (A, B) pairs.
    grads: list of (∇A, ∇B).
    states: list of (SideState for A, SideState for B).
    t: 0-based count of applied steps.
    o: options.

  Returns:
    (new factors, new states, applied): ``applied`` is False for a skipped
    non-finite step, in which case factors and states are returned unchanged.
  """
  prepared = []
  for (a, b), (ga, gb) in zip(factors, grads):
    qa, ra = np.linalg.qr(a)
    qb, rb = np.linalg.qr(b)
    ra_pinv, rb_pinv = np.linalg.pinv(ra), np.linalg.pinv(rb)
    gbar_a = ga @ rb_pinv  # step 2: unmagnified gradients
    gbar_b = gb @ ra_pinv
    prepared.append([qa, qb, ra_pinv, rb_pinv, gbar_a, gbar_b])

  if not all(np.all(np.isfinite(p[4])) and np.all(np.isfinite(p[5])) for p in prepared):
    return factors, states, False

  for p in prepared:  # step 3: update skipping, per factor
    for k in (4, 5):
      if o.update_skipping > 0 and rms(p[k]) > o.update_skipping:
        p[k] = np.zeros_like(p[k])

  norm = np.sqrt(sum(np.sum(p[4] ** 2) + np.sum(p[5] ** 2) for p in prepared))
  if o.clip_unmagnified_grad > 0 and norm > o.clip_unmagnified_grad:  # step 4
    for p in prepared:
      p[4] = p[4] * o.clip_unmagnified_grad / norm
      p[5] = p[5] * o.clip_unmagnified_grad / norm

  b1h, b2h = bias_corrected(o.b1, t), bias_corrected(o.b2, t)
  new_factors, new_states = [], []
  for (a, b), (sa, sb), (qa, qb, ra_pinv, rb_pinv, gbar_a, gbar_b) in zip(
      factors, states, prepared
  ):
    sides = []
    # (own factor, own state, own basis, partner basis, partner's previous
    # basis, partner R⁺, ḡ)
    for x, s, q_own, q_other, q_other_prev, r_other_pinv, g in (
        (a, sa, qa, qb, sb.basis, rb_pinv, gbar_a),
        (b, sb, qb, qa, sa.basis, ra_pinv, gbar_b),
    ):
      p_t = q_other.T @ q_other_prev  # step 5: basis transport
      v_tilde = sym(p_t @ s.v @ p_t.T)  # step 6
      v_new = (1 - b2h) * sym(g.T @ g / g.shape[0]) + b2h * v_tilde
      if o.apply_escape:  # step 7
        gap = np.max(np.linalg.eigvalsh(s.v) - np.linalg.eigvalsh(v_tilde))
        trace_gap = np.trace(s.v) - np.trace(v_tilde)
        e = min(max(0.0, gap), max(0.0, trace_gap))
        rho = b2h * (s.rho + e)
      else:
        rho = 0.0
      lam, q = np.linalg.eigh(v_new)  # step 8
      lam = np.maximum(lam, 0.0)
      # relative ε: eps·sqrt(λ_max), or eps where V = 0 (then ḡ = 0 as well).
      eps = o.eps * np.sqrt(lam.max()) if o.relative_eps and lam.max() > 0 else o.eps
      precond = q @ np.diag(1.0 / (np.sqrt(lam + rho) + eps)) @ q.T
      s_dir = g @ precond
      m_new = (1 - b1h) * s_dir + b1h * s.m @ p_t.T  # step 9
      m_used = m_new
      if o.update_capping > 0:  # step 10
        m_used = m_new / max(1.0, rms(m_new) / o.update_capping)
      delta = m_used @ r_other_pinv.T + o.weight_decay * x  # step 11
      sides.append((x - o.lr * delta, SideState(m_new, v_new, rho, q_own)))
    (a_new, sa_new), (b_new, sb_new) = sides
    if o.balance_factors:  # step 12, for adapters that moved (docs/algorithm.md step 12)
      na, nb = np.linalg.norm(a_new), np.linalg.norm(b_new)
      moved = np.any(a_new != a) or np.any(b_new != b)
      if moved and na > 0 and nb > 0:
        c = np.sqrt(nb / na)
        a_new, b_new = a_new * c, b_new / c
    new_factors.append((a_new, b_new))
    new_states.append((sa_new, sb_new))
  return new_factors, new_states, True

