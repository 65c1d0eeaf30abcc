"""LoRA-RITE as optax transformations: ``scale_by_lora_rite`` and ``lora_rite``.

The transformations validate their options, pair the LoRA factors of a param
tree (:mod:`.pairing`), and hand the step to :mod:`.engine`, which runs the
math of :mod:`.core` over groups of same-shape adapters. Here live the state,
the whole-step skip of :func:`lora_rite`, and :func:`diagnostics`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
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

# engine.Leaves field <- ScaleByLoraRiteState field, for the params-structured state.
_STATE_FIELDS = (('moments', 'first_moment'), ('bases', 'basis'),
                 ('seconds', 'second_moment'), ('escapes', 'escaped_mass'))


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
                       ('its LoRA-RITE state (from init)', leaves.moments[view.index])):
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
      **{field: jax.tree.unflatten(treedef, getattr(out, name)) for name, field in _STATE_FIELDS},
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
        **{name: treedef.flatten_up_to(getattr(state, field)) for name, field in _STATE_FIELDS})
    _check_shapes(paired, leaves)
    dtype = _state_dtype(paired.pairs)
    out, scalars = engine.step(hyper, paired.pairs, leaves, state.count.astype(dtype), dtype,
                               updates_in_param_dtype, others_ok)
    return jax.tree.unflatten(treedef, out.factors), _next_state(state, out, scalars, treedef)

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
  options.check_choice('unpaired', unpaired, UNPAIRED_CHOICES)
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
    unpaired_eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
  """LoRA-RITE for LoRA factors, with a fallback for every other trainable leaf.

  The factors found by ``pairing`` get :func:`scale_by_lora_rite` (with
  ``weight_decay·param`` added outside the preconditioner, as in the paper's
  code), then ``-learning_rate``. Leaves that are not factors (biases, norms, heads)
  are handled as ``unpaired`` says: ``'adamw'`` (``optax.adamw`` with ``b1``,
  ``b2``, ``unpaired_eps``, ``unpaired_learning_rate`` defaulting to
  ``learning_rate``, and ``unpaired_weight_decay``, computed and kept in the compute
  dtype: float32 for bfloat16 and float16 params), ``'zero'`` (frozen), or
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
    unpaired_eps: the AdamW fallback's denominator epsilon (in its float32 compute
      dtype for half-precision params, so the default is safe in float16).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.
    Its ``init`` carries the resolved pairing (``tx.init.pairing``), which
    :func:`rite_optax.state_partition_specs` and :func:`rite_optax.abstract_state`
    read, so it is given once.

  References:
    Yen et al., `LoRA Done RITE: Robust Invariant Transformation Equilibration
    for LoRA Optimization <https://arxiv.org/abs/2410.20625>`_, ICLR 2025.
  """
  labels = factor_labels(pairing, unpaired)  # checks unpaired
  options.check_learning_rate('learning_rate', learning_rate)
  if unpaired_learning_rate is not None:
    options.check_learning_rate('unpaired_learning_rate', unpaired_learning_rate)
  options.check_bool('balance_factors', balance_factors)
  fallback, fallback_ok = _fallback(
      unpaired, learning_rate if unpaired_learning_rate is None else unpaired_learning_rate,
      b1=b1, b2=b2, eps=unpaired_eps, weight_decay=unpaired_weight_decay)
  rite = optax.chain(
      _scale_by_lora_rite(
          b1=b1, b2=b2, eps=eps, relative_eps=relative_eps,
          clip_unmagnified_grad=clip_unmagnified_grad,
          update_skipping=update_skipping, update_capping=update_capping,
          weight_decay=weight_decay, apply_escape=apply_escape, pairing=pairing,
          updates_in_param_dtype=False),
      optax.scale_by_learning_rate(learning_rate),
  )
  tx = optax.partition({'lora_rite': rite, 'unpaired': fallback}, labels)
  if balance_factors:
    tx = optax.chain(tx, balance_lora_factors(pairing))
  options_ok = lambda count: options.learning_rate_ok(learning_rate, count) & fallback_ok(count)
  return pairing_lib.with_pairing(
      _skip_whole_step(tx, pairing, check_unpaired=unpaired == 'adamw', options_ok=options_ok),
      pairing)


def _fallback(unpaired: str, learning_rate, *, b1, b2, eps, weight_decay):
  """The transformation of the leaves that are not factors, and ``count -> bool``:
  its learning rate at that step finite and its traced options in range."""
  if unpaired != 'adamw':
    return optax.set_to_zero(), lambda count: jnp.array(True)
  checks = {'unpaired_weight_decay': (weight_decay, options.NON_NEGATIVE),
            'unpaired_eps': (eps, options.NON_NEGATIVE)}
  for name, (value, allowed) in checks.items():
    options.check_number(name, value, allowed)
  adamw = _in_compute_dtype(optax.adamw(
      learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return adamw, lambda count: (options.learning_rate_ok(learning_rate, count)
                               & options.traced_ok(checks))


def _in_compute_dtype(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """``inner`` with its state, gradients and params in the params' compute dtype
  (float32 for bfloat16 and float16 params): its state keeps the dtypes ``init``
  gave it whatever the gradients' dtype, and ``eps = 1e-8`` is not 0 as in float16.
  Updates come back in the compute dtype (:func:`lora_rite` casts them to the params')."""

  def cast(tree, like):
    return jax.tree.map(lambda x, p: x.astype(fm.compute_dtype(p.dtype)), tree, like)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    return inner.update(cast(updates, params), state, cast(params, params))

  return optax.GradientTransformation(lambda params: inner.init(cast(params, params)), update_fn)


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
    inner: optax.GradientTransformation, pairing: pairing_lib.Pairing, check_unpaired: bool,
    options_ok: Callable[[jax.Array], jax.Array],
) -> optax.GradientTransformationExtraArgs:
  """Skips ``inner``'s whole step when anything makes it unsound.

  ``scale_by_lora_rite`` skips the factors' step on a non-finite factor gradient
  or a traced option out of range; here a non-finite gradient of any other leaf
  (a bias, a norm) or one whose square overflows (AdamW's second moment could not
  hold it), a non-finite learning rate at this step (a schedule, or an
  ``inject_hyperparams`` array) and a traced fallback option out of range
  (``options_ok`` of the step count) skip the step too. A skipped step leaves
  every update zero and every inner state (the fallback's moments, the
  schedule's count) as it was, except LoRA-RITE's ``skipped``, which counts it.
  LoRA-RITE is told this verdict (an extra argument) and folds it into its own,
  so that it keeps its factor-sized state without a second select here; the
  step's verdict is read back from its ``skipped``. The other leaves'
  gradients are checked only when ``check_unpaired`` (they are applied: with
  ``unpaired='zero'`` they are discarded, and checking them would make XLA
  compute the frozen weights' gradients). Updates come back in the params'
  dtypes, whatever the gradients' dtypes.
  """

  def init_fn(params):
    paired = pairing_lib.pair_leaves(params, pairing)
    pairing_lib.require_pairs(params, paired, pairing)
    multihost.check_same_plan(params, paired, pairing_lib.resolve(pairing))
    return inner.init(params)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError('lora_rite needs params: call update(grads, state, params).')
    paired = pairing_lib.pair_leaves(params, pairing)
    (old_rite,) = _rite_states(state)
    others_ok = options_ok(old_rite.count)
    for i, (g, p) in enumerate(zip(jax.tree.leaves(updates), jax.tree.leaves(params),
                                   strict=True)):
      if check_unpaired and i not in paired.factor_indices:
        # g² finite in the fallback's compute dtype: AdamW's second moment can hold it.
        others_ok &= jnp.all(jnp.isfinite(jnp.square(g.astype(fm.compute_dtype(p.dtype)))))
    new_updates, new_state = inner.update(
        updates, state, params, **extra_args, **{_OTHERS_OK: others_ok})
    (new_rite,) = _rite_states(new_state)
    applied = new_rite.skipped == old_rite.skipped
    new_updates = jax.tree.map(
        lambda u, p: jnp.where(applied, u, 0).astype(p.dtype), new_updates, params)
    # LoRA-RITE kept its own state on a skipped step (it was told others_ok).
    is_rite = lambda x: isinstance(x, ScaleByLoraRiteState)
    new_state = jax.tree.map(
        lambda new, old: new if is_rite(new) else jnp.where(applied, new, old),
        new_state, state, is_leaf=is_rite)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
