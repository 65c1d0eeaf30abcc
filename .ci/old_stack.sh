#!/usr/bin/env bash
# CI: the core, sharding, pmap, checkpoint and option/reliability tests on the oldest supported stack
# (jax 0.7.x, T5X's current floor) with the flax/optax/orbax that go with it.
# Usage: .ci/old_stack.sh [venv dir]   (default: a fresh temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."

JAX_VERSION=0.7.2
FLAX_VERSION=0.12.0
OPTAX_VERSION=0.2.8
ORBAX_VERSION=0.12.8

venv="${1:-$(mktemp -d)/venv-old-stack}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q \
  "jax[cpu]==${JAX_VERSION}" "jaxlib==${JAX_VERSION}" "flax==${FLAX_VERSION}" \
  "optax==${OPTAX_VERSION}" "orbax-checkpoint==${ORBAX_VERSION}" \
  "pytest>=8" "hypothesis>=6.100"
"$venv/bin/pip" install -q --no-deps -e .
"$venv/bin/pip" check
"$venv/bin/python" -c 'import jax, flax, optax, orbax.checkpoint as ocp; print("old stack: jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "orbax-checkpoint", ocp.__version__)'
"$venv/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_lora_rite.py tests/test_lora_rite_robustness.py tests/test_optax_integration.py \
  tests/test_sharding.py tests/test_pmap.py tests/test_checkpoint.py \
  tests/test_options.py tests/test_reliability.py
