"""The VimRAG agent: tool-call protocol, prompts, the memory-graph agent loop and baselines."""
