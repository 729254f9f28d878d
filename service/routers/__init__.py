"""One router per resource: health, datasets, jobs, config, admin (API keys)."""
