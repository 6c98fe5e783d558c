"""The training loop and its hooks: ``Runner`` runs global steps, hooks do everything around them."""
