"""Moving bytes between clients and replicas: upstream calls, SSE relay, retries. Knows no policy."""
