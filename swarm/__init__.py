"""swarm: run a large language model across a swarm of peers.

`import swarm` stays light (no torch, no transformers); the Python API loads on first use:

    from swarm import DistributedModelForCausalLM
"""

from __future__ import annotations

from typing import Any

from .compute import tune_openmp

tune_openmp()  # before anything loads torch (see swarm/compute.py)

__all__ = ["DistributedModelForCausalLM"]


def __getattr__(name: str) -> Any:
    if name == "DistributedModelForCausalLM":
        from .hf import DistributedModelForCausalLM

        return DistributedModelForCausalLM
    raise AttributeError(f"module 'swarm' has no attribute {name!r}")
