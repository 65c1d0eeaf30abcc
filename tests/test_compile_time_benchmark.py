"""benchmarks/compile_time.py measures what it claims: per-pair HLO counts of the compiled
step, and the census of its kernels by source line."""

import optax

from benchmarks import compile_time


def test_counts_scale_with_the_pairs_and_adam_is_adam():
  small, large = (compile_time.measure(optax.adam(1e-3), n) for n in (2, 4))
  assert large['instructions'] > small['instructions'] and large['fusions'] > small['fusions']
  assert small['conditionals'] == 0 and small['custom_calls'] == 0
  assert small['compile_s'] > 0 and small['lower_s'] > 0
  assert compile_time.exponent([small, large], 'instructions') > 0.5


def test_the_census_attributes_every_kernel():
  counts = compile_time.census(2)
  text = compile_time.compiled_text(compile_time.rite_optax.lora_rite(1e-3), 2)
  entry = text[text.index('\nENTRY'):]
  kernels = sum(1 for line in entry.splitlines() if ' fusion(' in line or ' dot(' in line)
  assert sum(counts.values()) == kernels
  assert any(where.startswith('steering.py:link') for where in counts)  # the ordering links
