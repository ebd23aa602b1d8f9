"""The engine: admission, budgets, scheduling, batching, the latency model and the forward runner."""
