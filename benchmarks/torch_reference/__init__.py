"""PyTorch rendering of the official Luna modules (benchmark-only; needs `torch`, see
benchmarks/requirements-torch.txt). `luna_torch` holds the modules, `check` validates them
against tests/fixtures/luna_vectors.npz."""
