"""llm_compile: torch.compile backend "llmaccel"."""
