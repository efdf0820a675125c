"""The interactive session behind ``gpt2 repl``: ``session`` (state, no UI) and ``ui`` (prompt-toolkit)."""
