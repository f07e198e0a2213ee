"""Data-aware factors: patch statistics, whitened SVD and ridge refit (``solve``), running a torch model to feed
them (``run``: batches, hooks, sequential calibration) and image folders as calibration data (``images``)."""
