"""Core: errors, files, the chat template, config and the run/checkpoint catalogue; imports nothing else from trainer."""
