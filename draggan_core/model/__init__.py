"""The networks and their files: the bottom layer of draggan_core.

- ops.py, networks.py: the StyleGAN2 generator (NVIDIA's parameter names and numerics): FIR
  resampling, modulated convolution, mapping and synthesis networks.
- windowed.py: a synthesis block's features computed exactly inside a window (the drag's fast path).
- checkpoints.py: checkpoint formats and safe loading (NVIDIA .pkl through a restricted unpickler,
  rosinality .pt, our .safetensors with metadata).
- latents.py: seeds -> W+, and user latent files read and written safely.
- store.py: `ModelStore`, one shared generator per checkpoint, and the default model.
- registry.py: known public checkpoints (draggan_core/registry.json) and the verifying downloader.
- paths.py: where the bundled checkpoints and the package's data files are.
- devices.py: which device runs the networks, CPU thread budgets, the fused-modconv choice.
- landmark_net.py: the face-landmark detector, a small CNN with its own checkpoint (used by the
  evaluation and, optionally, as a feature loss of the inversion).

May import: nothing of draggan_core outside this package (torch, numpy and the standard library).
"""
