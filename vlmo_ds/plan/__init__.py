"""Capacity planning: which layouts of a recipe fit which GPUs, with memory per rank and a step-time estimate."""
