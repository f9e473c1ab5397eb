"""The pipeline's stages, run as ``python -m stages.<name>`` from the repository root (docs/design.md).

Importing this package pins params.yaml's ``numerics.cpu`` (mnist_dvc/numerics.py) before any stage imports torch.
"""

from mnist_dvc import numerics

numerics.pin()
