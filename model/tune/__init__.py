"""LoRA fine-tuning: data (data.py), adapters (lora.py), the training loop (train.py)."""
