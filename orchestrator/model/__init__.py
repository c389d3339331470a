"""Model: every family behind one interface, the LoRA on it, and how models come in.

- `families`: LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL loaded through one interface (`load_model`, `model.family`
  auto-detected from config.json): each family's vision inputs, image-token counts, prompts (HA-DPO's text
  templates or the model's chat template) and processing files.
- `image_tokens`: how many tokens one image becomes per family, as arithmetic the planner shares.
- `tiny`: tiny models of every family built from configs (`build_tiny_model`, `ensure_model`).
- `llava`: LLaVA-1.5 itself: the tiny LLaVA, the word tokenizer every tiny model uses, its image preprocessing.
- `templates`: LLaVA-1.5 conversation templates and label masking, shared by training and evaluation.
- `lora`: where LoRA goes (the language model of every family) and what is frozen.
- `base_model`: the model a stage starts from (a folder the caller or the config names, else the run's
  tiny model).
- `adapter`: finding a LoRA adapter's folder.
- `kernels`: fused GPU kernels for training (liger-kernel).
- `convert`: original LLaVA-1.5 checkpoints and HA-DPO's adapter -> llava-hf folders and peft adapters
  (LLaVA-1.5 only).
"""
