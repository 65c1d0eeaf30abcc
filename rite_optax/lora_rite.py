"""LoRA-RITE as optax transformations: ``scale_by_lora_rite`` and ``lora_rite``.

The transformation pairs the LoRA factors of a param tree (:mod:`.pairing`),
stacks adapters of equal canonical shape so that their r×r linear algebra runs
as one batched call, applies the per-side math of :mod:`.factor_math`, and
scatters the results back into params-structured updates and state.
"""

from __future__ import annotations

import collections
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rite_optax import factor_math as fm
from rite_optax import pairing as pairing_lib


class ScaleByLoraRiteState(NamedTuple):
  """State of :func:`scale_by_lora_rite`. Every field but the counters has the
  params' tree structure (one leaf per LoRA factor)."""

  count: jax.Array
  """``[]`` int32 (float32 after some restores): steps applied so far."""
  skipped: jax.Array
  """``[]`` int32: steps skipped because a gradient was not finite."""
  first_moment: optax.Updates
  """factor-shaped: M, the first moment in the partner's orthonormal basis."""
  basis: optax.Updates
  """factor-shaped: U, this factor's orthonormal basis at the last applied step."""
  second_moment: optax.Updates
  """``(*batch, r, r)``: V, the second moment of the unmagnified gradient."""
  escaped_mass: optax.Updates
  """``(*batch,)``: ρ, the escaped mass (zeros unless ``apply_escape``)."""
  skipped_factors: jax.Array
  """``[]`` int32: factors whose unmagnified gradient update skipping zeroed in
  the last applied step (docs/algorithm.md step 3)."""
  skipped_factors_total: jax.Array
  """``[]`` int32: the same, summed over every applied step."""
  grad_norm: jax.Array
  """``[]`` compute dtype: the global norm of the kept unmagnified gradients in
  the last applied step, before clipping (step 4)."""
  clip_scale: jax.Array
  """``[]`` compute dtype: the factor clipping applied in the last applied step
  (1 when the norm was within ``clip_unmagnified_grad``)."""


