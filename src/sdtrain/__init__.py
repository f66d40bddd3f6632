"""sdtrain: train Stable Diffusion base and inpainting checkpoints.

Models are key-for-key compatible with the original checkpoints.
"""

__version__ = "0.1.0"
