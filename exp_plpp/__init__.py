"""PLPP (arXiv 2412.15277): CoOp-family prompt learning with perplexity self-distillation."""
