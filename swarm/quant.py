"""Quantizing a peer's blocks to int8 or nf4 with bitsandbytes, one block at a time.

A peer that holds its blocks in int8 (LLM.int8(), `Linear8bitLt`) or nf4 (QLoRA's 4-bit
NormalFloat, `Linear4bit`, mixed with int8: NF4_INT8_LINEARS) serves about 3.5x or 5.5x as many
blocks in the same memory. Only the `nn.Linear` weights of a decoder layer are quantized (they are
>99% of its bytes); norms stay in the peer's dtype. Quantization is per peer and invisible on the
wire: hidden states arrive and leave as floats.

`quantize_block` is the `on_block` hook of `BlockSpan.load`: each block is quantized right after it
is read, so loading never holds more than one float block next to the quantized rest. The float
weights are dropped here (the replaced `nn.Linear` is the only owner of its tensor) and, where
glibc is the allocator, the freed heap pages are handed back to the system with `malloc_trim`:
otherwise glibc keeps them (its mmap threshold grows as large blocks are freed) and the peer's
resident memory would not show the saving.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import warnings

import torch
from torch import nn

from .errors import ModelError

QUANT_MODES = ("none", "int8", "nf4")

# LLM.int8()'s outlier threshold: input columns holding a value above it are multiplied in float16
# with dequantized weights instead of in int8. 6.0 is the paper's default, tuned for models of 6.7B
# parameters and more, whose outliers are large; SmolLM2-135M's hidden states are smaller, and on a
# fixed 317-token English text (tools/bench_quant.py) teacher-forced next-token agreement with
# float32 was 0.890 at 0, 0.937 at 6.0, 0.956 at 2.0 and 0.968 at 1.0, for ~2x the step time of 6.0
# (weights stay int8 either way: memory does not change).
INT8_THRESHOLD = 1.0
NF4_BLOCKSIZE = 64  # bitsandbytes' default: one absmax per 64 weights (nested-quantized to 8 bits)
# nf4 is a mix, as llama.cpp's k-quants are (Q4_K_M keeps attn_v and ffn_down at 6 bits, and gives
# the first and last layers more bits): these linears, and every linear of the model's first and
# last blocks, are int8; the rest (q, o, gate, up: 70% of a middle block) nf4. On SmolLM2-135M
# (tools/bench_quant.py's text) teacher-forced next-token agreement with float32 is 0.741 with
# every linear in nf4 and 0.877 with this mix, for 0.175x instead of 0.133x the float32 bytes;
# k, v and down alone gave 0.839, the end blocks alone 0.845 (with v, down), and the same mix
# 0.884 against 0.734 on a second text (photosynthesis) that played no part in choosing it.
NF4_INT8_LINEARS = ("k_proj", "v_proj", "down_proj")
_CPU_PACK_N = 32  # bitsandbytes' AVX512-BF16 packed layout needs out_features % 32 == 0


def check_mode(mode: str) -> str:
    if mode not in QUANT_MODES:
        raise ModelError(f"unknown quantization {mode!r} (choose from {', '.join(QUANT_MODES)})")
    return mode


@functools.cache
def _bnb():
    """bitsandbytes, imported on first use: a float peer never pays for it (nor for its
    warning about optional CPU kernels)."""
    # on CPUs with AVX512-BF16 it looks for an optional kernel on the Hugging Face hub (package
    # `kernels`) and logs its absence at import; its own kernel serves instead: not the user's news
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward")
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes as bnb
    # it logs a warning on every int8 matmul of a non-float16 input, saying that the input is cast
    # to float16 (LLM.int8() quantizes activations from float16): that is the method, not news
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(
        lambda record: not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")
    )
    return bnb


def linear_mode(mode: str, name: str, block: int, num_blocks: int) -> str:
    """How one linear of block `block` is stored under the peer's `--quant mode` (see NF4_INT8_LINEARS)."""
    if mode != "nf4":
        return mode
    if block in (0, num_blocks - 1) or name.rpartition(".")[2] in NF4_INT8_LINEARS:
        return "int8"
    return "nf4"


def block_hook(mode: str, compute_dtype: torch.dtype | str, num_blocks: int):
    """The `on_block` hook of `BlockSpan.load` for a peer started with `--quant mode` (None: floats)."""
    if check_mode(mode) == "none":
        return None
    return lambda i, layer: quantize_block(layer, mode, compute_dtype, i, num_blocks)