def _check_number(
    name: str, value: Any, low: float, high: float | None = None, infinite_ok: bool = False):
  """Validates Python numbers: in range, never NaN, finite unless ``infinite_ok``.
  Arrays (``inject_hyperparams``) pass through, as their values may be traced."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    if isinstance(value, (jax.Array, jnp.ndarray)) or hasattr(value, 'dtype'):
      return
    raise TypeError(f'{name} must be a real number, got {value!r}.')
  if math.isnan(value) or (math.isinf(value) and not infinite_ok):
    raise ValueError(f'{name} must be finite, got {value!r}.')
  if value < low or (high is not None and value >= high):
    bounds = f'[{low}, {high})' if high is not None else f'>= {low}'
    raise ValueError(f'{name} must be in {bounds}, got {value!r}.')


def _check_learning_rate(name: str, value: Any):
  """A learning rate is a finite number, an array, or a schedule (a callable)."""
  if callable(value):
    return
  if value is None or isinstance(value, (str, bytes)):
    raise TypeError(
        f'{name} must be a number or an optax schedule (a callable of the step),'
        f' got {value!r}.')
  _check_number(name, value, -float('inf'))


def _check_bool(name: str, value: Any):
  if not isinstance(value, bool):
    raise TypeError(f'{name} must be a bool, got {value!r}.')


def _paired_or_raise(params: Any, pairing: pairing_lib.Pairing) -> Any:
  paired = pairing_lib.pair_leaves(params, pairing)
  if paired.unpaired:
    raise ValueError(
        'scale_by_lora_rite only transforms LoRA factors, but these leaves are'
        f' not factors under pairing {pairing.name!r}: {list(paired.unpaired)}.'
        ' Use rite_optax.lora_rite (which routes them to a fallback), or'
        ' optax.partition.'
    )
  return paired


def _layout(view: pairing_lib.FactorView):
  """How a factor is laid out for computation, with no transpose when possible.

  ``lora_a (m, r)`` is used as stored, rows-major ``(batch, rows, r)``;
  ``lora_b (r, n)`` too, rank-major ``(batch, r, rows)``. Only factors whose
  rank axis sits between row axes (or whose batch axes are not leading) pay a
  transpose.

  Returns:
    ``(axis permutation, compute shape, rank_major)``.
  """
  rows = [ax for ax in range(len(view.shape))
          if ax != view.rank_axis and ax not in view.batch_axes]
  batch, n, r = view.canonical_shape
  if all(view.rank_axis < ax for ax in rows):
    return (*view.batch_axes, view.rank_axis, *rows), (batch, r, n), True
  return (*view.batch_axes, *rows, view.rank_axis), (batch, n, r), False


def _to_compute(view, leaf, dtype):
  permutation, shape, _ = _layout(view)
  return leaf.transpose(permutation).reshape(shape).astype(dtype)


def _from_compute(view, x, dtype):
  permutation, _, _ = _layout(view)
  permuted = tuple(view.shape[ax] for ax in permutation)
  return x.reshape(permuted).transpose(np.argsort(permutation)).astype(dtype)


class _Side:
  """One role (``a`` or ``b``) of a stack of same-shape adapters.

  Factor-sized arrays stay one piece per factor, in their stored layout
  (``rank_major`` for ``lora_b``): concatenating them would copy every factor
  into a temporary, which costs more than the thin products themselves. Their
  r×r statistics and per-adapter state leaves are stacked along the batch axis,
  so the small linear algebra of the whole stack is one batched call.
  """

  def __init__(self, views, dtype):
    self.views = views
    self.dtype = dtype
    self.rank_major = _layout(views[0])[2]
    self.rows = views[0].rows

  def gather(self, leaves):
    """Factor-shaped leaves -> one ``(batch_i, ...)`` compute-layout piece each."""
    return [_to_compute(v, leaves[v.index], self.dtype) for v in self.views]

  def gather_stats(self, leaves):
    """``(*batch, ...)`` state leaves -> one ``(B, ...)`` stack."""
    return fm.stack([
        leaves[v.index].reshape((v.canonical_shape[0], *leaves[v.index].shape[len(v.batch_axes):]))
        .astype(self.dtype) for v in self.views])


def _state_dtype(pairs) -> jnp.dtype:
  """The dtype of the state's scalar diagnostics: the widest compute dtype."""
  return jnp.result_type(jnp.float32, *(fm.compute_dtype(p.a.dtype) for p in pairs))


def _stacks(pairs):
  """Adapters whose two factors have equal compute shapes, layouts and dtype."""
  groups = collections.defaultdict(list)
  for pair in pairs:
    key = tuple(_layout(v)[1:] for v in (pair.a, pair.b)) + (fm.compute_dtype(pair.a.dtype),)
    key = tuple((shape[1:], rank_major) for shape, rank_major in key[:2]) + key[2:]
    groups[key].append(pair)
  return [
      {'a': _Side([p.a for p in group], fm.compute_dtype(group[0].a.dtype)),
       'b': _Side([p.b for p in group], fm.compute_dtype(group[0].a.dtype))}
      for group in groups.values()
  ]


