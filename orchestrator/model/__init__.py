"""Model: LLaVA in the llava-hf format, the LoRA on it, and how models come in.

- `llava`: the tiny LLaVA built from configs, and any llava-hf folder loaded by the same code.
- `templates`: LLaVA-1.5 conversation templates and label masking, shared by training and evaluation.
- `lora`: where LoRA goes on a LLaVA and what is frozen.
- `base_model`: the model a stage starts from (a folder the caller or the config names, else the run's
  tiny LLaVA).
- `adapter`: finding a LoRA adapter's folder.
- `kernels`: fused GPU kernels for training (liger-kernel).
- `convert`: original LLaVA-1.5 checkpoints and HA-DPO's adapter -> llava-hf folders and peft adapters.
"""
