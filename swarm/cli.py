"""The `swarm` command: prepare, join, generate, status, api, demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from .errors import NoRouteError, SwarmError
from .manifest import DEFAULT_MODEL

log = logging.getLogger("swarm")


# --- helpers shared by the subcommands --------------------------------------------------------------


def _progress_printer(stream=sys.stderr):
    """A tqdm bar per phase of a long job (preparing, loading)."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def progress(what: str, done: int, total: int) -> None:
        bar = bars.get(what)
        if bar is None:
            bar = bars[what] = tqdm(total=total, desc=what, unit="", file=stream, leave=False, dynamic_ncols=True)
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return progress


def _parse_span(text: str) -> tuple[int, int] | None:
    if text == "auto":
        return None
    try:
        s, e = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks takes S:E (e.g. 0:10) or auto, not {text!r}") from None
    if not 0 <= s < e:
        raise argparse.ArgumentTypeError(f"--blocks {text}: need 0 <= S < E")
    return s, e


def _size(text: str) -> int:
    from peers.memory import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _verify_rate(text: str) -> float:
    from .verify import parse_verify

    try:
        return parse_verify(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _addr(text: str) -> str:
    from .directory import split_addr

    try:
        split_addr(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _swarm_key(args: argparse.Namespace):
    """--swarm-key FILE, else $SWARM_KEY_FILE or $SWARM_KEY; None: the public swarm."""
    from .secure import swarm_key_from_env_or_file

    return swarm_key_from_env_or_file(getattr(args, "swarm_key", None))


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("asyncio", "transformers", "zeroconf", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")


# --- prepare --------------------------------------------------------------------------------------


def cmd_prepare(args: argparse.Namespace) -> int:
    from .prepare import prepare

    t0 = time.time()
    m = prepare(args.model, progress=_progress_printer(), force=args.force)
    print(f"prepared {m.name}: {m.num_blocks} blocks, {m.dtype}, in {m.root}")
    print(f"model hash {m.model_hash}  ({time.time() - t0:.1f}s)")
    return 0


# --- join -----------------------------------------------------------------------------------------


def cmd_join(args: argparse.Namespace) -> int:
    return asyncio.run(_join(args))


async def _join(args: argparse.Namespace) -> int:
    from peers.membership import MembershipConfig
    from peers.server import PeerConfig, PeerServer
    from peers.sessions import Limits

    from peers.join import JoinOptions, plan_join

    from . import compute
    from .blocks import resolve_device
    from .identity import Identity, default_identity_path

    if args.threads:
        compute.set_threads(args.threads)
    swarm_key = _swarm_key(args)
    # the model (prepared here, or learned and fetched from the swarm), the span, its weights
    plan = await plan_join(JoinOptions(
        model=args.model, blocks=args.blocks, max_blocks=args.max_blocks, max_memory=args.max_memory, dtype=args.dtype,
        quant=args.quant, bootstrap=tuple(args.peer), mdns=not args.no_mdns, mdns_interfaces=args.mdns_interface,
        discovery_timeout=args.discovery_timeout, swarm_key=swarm_key,
    ), _progress_printer())
    manifest, span = plan.manifest, plan.span
    max_cache_tokens = args.max_cache_tokens
    if args.max_memory is not None:  # quant: --max-memory sizes the span (auto) and the KV cache
        from peers.memory import cache_tokens_for, plan_capacity, span_bytes

        if args.blocks is None and args.max_blocks is None:  # plan_join chose a span of plan_capacity's size
            _, max_cache_tokens = plan_capacity(args.max_memory, manifest, args.dtype, args.quant, 0)
        else:
            left = args.max_memory - span_bytes(manifest.config, args.dtype, args.quant, span[0], span[1], manifest.num_blocks)
            max_cache_tokens = cache_tokens_for(left, span[1] - span[0], manifest.config, args.dtype)
            if max_cache_tokens < 1:
                raise SwarmError(f"--max-memory does not hold blocks {span[0]}:{span[1]} as {args.dtype}/{args.quant}; use fewer blocks or --quant")
    if args.identity or args.port:
        identity = Identity.load_or_create(args.identity or default_identity_path(args.port))
    else:
        identity = Identity.generate()  # any free port: a fresh identity, as unstable as the port
    config = PeerConfig(
        start=span[0],
        end=span[1],
        host=args.host,
        port=args.port,
        dtype=args.dtype,
        device=resolve_device(args.device),
        limits=Limits(
            max_sessions=args.max_sessions,
            max_cache_tokens=max_cache_tokens,
            idle_timeout=args.session_idle_timeout,
        ),
        torch_threads=args.threads,
        quant=args.quant,
        membership=MembershipConfig(bootstrap=tuple(args.peer), mdns=not args.no_mdns, mdns_interfaces=args.mdns_interface),
        announce=args.announce,
        swarm_key=swarm_key,
        test_perturb=args.test_perturb,
        frame_timeout=args.frame_timeout,
        pinned=args.blocks is not None,  # only auto peers rebalance (below): others should not wait on us
    )
    log.info("peer %s loading blocks %d:%d of %s", identity.short_id, span[0], span[1], manifest.name)
    server = await PeerServer.start(manifest, identity, config)
    log.info("peer %s serving blocks %d:%d on %s (%.2f ms/block)", identity.short_id, span[0], span[1], server.address, server.ms_per_block)
    print(f"READY {server.address} {identity.peer_id}", flush=True)
    rebalancer = None
    if args.blocks is None:  # auto: move to uncovered blocks when the swarm needs it (peers/rebalance.py)
        from peers.rebalance import RebalanceConfig, Rebalancer

        rebalancer = Rebalancer(server, RebalanceConfig(budget=plan.budget, check_s=args.rebalance_interval), swarm_key=swarm_key)
        rebalancer.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("peer %s leaving", identity.short_id)
    if rebalancer is not None:
        await rebalancer.close()
    await server.close()
    return 0


# --- generate -------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    return asyncio.run(_generate(args))


async def _generate(args: argparse.Namespace) -> int:
    from .client import ClientConfig, SwarmClient
    from .sampling import SamplingConfig

    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    cfg = ClientConfig(
        model=args.model, bootstrap=tuple(args.peer), mdns=not args.no_mdns, mdns_interfaces=args.mdns_interface,
        discovery_timeout=args.discovery_timeout,
        torch_threads=args.threads,
        swarm_key=_swarm_key(args),
        verify=args.verify,
    )
    async with await SwarmClient.connect(cfg) as client:
        ids = client.encode_prompt(args.prompt, chat=not args.no_chat)
        printed = ""
        tokens: list[int] = []

        def on_token(tok: int) -> None:
            nonlocal printed
            tokens.append(tok)
            if args.json:
                return
            text = client.decode(tokens)
            if text.startswith(printed):
                sys.stdout.write(text[len(printed) :])
                sys.stdout.flush()
                printed = text

        def on_failover(ev) -> None:
            new = ", ".join(f"{p[:10]} [{s}:{e})" for p, s, e in ev.replaced_by)
            print(f"\n[swarm] peer {ev.dropped[:10]} dropped for blocks {ev.span[0]}:{ev.span[1]} ({ev.reason}); now {new}; resumed after {ev.stall_s:.2f}s", file=sys.stderr)

        def on_verify(v: dict) -> None:
            who = f"peer {v['liar'][:10]} lied and is dropped" if v["liar"] else "no third peer could say which is wrong"
            print(f"\n[swarm] verification failed at token {v['position']} for blocks {v['span'][0]}:{v['span'][1]} "
                  f"({v['primary'][:10]} vs {v['checker'][:10]}, distance {v['distance']:.2e} > {v['tolerance']:.0e}): {who}",
                  file=sys.stderr)

        try:
            result = await client.generate(ids, args.max_new_tokens, sampling, on_token=on_token, on_failover=on_failover, on_verify=on_verify)
        except NoRouteError as e:
            if args.json:
                print(json.dumps({"error": str(e), "missing_blocks": e.missing, "tokens": e.tokens, "text": client.decode(e.tokens)}))
            else:
                print(f"\n[swarm] stopped: {e}", file=sys.stderr)
                print(f"[swarm] tokens so far: {e.tokens}", file=sys.stderr)
            return 3
        if args.json:
            print(json.dumps(result.to_json()))
        else:
            print()
            route = " -> ".join(f"{h['peer'][:10]}[{h['span'][0]}:{h['span'][1]})" for h in result.routes[-1])
            print(
                f"[swarm] {len(result.tokens)} tokens, {result.decode_tokens_per_s:.1f} tokens/s, "
                f"first token after {result.ttft_s:.2f}s; route {route}",
                file=sys.stderr,
            )
    return 0


# --- status ---------------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    return asyncio.run(_status(args))


async def _status(args: argparse.Namespace) -> int:
    from .status import collect, render

    snapshot = await collect(
        tuple(args.peer), timeout=args.discovery_timeout, mdns=not args.no_mdns, mdns_interfaces=args.mdns_interface,
        swarm_key=_swarm_key(args),
    )
    if args.json:
        print(json.dumps(snapshot))
    else:
        print(render(snapshot))
    return 0 if snapshot["peers"] else 1


# --- api ------------------------------------------------------------------------------------------


def cmd_api(args: argparse.Namespace) -> int:
    return asyncio.run(_api(args))


async def _api(args: argparse.Namespace) -> int:
    from .api import ApiConfig, ApiServer

    key = args.api_key if args.api_key is not None else os.environ.get("SWARM_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not key:
        log.warning("listening on %s without --api-key: anyone who can reach it can use the swarm through it", args.host)
    cfg = ApiConfig(
        model=args.model, host=args.host, port=args.port, api_key=key, bootstrap=tuple(args.peer), mdns=not args.no_mdns,
        discovery_timeout=args.discovery_timeout, torch_threads=args.threads, mdns_interfaces=args.mdns_interface,
        swarm_key=_swarm_key(args),
    )
    server = await ApiServer.start(cfg)
    log.info("serving %s at http://%s/v1 (the swarm map at http://%s/)", server.model_name, server.address, server.address)
    print(f"READY http://{server.address}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()
    return 0


# --- demo -----------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from .local import LocalSwarm, thirds
    from .prepare import prepare

    print("[demo] preparing the embedded SmolLM2-135M-Instruct (once)...", file=sys.stderr)
    m = prepare(DEFAULT_MODEL, progress=_progress_printer())
    home = Path(os.environ.get("SWARM_HOME") or Path.home() / ".cache" / "swarm")
    spans = thirds(m.num_blocks, 3)
    print(f"[demo] starting 3 peers on 127.0.0.1 serving blocks {', '.join(f'{s}:{e}' for s, e in spans)}...", file=sys.stderr)
    with LocalSwarm(log_dir=home / "logs") as swarm:
        first = swarm.start(["--blocks", f"{spans[0][0]}:{spans[0][1]}", "--port", "0", "--no-mdns"])
        swarm.start_many([["--blocks", f"{s}:{e}", "--port", "0", "--peer", first.addr, "--no-mdns"] for s, e in spans[1:]])
        for p in swarm.peers:
            print(f"[demo] peer {p.peer_id[:10]} on {p.addr} pid {p.pid}", file=sys.stderr)
        print(f"[demo] > {args.prompt}", file=sys.stderr)
        ns = argparse.Namespace(
            prompt=args.prompt, model=DEFAULT_MODEL, peer=swarm.addrs, max_new_tokens=args.max_new_tokens,
            temperature=0.0, top_k=0, top_p=1.0, seed=None, no_chat=False, json=False, discovery_timeout=30.0, threads=None,
            no_mdns=True, mdns_interface=None, swarm_key=None, verify=0.0,
        )
        return asyncio.run(_generate(ns))


# --- the parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swarm", description="Run a large language model across a swarm of peers.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("prepare", help="convert a model into per-block files once")
    sp.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"{DEFAULT_MODEL} (default) or a local Hugging Face folder")
    sp.add_argument("--force", action="store_true", help="prepare again even if a prepared copy exists")
    sp.set_defaults(func=cmd_prepare)

    sp = sub.add_parser("join", help="serve a span of blocks to the swarm")
    sp.add_argument("--model", default=None, help=f"a local model folder or a model name (default: the swarm's model, else {DEFAULT_MODEL}); a name not prepared here is fetched from the swarm")
    sp.add_argument("--blocks", type=_parse_span, default=None, help="S:E pins the blocks to serve; auto (default) takes the blocks the swarm needs most and moves when a span is left uncovered")
    sp.add_argument("--max-blocks", type=int, default=None, metavar="N", help="with --blocks auto: serve at most N blocks")
    sp.add_argument("--discovery-timeout", type=float, default=5.0, help="seconds to wait for the swarm's table before choosing blocks")
    sp.add_argument("--rebalance-interval", type=float, default=2.0, help=argparse.SUPPRESS)  # seconds between move checks
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sp.add_argument("--port", type=int, default=0, help="port to listen on (default: any free port)")
    sp.add_argument("--peer", type=_addr, action="append", default=[], help="HOST:PORT of a swarm member (repeatable)")
    sp.add_argument("--announce", type=_addr, default=None, help="HOST:PORT others should dial, if not the listening address")
    sp.add_argument("--identity", help="the peer's key file (default: one per port in ~/.config/swarm/keys)")
    sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    sp.add_argument("--device", default="cpu", help="where the blocks run: cpu (default), cuda, cuda:N, or auto")
    sp.add_argument("--quant", default="none", choices=["none", "int8", "nf4"], help="hold the blocks in int8 or nf4 (bitsandbytes); compute stays in --dtype")
    sp.add_argument("--max-memory", type=_size, default=None, metavar="SIZE", help="bytes for blocks + KV cache, e.g. 4GiB, 512MB; with --blocks auto it picks the span")
    sp.add_argument("--no-mdns", action="store_true", help="do not announce or browse on the LAN")
    sp.add_argument("--mdns-interface", action="append", default=None, metavar="ADDR", help="IPv4 address of an interface for mDNS (repeatable; default all)")
    sp.add_argument("--threads", type=int, default=None, help="torch threads for compute")
    sp.add_argument("--max-sessions", type=int, default=256)
    sp.add_argument("--max-cache-tokens", type=int, default=65536, help="KV cache tokens reserved across sessions")
    sp.add_argument("--session-idle-timeout", type=float, default=300.0, help="seconds before an idle session is freed")
    sp.add_argument("--frame-timeout", type=float, default=10.0, help="seconds a started frame may take to arrive")
    sp.add_argument("--test-perturb", type=float, default=0.0, help=argparse.SUPPRESS)  # testing: a lying peer
    sp.add_argument("--swarm-key", metavar="FILE", default=None,
                    help="a private swarm's shared secret (or $SWARM_KEY_FILE / $SWARM_KEY); default: the public swarm")
    sp.set_defaults(func=cmd_join)

    sp = sub.add_parser("generate", help="answer a prompt through the swarm")
    sp.add_argument("prompt")
    sp.add_argument("--model", default=None, help=f"a local model folder or a model name (default: the model the swarm serves, else {DEFAULT_MODEL}); a model not prepared here is learned from the swarm, and only its embeddings, head and tokenizer are fetched")
    sp.add_argument("--peer", type=_addr, action="append", default=[], help="HOST:PORT of a swarm member (repeatable)")
    sp.add_argument("--max-new-tokens", type=int, default=128)
    sp.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    sp.add_argument("--top-p", type=float, default=1.0)
    sp.add_argument("--top-k", type=int, default=0)
    sp.add_argument("--seed", type=int, default=None)
    sp.add_argument("--no-chat", action="store_true", help="send the prompt as raw text, without the chat template")
    sp.add_argument("--json", action="store_true", help="print one JSON object: tokens, text, route, timings")
    sp.add_argument("--discovery-timeout", type=float, default=10.0, help="seconds to wait for the swarm")
    sp.add_argument("--no-mdns", action="store_true", help="do not look for peers on the LAN")
    sp.add_argument("--mdns-interface", action="append", default=None, metavar="ADDR", help="IPv4 address of an interface for mDNS (repeatable; default all)")
    sp.add_argument("--threads", type=int, default=None, help="torch threads for the local head")
    sp.add_argument("--verify", type=_verify_rate, default=0.0, metavar="FRACTION|all",
                    help="have a second peer re-compute this fraction of steps and compare (e.g. 0.1, or all)")
    sp.add_argument("--swarm-key", metavar="FILE", default=None,
                    help="a private swarm's shared secret (or $SWARM_KEY_FILE / $SWARM_KEY); default: the public swarm")
    sp.set_defaults(func=cmd_generate)

    sp = sub.add_parser("status", help="show the peers, their spans and block coverage")
    sp.add_argument("--peer", type=_addr, action="append", default=[], help="HOST:PORT of a swarm member (repeatable)")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--no-mdns", action="store_true", help="do not look for peers on the LAN")
    sp.add_argument("--mdns-interface", action="append", default=None, metavar="ADDR", help="IPv4 address of an interface for mDNS (repeatable; default all)")
    sp.add_argument("--discovery-timeout", type=float, default=3.0)
    sp.add_argument("--swarm-key", metavar="FILE", default=None,
                    help="a private swarm's shared secret (or $SWARM_KEY_FILE / $SWARM_KEY); default: the public swarm")
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser("api", help="serve an OpenAI-compatible HTTP API and a live map of the swarm")
    sp.add_argument("--model", default=None, help=f"a local model folder or a model name (default: the model the swarm serves, else {DEFAULT_MODEL})")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; others need care)")
    sp.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: any free port)")
    sp.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (default: $SWARM_API_KEY, else none)")
    sp.add_argument("--peer", type=_addr, action="append", default=[], help="HOST:PORT of a swarm member (repeatable)")
    sp.add_argument("--no-mdns", action="store_true", help="do not look for peers on the LAN")
    sp.add_argument("--mdns-interface", action="append", default=None, metavar="ADDR", help="IPv4 address of an interface for mDNS (repeatable; default all)")
    sp.add_argument("--discovery-timeout", type=float, default=10.0, help="seconds a request waits for the swarm")
    sp.add_argument("--threads", type=int, default=None, help="torch threads for the local head")
    sp.add_argument("--swarm-key", metavar="FILE", default=None,
                    help="a private swarm's shared secret (or $SWARM_KEY_FILE / $SWARM_KEY); default: the public swarm")
    sp.set_defaults(func=cmd_api)

    sp = sub.add_parser("demo", help="start a local 3-peer swarm and answer one prompt through it")
    sp.add_argument("prompt", nargs="?", default="What is the capital of France? Answer in one sentence, then name two famous sights there.")
    sp.add_argument("--max-new-tokens", type=int, default=96)
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except SwarmError as e:
        print(f"swarm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
