"""Stage 2: export a student (or any Hugging Face Llama checkpoint, or the GGUF default teacher) to GGUF and ONNX.

``edgedistill export gguf|onnx MODEL_DIR --quant ... --out DIR`` (``export/cli.py``, settings in ``recipe.py``) loads
the model once, computes PyTorch's answers on the probe prompts (``parity.py``) and runs one skeleton for every format
(``formats.py``): convert, then per quantization derive, check in the format's own engine against those answers and
the Hugging Face tokenizer, record, and stage under a temporary name; everything is then published with
``DIR/manifest.json`` (``manifest.py``). Each format fills in only its own steps, in its own module (``gguf.py``
through gguf-py and llama.cpp's quantizer, ``onnx.py`` through optimum-onnx and onnxruntime's quantizers), and is
listed once in ``registry.py``. Importing this package or its CLI module imports neither torch nor any runtime.
"""
