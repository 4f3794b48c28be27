"""The API routers: jobs, datasets, and service-level endpoints (health, metrics, backends, estimate)."""
