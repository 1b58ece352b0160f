"""Old import path, kept so that existing code keeps working: latents now live in
draggan_core/model/latents.py. New code: `from draggan_core import seed_to_w, load_latent, save_latent`."""
from .model.latents import LatentError, MAX_SEED, load_latent, save_latent, seed_to_w, seed_to_z  # noqa: F401
