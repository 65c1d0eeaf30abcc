"""LoRA adapter math for dense layers, independent of flaxformer and T5X.

A LoRA dense layer computes ``y = x W + (alpha / r) · dropout(x) A B`` with the
base kernel ``W`` frozen, ``A`` (``lora_a``, joined-in × r) and ``B``
(``lora_b``, r × joined-out). This is the layout of rite_optax's ``'nnx'``
pairing, so :func:`rite_optax.lora_rite` finds every adapter by its path.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

RANK_AXIS_NAME = 'lora_rank'
"""Logical axis name of the rank dimension (replicated: ``r`` is tiny)."""

ALL_PROJECTIONS = (
    r'.*attention/(query|key|value|out)',
    r'.*mlp/(wi(_[0-9]+)?|wo)',
)
"""Module-path patterns of flaxformer's attention (self and cross) and MLP projections."""

INITS = ('kaiming_uniform', 'normal', 'zeros')


def check_rank_and_alpha(rank: int, alpha: float) -> None:
  """Raises ``ValueError`` naming ``rank`` or ``alpha`` when they are invalid."""
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
    raise ValueError(f'lora rank must be an int >= 0, got {rank!r}.')
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
    raise ValueError(f'lora alpha must be a number > 0, got {alpha!r}.')


def check_dropout(rate: float) -> None:
  """Raises ``ValueError`` naming ``dropout_rate`` when it is not in [0, 1)."""
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
    raise ValueError(f'lora dropout_rate must be in [0, 1), got {rate!r}.')


def check_init(init: str) -> None:
  """Raises ``ValueError`` naming ``a_init`` when it is not one of :data:`INITS`."""
  if init not in INITS:
    raise ValueError(f'lora a_init must be one of {INITS}, got {init!r}.')


def compile_targets(targets: Sequence[str]) -> tuple[re.Pattern, ...]:
  """Compiles the module-path patterns that select which projections get LoRA.

  Raises:
    ValueError: naming ``targets`` when it is a bare string or a pattern is invalid.
  """
  if isinstance(targets, str):
    raise ValueError(f'lora targets must be a sequence of patterns, got the string {targets!r}.')
  compiled = []
  for pattern in targets:
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise ValueError(f'lora targets: invalid pattern {pattern!r}: {e}') from e
  return tuple(compiled)


def is_target(module_path: str, targets: Sequence[re.Pattern]) -> bool:
  """Whether a module path (``'encoder/layers_0/attention/query'``) fully matches a target."""
  return any(t.fullmatch(module_path) for t in targets)


def joined_axis_name(
    names: Sequence[str], reshaped_names: Mapping[str, str], where: str
) -> str:
  """Logical name of several kernel axes joined into one factor axis.

  Follows flaxformer's ``DenseGeneral`` (``'heads * kv'`` → ``'joined_kv'``).

  Raises:
    ValueError: when several axes join into a name with no mapping (T5X's
      partitioner would not know how to shard it).
  """
  if len(names) == 1:
    return names[0]
  joined = ' * '.join(names)
  if joined not in reshaped_names:
    raise ValueError(
        f'{where}: LoRA cannot name the joined kernel axes {tuple(names)}; add'
        f' {joined!r} to reshaped_kernel_axis_name_map or drop this module from targets.')
  return reshaped_names[joined]


def factor_axis_names(
    kernel_axis_names: Sequence[str] | None,
    num_in_axes: int,
    reshaped_names: Mapping[str, str],
    where: str,
) -> tuple[tuple[str, str], tuple[str, str]]:
  """Logical axis names of ``lora_a`` (in, rank) and ``lora_b`` (rank, out).

  The in/out axes take the kernel's names, so factors shard like the kernel's
  rows/columns; the rank axis is :data:`RANK_AXIS_NAME`.
  """
  if kernel_axis_names is None:
    in_name = out_name = 'unmodeled'
  else:
    names = tuple(kernel_axis_names)
    in_name = joined_axis_name(names[:num_in_axes], reshaped_names, where)
    out_name = joined_axis_name(names[num_in_axes:], reshaped_names, where)
  return (in_name, RANK_AXIS_NAME), (RANK_AXIS_NAME, out_name)


def a_initializer(init: str):
  """Initializer of ``lora_a`` (``B`` starts at zero, so ``Z = A B = 0``)."""
  check_init(init)
  if init == 'kaiming_uniform':
    # nn.Linear's default, as in the reference LoRA code: U(±1/sqrt(fan_in)).
    return jax.nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')
  if init == 'normal':
    return jax.nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')
  return jax.nn.initializers.zeros


def lora_delta(
    inputs: jax.Array,
    lora_a: jax.Array,
    lora_b: jax.Array,
    num_in_axes: int,
    out_features: Sequence[int],
    scale: float,
) -> jax.Array:
  """``scale · x A B`` contracting the last ``num_in_axes`` axes of ``inputs``.

  Args:
    inputs: ``(..., *in_features)``.
    lora_a: ``(prod(in_features), r)``.
    lora_b: ``(r, prod(out_features))``.
    num_in_axes: how many trailing input axes the layer contracts.
    out_features: the layer's output feature shape.
    scale: ``alpha / r``.

  Returns:
    ``(..., *out_features)`` in the dtype of ``inputs``.
  """
  batch_shape = inputs.shape[: inputs.ndim - num_in_axes]
  x = inputs.reshape(*batch_shape, math.prod(inputs.shape[inputs.ndim - num_in_axes:]))
  low_rank = jnp.dot(x, lora_a.astype(inputs.dtype))
  out = jnp.dot(low_rank, lora_b.astype(inputs.dtype)) * jnp.asarray(scale, inputs.dtype)
  return out.reshape(*batch_shape, *out_features)