def scale_by_lora_rite(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    relative_eps: bool = False,
    clip_unmagnified_grad: float = 1.0,
    update_skipping: float = 1.0,
    update_capping: float = 0.0,
    weight_decay: float = 0.0,
    apply_escape: bool = False,
    pairing: str | pairing_lib.Pairing = 'nnx',
) -> optax.GradientTransformationExtraArgs:
  """Rescales LoRA factor gradients by LoRA-RITE's invariant preconditioner.

  For every adapter ``Z = A Bᵀ`` found by ``pairing``, the gradient of each
  factor is expressed in an orthonormal basis of the other factor (the
  unmagnified gradient), preconditioned by the inverse root of an r×r second
  moment that is carried across steps by basis transport, averaged into a
  first moment, and mapped back. The resulting ``Z``-update is the same for
  every equivalent pair ``(A R, B R⁻ᵀ)``. Every leaf of the params must be a
  LoRA factor; :func:`lora_rite` routes other leaves to a fallback.

  A step in which any unmagnified gradient is not finite returns zero updates
  (weight decay included) and leaves the state unchanged except for
  ``skipped``.

  Example::

    >>> import jax.numpy as jnp, optax, rite_optax
    >>> params = {'q': {'lora_a': jnp.ones((8, 2)), 'lora_b': jnp.zeros((2, 4))}}
    >>> tx = optax.chain(rite_optax.scale_by_lora_rite(), optax.scale(-1e-2))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)

  Args:
    b1: first-moment decay (bias-corrected as in Adafactor).
    b2: second-moment decay (bias-corrected as in Adafactor).
    eps: added to the root of the second moment's eigenvalues. ``0`` is safe:
      eigen-directions of the second moment at rounding level (λ ≤ eps·λ_max of
      its dtype) get no step whatever ``eps`` is (docs/algorithm.md §6.5).
    relative_eps: scale ``eps`` by ``sqrt(λ_max)`` of each second moment.
    clip_unmagnified_grad: clip the global norm of all unmagnified gradients to
      this value; ``<= 0`` or ``inf`` disables.
    update_skipping: zero an adapter's unmagnified gradient when its RMS exceeds
      this value; ``<= 0`` or ``inf`` disables.
    update_capping: cap the RMS of each first moment at this value before it is
      applied; ``<= 0`` or ``inf`` disables.
    weight_decay: adds ``weight_decay·factor`` to each factor's update, outside
      the preconditioner (docs/algorithm.md step 11).
    apply_escape: add the paper's escaped mass to the second moment's
      eigenvalues.
    pairing: a preset name (``'nnx'``) or a :class:`rite_optax.Pairing`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

  References:
    Yen et al., `LoRA Done RITE: Robust Invariant Transformation Equilibration
    for LoRA Optimization <https://arxiv.org/abs/2410.20625>`_, ICLR 2025.
  """
  return _scale_by_lora_rite(
      b1=b1, b2=b2, eps=eps, relative_eps=relative_eps,
      clip_unmagnified_grad=clip_unmagnified_grad, update_skipping=update_skipping,
      update_capping=update_capping, weight_decay=weight_decay, apply_escape=apply_escape,
      pairing=pairing, updates_in_param_dtype=True)


