"""Using a model outside the pipeline: `medtl predict`, `medtl export` (ONNX, TorchScript, INT8), `medtl locate`."""
