"""An engine that forwards to OpenAI-compatible servers (vLLM, SGLang, llama-server)."""
