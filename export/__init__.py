"""Stage 2: export a student to ONNX and GGUF."""
