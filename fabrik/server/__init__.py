"""The OpenAI-compatible HTTP server and the parsers that turn model text into its response fields."""