def _scale_by_lora_rite(
    *, b1, b2, eps, relative_eps, clip_unmagnified_grad, update_skipping, update_capping,
    weight_decay, apply_escape, pairing, updates_in_param_dtype: bool,
) -> optax.GradientTransformationExtraArgs:
  """:func:`scale_by_lora_rite`; with ``updates_in_param_dtype=False`` the updates stay
  in the compute dtype, so that :func:`lora_rite` rounds them to bf16 params once,
  after the learning rate, not twice."""
  _check_number('b1', b1, 0.0, 1.0)
  _check_number('b2', b2, 0.0, 1.0)
  _check_number('eps', eps, 0.0)
  # Thresholds: <= 0 and +inf both switch the feature off.
  _check_number('clip_unmagnified_grad', clip_unmagnified_grad, -float('inf'), infinite_ok=True)
  _check_number('update_skipping', update_skipping, -float('inf'), infinite_ok=True)
  _check_number('update_capping', update_capping, -float('inf'), infinite_ok=True)
  _check_number('weight_decay', weight_decay, 0.0)
  _check_bool('relative_eps', relative_eps)
  _check_bool('apply_escape', apply_escape)
  pairing = pairing_lib.resolve(pairing)
  capping_off = isinstance(update_capping, numbers.Real) and not 0 < update_capping < math.inf

  def init_fn(params):
    paired = _paired_or_raise(params, pairing)
    leaves, treedef = jax.tree.flatten(params)
    moments, bases, seconds, escapes = (list(leaves) for _ in range(4))
    for pair in paired.pairs:
      for view in (pair.a, pair.b):
        dtype = fm.compute_dtype(view.dtype)
        moments[view.index] = jnp.zeros(view.shape, dtype)
        bases[view.index] = jnp.zeros(view.shape, dtype)
        seconds[view.index] = jnp.zeros(view.state_shape(view.rank, view.rank), dtype)
        escapes[view.index] = jnp.zeros(view.state_shape(), dtype)
    unflatten = lambda xs: jax.tree.unflatten(treedef, xs)
    dtype = _state_dtype(paired.pairs)
    return ScaleByLoraRiteState(
        count=jnp.zeros([], jnp.int32),
        skipped=jnp.zeros([], jnp.int32),
        first_moment=unflatten(moments),
        basis=unflatten(bases),
        second_moment=unflatten(seconds),
        escaped_mass=unflatten(escapes),
        skipped_factors=jnp.zeros([], jnp.int32),
        skipped_factors_total=jnp.zeros([], jnp.int32),
        grad_norm=jnp.zeros([], dtype),
        clip_scale=jnp.ones([], dtype),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError('scale_by_lora_rite needs params: call update(grads, state, params).')
    paired = _paired_or_raise(params, pairing)
    grads, treedef = jax.tree.flatten(updates)
    factors = jax.tree.leaves(params)
    moments = treedef.flatten_up_to(state.first_moment)
    bases = treedef.flatten_up_to(state.basis)
    seconds = treedef.flatten_up_to(state.second_moment)
    escapes = treedef.flatten_up_to(state.escaped_mass)

    stacks = _stacks(paired.pairs)
    sides = [side for stack in stacks for side in stack.values()]
    partners = [(stack[role], stack[other]) for stack in stacks
                for role, other in (('a', 'b'), ('b', 'a'))]

    # Phase 1: bases, unmagnified gradients and their r×r Gram matrices. The
    # global clipping norm and the finiteness check need all of them first.
    for side in sides:
      side.x, side.grad = side.gather(factors), side.gather(grads)
      side.basis_prev = side.gather(bases)
      side.gram = fm.grams(side.x, side.rank_major)
      side.grad_gram = fm.grams(side.grad, side.rank_major)
    for side, gram_eigh in zip(sides, fm.eigh_each([s.gram for s in sides]), strict=True):
      side.basis, side.r_pinv = fm.orthonormal_bases(side.x, gram_eigh, side.rank_major)
    for side, other in partners:
      side.gbar_gram = fm.unmagnified_gram(side.grad_gram, other.r_pinv)

    # Skipping, clipping and the finiteness check need only the r×r traces;
    # their scalings are folded into r×r matrices below.
    dtype = _state_dtype(paired.pairs)
    total = lambda xs: sum((jnp.sum(x).astype(dtype) for x in xs), start=jnp.zeros([], dtype))
    squared = [fm.squared_norm(s.gbar_gram) for s in sides]
    finite = jnp.isfinite(total(squared))
    kept = [fm.kept_by_skipping(sq, s.rows * s.gram.shape[-1], update_skipping)
            for sq, s in zip(squared, sides, strict=True)]
    grad_norm = jnp.sqrt(total(k * sq for k, sq in zip(kept, squared, strict=True)))
    clip = jnp.asarray(clip_unmagnified_grad, dtype)
    clip_scale = jnp.where(
        (clip > 0) & (grad_norm > clip), clip / jnp.where(grad_norm > 0, grad_norm, 1.0), 1.0)
    for side, k in zip(sides, kept, strict=True):
      side.grad_scale = (k * clip_scale).astype(side.dtype)[:, None, None]
    skipped_factors = sum((jnp.sum(k == 0).astype(jnp.int32) for k in kept),
                          start=jnp.zeros([], jnp.int32))

    # Phase 2: transport, moments, preconditioning, updates. A non-finite step
    # (NaN/inf in any gradient) must leave the state as it was and return zero
    # updates: the r×r inputs of eigh are kept finite, and every output is
    # selected elementwise (a lax.cond would copy every factor-sized output).
    count = state.count.astype(dtype)
    for side, other in partners:
      side.b1_hat = fm.bias_corrected_decay(count, jnp.asarray(b1, side.dtype)).astype(side.dtype)
      side.b2_hat = fm.bias_corrected_decay(count, jnp.asarray(b2, side.dtype)).astype(side.dtype)
      side.transport = fm.stack([
          fm.basis_transport(u, u_prev, other.rank_major)
          for u, u_prev in zip(other.basis, other.basis_prev, strict=True)])
      side.v_old = side.gather_stats(seconds)
      side.v_transported = fm.transported_second_moment(side.v_old, side.transport)
      side.v_new = jnp.where(finite, fm.second_moment(
          side.v_transported, side.gbar_gram * jnp.square(side.grad_scale), side.rows,
          side.b2_hat), side.v_old)
    to_decompose = [s.v_new for s in sides]
    if apply_escape:
      to_decompose += [s.v_old for s in sides] + [s.v_transported for s in sides]
    decomposed = fm.eigh_each(to_decompose)
    n = len(sides)

    new_updates, new_moments, new_bases = list(grads), list(moments), list(bases)
    new_seconds, new_escapes = list(seconds), list(escapes)
    for i, (side, other) in enumerate(partners):
      rho_old = side.gather_stats(escapes)
      if apply_escape:
        rho = side.b2_hat * (rho_old + fm.escaped_mass(
            side.v_old, side.v_transported, decomposed[n + i][0], decomposed[2 * n + i][0]))
      else:
        rho = jnp.zeros(side.v_new.shape[:1], side.dtype)
      inv_root = fm.inverse_root(
          decomposed[i], rho, jnp.asarray(eps, side.dtype), relative_eps) * side.grad_scale
      # S = ḡ V^-½ = ∇A (R_B⁺ V^-½): the unmagnified gradient is never formed.
      precondition = fm.split_like(fm.matmul_small(other.r_pinv, inv_root), side.grad)
      transport = fm.split_like(side.transport, side.grad)
      m_old = side.gather(moments)
      m_new = [
          fm.first_moment(m, p, fm.precondition(g, k, side.rank_major), side.b1_hat,
                          side.rank_major)
          for m, p, g, k in zip(m_old, transport, side.grad, precondition, strict=True)]
      if capping_off:  # no pass over M for its RMS
        capped = jnp.ones(side.v_new.shape[:1], side.dtype)
      else:
        capped = fm.capping_scale_each(m_new, jnp.asarray(update_capping, side.dtype))
      to_params = fm.split_like(other.r_pinv * capped[:, None, None], side.grad)
      wd = jnp.asarray(weight_decay, side.dtype)
      delta = [jnp.where(finite, fm.to_parameter_space(m, p, side.rank_major) + wd * x, 0.0)
               for m, p, x in zip(m_new, to_params, side.x, strict=True)]
      m_new = [jnp.where(finite, m, old) for m, old in zip(m_new, m_old, strict=True)]
      # Each new basis is kept only where the transport that read its old one is
      # finite (always, for finite params): that orders the read before the
      # write, so the new basis overwrites the donated old one in place.
      read_old = fm.split_like(other.transport, side.grad)
      basis = [jnp.where(finite & jnp.isfinite(p[..., :1, :1]), u, old)
               for u, old, p in zip(side.basis, side.basis_prev, read_old, strict=True)]
      rho = jnp.where(finite, rho, rho_old)
      pieces = zip(side.views, delta, m_new, basis, fm.split_like(side.v_new, side.grad),
                   fm.split_like(rho, side.grad), strict=True)
      for view, d, m, u, v, r in pieces:
        k = view.index
        new_updates[k] = _from_compute(
            view, d, factors[k].dtype if updates_in_param_dtype else side.dtype)
        new_moments[k] = _from_compute(view, m, moments[k].dtype)
        new_bases[k] = _from_compute(view, u, bases[k].dtype)
        new_seconds[k] = v.reshape(seconds[k].shape).astype(seconds[k].dtype)
        new_escapes[k] = r.reshape(escapes[k].shape).astype(escapes[k].dtype)

    unflatten = lambda xs: jax.tree.unflatten(treedef, xs)
    keep_old = lambda new, old: jnp.where(finite, new, old).astype(old.dtype)
    return unflatten(new_updates), ScaleByLoraRiteState(
        count=state.count + finite.astype(state.count.dtype),
        skipped=state.skipped + (~finite).astype(state.skipped.dtype),
        first_moment=unflatten(new_moments),
        basis=unflatten(new_bases),
        second_moment=unflatten(new_seconds),
        escaped_mass=unflatten(new_escapes),
        skipped_factors=keep_old(skipped_factors, state.skipped_factors),
        skipped_factors_total=keep_old(
            state.skipped_factors_total + skipped_factors, state.skipped_factors_total),
        grad_norm=keep_old(grad_norm, state.grad_norm),
        clip_scale=keep_old(clip_scale, state.clip_scale),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def balance_lora_factors(
    pairing: str | pairing_lib.Pairing = 'nnx',
) -> optax.GradientTransformationExtraArgs:
  """Rescales each adapter's new factors to equal Frobenius norms.

  Changes ``updates`` so that ``params + updates`` becomes ``(c·A', B'/c)`` with
  ``‖c·A'‖ = ‖B'/c‖`` per adapter: the product ``A' B'ᵀ`` is unchanged, so the
  LoRA delta and LoRA-RITE's trajectory are too. Adapters with an all-zero
  factor or a zero update (a skipped step) keep their update unchanged. Leaves that are not factors pass through. Put it
  last in a chain: it needs the final updates.
  """
  pairing = pairing_lib.resolve(pairing)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError('balance_lora_factors needs params.')
    paired = pairing_lib.pair_leaves(params, pairing)
    deltas, treedef = jax.tree.flatten(updates)
    factors = jax.tree.leaves(params)
    out = list(deltas)
    for pair in paired.pairs:
      dtype = fm.compute_dtype(pair.a.dtype)
      old, step = {}, {}
      for role, view in (('a', pair.a), ('b', pair.b)):
        old[role] = view.to_canonical(factors[view.index]).astype(dtype)
        step[role] = view.to_canonical(deltas[view.index]).astype(dtype)
      new = {role: old[role] + step[role] for role in 'ab'}
      norm_a, norm_b = (jnp.linalg.norm(new[role], axis=(-2, -1)) for role in 'ab')
      moved = jnp.any(step['a'] != 0, axis=(-2, -1)) | jnp.any(step['b'] != 0, axis=(-2, -1))
      # Adapters that did not move (a skipped step) or have a zero factor keep
      # their update bit for bit: (p + u)·1 - p is not u in floating point.
      ok = moved & (norm_a > 0) & (norm_b > 0)
      c = jnp.sqrt(norm_b / jnp.where(ok, norm_a, 1.0))
      for role, view, scale in (('a', pair.a, c), ('b', pair.b, 1.0 / c)):
        balanced = new[role] * scale[:, None, None] - old[role]
        out[view.index] = view.from_canonical(
            jnp.where(ok[:, None, None], balanced, step[role])
        ).astype(deltas[view.index].dtype)
    return jax.tree.unflatten(treedef, out), state

  return optax.GradientTransformationExtraArgs(
      lambda params: optax.EmptyState(), update_fn)


UNPAIRED_CHOICES = ('adamw', 'zero', 'error')


def factor_labels(
    pairing: str | pairing_lib.Pairing = 'nnx', unpaired: str = 'adamw'
) -> Callable[[Any], Any]:
  """Returns ``params -> labels``: ``'lora_rite'`` for factors, else ``'unpaired'``.

  With ``unpaired='error'`` the function raises, naming every leaf that is not
  a factor. Use it with ``optax.partition`` to build your own combinations.
  """
  pairing = pairing_lib.resolve(pairing)

  def labels(params):
    paired = pairing_lib.pair_leaves(params, pairing)
    if unpaired == 'error' and paired.unpaired:
      raise ValueError(
          f"unpaired='error', but these leaves are not LoRA factors under"
          f' pairing {pairing.name!r}: {list(paired.unpaired)}. Freeze them'
          " (optax.partition with optax.set_to_zero) or pass unpaired='adamw'."
      )
    leaves, treedef = jax.tree.flatten(params)
    factor_indices = paired.factor_indices
    return jax.tree.unflatten(treedef, [
        'lora_rite' if i in factor_indices else 'unpaired'
        for i in range(len(leaves))
    ])

  return labels


def lora_rite(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    relative_eps: bool = False,
    clip_unmagnified_grad: float = 1.0,
    update_skipping: float = 1.0,
    update_capping: float = 0.0,
    weight_decay: float = 0.0,
    apply_escape: bool = False,
    balance_factors: bool = False,
    pairing: str | pairing_lib.Pairing = 'nnx',
    unpaired: str = 'adamw',
    unpaired_learning_rate: optax.ScalarOrSchedule | None = None,
    unpaired_weight_decay: float = 1e-4,
) -> optax.GradientTransformationExtraArgs:
  """LoRA-RITE for LoRA factors, with a fallback for every other trainable leaf.

  The factors found by ``pairing`` get :func:`scale_by_lora_rite` (with
  ``weight_decay·param`` added outside the preconditioner, as in the paper's
  code), then ``-learning_rate``. Leaves that are not factors (biases, norms, heads)
  are handled as ``unpaired`` says: ``'adamw'`` (``optax.adamw`` with ``b1``,
  ``b2``, ``eps=1e-8``, ``unpaired_learning_rate`` defaulting to
  ``learning_rate``, and ``unpaired_weight_decay``), ``'zero'`` (frozen), or
  ``'error'`` (raise at ``init``, naming them).

  Example::

    >>> import jax, jax.numpy as jnp, optax, rite_optax
    >>> params = {'q': {'lora_a': jnp.ones((8, 2)), 'lora_b': jnp.zeros((2, 4))},
    ...           'bias': jnp.zeros(4)}
    >>> tx = rite_optax.lora_rite(optax.cosine_decay_schedule(1e-3, 1000))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  Args:
    learning_rate: a number or an ``optax`` schedule.
    b1, b2, eps, relative_eps, clip_unmagnified_grad, update_skipping,
      update_capping, apply_escape, pairing: see :func:`scale_by_lora_rite`.
    weight_decay: weight decay ``Δ += weight_decay·param`` on factors, added after
      the preconditioner and before the learning rate (docs/algorithm.md step 11).
    balance_factors: after each step, rescale every adapter's factors to equal
      Frobenius norms (product unchanged), see :func:`balance_lora_factors`.
    unpaired: ``'adamw'``, ``'zero'`` or ``'error'``.
    unpaired_learning_rate: learning rate of the AdamW fallback.
    unpaired_weight_decay: weight decay of the AdamW fallback.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

  References:
    Yen et al., `LoRA Done RITE: Robust Invariant Transformation Equilibration
    for LoRA Optimization <https://arxiv.org/abs/2410.20625>`_, ICLR 2025.
  """
  if unpaired not in UNPAIRED_CHOICES:
    raise ValueError(
        f'unpaired must be one of {UNPAIRED_CHOICES}, got {unpaired!r}.')
  _check_learning_rate('learning_rate', learning_rate)
  if unpaired_learning_rate is not None:
    _check_learning_rate('unpaired_learning_rate', unpaired_learning_rate)
  _check_number('unpaired_weight_decay', unpaired_weight_decay, 0.0)
  _check_bool('balance_factors', balance_factors)
  rite = optax.chain(
      _scale_by_lora_rite(
          b1=b1, b2=b2, eps=eps, relative_eps=relative_eps,
          clip_unmagnified_grad=clip_unmagnified_grad,
          update_skipping=update_skipping, update_capping=update_capping,
          weight_decay=weight_decay, apply_escape=apply_escape, pairing=pairing,
          updates_in_param_dtype=False),
      optax.scale_by_learning_rate(learning_rate),
  )
  if unpaired == 'adamw':
    fallback = optax.adamw(
        learning_rate if unpaired_learning_rate is None else unpaired_learning_rate,
        b1=b1, b2=b2, eps=1e-8, weight_decay=unpaired_weight_decay)
  else:
    fallback = optax.set_to_zero()
  tx = optax.partition(
      {'lora_rite': rite, 'unpaired': fallback},
      factor_labels(pairing, unpaired))
  if balance_factors:
    tx = optax.chain(tx, balance_lora_factors(pairing))
  return _skip_whole_step(tx, pairing, check_unpaired=unpaired == 'adamw')


def _rite_states(state: Any) -> list[ScaleByLoraRiteState]:
  is_rite = lambda x: isinstance(x, ScaleByLoraRiteState)
  return [x for x in jax.tree.leaves(state, is_leaf=is_rite) if is_rite(x)]


def diagnostics(state: Any) -> dict[str, jax.Array]:
  """LoRA-RITE's per-step diagnostics, as scalars a training loop can log.

  Finds the one :class:`ScaleByLoraRiteState` inside any optax state
  (:func:`lora_rite`, ``optax.chain``, ``optax.partition``,
  ``optax.inject_hyperparams``, ``optax.MultiSteps``). Works inside ``jit``.

  Example::

    >>> tx = rite_optax.lora_rite(1e-3)  # doctest: +SKIP
    >>> updates, state = tx.update(grads, state, params)  # doctest: +SKIP
    >>> logs = {k: float(v) for k, v in rite_optax.diagnostics(state).items()}  # doctest: +SKIP

  Returns:
    ``step`` (applied steps), ``skipped_steps`` (steps skipped whole for a
    non-finite gradient), ``skipped_factors`` (factors whose unmagnified gradient
    update skipping zeroed in the last applied step) and its running total
    ``skipped_factors_total``, ``grad_norm`` (global norm of the kept unmagnified
    gradients, before clipping) and ``clip_scale`` (1 when not clipped). A
    ``skipped_factors`` near the number of factors usually means a loss summed
    over tokens: the skipping threshold assumes a mean.

  Raises:
    ValueError: ``state`` holds no LoRA-RITE state, or more than one.
  """
  rites = _rite_states(state)
  if len(rites) != 1:
    raise ValueError(
        f'diagnostics needs exactly one ScaleByLoraRiteState in the state, found {len(rites)}.')
  rite, = rites
  return {
      'step': rite.count,
      'skipped_steps': rite.skipped,
      'skipped_factors': rite.skipped_factors,
      'skipped_factors_total': rite.skipped_factors_total,
      'grad_norm': rite.grad_norm,
      'clip_scale': rite.clip_scale,
  }


def _skip_whole_step(
    inner: optax.GradientTransformation, pairing: pairing_lib.Pairing, check_unpaired: bool
) -> optax.GradientTransformationExtraArgs:
  """Skips ``inner``'s whole step when any gradient is not finite.

  ``scale_by_lora_rite`` alone skips the factors' step on a non-finite
  unmagnified gradient; here a non-finite gradient of any other leaf (a bias, a
  norm) skips the step too, and a skipped step leaves every update zero and
  every inner state (the fallback's moments, the schedule's count) as it was,
  except LoRA-RITE's ``skipped``, which counts it. The factors' finiteness is
  read from the LoRA-RITE step itself (its ``skipped`` moved), so only the other
  leaves' gradients are checked here, and only when ``check_unpaired`` (they are
  applied: with ``unpaired='zero'`` they are discarded, and checking them would
  make XLA compute the frozen weights' gradients). Updates come back in the
  params' dtypes, whatever the gradients' dtypes.
  """

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError('lora_rite needs params: call update(grads, state, params).')
    paired = pairing_lib.pair_leaves(params, pairing)
    grads = jax.tree.leaves(updates)
    others_finite = jnp.array(True)
    for i, g in enumerate(grads):
      if check_unpaired and i not in paired.factor_indices:
        others_finite &= jnp.all(jnp.isfinite(g))
    new_updates, new_state = inner.update(updates, state, params, **extra_args)
    (old_rite,), (new_rite,) = _rite_states(state), _rite_states(new_state)
    finite = others_finite & (new_rite.skipped == old_rite.skipped)
    new_updates = jax.tree.map(
        lambda u, p: jnp.where(finite, u, 0).astype(p.dtype), new_updates, params)
    count_skip = lambda rite: rite._replace(
        skipped=old_rite.skipped + (~finite).astype(old_rite.skipped.dtype))
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    is_rite = lambda x: isinstance(x, ScaleByLoraRiteState)
    new_state = jax.tree.map(lambda x: count_skip(x) if is_rite(x) else x, new_state,
                             is_leaf=is_rite)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)
