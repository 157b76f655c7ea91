"""``fabrik bench``: offline throughput, offline latency, and a load driver for any OpenAI-compatible server.

    workload.py  seeded random prompts (token ids or words)
    stats.py     percentiles, TPOT / ITL, goodput, token counting from streamed chunks (pure Python)
    offline.py   ``throughput`` (fabrik.LLM) and ``latency`` (LLMEngine, step by step)
    serve.py     ``serve``: streaming /v1/completions at several concurrency levels (httpx)
    cli.py       the argparse subcommands, tables and JSON output
"""
