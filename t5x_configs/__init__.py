"""T5X / flaxformer integration for rite_optax (t5x and flaxformer are imported lazily)."""
