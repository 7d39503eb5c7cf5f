"""Synthetic datasets written in the real on-disk layouts (no download): PASCAL-Context and NYUD-v2
(``datasets``), Cityscapes and Taskonomy trees (``layouts``). For tests, benchmarks and the quickstart;
the training path reads them only through shards, like any dataset."""
