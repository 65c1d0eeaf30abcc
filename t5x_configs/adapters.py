"""LoRA adapters out of T5X checkpoints: export the factors alone, put them back on the base,
or merge them into the base kernels.

A LoRA fine-tune checkpoint stores the frozen base next to the factors (≈48 GiB per
checkpoint at mT5-XXL for ≈270 MiB of factors). Three commands::

  # Only the factors (+ rank, alpha, targets, base checkpoint, step) in one .npz file.
  python -m t5x_configs.adapters export --checkpoint=$MODEL_DIR/checkpoint_60 \\
      --output=/tmp/adapters.npz
  # Base + factors as a T5X checkpoint for the LoRA eval/infer gin (tiny_lora_*_cpu.gin,
  # mt5_xxl_lora_{eval,infer}.gin).
  python -m t5x_configs.adapters apply --adapters=/tmp/adapters.npz --output=/tmp/with_adapters
  # W + (alpha / rank) · A · B as a standard T5X checkpoint for the LoRA-free gin.
  python -m t5x_configs.adapters merge --adapters=/tmp/adapters.npz --output=/tmp/merged

The scale is the one :class:`t5x_configs.lora_dense.LoraDenseGeneral` applies,
``alpha / rank`` with ``A = lora_a`` (joined-in × r) and ``B = lora_b`` (r × joined-out);
flaxformer kernels are ``(*in_axes, *out_axes)`` in C order, so ``A · B`` reshaped to the
kernel's shape is the kernel's update. ``alpha`` and the targets are not in a checkpoint:
``export`` reads them from the ``config.gin`` T5X writes next to the checkpoints (or takes
``--alpha``), and the base checkpoint from ``INITIAL_CHECKPOINT_PATH`` there (or ``--base``).

The math (:func:`extract_factors`, :func:`apply_factors`, :func:`merge_factors`) is
NumPy on flat ``{'encoder/layers_0/attention/query/kernel': array}`` dicts; only the
checkpoint I/O needs ``orbax-checkpoint`` (imported lazily).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

FACTORS = ('lora_a', 'lora_b')
METADATA_KEY = '__rite_optax_lora__'
"""Key of the JSON metadata entry in an adapter file."""
FORMAT = 'rite_optax.lora_adapters/1'


def _split(path: str) -> tuple[str, str]:
  prefix, _, leaf = path.rpartition('/')
  return prefix, leaf


def extract_factors(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The ``.../lora_a`` and ``.../lora_b`` leaves of a flat param dict.

  Raises:
    ValueError: when there are none, or a module has one factor without the other.
  """
  factors = {k: np.asarray(v) for k, v in params.items() if _split(k)[1] in FACTORS}
  if not factors:
    raise ValueError('no lora_a/lora_b params: is this a LoRA fine-tune checkpoint?')
  modules = {_split(k)[0] for k in factors}
  for m in sorted(modules):
    for f in FACTORS:
      if f'{m}/{f}' not in factors:
        raise ValueError(f'{m} has no {f}: a LoRA module needs both lora_a and lora_b.')
  return factors


def _modules(factors: Mapping[str, np.ndarray]) -> list[str]:
  return sorted({_split(k)[0] for k in factors})


def rank_of(factors: Mapping[str, np.ndarray]) -> int:
  """The LoRA rank ``r`` (``lora_a``'s last axis), checked equal across modules."""
  ranks = {np.shape(factors[f'{m}/lora_a'])[-1] for m in _modules(factors)}
  ranks |= {np.shape(factors[f'{m}/lora_b'])[0] for m in _modules(factors)}
  if len(ranks) != 1:
    raise ValueError(f'LoRA factors have several ranks {sorted(ranks)}; expected one.')
  return int(ranks.pop())


