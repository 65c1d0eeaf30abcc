"""``python -m rite_optax`` (console script ``rite-optax``): the main job, see :mod:`rite_optax.demo`."""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the demo, or says which extra to install if its dependencies are missing."""
  try:
    from rite_optax import demo
  except ModuleNotFoundError as e:
    if e.name not in ('flax', 'tqdm', 'matplotlib'):
      raise
    raise SystemExit(
        f'The main job needs {e.name}: pip install "rite_optax[demo]"') from e
  demo.main(argv)


if __name__ == '__main__':
  main()
