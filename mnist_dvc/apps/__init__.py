"""The apps on the trained models: the command line (predict), the web app
(serve) and what they share (images: any picture -> the model's input;
inference: both models loaded once), and the report that compares revisions
and experiments (report). The pipeline's stages never import this.
"""
