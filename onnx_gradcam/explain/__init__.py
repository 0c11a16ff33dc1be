"""Running prepared models: sessions and providers, images in, maps and overlays out.

The only package that imports onnxruntime.
"""
