"""The apps on the trained models: the command line (predict), the web app
(serve) and what they share (images: any picture -> the model's input;
inference: both models loaded once). The pipeline's stages never import this.
"""
