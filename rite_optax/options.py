"""Option checks shared by every transformation the package exports.

An option is checked twice. At construction, a Python number must be real, not
NaN, finite (unless ``infinite_ok``) and in range, and a learning rate must be
a number, an array or a schedule: a bad value raises, naming the option. An
array (``optax.inject_hyperparams`` passes every number as one, possibly
traced) cannot be checked by value then; it must be at least float32, since
``inject_hyperparams`` casts to the params' dtype and ``b2 = 0.999`` is exactly
1.0 in bfloat16. Its value is checked inside ``update`` by :func:`traced_ok`, a
traced verdict that :func:`rite_optax.lora_rite` folds into its whole-step skip.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class Range(NamedTuple):
  """Allowed values of a numeric option: ``low <= x`` (``< high``), never NaN."""

  low: float = -math.inf
  high: float | None = None
  infinite_ok: bool = False

  def describe(self) -> str:
    return f'[{self.low}, {self.high})' if self.high is not None else f'>= {self.low}'

  def holds(self, value: Any) -> jax.Array:
    """The check as a traced bool, for array values."""
    x = jnp.asarray(value)
    ok = (x >= self.low) & (jnp.isfinite(x) | (self.infinite_ok & ~jnp.isnan(x)))
    if self.high is not None:
      ok &= x < self.high
    return jnp.all(ok)


UNIT = Range(0.0, 1.0)  # decays
NON_NEGATIVE = Range(0.0)  # eps, weight decays, ratios, ridges
THRESHOLD = Range(-math.inf, infinite_ok=True)  # <= 0 and inf both mean off
ANY = Range()  # learning rates: any finite number


def _is_array(value: Any) -> bool:
  return hasattr(value, 'dtype') and hasattr(value, 'shape')


def check_array_dtype(name: str, value: Any) -> None:
  """An array option must be a real number of at least float32 precision."""
  dtype = jnp.dtype(value.dtype)
  if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
    raise TypeError(f'{name} must be a real number, got an array of dtype {dtype}.')
  if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
    raise TypeError(
        f'{name} arrived as a {dtype} array, which rounds it (b2 = 0.999 is 1.0 in bfloat16).'
        ' optax.inject_hyperparams casts hyperparameters to the params\' dtype: pass'
        ' hyperparam_dtype=jnp.float32 to it.')


def check_number(name: str, value: Any, allowed: Range) -> None:
  """Raises ``TypeError``/``ValueError`` naming ``name`` unless ``value`` is allowed."""
  if _is_array(value):
    check_array_dtype(name, value)
    return
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f'{name} must be a real number, got {value!r}.')
  if math.isnan(value) or (math.isinf(value) and not allowed.infinite_ok):
    raise ValueError(f'{name} must be finite, got {value!r}.')
  if value < allowed.low or (allowed.high is not None and value >= allowed.high):
    raise ValueError(f'{name} must be in {allowed.describe()}, got {value!r}.')


def check_learning_rate(name: str, value: Any) -> None:
  """A learning rate is a finite number, an array, or a schedule (a callable of the step)."""
  if callable(value):
    return
  if value is None or isinstance(value, (str, bytes)) or not (
      _is_array(value) or isinstance(value, numbers.Real)):
    raise TypeError(
        f'{name} must be a number or an optax schedule (a callable of the step),'
        f' got {value!r}.')
  check_number(name, value, ANY)


def check_bool(name: str, value: Any) -> None:
  if not isinstance(value, bool):
    raise TypeError(f'{name} must be a bool, got {value!r}.')


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f'{name} must be one of {choices}, got {value!r}.')


def traced_ok(checks: dict[str, tuple[Any, Range]]) -> jax.Array:
  """Whether every array-valued option is allowed, as a traced bool (``True``
  when none is an array: Python numbers were checked at construction)."""
  ok = jnp.array(True)
  for value, allowed in checks.values():
    if _is_array(value):
      ok &= allowed.holds(value)
  return ok


def learning_rate_ok(learning_rate: Any, count: jax.Array) -> jax.Array:
  """Whether the learning rate at step ``count`` is finite, as a traced bool."""
  if callable(learning_rate):
    return jnp.all(jnp.isfinite(jnp.asarray(learning_rate(count))))
  return traced_ok({'learning_rate': (learning_rate, ANY)})
