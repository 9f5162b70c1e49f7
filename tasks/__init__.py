"""The paper's six real tasks: prepare scripts, chat formats, and the metrics that need more than exact match."""
