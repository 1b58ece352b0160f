"""Serving: the drag engine as a Ray Serve deployment (ray_engine.py), speaking the engine protocol
of draggan_core/edit/engine.py across processes and machines. Needs requirements-serve.txt; ray is
imported only here.

May import: draggan_core.model, draggan_core.edit.
"""
