"""glibc settings for training: freed memory is reused instead of mapped afresh (and faulted in) every step."""

import subprocess
import sys

import pytest

# 64 MB allocated, filled and freed over and over, as XLA:CPU does with a step's temporaries; the
# minor page faults of the last five rounds, per round. Each setting in its own process: mallopt is
# process-wide and must run before anything else allocates on other threads.
PROBE = """
import resource, sys
import numpy as np
from npo_jax.memory import reuse_host_memory
applied = reuse_host_memory() if sys.argv[1] == "reuse" else None
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    a = np.ones(1 << 24, np.float32); del a
before = faults()
for _ in range(5):
    a = np.ones(1 << 24, np.float32); del a
print(applied, (faults() - before) / 5)
"""


def _probe(mode: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    applied, per_round = out.split()
    return applied, float(per_round)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reuse_host_memory_stops_fresh_page_faults():
    applied, reused = _probe("reuse")
    _, default = _probe("default")
    assert applied == "True"
    # a fresh 64 MB mapping faults at least once per 2 MB huge page, more with 4 KB pages
    assert default >= 32, default
    assert reused < 4, (reused, default)


def test_jax_runs_on_cpu_is_told_without_starting_jax(monkeypatch, tmp_path):
    from npo_jax.memory import jax_runs_on_cpu

    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not jax_runs_on_cpu()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert jax_runs_on_cpu()
    monkeypatch.delenv("JAX_PLATFORMS")
    (tmp_path / "jax_plugins" / "xla_cuda12").mkdir(parents=True)  # how jax's CUDA plugin installs itself
    (tmp_path / "jax_plugins" / "xla_cuda12" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert not jax_runs_on_cpu()
