"""lenslab: a GPU lab for mechanistic interpretability (the part that runs where the user sits).

Kept light on purpose: importing it, or running the ``lenslab`` CLI, never imports torch or
sae-lens, and heavy libraries (paramiko, rich, docker) load only inside the commands that use them.
"""

__version__ = "0.1.0"
