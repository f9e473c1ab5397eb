"""The pipeline's stages, one module per stage in dvc.yaml, run as ``python -m stages.<name>``.

Run as modules from the repository root, so ``mnist_dvc`` is imported from
the same checkout (and the same experiment workspace) that DVC hashes.
Importing this package first pins the CPU numerics of params.yaml's
``numerics.cpu`` (mnist_dvc/numerics.py), before any stage imports torch.
"""

from mnist_dvc import numerics

numerics.pin()
