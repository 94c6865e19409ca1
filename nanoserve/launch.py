"""Running the server: `python -m nanoserve serve` flags (one per ServerOptions field), the
uvicorn settings they become, and the process around it: signals, a warning for an exposed
server without a key, and the exit status (0 after a drain, 1 if the engine died, 2 for a bad
flag or model).

References: vLLM `entrypoints/openai/cli_args.py`, uvicorn's `Config`.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

if TYPE_CHECKING:                   # imported where the server starts; only named here
    import uvicorn

from .config import EngineConfig
from .guards import head_deadline
from .server import ServerOptions, build_app

log = logging.getLogger("nanoserve.server")


def uvicorn_config(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> "uvicorn.Config":
    """uvicorn's settings from the app's ServerOptions: connection limits, read deadlines, and
    X-Forwarded-For trusted only from the proxies the operator names (uvicorn's default trusts
    127.0.0.1, so any local proxy or tunnel would let clients pick their address, and so
    their rate-limit bucket)."""
    import uvicorn
    o: ServerOptions = app.state.server.opts
    return uvicorn.Config(app, host=host, port=port, http=head_deadline(o.header_timeout),
                          proxy_headers=o.forwarded_allow_ips is not None, forwarded_allow_ips=o.forwarded_allow_ips,
                          limit_concurrency=o.limit_concurrency, timeout_keep_alive=o.timeout_keep_alive,
                          h11_max_incomplete_event_size=o.max_header_bytes,
                          timeout_graceful_shutdown=o.shutdown_timeout + 5, **kwargs)


_FLAG_HELP = {   # ServerOptions field -> help (the formatter appends the default)
    "served_model_name": "model ids clients may send (several allowed); default: the --model name and the "
                         "checkpoint directory's name",
    "api_key": "require 'Authorization: Bearer KEY' on every route but /health; default: $NANOSERVE_API_KEY if set",
    "max_queue": "prompts waiting to start; more get 503",
    "rate_limit": "requests/s per client (API key or address); None or 0: no limit",
    "rate_limit_burst": "requests at once per client",
    "request_timeout": "seconds per request; 0: none",
    "shutdown_timeout": "seconds in-flight requests get after SIGTERM before they are aborted",
    "max_body_bytes": "larger request bodies get 413",
    "max_prompt_chars": "characters in a request's text prompts, checked before tokenizing",
    "max_stop_strings": "stop strings per request", "max_stop_chars": "characters per stop string",
    "max_request_tokens": "prompts x (n or best_of) x max_tokens, per request",
    "max_request_logprobs": "logprob entries in one response ((prompt and generated tokens) x (logprobs + 1))",
    "limit_concurrency": "connections + requests at once; more get 503",
    "timeout_keep_alive": "seconds an idle keep-alive connection stays open",
    "header_timeout": "seconds a request's head may take to arrive; then 408 and the connection closes",
    "body_timeout": "seconds a request's body may take to arrive; then 408",
    "max_header_bytes": "largest request head, in bytes",
    "forwarded_allow_ips": "comma-separated proxy addresses whose X-Forwarded-For is trusted; default: none",
}


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """The server's flags, one per ServerOptions field; the CLI adds the engine's itself."""
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server to the network")
    g.add_argument("--port", type=int, default=8000, help="port to listen on")
    for f in fields(ServerOptions):
        flag, kind = "--" + f.name.replace("_", "-"), type(f.default)
        if f.name == "served_model_name":
            g.add_argument(flag, nargs="+", default=None, help=_FLAG_HELP[f.name])
        else:   # "float | None" fields (None default) take floats; the key and proxies are strings
            kind = float if f.type.startswith("float") else str if f.default is None else kind
            g.add_argument(flag, type=kind, default=f.default, help=_FLAG_HELP[f.name])


def _warn_if_exposed(host: str, api_key: str | None) -> None:
    """A server reachable from other machines without a key serves (and costs) anyone."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False                     # a host name: it may resolve to anything
    if not loopback and api_key is None:
        log.warning("\n%s\nWARNING: serving on %s with no --api-key: anyone who can reach this address can use the "
                    "server.\nSet --api-key (or $NANOSERVE_API_KEY), or bind 127.0.0.1.\n%s", "!" * 78, host, "!" * 78)


def serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or Ctrl-C, then drain and return 0. Return 1 if the engine thread
    died (every request it held got an error first), 2 for a bad flag or model."""
    import uvicorn
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    config = EngineConfig(**{k: v for k, v in vars(args).items() if k in EngineConfig.field_names() and v is not None})
    options = {f.name: getattr(args, f.name) for f in fields(ServerOptions) if getattr(args, f.name, None) is not None}
    for name in ("request_timeout", "rate_limit"):       # 0 on the command line means "no limit"
        options[name] = options.get(name) or None
    if "api_key" not in options and "NANOSERVE_API_KEY" in os.environ:
        options["api_key"] = os.environ["NANOSERVE_API_KEY"]
    options["served_model_name"] = tuple(options.get("served_model_name") or ())
    try:
        app = build_app(config, **options)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, OSError) as e:
        print(f"nanoserve: error: {e}", file=sys.stderr)
        return 2
    server = app.state.server
    _warn_if_exposed(args.host, server.opts.api_key)

    class Uvicorn(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # We are in a signal handler: hand the drain to the loop. uvicorn then stops accepting
            # connections and waits for in-flight responses before running the app's shutdown.
            if server.loop is not None:
                server.loop.call_soon_threadsafe(server.begin_drain)
            super().handle_exit(sig, frame)

    # uvicorn re-raises the signal after its graceful shutdown, so that the default action ends
    # the process (status 143). By then we have shut down cleanly: let that be a no-op.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uv = Uvicorn(uvicorn_config(app, args.host, args.port))
    server.on_fatal = lambda: setattr(uv, "should_exit", True)   # answered requests go out, then we exit
    uv.run()
    if server.failed:
        print(f"nanoserve: error: the engine failed ({server.failed}); exiting", file=sys.stderr)
        return 1
    return 0
