"""Bridges to serving engines that run qcfuse's fusion inside them (vLLM)."""
