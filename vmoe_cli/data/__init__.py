"""Data: image sources, the resumable shard writer, and the WebDataset loader."""
