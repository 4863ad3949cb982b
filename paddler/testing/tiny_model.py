"""The tiny random-weight GGUF model of the tests: written by ``paddler.demo_model``
(part of the package proper, since ``paddler cluster`` serves it when no model is
given); re-exported here under the name the tests and benchmarks use."""

from paddler.demo_model import (
    CHAT_TEMPLATE,
    DEFAULT_MODEL_FILENAME,
    cache_dir,
    default_model_path,
    tiny_llama_file_size,
    write_tiny_llama,
)

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_MODEL_FILENAME",
    "cache_dir",
    "default_model_path",
    "tiny_llama_file_size",
    "write_tiny_llama",
]
