"""Files to deploy: each (task, level) as its own ONNX or torch.export model, a shared export folder (one weights
file, one graph per pair), weights at lower precision, compact model files. Above ``planning``, beside ``runtime``
(the shared export checks its graphs with ``runtime.ort``)."""
