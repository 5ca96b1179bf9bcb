"""Classification companion: models, data, optimisers and the SOS training loop."""
