"""The LAION WebDataset loader: shards -> metadata filters -> decode / crop / mask -> batches."""
