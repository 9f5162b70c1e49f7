"""The embedded run's data, made here without a download: the formats (common reads them, write writes
them), the stdlib corpus, the tiny base pretrained on it, and the generated tasks."""
