"""T5X / flaxformer integration for rite_optax (t5x and flaxformer are imported lazily).

Modules: :mod:`~t5x_configs.lora` (LoRA math, no flaxformer),
:mod:`~t5x_configs.lora_dense` (flaxformer layer), :mod:`~t5x_configs.partition_rules`
(T5X optimizer-state axes), :mod:`~t5x_configs.labels` (freezing the base),
:mod:`~t5x_configs.tasks` (seqio tasks), :mod:`~t5x_configs.metrics` (exact match,
ROUGE-L), :mod:`~t5x_configs.adapters` (export / apply / merge LoRA adapters of T5X
checkpoints). The gin files live in :func:`gin_dir`.
"""

import pathlib


def gin_dir() -> str:
  """The folder of rite_optax's gin files, for T5X's ``--gin_search_paths``.

  ``t5x_configs/gin`` in an installed wheel, the repository's ``gin/`` in a source
  checkout or editable install. Example::

    python -m t5x.train --gin_search_paths="$(python -c 'import t5x_configs; print(t5x_configs.gin_dir())')" ...
  """
  here = pathlib.Path(__file__).resolve().parent
  for candidate in (here / 'gin', here.parent / 'gin'):
    if (candidate / 'lora_rite.gin').exists():
      return str(candidate)
  raise FileNotFoundError(f'rite_optax gin files not found next to {here}.')
