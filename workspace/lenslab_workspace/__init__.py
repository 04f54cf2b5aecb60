"""lenslab-workspace: what runs on the box. Resilient SAE training on top of sae-lens."""

__version__ = "0.1.0"
