"""Sources to shards: dataset readers (``formats``, built in or declared in a data config:
``format_spec``), label helpers (``labels``, ``edges``), the shard format (``encoding``,
``tarshards``, ``manifest``) and the conversion that writes it (``convert``, ``convert_parts``).
See ``docs/data.md`` sections 1-3."""
