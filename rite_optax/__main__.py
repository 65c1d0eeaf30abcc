"""``python -m rite_optax``: the main job (see :mod:`rite_optax.demo`)."""

from rite_optax.demo import main

if __name__ == '__main__':
  main()
