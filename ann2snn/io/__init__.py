"""Reading and writing what users bring and keep: files, records, data sets, checkpoints, torch.export archives, the model zoo, fetched data."""
