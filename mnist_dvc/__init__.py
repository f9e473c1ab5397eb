"""Code shared by the pipeline's stages (stages/<name>.py), the predict command and the web app.

A regular package, so that it ships to Dask workers as a zip (mnist_dvc/cluster.py); it imports nothing.
"""
