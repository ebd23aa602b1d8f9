"""HTTP and gRPC: the app, the native and Open Inference Protocol adapters, auth, limits, metrics, health."""
