"""Shards to batches: which samples each rank and worker reads in an epoch (``plan``), the byte reader
of a worker (``reader``: ranged reads, checksums, retries, cache), the per-worker sample stream
(``streaming``: decode, transform, collate), augmentation (``transforms``), collation (``batch``),
the counters (``stats``) and the loader the trainer iterates (``loader``). See ``docs/data.md`` section 4."""
