"""Data for drlora: on-disk formats (common), the stdlib pretraining corpus, generated fine-tuning tasks."""
