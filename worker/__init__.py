"""chatqueue worker: everything that touches a model (torch, transformers, huggingface_hub)."""
