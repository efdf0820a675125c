"""An OpenAI-compatible HTTP server over one loaded model (needs the ``serve`` extra)."""
