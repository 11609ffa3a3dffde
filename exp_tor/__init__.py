"""exp_tor: Training Overhead Ratio (Lu et al., arXiv 2408.07482)."""
