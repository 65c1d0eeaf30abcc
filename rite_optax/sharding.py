"""Sharding of optimizer state: partition specs and abstract state for Orbax.

The state of :func:`rite_optax.scale_by_lora_rite` has three kinds of leaves:
factor-shaped (first moment, basis), which copy their factor's spec; per-adapter
r×r matrices and scalars (second moment, escaped mass), which keep the spec
entries of the factor's batch axes (scanned layers, experts) and are replicated
otherwise; and the step counters, replicated. Every other params-structured
state (AdamW's ``mu``/``nu`` of unpaired leaves, inside ``optax.chain``,
``optax.partition`` or ``optax.inject_hyperparams``) copies the param specs,
and every remaining leaf is replicated.

Everything works from ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape``), so
the specs exist before any array does. Spec entries are copied, never
interpreted, so logical axis names (T5X/flax ``nn.partitioning``) work the same
as mesh axis names.

On a mesh the update needs no factor-sized communication because each basis
comes from the eigh of the factor's r×r Gram matrix (docs/algorithm.md §4a): a
row-sharded factor contributes a partial Gram, and only that r×r all-reduce
crosses devices. Householder QR does not partition: XLA all-gathers the whole
factor first (measured on 8 CPU devices: ``jnp.linalg.qr`` of a row-sharded
f32[4096, 16] compiles to one all-gather of f32[4096, 16]; the Gram basis to
one all-reduce of f32[16, 16]). ``tests/test_sharding.py`` asserts on the
compiled HLO of a sharded step that no all-gather appears.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from rite_optax import pairing as pairing_lib
from rite_optax.lora_rite import ScaleByLoraRiteState

_MASKED = optax.MaskedNode


def _entries(spec: PartitionSpec | None, ndim: int) -> tuple[Any, ...]:
  """A spec's entries padded with ``None`` to ``ndim`` (``None`` spec: replicated)."""
  entries = () if spec is None else tuple(spec)
  if len(entries) > ndim:
    raise ValueError(f'PartitionSpec {spec} has more entries than the {ndim} dims of its param.')
  return entries + (None,) * (ndim - len(entries))


def _specs_by_path(params: Any, param_specs: Any) -> dict[str, tuple[Any, ...]]:
  """Param path -> the param spec's entries, one per dim."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  specs = treedef.flatten_up_to(param_specs)
  return {
      pairing_lib.path_string(path): _entries(spec, len(leaf.shape))
      for (path, leaf), spec in zip(leaves, specs, strict=True)
  }


def _params_structured(node: Any, treedef: Any) -> bool:
  """Whether ``node`` has the params' structure (masked leaves count as leaves)."""
  return jax.tree.structure(node, is_leaf=lambda x: isinstance(x, _MASKED)) == treedef


def _copy_param_specs(node: Any, by_path: dict[str, tuple[Any, ...]]) -> Any:
  """Param-shaped leaves take their param's spec; other shapes are replicated."""

  def spec(path, leaf):
    entries = by_path[pairing_lib.path_string(path)]
    return PartitionSpec(*entries) if len(entries) == len(leaf.shape) else PartitionSpec()

  return jax.tree_util.tree_map_with_path(spec, node)


def _rite_specs(
    state: ScaleByLoraRiteState, by_path: dict[str, tuple[Any, ...]], pairing: pairing_lib.Pairing
) -> ScaleByLoraRiteState:
  """Specs of one ``ScaleByLoraRiteState``, its fields handled one by one."""
  # The first moment has the (possibly masked) factors' shapes, so pairing it
  # finds the batch axes without the caller's params.
  try:
    pairs = pairing_lib.pair_leaves(state.first_moment, pairing).pairs
  except ValueError as e:
    raise ValueError(
        f'{e} (reading the LoRA-RITE state with pairing {pairing.name!r}: pass'
        ' state_partition_specs the pairing given to the transformation)') from e
  views = {view.path: view for pair in pairs for view in (pair.a, pair.b)}

  def per_adapter(trailing: int):
    def spec(path, leaf):
      path = pairing_lib.path_string(path)
      entries = by_path[path]
      if path not in views:
        raise ValueError(
            f'{path} has LoRA-RITE state, but it is not a factor under pairing'
            f' {pairing.name!r}: pass state_partition_specs the pairing given to the'
            ' transformation.')
      batch = tuple(entries[ax] for ax in views[path].batch_axes)
      if len(batch) + trailing != len(leaf.shape):
        raise ValueError(
            f'{path}: its LoRA-RITE state has shape {tuple(leaf.shape)}, but pairing'
            f' {pairing.name!r} gives it {len(batch)} batch axes: pass'
            ' state_partition_specs the pairing given to the transformation.')
      return PartitionSpec(*batch, *(None,) * trailing)
    return spec

  map_with_path = jax.tree_util.tree_map_with_path
  return ScaleByLoraRiteState(
      count=PartitionSpec(),
      skipped=PartitionSpec(),
      first_moment=_copy_param_specs(state.first_moment, by_path),
      basis=_copy_param_specs(state.basis, by_path),
      second_moment=map_with_path(per_adapter(2), state.second_moment),
      escaped_mass=map_with_path(per_adapter(0), state.escaped_mass),
      skipped_factors=PartitionSpec(),
      skipped_factors_total=PartitionSpec(),
      grad_norm=PartitionSpec(),
      clip_scale=PartitionSpec(),
  )


