"""The embedded engine: llama.cpp through llama-cpp-python, with continuous batching."""
