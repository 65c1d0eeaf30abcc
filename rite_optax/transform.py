"""LoRA-RITE's preconditioner as an optax transformation: ``scale_by_lora_rite`` and its state.

It validates its options, pairs the LoRA factors of a param tree (:mod:`.pairing`), and
hands the step to :mod:`.engine`, which runs the math of :mod:`.core` over groups of
same-shape adapters. The full optimizer, with the fallback for other leaves and the
whole-step skip, is :func:`rite_optax.alias.lora_rite`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rite_optax import core, engine, multihost, options
from rite_optax import factor_math as fm
from rite_optax import pairing as pairing_lib

# The extra argument by which lora_rite tells scale_by_lora_rite whether the rest of
# the step is sound (the fallback leaves' gradients finite, the learning rates finite
# and the traced options in range): both skip the step together.
_OTHERS_OK = 'lora_rite_others_ok'



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


def _paired_or_raise(params: Any, pairing: pairing_lib.Pairing) -> Any:
  paired = pairing_lib.pair_leaves(params, pairing)
  pairing_lib.require_pairs(params, paired, pairing)
  if paired.unpaired:
    raise ValueError(
        'scale_by_lora_rite only transforms LoRA factors, but these leaves are'
        f' not factors under pairing {pairing.name!r}: {list(paired.unpaired)}.'
        ' Use rite_optax.lora_rite (which routes them to a fallback), or'
        ' optax.partition.'
    )
  return paired


def _check_shapes(paired: Any, leaves: engine.Leaves) -> None:
  """Gradients and state must have the shapes of the factors ``init`` saw."""
  for view in (v for pair in paired.pairs for v in (pair.a, pair.b)):
    for what, leaf in (('its gradient', leaves.grads[view.index]),
                       ('its LoRA-RITE state (from init)', leaves.first_moment[view.index])):
      if tuple(leaf.shape) != tuple(view.shape):
        raise ValueError(
            f'{view.path}: the factor has shape {tuple(view.shape)} but {what} has shape'
            f' {tuple(leaf.shape)}. A factor resized since init needs a new state (tx.init).')


def _state_dtype(pairs) -> jnp.dtype:
  """The dtype of the state's scalar diagnostics: the widest compute dtype."""
  return jnp.result_type(jnp.float32, *(fm.compute_dtype(p.a.dtype) for p in pairs))


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
    Its ``init`` carries the resolved pairing (``tx.init.pairing``), which
    :func:`rite_optax.state_partition_specs` and :func:`rite_optax.abstract_state`
    read, so it is given once.

  References:
    Yen et al., `LoRA Done RITE: Robust Invariant Transformation Equilibration
    for LoRA Optimization <https://arxiv.org/abs/2410.20625>`_, ICLR 2025.
  """
  return pairing_lib.with_pairing(_scale_by_lora_rite(
      b1=b1, b2=b2, eps=eps, relative_eps=relative_eps,
      clip_unmagnified_grad=clip_unmagnified_grad, update_skipping=update_skipping,
      update_capping=update_capping, weight_decay=weight_decay, apply_escape=apply_escape,
      pairing=pairing, updates_in_param_dtype=True), pairing)


def _init_state(params: Any, pairing: pairing_lib.Pairing) -> ScaleByLoraRiteState:
  """Zeros for every factor's state; other leaves keep their place (never read)."""
  paired = _paired_or_raise(params, pairing)
  multihost.check_same_plan(params, paired, pairing)
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


def _next_state(state: ScaleByLoraRiteState, out: engine.Leaves, scalars: core.Scalars,
                treedef: Any) -> ScaleByLoraRiteState:
  """The state after a step: counters and diagnostics move only on an applied step."""
  finite = scalars.finite
  keep_old = lambda new, old: jnp.where(finite, new, old).astype(old.dtype)
  return ScaleByLoraRiteState(
      count=state.count + finite.astype(state.count.dtype),
      skipped=state.skipped + (~finite).astype(state.skipped.dtype),
      **{field: jax.tree.unflatten(treedef, getattr(out, field)) for field in engine.STATE},
      skipped_factors=keep_old(scalars.skipped_factors, state.skipped_factors),
      skipped_factors_total=keep_old(
          state.skipped_factors_total + scalars.skipped_factors, state.skipped_factors_total),
      grad_norm=keep_old(scalars.grad_norm, state.grad_norm),
      clip_scale=keep_old(scalars.clip_scale, state.clip_scale),
  )


def _scale_by_lora_rite(
    *, b1, b2, eps, relative_eps, clip_unmagnified_grad, update_skipping, update_capping,
    weight_decay, apply_escape, pairing, updates_in_param_dtype: bool,
) -> optax.GradientTransformationExtraArgs:
  """:func:`scale_by_lora_rite`; with ``updates_in_param_dtype=False`` the updates stay
  in the compute dtype, so that :func:`lora_rite` rounds them to bf16 params once,
  after the learning rate, not twice."""
  checks = {
      'b1': (b1, options.UNIT), 'b2': (b2, options.UNIT), 'eps': (eps, options.NON_NEGATIVE),
      'clip_unmagnified_grad': (clip_unmagnified_grad, options.THRESHOLD),
      'update_skipping': (update_skipping, options.THRESHOLD),
      'update_capping': (update_capping, options.THRESHOLD),
      'weight_decay': (weight_decay, options.NON_NEGATIVE)}
  for name, (value, allowed) in checks.items():
    options.check_number(name, value, allowed)
  options.check_bool('relative_eps', relative_eps)
  options.check_bool('apply_escape', apply_escape)
  pairing = pairing_lib.resolve(pairing)
  capping_off = isinstance(update_capping, numbers.Real) and not 0 < update_capping < math.inf
  hyper = core.Hyper(
      b1=b1, b2=b2, eps=eps, relative_eps=relative_eps,
      clip_unmagnified_grad=clip_unmagnified_grad, update_skipping=update_skipping,
      update_capping=None if capping_off else update_capping,
      weight_decay=None if isinstance(weight_decay, numbers.Real) and weight_decay == 0
      else weight_decay, apply_escape=apply_escape)

  def init_fn(params):
    return _init_state(params, pairing)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError('scale_by_lora_rite needs params: call update(grads, state, params).')
    # A traced option out of range (inject_hyperparams) skips the step, as a
    # non-finite gradient does.
    others_ok = extra_args.get(_OTHERS_OK, jnp.array(True)) & options.traced_ok(checks)
    paired = _paired_or_raise(params, pairing)
    grads, treedef = jax.tree.flatten(updates)
    leaves = engine.Leaves(
        factors=jax.tree.leaves(params), grads=grads,
        **{field: treedef.flatten_up_to(getattr(state, field)) for field in engine.STATE})
    _check_shapes(paired, leaves)
    dtype = _state_dtype(paired.pairs)
    out, scalars = engine.step(hyper, paired.pairs, leaves, state.count.astype(dtype), dtype,
                               updates_in_param_dtype, others_ok)
    return jax.tree.unflatten(treedef, out.factors), _next_state(state, out, scalars, treedef)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
