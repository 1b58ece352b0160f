"""Measuring edits: how well drags move faces, built on draggan_core.edit and draggan_core.model.

- protocol.py: the paper's landmark-transfer protocol (drag one face's landmarks to another's,
  mean distance after, with our landmark detector from model/landmark_net.py).
- face_checks.py: the parts check (are eyes, brows, nose and mouth still there after an edit?).
- user_edits.py: the user-edit benchmark (named everyday edits by landmark, re-detected, parts
  check, drift outside the edit).

May import: draggan_core.model, draggan_core.edit.
"""
