"""ONNX export of DGA models and ONNX Runtime deployment (custom domain ``ai.dga``)."""
