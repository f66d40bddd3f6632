"""Ground-floor helpers with no sdtrain imports but ``sdtrain.errors``: checkpoint and weight
files (``files.py``: the only ``torch.load``, safetensors, the atomic writer), images, grids and
plots (``images.py``), markdown blocks, progress bars, thread pinning."""
