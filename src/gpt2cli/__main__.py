"""`python -m gpt2cli` runs the CLI (also the entry point torchrun uses)."""

from gpt2cli.cli.app import main

if __name__ == "__main__":
    main()
