"""Shards to batches: which samples each rank and worker reads in an epoch (``plan``), the per-worker
shard stream (``streaming``), augmentation (``transforms``), collation (``batch``) and the loader the
trainer iterates (``loader``). See ``docs/data.md`` section 4."""
