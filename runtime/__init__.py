"""Stage 3: the torch-free runtime that loads an exported student. It imports nothing from the other stages."""
