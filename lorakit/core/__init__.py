"""LoRA on any ``nn.Module``: the config, the adapter layers, injection, mixed batches, combining adapters, the
4-bit base. Imports only torch and safetensors (bitsandbytes when a 4-bit base is asked for)."""
