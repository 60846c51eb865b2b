"""The OpenAI-compatible HTTP server: `build_app(engine_or_config, ServerOptions(...))` (see app.py)."""
