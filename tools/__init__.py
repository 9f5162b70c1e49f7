"""The research harness: export (merged, PEFT), a run's figures, the DR-LoRA-vs-LoRA experiments, the benchmark,
the GPU check, tokenizer conversion and the reading-path count."""
