"""OpenAI-compatible engine server with two backends: real vLLM (`vllm`) and a simulated replica (`sim`)."""
