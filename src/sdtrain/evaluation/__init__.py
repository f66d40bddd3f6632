"""Evaluation of text-to-image checkpoints: FID, KID and CLIP score over guidance scales.

``prompts`` (text file, COCO captions, shard captions), ``reference`` (real images and their
cached Inception features), ``extractors`` (InceptionV3 and open_clip, standard or seeded random
weights), ``metrics`` (torchmetrics FID / KID, the CLIP-score definition), ``run`` (generation in
resumable chunks, split across ranks) and ``report`` (CSV, JSON, the FID-vs-CLIP plot).

A layer of its own between ``trainer`` and ``models``: it samples through
``models.sampling.sample_images`` and reads data through ``data.shards``; ``launch.eval`` opens
the checkpoints and parses the command line.
"""
