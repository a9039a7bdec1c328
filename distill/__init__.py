"""Stage 1: knowledge distillation of a teacher language model into a small Llama-architecture student.

``edgedistill.distill.train.train(TrainConfig(...))`` is the Python entry point; ``edgedistill distill`` the CLI.
"""
