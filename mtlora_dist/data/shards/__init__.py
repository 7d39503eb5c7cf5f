"""The shard format both pipelines share: the converter (``ingest``) writes it, the stream reads it.

``encoding`` (tar member encodings and their decoders), ``tarshards`` (tar primitives on webdataset's
writer and iterators), ``manifest`` (``manifest.json``: shards, sizes, digests) and ``shard_index`` (the
per-sample byte index in the manifest). See ``docs/data.md`` section 2.
"""
