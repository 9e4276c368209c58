"""The peer's memory accountant: how many blocks and how many KV-cache tokens fit in a budget.

Pure functions over the manifest's config; no I/O, no torch. `--max-memory` counts what grows
with the blocks served: their weights and their KV cache. It does not count the Python, torch and
transformers runtime every peer process pays once (about 0.3 GiB on CPU here; measure it with
tools/bench_quant.py), nor the client's embeddings and head, which a peer never loads.

The split rule of `plan_capacity`: the cache gets at least CACHE_FRACTION of the budget, the weights
of as many consecutive blocks from `start` as fit in the rest, and the cache then gets everything
the blocks did not use. For SmolLM2-135M in float32 (1,536 bytes of cache per token per block, 30
blocks of 13.5 MiB) a 1 GiB budget serves all 30 blocks with 14,082 tokens of cache; 200 MiB serves
11 blocks and 3,193 tokens. A quarter keeps a peer useful to several sessions at once while the
blocks, which the swarm needs most, get the rest.
"""

from __future__ import annotations

import re
from typing import Any

from swarm.errors import ModelError
from swarm.manifest import Manifest

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANT_MODES = ("none", "int8", "nf4")  # the same as swarm.quant's, without importing torch here
CACHE_FRACTION = 0.25  # the least share of --max-memory kept for the KV cache
NF4_BLOCKSIZE = 64  # weights per nf4 scale (swarm.quant.NF4_BLOCKSIZE)

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,  # bare letters: binary, as `free -g` counts
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """'4GiB' -> 4294967296, '512MB' -> 512000000, '1.5G' -> 1610612736, '1000' -> 1000 bytes.
    KB/MB/GB are powers of 1000, KiB/MiB/GiB (and bare K/M/G) powers of 1024."""
    m = _SIZE.match(text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ValueError(f"cannot read size {text!r}: give a number and a unit, e.g. 4GiB, 512MB, 2G")
    return int(float(m.group(1)) * _UNITS[unit])


def _head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def linear_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(out, in) features of each linear of a Llama-family decoder block."""
    h = int(cfg["hidden_size"])
    inter = int(cfg["intermediate_size"])
    nq = int(cfg["num_attention_heads"])
    nkv = int(cfg.get("num_key_value_heads") or nq)
    hd = _head_dim(cfg)
    q, kv = nq * hd, nkv * hd
    return {
        "q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
        "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter),
    }


def block_params(cfg: dict[str, Any]) -> tuple[int, int, int]:
    """(linear weight params, linear output rows, other params) of one Llama-family decoder block.

    Linear weights are what quantization shrinks; each output row of an int8 layer has one scale.
    The rest (RMSNorm weights, biases) stays in the peer's dtype."""
    shapes = linear_shapes(cfg)
    linear = sum(o * i for o, i in shapes.values())
    rows = sum(o for o, _ in shapes.values())
    h, inter = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    q, kv = shapes["q_proj"][0], shapes["k_proj"][0]
    other = 2 * h  # input and post-attention RMSNorm
    if cfg.get("attention_bias"):
        other += q + 2 * kv + h
    if cfg.get("mlp_bias"):
        other += 2 * inter + h
    return linear, rows, other


def block_bytes(cfg: dict[str, Any], dtype: str, quant: str, block: int = 1, num_blocks: int = 3) -> int:
    """Bytes of the weights of block `block` (of `num_blocks`) held as `dtype` with `quant`; the
    default position is a middle block (nf4 keeps the end blocks in int8: swarm.quant.linear_mode).

    int8: one byte per weight and a float32 scale per output row (LLM.int8()'s SCB).
    nf4: half a byte per weight and, per NF4_BLOCKSIZE weights, a float32 scale: an upper bound
    (bitsandbytes stores it in 8 bits on CUDA and in bfloat16 in its packed CPU layout)."""
    if dtype not in DTYPE_BYTES:
        raise ModelError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPE_BYTES)})")
    if quant not in QUANT_MODES:
        raise ModelError(f"unknown quantization {quant!r} (choose from {', '.join(QUANT_MODES)})")
    size = DTYPE_BYTES[dtype]
    linear, _, other = block_params(cfg)
    if quant == "none":
        return (linear + other) * size
    from swarm.quant import linear_mode  # which linears nf4 keeps in int8: one rule, the loader's

    total = other * size
    for name, (o, i) in linear_shapes(cfg).items():
        if linear_mode(quant, name, block, num_blocks) == "int8":
            total += o * i + 4 * o
        else:
            total += o * i // 2 + 4 * -(-o * i // NF4_BLOCKSIZE)
    return total


def span_bytes(cfg: dict[str, Any], dtype: str, quant: str, start: int, end: int, num_blocks: int) -> int:
    """Bytes of the weights of blocks [start, end)."""
    return sum(block_bytes(cfg, dtype, quant, b, num_blocks) for b in range(start, end))


def kv_bytes_per_token(cfg: dict[str, Any], dtype: str) -> int:
    """KV cache bytes one token costs in one block: keys and values, each num_key_value_heads x
    head_dim, in the compute dtype (quantization leaves the cache in floats)."""
    nkv = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    return 2 * nkv * _head_dim(cfg) * DTYPE_BYTES[dtype]


def cache_tokens_for(budget: int, n_blocks: int, cfg: dict[str, Any], dtype: str) -> int:
    """Tokens of KV cache (across all sessions) that `budget` bytes hold for `n_blocks` blocks."""
    return max(0, budget) // (n_blocks * kv_bytes_per_token(cfg, dtype))


def plan_capacity(max_memory: int, manifest: Manifest, dtype: str, quant: str, start: int = 0) -> tuple[int, int]:
    """(blocks to serve from `start`, KV cache tokens) for `--blocks auto --max-memory`.

    Raises ModelError when not even one block and its share of cache fit."""
    cfg = manifest.config
    if not 0 <= start < manifest.num_blocks:
        raise ModelError(f"start block {start} is outside the model's {manifest.num_blocks} blocks")
    weights_budget = max_memory - int(max_memory * CACHE_FRACTION)
    n, used = 0, 0
    while start + n < manifest.num_blocks:
        more = block_bytes(cfg, dtype, quant, start + n, manifest.num_blocks)
        if used + more > weights_budget:
            break
        n, used = n + 1, used + more
    if n < 1:
        first = block_bytes(cfg, dtype, quant, start, manifest.num_blocks)
        raise ModelError(
            f"--max-memory {max_memory} bytes does not hold one block ({first} bytes as {dtype}/{quant}) "
            f"and its cache; give more memory, or try --quant int8 or nf4"
        )
    tokens = cache_tokens_for(max_memory - used, n, cfg, dtype)
    return n, tokens
