"""Rollout engines: the Llama/Qwen2 decoder, the paged KV cache, sampling, our continuous-batching engine, the vLLM
backend. Knows nothing of prompts, code cells or rewards."""
