"""hadpo-orchestrator: Ray-native HA-DPO experiments for LLaVA-style vision-language models."""

__version__ = "0.1.0"
