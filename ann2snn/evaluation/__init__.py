"""Evaluating an artifact: the run plan, shards and merging, the report and its statistics."""
