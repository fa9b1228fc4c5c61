"""Model files in and out of hwloop: ONNX import/export, loading PyTorch model files, and the
converted-network file. The file I/O lives here; the math stays in :mod:`hwloop.ttfs`.

ONNX needs the optional extra: ``pip install 'hwloop[onnx]'`` (``onnx`` and ``onnxruntime``).
Without it, :mod:`hwloop.interop.onnx_import` and :mod:`hwloop.interop.onnx_export` raise
:class:`~hwloop.errors.ConversionError` saying so when called; importing them is always safe.
"""
