"""Integrations with other libraries: transformers' quantizer registry, peft's LoRA layers."""
