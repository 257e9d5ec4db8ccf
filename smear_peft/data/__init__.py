"""Datasets and prompts for the paper's two settings (GLUE with PromptSource prompts, DomainNet) and offline stand-ins."""
