"""The command line: `python -m draggan_core <command>`, installed as the `draggan` console command.

- program.py: the program (parser, command registry, shared helpers, main) and the small commands
  render, convert, info, download and models.
- drag.py, eval.py, invert.py, bench.py: one command each, found by program.py (every module of
  this package defining `add_parser(subparsers)` is the command of its name).

May import: draggan_core.model, draggan_core.edit, draggan_core.evaluation (not serving).
"""
