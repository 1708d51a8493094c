"""lvm: latent vector models trained with P6b directional losses and a callback-based safety system."""
