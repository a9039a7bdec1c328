"""Stage 2: export a student (or any Hugging Face Llama checkpoint, or the GGUF default teacher) to GGUF and ONNX.

``edgedistill export gguf|onnx MODEL_DIR --quant ... --out DIR`` (``export/cli.py``) loads the model once, computes
PyTorch's answers on the probe prompts (``parity.py``), writes and quantizes each artifact (``gguf.py`` through
gguf-py and llama.cpp's quantizer, ``onnx.py`` through optimum-onnx and onnxruntime's quantizers), runs each one in
its own engine against those answers and the Hugging Face tokenizer, and records everything in ``DIR/manifest.json``
(``manifest.py``). Importing this package or its CLI module imports neither torch nor any runtime.
"""
