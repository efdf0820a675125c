"""The command-line client: parse, call the library, render. No tensor code lives here."""
