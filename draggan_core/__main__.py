"""`python -m draggan_core <command>`: see draggan_core/cli.py."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
