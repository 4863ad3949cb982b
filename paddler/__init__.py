"""paddler: an LLM serving platform and load balancer for llama.cpp agents."""

__version__ = "0.1.0"
