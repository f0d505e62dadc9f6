"""What lorakit reads and writes: PEFT-format adapter files and their safety checks, base-model fingerprints, the
model card, merged exports (a Hugging Face folder, GGUF)."""
