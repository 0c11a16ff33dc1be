"""ONNX -> ONNX: loading, choosing layers, appending the gradient and CAM subgraphs, saving."""
