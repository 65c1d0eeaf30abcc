"""Test configuration: 8 simulated CPU devices, float64 available on request."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import jax  # noqa: E402

jax.config.update('jax_enable_x64', True)
