"""Training-side code: procedural face world and StyleGAN2 training."""
