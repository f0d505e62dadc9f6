"""Models with adapters and the models they wrap: :class:`LoraModel`, prompt tuning, loading Hugging Face and
embedded models (tensor by tensor for big checkpoints), the device and precision they run in, chat prompts, and
what is computed about them (parameters, memory, FLOPs, singular values, compiled blocks)."""
