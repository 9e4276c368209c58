"""A Python API in the style of transformers, for plain scripts and notebooks.

    from swarm import DistributedModelForCausalLM
    from transformers import TextStreamer

    with DistributedModelForCausalLM.from_pretrained("smollm2-135m", peers=["127.0.0.1:7001"]) as model:
        ids = model.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
        out = model.generate(ids, max_new_tokens=64, streamer=TextStreamer(model.tokenizer))

The swarm client is asyncio; these calls are synchronous. The client lives on an event loop in a
background thread that this object owns, so it works where a loop is already running (Jupyter)
as well as where none is. Tokens cross to the caller's thread through a queue, so a streamer is
called from the thread that called `generate()`, as in transformers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import torch

from .manifest import DEFAULT_MODEL

T = TypeVar("T")

# generate() keywords that transformers callers pass out of habit and that mean nothing here
_IGNORED = {"attention_mask", "pad_token_id", "use_cache", "return_dict_in_generate"}


class _LoopThread:
    """An event loop running in a daemon thread; `run(coro)` blocks the caller until it is done."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="swarm-client-loop", daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        fut = self.submit(coro)
        try:
            return fut.result()
        except BaseException:  # KeyboardInterrupt included: cancel the task, so it closes its sessions
            fut.cancel()
            raise

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        if not self.loop.is_running():
            self.loop.close()


class DistributedModelForCausalLM:
    """A causal LM whose blocks run in the swarm. Create with `from_pretrained`; close when done."""

    def __init__(self, client: Any, runner: _LoopThread) -> None:
        self._client = client
        self._runner = runner
        self.tokenizer = client.tokenizer
        self.config = client.head.config
        self.name_or_path = client.manifest.name
        self._closed = False

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = DEFAULT_MODEL,
        peers: Sequence[str] = (),
        mdns: bool | None = None,
        discovery_timeout: float = 30.0,
        torch_threads: int | None = None,
        swarm_key: Any = None,
        wire_dtype: str = "float32",
    ) -> "DistributedModelForCausalLM":
        """Find the swarm through `peers` ("host:port") and, unless `mdns=False` (the default when
        peers are given), the LAN; load the model's client part (embeddings, norm, head, tokenizer),
        prepared here or, for a model not here, fetched from the swarm (swarm.client)."""
        from .client import ClientConfig, SwarmClient

        cfg = ClientConfig(
            model=str(name_or_path),
            bootstrap=tuple(peers),
            mdns=(not peers) if mdns is None else mdns,
            discovery_timeout=discovery_timeout,
            torch_threads=torch_threads,
            swarm_key=swarm_key,
            wire_dtype=wire_dtype,
        )
        runner = _LoopThread()
        try:
            client = runner.run(SwarmClient.connect(cfg))
        except BaseException:
            runner.stop()
            raise
        return cls(client, runner)

    # --- generation ------------------------------------------------------------------------------

    def generate(
        self,
        input_ids: torch.Tensor | Sequence[int] | None = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        streamer: Any = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> torch.LongTensor:
        """input_ids [1, n] (or a list of ids) -> [1, n + new], like transformers' generate().
        Greedy unless do_sample; stops at the model's end-of-sequence token or max_new_tokens.
        `streamer` gets put(prompt [1, n]), put(token [1]) per new token, then end()."""
        from .sampling import SamplingConfig

        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        unknown = set(kwargs) - _IGNORED
        if unknown:
            raise TypeError(f"generate() got unsupported arguments: {', '.join(sorted(unknown))}")
        if self._closed:
            raise RuntimeError("this model is closed")
        prompt = _as_ids(input_ids)
        sampling = SamplingConfig(temperature=temperature if do_sample else 0.0, top_k=top_k if do_sample else 0, top_p=top_p if do_sample else 1.0, seed=seed)
        if streamer is not None:
            streamer.put(torch.tensor([prompt], dtype=torch.long))
        tokens: list[int] = []
        q: queue.Queue[int | None] = queue.Queue()

        async def run() -> None:
            try:
                async for tok in self._client.stream(prompt, max_new_tokens, sampling):
                    q.put(tok)
            finally:
                q.put(None)

        fut = self._runner.submit(run())
        try:
            while (tok := q.get()) is not None:
                tokens.append(tok)
                if streamer is not None:
                    streamer.put(torch.tensor([tok], dtype=torch.long))
            fut.result()  # raises the swarm's error, if any
        except BaseException:
            fut.cancel()  # the task closes its sessions on the peers
            raise
        finally:
            if streamer is not None:
                streamer.end()
        return torch.tensor([prompt + tokens], dtype=torch.long)

    @property
    def last_route(self) -> list[dict]:
        """The chain of peers (ids and spans) of the latest answer."""
        return self._client.last_route

    # --- lifetime --------------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._runner.run(self._client.close())
        finally:
            self._runner.stop()

    def __enter__(self) -> "DistributedModelForCausalLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_ids(input_ids: Any) -> list[int]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2:
            if input_ids.shape[0] != 1:
                raise ValueError(f"one sequence at a time: input_ids has batch size {input_ids.shape[0]}")
            input_ids = input_ids[0]
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be [1, n] or [n], got shape {list(input_ids.shape)}")
        return [int(t) for t in input_ids.tolist()]
    if hasattr(input_ids, "keys") and "input_ids" in input_ids:  # a BatchEncoding
        return _as_ids(input_ids["input_ids"])
    ids = list(input_ids) if input_ids is not None else []
    if ids and isinstance(ids[0], (list, tuple)):
        if len(ids) != 1:
            raise ValueError(f"one sequence at a time: got {len(ids)}")
        ids = list(ids[0])
    if not ids or not all(isinstance(t, int) for t in ids):
        raise ValueError("input_ids must be a non-empty [1, n] tensor or list of token ids")
    return ids
