"""The LAION WebDataset loader: shards -> metadata filters -> decode / crop / mask / depth ->
batches, with exact stream positions for resumption; shard writing (``make-shards``) and the
generated test and demo shards. A component: imports only the ground floor (config, utils,
errors), never ``diffusion``, ``models``, ``trainer`` or ``launch``."""