def quantize_block(
    layer: nn.Module, mode: str, compute_dtype: torch.dtype | str = torch.float32, block: int = 1, num_blocks: int = 3
) -> nn.Module:
    """Replace every nn.Linear inside `layer` by its int8 or nf4 version, in place; returns `layer`.

    `block` of `num_blocks` is where the layer sits in the model: nf4 stores some linears as int8
    (`linear_mode`); the defaults stand for a middle block.
    `compute_dtype` is what the peer computes in (its `--dtype`): nf4 weights are dequantized to it
    per matmul; int8 rescales its int32 accumulators to the input's dtype."""
    check_mode(mode)
    if mode == "none":
        return layer
    if isinstance(compute_dtype, str):
        from .blocks import parse_dtype

        compute_dtype = parse_dtype(compute_dtype)
    # collect first: replacing children while iterating named_modules would skip some
    targets = [(name, m) for name, m in layer.named_modules() if type(m) is nn.Linear]
    for name, linear in targets:
        parent = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
        q = _int8(linear) if linear_mode(mode, name, block, num_blocks) == "int8" else _nf4(linear, compute_dtype)
        setattr(parent, name.rpartition(".")[2], q)
        # the float weight's last owner was `linear`; drop its tensors now rather than at the
        # next garbage collection (a layer's modules hold no reference cycles to it)
        linear.weight = None
        linear.bias = None
        del linear, q
    del targets
    # what stays float (norms, biases) may still point into the block file's mmap (safetensors
    # hands out views of it), and one live view keeps the whole file mapped and resident: copy them
    quantized = tuple(type(m) for m in layer.modules() if type(m).__module__.startswith("bitsandbytes"))
    for m in layer.modules():
        if isinstance(m, quantized):
            continue
        for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            t.data = t.data.clone()
    release_freed_memory()
    return layer.eval().requires_grad_(False)


def _int8(linear: nn.Linear) -> nn.Module:
    bnb = _bnb()
    with torch.device("meta"):  # no throwaway float weight of the right size
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False, threshold=INT8_THRESHOLD)
    # Int8Params quantizes on its first move to a real device: row-wise absmax to int8 (CB) with
    # one float scale per output row (SCB)
    q.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False).to(linear.weight.device)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.eval()


def _nf4(linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    bnb = _bnb()
    with torch.device("meta"):
        q = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
        )
    q.weight = bnb.nn.Params4bit(
        linear.weight.data, requires_grad=False, blocksize=NF4_BLOCKSIZE, compress_statistics=True, quant_type="nf4", module=q
    ).to(linear.weight.device)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.to(compute_dtype).clone(), requires_grad=False)
    if linear.weight.device.type != "cpu":
        return q.eval()  # the packing below is bitsandbytes' CPU kernel's
    if linear.out_features % _CPU_PACK_N or linear.in_features % NF4_BLOCKSIZE:
        q.support_avx512bf16_for_cpu = False  # the packed CPU kernel cannot take this shape
    elif q.support_avx512bf16_for_cpu:
        # bitsandbytes repacks the weight for its AVX512-BF16 kernel on the first forward, through a
        # transient int32 copy 8x the packed size; do it now, while loading, not in a peer's first
        # answer, and before the freed memory is trimmed
        q.eval()  # bitsandbytes packs only outside training mode
        with torch.inference_mode():
            q(torch.zeros(1, linear.in_features, dtype=compute_dtype))
    return q.eval()


def weight_bytes(module: nn.Module) -> int:
    """Bytes the module's weights occupy, quantized storage included.

    Counts each tensor once (by storage): parameters and buffers, plus what bitsandbytes keeps
    beside them: an int8 layer's row scales (SCB, on the weight before the first forward and on the
    layer's matmul state after it; its CB is the weight's own data), an nf4 layer's quant state
    (absmax, the nested absmax and code tables)."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is None or not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            return
        seen.add(key)
        total += t.untyped_storage().nbytes()

    for m in module.modules():
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            add(t)
        w = getattr(m, "weight", None)
        for attr in ("CB", "SCB"):
            add(getattr(w, attr, None))
        state = getattr(m, "state", None)
        for attr in ("CB", "SCB"):
            add(getattr(state, attr, None))
        qs = getattr(w, "quant_state", None)
        while qs is not None:
            for attr in ("absmax", "code", "offset"):
                add(getattr(qs, attr, None))
            qs = getattr(qs, "state2", None)
    return total


@functools.cache
def _libc():
    if os.name != "posix":
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.malloc_trim  # only glibc has it
        return libc
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Give free heap pages back to the system (glibc's malloc_trim). Without it, weights freed
    during loading stay in the process's resident memory: a cost of the allocator, not of us."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
