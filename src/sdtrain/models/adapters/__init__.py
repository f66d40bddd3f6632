"""State-dict adapters: one small module per external weight layout.

An adapter turns a file of one layout into plain per-part tensor dicts keyed like our modules
(``unet``, ``vae``, ``text``, ``ema``, ``schedule``) and back; it never builds a model and never
opens a file itself (``sdtrain.utils.files`` does). ``original`` is the single-file layout of the
original Stable Diffusion code (``.ckpt`` / ``.safetensors``); a diffusers-folder adapter and LoRA
adapters belong beside it, each with its own ``read_*`` / ``write_*`` pair.
"""
