"""``fabrik serve MODEL``: load the model, then serve the OpenAI-compatible API with uvicorn."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys

from fabrik.config import parse_bytes
from fabrik.entrypoints.cli import add_engine_args, engine_config_from_args
from fabrik.server.config import ServerConfig

# Checked here, so that `fabrik serve` without the server extras says what to install (see fabrik/entrypoints/cli.py).
for _module in ("fastapi", "uvicorn", "pydantic"):
    if importlib.util.find_spec(_module) is None:
        raise ImportError(f"No module named {_module!r}")

_DEFAULTS = ServerConfig()
API_KEY_ENV = "FABRIK_API_KEY"
_STARTUP_FAILURE = 3  # uvicorn's exit status when it could not start (the port is taken, ...)


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the ``serve`` subcommand to the ``fabrik`` command line."""
    serve = subparsers.add_parser(
        "serve", help="serve the OpenAI-compatible HTTP API",
        description="Serve MODEL over an OpenAI-compatible HTTP API (point any OpenAI client at "
                    "http://HOST:PORT/v1).")
    serve.add_argument("model", nargs="?", default=None,
                       help="Hugging Face model folder or hub id (default: the small demo model shipped with fabrik)")
    serve.add_argument("--host", default=_DEFAULTS.host,
                       help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 exposes it)")
    serve.add_argument("--port", type=int, default=_DEFAULTS.port)
    serve.add_argument("--api-key", action="append", default=None, metavar="KEY",
                       help=f"accepted bearer token (repeatable; also read from ${API_KEY_ENV}); "
                            "without one, anyone who can reach the port may call")
    serve.add_argument("--served-model-name", default=None, help="model id clients send (default: MODEL)")
    serve.add_argument("--enable-request-logging", action="store_true",
                       help="log prompts and completions (off by default: they are private)")
    serve.add_argument("--max-request-bytes", default=str(_DEFAULTS.max_request_bytes),
                       help="largest request body, e.g. 8MiB (413 above)")
    serve.add_argument("--max-waiting-requests", type=int, default=_DEFAULTS.max_waiting_requests,
                       help="sequences (prompts x n) accepted but not yet generating before new ones get 429")
    serve.add_argument("--max-n", type=int, default=_DEFAULTS.max_n)
    serve.add_argument("--max-prompts", type=int, default=_DEFAULTS.max_prompts,
                       help="most prompts in one /v1/completions request")
    serve.add_argument("--max-sequences-per-request", type=int, default=_DEFAULTS.max_sequences_per_request,
                       help="most sequences (prompts x n) one request may ask for")
    serve.add_argument("--allowed-origins", action="append", default=None, metavar="ORIGIN",
                       help="browser origin allowed to call the API (CORS; repeatable or comma-separated; '*' "
                            "allows any); default: none")
    serve.add_argument("--allow-special-tokens-in-content", action="store_true",
                       help="let special-token strings in messages and tools become control tokens (trusted "
                            "callers only: a user could write a system turn)")
    serve.add_argument("--prepare-workers", type=int, default=_DEFAULTS.prepare_workers,
                       help="threads that render chat templates and tokenize, off the event loop")
    serve.add_argument("--max-preparing-requests", type=int, default=_DEFAULTS.max_preparing_requests,
                       help="requests being rendered and tokenized at once before new ones get 429")
    serve.add_argument("--max-stop-sequences", type=int, default=_DEFAULTS.max_stop_sequences)
    serve.add_argument("--max-stop-length", type=int, default=_DEFAULTS.max_stop_length)
    serve.add_argument("--max-top-logprobs", type=int, default=_DEFAULTS.max_top_logprobs)
    serve.add_argument("--max-logit-bias", type=int, default=_DEFAULTS.max_logit_bias)
    serve.add_argument("--max-connections", type=int, default=_DEFAULTS.max_connections,
                       help="open connections before new ones get 503 (lowered to fit the file limit, ulimit -n)")
    serve.add_argument("--idle-timeout", type=float, default=_DEFAULTS.idle_timeout_seconds, metavar="SECONDS",
                       help="close a connection idle this long (no request under way)")
    serve.add_argument("--header-timeout", type=float, default=_DEFAULTS.header_timeout_seconds, metavar="SECONDS",
                       help="408 when a request's headers take longer")
    serve.add_argument("--body-timeout", type=float, default=_DEFAULTS.body_timeout_seconds, metavar="SECONDS",
                       help="408 when a request's body takes longer")
    serve.add_argument("--drain-timeout", type=float, default=_DEFAULTS.drain_timeout_seconds, metavar="SECONDS",
                       help="on SIGTERM, time running requests get to finish; then streams end with an error event")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_engine_args(serve)
    serve.set_defaults(func=serve_main)
    return serve


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    keys = list(args.api_key or [])
    if os.environ.get(API_KEY_ENV):
        keys.append(os.environ[API_KEY_ENV])
    return ServerConfig(
        host=args.host, port=args.port, served_model_name=args.served_model_name or args.model,
        api_keys=tuple(keys), enable_request_logging=args.enable_request_logging,
        max_request_bytes=parse_bytes(args.max_request_bytes), max_n=args.max_n, max_prompts=args.max_prompts,
        max_stop_sequences=args.max_stop_sequences, max_stop_length=args.max_stop_length,
        max_top_logprobs=args.max_top_logprobs, max_logit_bias=args.max_logit_bias,
        max_waiting_requests=args.max_waiting_requests, max_sequences_per_request=args.max_sequences_per_request,
        allowed_origins=tuple(o.strip() for item in args.allowed_origins or () for o in item.split(",") if o.strip()),
        allow_special_tokens_in_content=args.allow_special_tokens_in_content, prepare_workers=args.prepare_workers,
        max_preparing_requests=args.max_preparing_requests, max_connections=args.max_connections,
        idle_timeout_seconds=args.idle_timeout, header_timeout_seconds=args.header_timeout,
        body_timeout_seconds=args.body_timeout, drain_timeout_seconds=args.drain_timeout)


def serve_main(args: argparse.Namespace) -> int:
    """Run the server until interrupted; returns the exit status."""
    if args.model is None:
        from fabrik.demo_model import DEMO_MODEL_NAME, default_model_path

        args.model = str(default_model_path())
        args.served_model_name = args.served_model_name or DEMO_MODEL_NAME
    from fabrik.engine.llm_engine import LLMEngine
    from fabrik.server.app import build_app
    from fabrik.server.shutdown import DrainingServer
    from fabrik.server.transport import uvicorn_config

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = server_config_from_args(args)
    engine_config = engine_config_from_args(args.model, args)
    # The engine ends this thread's OpenMP workers once loaded: only the engine thread keeps a pool (the event loop runs
    # no torch).
    engine = LLMEngine(engine_config)
    app = build_app(engine, config)
    if not config.api_keys and config.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger(__name__).warning("serving on %s without --api-key: anyone who can reach it may call",
                                            config.host)
    print(f"fabrik: serving {config.served_model_name!r} at http://{config.host}:{config.port}/v1", file=sys.stderr)
    server = DrainingServer(uvicorn_config(app, config, args.log_level), app.state.drain, config.drain_timeout_seconds)
    server.run()
    return 0 if server.started else _STARTUP_FAILURE
