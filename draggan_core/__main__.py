"""`python -m draggan_core <command>`: see draggan_core/cli/program.py."""
from .cli.program import main

if __name__ == "__main__":
    raise SystemExit(main())
