"""Training for randomized smoothing: Gaussian noise augmentation (Cohen et al. 2019)."""
