"""Code shared by the pipeline's stages (stages/<name>.py), the predict command and the web app.

A regular package (not a namespace one) so that it can be shipped to Dask
workers as a zip (mnist_dvc/cluster.py). Importing it imports nothing else.
"""
