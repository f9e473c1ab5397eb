"""The pipeline's stages, one module per stage in dvc.yaml, run as ``python -m stages.<name>``.

Run as modules from the repository root, so ``mnist_dvc`` is imported from
the same checkout (and the same experiment workspace) that DVC hashes.
"""
