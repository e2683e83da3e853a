"""Fixtures for the kernel tests: running Python in a fresh process with a chosen environment."""
import os
import subprocess
import sys

import pytest


def _child_env(**overrides):
    """os.environ plus this process's sys.path (so tokaccel imports the same way), plus overrides.

    An override of None removes the variable.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@pytest.fixture(scope="session")
def run_python():
    """run_python(args, timeout=..., **env) -> CompletedProcess; raises with stdout/stderr on failure."""

    def run(args, timeout=300, **env):
        proc = subprocess.run([sys.executable, *args], env=_child_env(**env), capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"subprocess {args[:2]} failed ({proc.returncode}):\n"
                                 f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
        return proc

    return run
