"""Sources to shards: dataset readers (``formats``, built in or declared in a data config:
``format_spec``), label helpers (``labels``, ``edges``) and the conversion (``convert``,
``convert_parts``) that writes the shard format of :mod:`mtlora_dist.data.shards`.
See ``docs/data.md`` sections 1-3."""
