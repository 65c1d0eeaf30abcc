"""Where the optimizer step's compile time goes, as the number of adapters grows.

    python -m benchmarks.compile_time                        # 72 144 288 432 pairs
    python -m benchmarks.compile_time --pairs 72 288 --json out.json

For each size, ``pairs`` unscanned mT5-XXL attention adapters (``lora_a (4096, 16)``,
``lora_b (16, 4096)``, one leaf each, as T5X/flaxformer stores them) and, in the same
process, the same jitted, donated step (``tx.update`` + ``optax.apply_updates``) with
``optax.adam`` and ``lora_rite``, lowered from abstract arrays (nothing is allocated):

- trace + lower seconds and compile seconds;
- the optimized HLO's instruction count, fusion (kernel) count, conditionals and
  custom calls (the eighs), per pair;
- the growth exponent of compile time, ``log(t_max / t_min) / log(n_max / n_min)``
  (1 is linear).

XLA's own flags (``XLA_FLAGS``) apply as usual, so the share of the backend's code
generation can be read off by rerunning with, e.g.,
``XLA_FLAGS=--xla_backend_optimization_level=0``, and XLA logs every HLO pass with its time
under ``TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=hlo_pass_pipeline=1``.

``--census N`` instead counts the kernels (fusions and dots) of lora_rite's compiled step at
N pairs by the rite_optax source line that made them (results/compile_time.md §3).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import math
import platform
import re
import time

import jax
import jax.numpy as jnp
import optax

import rite_optax

ROWS, RANK = 4096, 16


def abstract_params(pairs: int) -> dict:
  leaf = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  return {f'proj_{i:03d}': {'lora_a': leaf((ROWS, RANK)), 'lora_b': leaf((RANK, ROWS))}
          for i in range(pairs)}


def hlo_counts(text: str) -> dict:
  """Instructions, fusions, conditionals and custom calls of the optimized HLO's entry
  and nested computations (every line that defines a value)."""
  defines = [line for line in text.splitlines() if re.match(r'\s*(ROOT )?%?\S+ = ', line)]
  count = lambda pattern: sum(bool(re.search(pattern, line)) for line in defines)
  return {'instructions': len(defines), 'fusions': count(r'= \S+ fusion\('),
          'conditionals': count(r' conditional\('), 'custom_calls': count(r' custom-call\(')}


def measure(tx, pairs: int) -> dict:
  params = abstract_params(pairs)
  state = jax.eval_shape(tx.init, params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  start = time.perf_counter()
  lowered = step.lower(params, state, params)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  return {'pairs': pairs, 'lower_s': lower_s, 'compile_s': compile_s,
          **hlo_counts(compiled.as_text())}


def census(pairs: int) -> collections.Counter:
  """Kernels of the compiled lora_rite step, by the innermost rite_optax frames that made
  them (read from the HLO's stack-frame tables)."""
  text = compiled_text(rite_optax.lora_rite(1e-3), pairs)
  table = lambda name: dict(re.findall(r'^(\d+) (.*)$', text.split(f'\n{name}\n', 1)[1]
                                       .split('\n\n', 1)[0], re.M))
  files, functions = table('FileNames'), table('FunctionNames')
  locations = {k: re.findall(r'\d+', v)[:3] for k, v in table('FileLocations').items()}
  frames = {k: re.findall(r'\d+', v)[:2] for k, v in table('StackFrames').items()}

  def where(frame):
    chain = []
    while frame:
      location, parent = frames[frame][0], frames[frame][-1]
      file, function, line = locations[location]
      name = files[file].strip('"')
      if '/rite_optax/' in name:
        chain.append(f'{name.rsplit("/", 1)[-1]}:{functions[function].strip(chr(34))}:{line}')
      frame = None if parent == frame else parent
    return ' < '.join(chain[:2]) or '(no rite_optax frame: the products of thin.mm)'

  entry = text[text.index('\nENTRY'):]
  kernels = [line for line in entry.splitlines() if re.search(r'= \S+ (fusion|dot)\(', line)]
  frame = lambda line: (re.findall(r'stack_frame_id=(\d+)', line) or [None])[0]
  return collections.Counter(where(frame(line)) for line in kernels)


def compiled_text(tx, pairs: int) -> str:
  params = abstract_params(pairs)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step.lower(params, jax.eval_shape(tx.init, params), params).compile().as_text()


def exponent(rows: list[dict], key: str = 'compile_s') -> float:
  first, last = rows[0], rows[-1]
  return math.log(last[key] / first[key]) / math.log(last['pairs'] / first['pairs'])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--pairs', type=int, nargs='+', default=[72, 144, 288, 432])
  parser.add_argument('--json', default=None, help='also write the rows here')
  parser.add_argument('--census', type=int, default=None, metavar='N',
                      help='only count the kernels of the step at N pairs by source line')
  args = parser.parse_args(argv)
  if args.census:
    for where, count in census(args.census).most_common():
      print(f'{count:6d}  {count / (2 * args.census):5.1f} per factor  {where}')
    return
  optimizers = {'optax.adam': lambda: optax.adam(1e-3), 'lora_rite': lambda: rite_optax.lora_rite(1e-3)}
  rows = {name: [] for name in optimizers}
  print(f'# {platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, '
        f'jax {jax.__version__}')
  print('| optimizer | pairs | lower s | compile s | HLO instructions | per pair | fusions | '
        'per pair | conditionals | custom calls |')
  print('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
  for pairs in args.pairs:
    for name, make in optimizers.items():
      row = measure(make(), pairs)
      rows[name].append(row)
      print(f'| {name} | {pairs} | {row["lower_s"]:.1f} | {row["compile_s"]:.1f} | '
            f'{row["instructions"]} | {row["instructions"] / pairs:.0f} | {row["fusions"]} | '
            f'{row["fusions"] / pairs:.1f} | {row["conditionals"]} | {row["custom_calls"]} |',
            flush=True)
  if len(args.pairs) > 1:
    for name, r in rows.items():
      print(f'{name}: compile time grows as pairs^{exponent(r):.2f}, '
            f'lowering as pairs^{exponent(r, "lower_s"):.2f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
