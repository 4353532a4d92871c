"""Running model files: several (task, level)s at once over one store of unit blocks, in PyTorch
(``shared.SharedRuntime``) or in onnxruntime without torch (``ort.SharedOrtRuntime``), how each kind of file runs
(``runner.ModelRunner``, which evaluation and training use too), and ``dvn predict``."""
