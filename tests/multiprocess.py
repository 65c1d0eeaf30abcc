"""Runs a test scenario as N JAX processes on localhost, as a pod slice runs one per host.

``launch('tests.test_multihost:scenario', processes=2, devices=4)`` starts N workers
(``python -m tests.multiprocess``), each with ``devices`` simulated CPU devices, gloo
collectives and ``jax.distributed.initialize`` on a free port; each calls the scenario
function with its process index and saves the dict of arrays it returns. ``launch``
returns those dicts in process order. Every worker is bounded by ``timeout`` seconds and
runs in its own process group: on a failure, a timeout or an interrupt every group is
killed, so no process outlives the call.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
CACHE = pathlib.Path(tempfile.gettempdir()) / f'rite_optax_multiprocess_cache_{os.getuid()}'


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _kill(procs) -> None:
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
  for p in procs:
    p.wait()


def launch(target: str, processes: int, devices: int, timeout: float = 180.0,
           args: tuple[str, ...] = ()) -> list[dict[str, np.ndarray]]:
  """Runs ``target`` ('module:function') in ``processes`` JAX processes; their results."""
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO),
             # Launches of one scenario compile the same programs: share them.
             JAX_COMPILATION_CACHE_DIR=str(CACHE), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  port = free_port()
  with tempfile.TemporaryDirectory() as out:
    logs = [open(pathlib.Path(out) / f'{i}.log', 'w+') for i in range(processes)]  # noqa: SIM115
    procs = [subprocess.Popen(
        [sys.executable, '-m', 'tests.multiprocess', target, str(i), str(processes), str(port),
         out, *args], env=env, cwd=REPO, stdout=logs[i], stderr=subprocess.STDOUT,
        start_new_session=True) for i in range(processes)]
    try:
      deadline = time.monotonic() + timeout
      while any(p.poll() is None for p in procs):
        failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failed or time.monotonic() > deadline:
          break
        time.sleep(0.2)
      codes = [p.poll() for p in procs]
    finally:
      _kill(procs)
    if any(code != 0 for code in codes):
      text = []
      for i, log in enumerate(logs):
        log.seek(0)
        text.append(f'--- process {i} (exit {codes[i]}) ---\n{log.read()[-4000:]}')
      failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
      reason = f'failed in process {failed}' if failed else f'timed out after {timeout} s'
      raise RuntimeError(f'{target} {reason}:\n' + '\n'.join(text))
    for log in logs:
      log.close()
    return [dict(np.load(pathlib.Path(out) / f'{i}.npz')) for i in range(processes)]


def _worker(target: str, index: int, count: int, port: int, out: str, *args: str) -> None:
  import jax  # noqa: PLC0415  (after XLA_FLAGS is set by launch)

  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.config.update('jax_enable_x64', True)  # as tests/conftest.py
  jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=count, process_id=index,
                             initialization_timeout=60)
  module, name = target.split(':')
  try:
    result = getattr(importlib.import_module(module), name)(index, *args)
  except BaseException:
    # Exit at once: a normal exit would wait in jax.distributed's shutdown for the
    # other processes, and the harness would see a hang instead of this failure.
    traceback.print_exc()
    sys.stdout.flush()
    os._exit(1)
  np.savez(pathlib.Path(out) / f'{index}.npz', **result)
  jax.distributed.shutdown()


if __name__ == '__main__':
  _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:])
