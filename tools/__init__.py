"""The research harness: export, the DR-LoRA-vs-LoRA experiments and the benchmark."""
