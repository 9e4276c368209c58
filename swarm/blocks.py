"""Executing a span of transformer blocks, and the client's head, with transformers' own modules.

The model's classes come from a skeleton built on the meta device (no memory, no weights), so the
arithmetic is the library's and nothing here names a model family. Only the blocks of the span
are read from disk, each from its own file, checked against the manifest's sha256 first.
"""

from __future__ import annotations

import copy
import functools
import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import nn

from .errors import ModelError
from .manifest import Manifest

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_skeleton_lock = threading.Lock()


def resolve_device(name: str) -> str:
    """`auto` is the GPU when torch sees one, else the CPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {name}: torch sees no CUDA device here (torch {torch.__version__})")
    if name != "cpu" and not name.startswith("cuda"):
        raise ModelError(f"unknown device {name!r} (cpu, cuda, cuda:N or auto)")
    return name


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelError(f"unknown dtype {name!r} (choose from {', '.join(DTYPES)})") from None


def load_config(manifest: Manifest):
    from transformers import AutoConfig

    cfg = dict(manifest.config)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    config._attn_implementation = "sdpa"
    return config


def skeleton(config) -> nn.Module:
    """The whole model on the meta device: its modules tell us the classes, at no memory cost."""
    from transformers import AutoModelForCausalLM

    with _skeleton_lock, torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _materialize(module: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype, what: str, device: str = "cpu") -> nn.Module:
    """Give a meta module real weights, checking every key and shape first (as nanoGPT does)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ModelError(f"{what}: missing tensors {missing[:5]}, unexpected tensors {extra[:5]}")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ModelError(f"{what}: tensor {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    module.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}, assign=True)
    return module.eval().requires_grad_(False)


def _read(manifest: Manifest, entry) -> dict[str, torch.Tensor]:
    manifest.check_file(entry)
    with safe_open(manifest.path(entry), framework="pt") as sf:
        return {k: sf.get_tensor(k) for k in sf.keys()}


BlockHook = Callable[[int, nn.Module], nn.Module]


class BlockSpan:
    """Blocks [start, end) of a model, ready to run. One instance serves every session; each
    session brings its own cache (see `new_cache`)."""

    def __init__(self, config, layers: nn.ModuleList, rotary: nn.Module, start: int, end: int, dtype: torch.dtype, device: str = "cpu"):
        self.config = config
        self.layers = layers
        self.rotary = rotary
        self.start = start
        self.end = end
        self.dtype = dtype
        self.device = torch.device(device)
        # transformers renamed the decoder layers' cache argument (past_key_values -> cache)
        params = inspect.signature(layers[0].forward).parameters if len(layers) else {}
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.hidden_size = int(config.hidden_size)

    @classmethod
    def load(
        cls,
        manifest: Manifest,
        start: int,
        end: int,
        dtype: str = "float32",
        on_block: BlockHook | None = None,
        progress: Callable[[int, int], None] | None = None,
        device: str = "cpu",
    ) -> "BlockSpan":
        """Read blocks [start, end) one at a time. `on_block` may replace each block as it
        arrives (quantization does), so peak memory stays near one float block."""
        if not 0 <= start < end <= manifest.num_blocks:
            raise ModelError(f"span {start}:{end} is outside the model's {manifest.num_blocks} blocks")
        config = load_config(manifest)
        torch_dtype = parse_dtype(dtype)
        skel = skeleton(config)
        layers = []
        for n, i in enumerate(range(start, end)):
            layer = copy.deepcopy(skel.model.layers[i])  # still on meta: costs nothing
            layer = _materialize(layer, _read(manifest, manifest.blocks[i]), torch_dtype, f"block {i}", device)
            if on_block is not None:
                layer = on_block(i, layer)
            layers.append(layer)
            if progress:
                progress(n + 1, end - start)
        rotary = type(skel.model.rotary_emb)(config=config).to(device)
        return cls(config, nn.ModuleList(layers), rotary, start, end, torch_dtype, device)

    def new_cache(self, max_length: int | None = None):
        """transformers' DynamicCache, whose full-attention layers append in place (see
        `_GrowingLayer`); `max_length` caps what they reserve."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        layers = getattr(cache, "layers", None)
        if layers is not None:
            cache.layers = [_growing_layer(max_length) if type(layer) is _dynamic_layer() else layer for layer in layers]
        return cache

    def cache_length(self, cache) -> int:
        return cache.get_seq_length(self.start)

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, position: int, cache, start: int | None = None, end: int | None = None) -> torch.Tensor:
        """hidden [1, n, H] at positions position..position+n-1 -> hidden after blocks [start, end).

        The cache must hold exactly `position` tokens (the caller rewinds it first)."""
        start = self.start if start is None else start
        end = self.end if end is None else end
        n = hidden.shape[1]
        dev = self.device
        x = hidden.to(device=dev, dtype=self.dtype)
        pos = torch.arange(position, position + n, device=dev).unsqueeze(0)
        cos_sin = self.rotary(x, pos)
        mask = None
        if n > 1 and position > 0:
            # several new rows after a cached prefix: SDPA's is_causal would align them to the
            # top-left, so spell the causal mask out. (n == 1 attends to all; a prefix-free
            # prefill uses SDPA's own causal path.)
            q = torch.arange(position, position + n, device=dev).unsqueeze(1)
            k = torch.arange(position + n, device=dev).unsqueeze(0)
            mask = (k <= q)[None, None]
        for layer in self.layers[start - self.start : end - self.start]:
            x = layer(x, attention_mask=mask, position_ids=pos, use_cache=True, position_embeddings=cos_sin, **{self._cache_kw: cache})
        return x

    def weight_bytes(self) -> int:
        total = 0
        for t in list(self.layers.parameters()) + list(self.layers.buffers()):
            total += t.numel() * t.element_size()
        return total


@functools.cache
def _dynamic_layer() -> type:
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer


@functools.cache
def _growing_layer_class() -> type:
    class GrowingLayer(_dynamic_layer()):
        """A DynamicLayer that writes each step into spare room instead of concatenating the whole
        cache into a new tensor: a decode step on 10 blocks of SmolLM2 is 0.3-0.4 ms (3-4%) faster,
        and the keys and values are the same bits. Room doubles as needed, up to `max_length`."""

        max_length: int | None = None
        _room: tuple[torch.Tensor, torch.Tensor] | None = None

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self._room = None
            n = self.keys.shape[-2] if self.keys.numel() else 0
            m = n + key_states.shape[-2]
            if self._room is None or m > self._room[0].shape[-2]:
                size = max(64, 1 << (m - 1).bit_length())
                if self.max_length is not None:
                    size = max(m, min(size, self.max_length))
                shape = (*key_states.shape[:-2], size, key_states.shape[-1])
                room = (key_states.new_empty(shape), value_states.new_empty(shape))
                if n:
                    room[0][..., :n, :] = self.keys
                    room[1][..., :n, :] = self.values
                self._room = room
            self._room[0][..., n:m, :] = key_states
            self._room[1][..., n:m, :] = value_states
            # views: crop() shortens them, and the next update writes over what was dropped
            self.keys = self._room[0][..., :m, :]
            self.values = self._room[1][..., :m, :]
            return self.keys, self.values

    return GrowingLayer


def _growing_layer(max_length: int | None):
    layer = _growing_layer_class()()
    layer.max_length = max_length
    return layer


def rewind(cache, length: int, layer_idx: int) -> None:
    """Drop cached positions >= length (a retried or replayed step). A negative crop removes that
    many tokens in every transformers version (a positive one meant "keep" in 4.x, and is refused
    in 5.x)."""
    remove = cache.get_seq_length(layer_idx) - length
    if remove > 0:
        cache.crop(-remove)


@dataclass
class Head:
    """What a client runs locally: embeddings in, final norm and LM head out."""

    embed: nn.Module
    norm: nn.Module
    lm_head: nn.Module
    config: object

    @classmethod
    def load(cls, manifest: Manifest, dtype: str = "float32") -> "Head":
        config = load_config(manifest)
        torch_dtype = parse_dtype(dtype)
        skel = skeleton(config)
        tensors = _read(manifest, manifest.client)
        embed = _materialize(copy.deepcopy(skel.model.embed_tokens), {"weight": tensors["embed_tokens.weight"]}, torch_dtype, "embeddings")
        norm = _materialize(copy.deepcopy(skel.model.norm), {"weight": tensors["norm.weight"]}, torch_dtype, "final norm")
        head_weight = tensors.get("lm_head.weight", None)
        lm_head = copy.deepcopy(skel.lm_head)
        if head_weight is None:
            if not getattr(config, "tie_word_embeddings", False):
                raise ModelError("the prepared model has no LM head and its embeddings are not tied")
            lm_head = _materialize(lm_head, {"weight": tensors["embed_tokens.weight"]}, torch_dtype, "LM head")
            lm_head.weight = embed.weight  # tied: one tensor, not two
        else:
            lm_head = _materialize(lm_head, {"weight": head_weight}, torch_dtype, "LM head")
        return cls(embed, norm, lm_head, config)

    @torch.inference_mode()
    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        return self.embed(torch.tensor([ids], dtype=torch.long))  # [1, n, H]

    @torch.inference_mode()
    def logits(self, hidden_last: torch.Tensor) -> torch.Tensor:
        """hidden [1, n, H] -> logits of the last row, float32 [vocab]."""
        x = hidden_last[:, -1:].to(self.norm.weight.dtype)
        return self.lm_head(self.norm(x))[0, -1].float()