def _children(node: Any) -> tuple[list[Any], Any]:
  """One level of a pytree node: its direct children and how to rebuild it."""
  return jax.tree.flatten(node, is_leaf=lambda x: x is not node)


def state_partition_specs(
    tx: optax.GradientTransformation,
    params: Any,
    param_specs: Any,
    pairing: str | pairing_lib.Pairing = 'nnx',
) -> Any:
  """Partition specs of ``tx``'s state, derived from the params' specs.

  ``ScaleByLoraRiteState`` fields are handled explicitly: ``first_moment`` and
  ``basis`` copy their factor's spec; ``second_moment`` ``(*batch, r, r)`` gets
  the spec entries of the factor's batch axes followed by ``None, None``;
  ``escaped_mass`` ``(*batch,)`` the batch entries alone; the counters and
  diagnostics are replicated. Any other params-structured state (e.g. AdamW's ``mu``/``nu``)
  copies the param specs, ``optax.MaskedNode`` leaves of ``optax.partition``
  stay as they are, and every other leaf is replicated (``PartitionSpec()``).

  Example::

    >>> import jax, jax.numpy as jnp, rite_optax
    >>> from jax.sharding import PartitionSpec as P
    >>> params = {'q': {'lora_a': jax.ShapeDtypeStruct((64, 4), jnp.float32),
    ...                 'lora_b': jax.ShapeDtypeStruct((4, 32), jnp.float32)}}
    >>> specs = {'q': {'lora_a': P('data', None), 'lora_b': P(None, 'model')}}
    >>> tx = rite_optax.lora_rite(1e-3)
    >>> state_specs = rite_optax.state_partition_specs(tx, params, specs)

  Args:
    tx: the transformation whose state is described (``lora_rite``,
      ``scale_by_lora_rite``, or any optax combination containing them).
    params: the params, or their ``jax.ShapeDtypeStruct`` s.
    param_specs: a tree of ``PartitionSpec`` (or ``None``, replicated) with
      the structure of ``params``; entries may be mesh or logical axis names.
    pairing: the pairing given to ``tx`` (a preset name or a
      :class:`rite_optax.Pairing`), which says the factors' batch axes.

  Returns:
    A tree of ``PartitionSpec`` (and ``optax.MaskedNode``) with the structure
    of ``tx.init(params)``.
  """
  pairing = pairing_lib.resolve(pairing)
  abstract = jax.eval_shape(tx.init, params)
  treedef = jax.tree.structure(params)
  by_path = _specs_by_path(params, param_specs)

  def describe(node):
    if isinstance(node, ScaleByLoraRiteState):
      return _rite_specs(node, by_path, pairing)
    if isinstance(node, _MASKED) or node is None:
      return node
    if _params_structured(node, treedef):
      return _copy_param_specs(node, by_path)
    children, node_def = _children(node)
    if node_def.num_nodes == 1 and node_def.num_leaves == 1:  # an array leaf
      return PartitionSpec()
    return jax.tree.unflatten(node_def, [describe(child) for child in children])

  return describe(abstract)


def abstract_state(
    tx: optax.GradientTransformation,
    params: Any,
    param_specs: Any,
    mesh: jax.sharding.Mesh,
    pairing: str | pairing_lib.Pairing = 'nnx',
) -> Any:
  """``tx``'s state as ``jax.ShapeDtypeStruct`` s with their ``NamedSharding``.

  This is the restore target Orbax expects (``StandardCheckpointer.restore``,
  ``args.StandardRestore``), and the ``out_shardings`` source for a jitted
  ``tx.init``; restoring onto another mesh only needs another ``mesh``.

  Example::

    >>> import orbax.checkpoint as ocp
    >>> target = rite_optax.abstract_state(tx, params, specs, mesh)  # doctest: +SKIP
    >>> state = ocp.StandardCheckpointer().restore(path, target)  # doctest: +SKIP

  Args:
    tx: the transformation, see :func:`state_partition_specs`.
    params: the params, or their ``jax.ShapeDtypeStruct`` s.
    param_specs: the params' ``PartitionSpec`` s, in ``mesh`` axis names.
    mesh: the mesh the state lives (or will be restored) on.
    pairing: the pairing given to ``tx``.

  Returns:
    The abstract state: ``jax.ShapeDtypeStruct`` leaves with ``sharding`` set.
  """
  specs = state_partition_specs(tx, params, param_specs, pairing)
  abstract = jax.eval_shape(tx.init, params)
  return jax.tree.map(
      lambda leaf, spec: jax.ShapeDtypeStruct(
          leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, spec)),
      abstract, specs)