def _check_module(module: str, kernel: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
  if a.ndim != 2 or b.ndim != 2:
    raise ValueError(
        f'{module}: lora_a {a.shape} and lora_b {b.shape} must be 2-D (scanned layers'
        ' are not supported).')
  if a.shape[1] != b.shape[0]:
    raise ValueError(f'{module}: lora_a {a.shape} and lora_b {b.shape} differ in rank.')
  sizes = [math.prod(kernel.shape[:k]) for k in range(kernel.ndim + 1)]
  if not any(s == a.shape[0] and math.prod(kernel.shape) // max(s, 1) == b.shape[1]
             for s in sizes):
    raise ValueError(
        f'{module}: kernel {kernel.shape} does not split into lora_a rows {a.shape[0]}'
        f' × lora_b columns {b.shape[1]}.')


def delta(a: np.ndarray, b: np.ndarray, scale: float, kernel_shape: Sequence[int]) -> np.ndarray:
  """``scale · A · B`` (float32) reshaped to the kernel's ``(*in_axes, *out_axes)`` shape."""
  prod = np.asarray(a, np.float32) @ np.asarray(b, np.float32)
  return (np.float32(scale) * prod).reshape(tuple(kernel_shape))


def merge_factors(
    params: Mapping[str, np.ndarray], factors: Mapping[str, np.ndarray], alpha: float
) -> dict[str, np.ndarray]:
  """Base params with every adapted ``kernel`` replaced by ``W + (alpha / r) · A · B``.

  Args:
    params: flat base params (LoRA factors in them, if any, are dropped).
    factors: flat ``.../lora_a``, ``.../lora_b`` arrays (:func:`extract_factors`).
    alpha: the LoRA alpha the factors were trained with.

  Returns:
    A flat dict with the base's keys only (no factors), kernels in their own dtype.
  """
  factors = extract_factors(factors)
  scale = alpha / rank_of(factors)
  out = {k: np.asarray(v) for k, v in params.items() if _split(k)[1] not in FACTORS}
  for m in _modules(factors):
    key = f'{m}/kernel'
    if key not in out:
      raise ValueError(f'{m}: the base has no kernel to merge lora_a/lora_b into.')
    kernel, a, b = out[key], factors[f'{m}/lora_a'], factors[f'{m}/lora_b']
    _check_module(m, kernel, a, b)
    merged = kernel.astype(np.float32) + delta(a, b, scale, kernel.shape)
    out[key] = merged.astype(kernel.dtype)
  return out


def apply_factors(
    params: Mapping[str, np.ndarray], factors: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
  """Base params plus the factors as separate leaves (the LoRA model's params)."""
  factors = extract_factors(factors)
  out = {k: np.asarray(v) for k, v in params.items() if _split(k)[1] not in FACTORS}
  for m in _modules(factors):
    if f'{m}/kernel' not in out:
      raise ValueError(f'{m}: the base has no kernel for these lora_a/lora_b.')
    _check_module(m, out[f'{m}/kernel'], factors[f'{m}/lora_a'], factors[f'{m}/lora_b'])
  out.update(factors)
  return out


# ---------------------------------------------------------------------------------------
# Adapter files.


def save_adapters(path: str, factors: Mapping[str, np.ndarray], *, alpha: float,
                  targets: Sequence[str] | None = None, base_checkpoint: str | None = None,
                  step: int | None = None) -> dict[str, Any]:
  """Writes the factors and their metadata to one uncompressed ``.npz``; returns the metadata.

  The file is the factors' bytes plus a few hundred bytes of zip headers and JSON.
  """
  factors = extract_factors(factors)
  meta = {'format': FORMAT, 'rank': rank_of(factors), 'alpha': float(alpha),
          'scale': float(alpha) / rank_of(factors),
          'targets': None if targets is None else list(targets),
          'base_checkpoint': base_checkpoint, 'step': step,
          'modules': _modules(factors)}
  if not path.endswith('.npz'):
    raise ValueError(f'adapter file must end in .npz, got {path!r}.')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  metadata = np.frombuffer(json.dumps(meta).encode('utf-8'), np.uint8)  # UTF-8, not UCS-4
  np.savez(path, **{METADATA_KEY: metadata}, **factors)
  return meta


def load_adapters(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """``(factors, metadata)`` from a file written by :func:`save_adapters`."""
  with np.load(path, allow_pickle=False) as z:
    if METADATA_KEY not in z.files:
      raise ValueError(f'{path}: not a rite_optax adapter file (no {METADATA_KEY}).')
    meta = json.loads(z[METADATA_KEY].tobytes().decode('utf-8'))
    factors = {k: z[k] for k in z.files if k != METADATA_KEY}
  if meta.get('format') != FORMAT:
    raise ValueError(f'{path}: unknown adapter format {meta.get("format")!r}.')
  return factors, meta


def factor_bytes(factors: Mapping[str, np.ndarray]) -> int:
  """Bytes of the factors' data."""
  return sum(np.asarray(v).nbytes for v in factors.values())


# ---------------------------------------------------------------------------------------
# T5X checkpoints (Orbax format: checkpoint_<step>/state with 'target' = params).


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    path = f'{prefix}/{k}' if prefix else str(k)
    out.update(_flatten(v, path) if isinstance(v, Mapping) else {path: v})
  return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, v in flat.items():
    node = tree
    *parents, leaf = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def _path(path: str):
  """An ``etils.epath.Path`` (local or ``gs://``), as T5X and Orbax use."""
  from etils import epath  # pylint: disable=g-import-not-at-top

  return epath.Path(path) if '://' in str(path) else epath.Path(os.path.abspath(path))


def checkpoint_step(checkpoint: str) -> int:
  """The step in a ``.../checkpoint_<step>`` directory name."""
  m = re.fullmatch(r'checkpoint_(\d+)', os.path.basename(os.path.normpath(checkpoint)))
  if not m:
    raise ValueError(f'{checkpoint!r} is not a T5X checkpoint_<step> directory.')
  return int(m.group(1))


def read_params(checkpoint: str, only_factors: bool = False) -> dict[str, np.ndarray]:
  """A T5X checkpoint's params as a flat ``{path: numpy array}`` (the optimizer state is skipped).

  With ``only_factors``, only the ``lora_a``/``lora_b`` leaves are read from storage (an
  mT5-XXL export reads ≈270 MiB, not the ≈48 GiB base).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  state_dir = _path(checkpoint) / 'state'
  if not state_dir.is_dir():
    raise ValueError(
        f'{checkpoint}: no state/ folder; only Orbax-format T5X checkpoints are supported.')
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(state_dir).item_metadata.tree
  if 'target' not in tree:
    raise ValueError(f'{checkpoint}: the checkpoint state has no target (params).')
  target = tree['target']
  if only_factors:
    target = _unflatten({k: v for k, v in _flatten(target).items() if _split(k)[1] in FACTORS})
    if not target:
      return {}
  item = {'target': target}
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  restored = checkpointer.restore(
      state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True))
  return {k: np.asarray(v) for k, v in _flatten(restored['target']).items()}


def write_checkpoint(model_dir: str, params: Mapping[str, np.ndarray], step: int) -> str:
  """Writes ``model_dir/checkpoint_<step>`` with ``params`` and no optimizer state.

  T5X's eval/infer (an ``InferenceState``) and a fine-tune's ``INITIAL_CHECKPOINT_PATH``
  restore it like any T5X checkpoint. Returns the checkpoint directory.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  ckpt = _path(model_dir) / f'checkpoint_{step}'
  if ckpt.exists():
    raise ValueError(f'{ckpt} exists; choose another --output.')
  state = {'state': {'step': np.asarray(step, np.int32)}, 'target': _unflatten(params)}
  with ocp.PyTreeCheckpointer() as checkpointer:
    checkpointer.save(ckpt / 'state', args=ocp.args.PyTreeSave(state))
  return str(ckpt)


def read_run_config(checkpoint: str) -> dict[str, Any]:
  """``LORA_ALPHA``, ``LORA_TARGETS``, ``INITIAL_CHECKPOINT_PATH`` from the run's ``config.gin``.

  T5X writes the operative gin config next to the checkpoints; missing values are absent.
  """
  path = _path(checkpoint).parent / 'config.gin'
  found = {}
  if not path.exists():
    return found
  text = path.read_text()
  for name in ('LORA_ALPHA', 'LORA_TARGETS', 'INITIAL_CHECKPOINT_PATH'):
    m = re.search(rf'^{name} = (.+?)(?=^\S|\Z)', text, re.MULTILINE | re.DOTALL)
    if m:
      try:
        found[name] = ast.literal_eval(m.group(1).replace('\\\n', ' ').strip())
      except (ValueError, SyntaxError):
        pass
  return found


# ---------------------------------------------------------------------------------------
# Command line.


def export(checkpoint: str, output: str, alpha: float | None = None,
           base: str | None = None) -> dict[str, Any]:
  """Writes the LoRA factors of a T5X checkpoint to ``output`` (.npz); returns the metadata."""
  run = read_run_config(checkpoint)
  alpha = run.get('LORA_ALPHA') if alpha is None else alpha
  if alpha is None:
    raise ValueError(f'no config.gin with LORA_ALPHA next to {checkpoint}; pass --alpha.')
  base = run.get('INITIAL_CHECKPOINT_PATH') if base is None else base
  factors = extract_factors(read_params(checkpoint, only_factors=True))
  return save_adapters(output, factors, alpha=alpha, targets=run.get('LORA_TARGETS'),
                       base_checkpoint=base, step=checkpoint_step(checkpoint))


def _base_and_factors(adapters: str, base: str | None):
  factors, meta = load_adapters(adapters)
  base = base or meta.get('base_checkpoint')
  if not base:
    raise ValueError(f'{adapters} names no base checkpoint; pass --base.')
  return read_params(base), factors, meta, base


def merge(adapters: str, output: str, base: str | None = None) -> str:
  """Writes base + merged adapters as a LoRA-free T5X checkpoint under ``output``."""
  params, factors, meta, base = _base_and_factors(adapters, base)
  merged = merge_factors(params, factors, meta['alpha'])
  return write_checkpoint(output, merged, meta.get('step') or checkpoint_step(base))


def apply(adapters: str, output: str, base: str | None = None) -> str:
  """Writes base + adapters (factors kept apart) as a T5X checkpoint for the LoRA gin."""
  params, factors, meta, base = _base_and_factors(adapters, base)
  return write_checkpoint(output, apply_factors(params, factors),
                          meta.get('step') or checkpoint_step(base))


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m t5x_configs.adapters', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)
  p = sub.add_parser('export', help='write the LoRA factors of a T5X checkpoint to a .npz')
  p.add_argument('--checkpoint', required=True, help='a LoRA fine-tune checkpoint_<step> dir')
  p.add_argument('--output', required=True, help='the adapter file (.npz)')
  p.add_argument('--alpha', type=float, help="default: LORA_ALPHA in the run's config.gin")
  p.add_argument('--base', help="default: INITIAL_CHECKPOINT_PATH in the run's config.gin")
  for name, what in (('merge', 'W + (alpha/r)·A·B, a LoRA-free T5X checkpoint'),
                     ('apply', 'base + factors, a T5X checkpoint for the LoRA gin')):
    p = sub.add_parser(name, help=f'write {what}')
    p.add_argument('--adapters', required=True, help='an adapter file from export')
    p.add_argument('--output', required=True, help='a new model dir; gets checkpoint_<step>')
    p.add_argument('--base', help="default: the adapter file's base checkpoint")
  args = parser.parse_args(argv)
  if args.command == 'export':
    meta = export(args.checkpoint, args.output, args.alpha, args.base)
    size = os.path.getsize(args.output)
    print(f'wrote {args.output}: {len(meta["modules"])} modules, rank {meta["rank"]}, '
          f'alpha {meta["alpha"]}, {size} bytes')
  else:
    ckpt = (merge if args.command == 'merge' else apply)(args.adapters, args.output, args.base)
    print(f'wrote {ckpt}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
