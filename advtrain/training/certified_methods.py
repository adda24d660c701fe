"""Training for verified robustness: IBP (Gowal et al. 2018) and CROWN-IBP (Zhang et al. 2020)."""
