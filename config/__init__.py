"""Validated configuration models (pydantic) for the router, and example files beside them."""

from config.router import ConfigError, RouterConfig, load_config

__all__ = ["ConfigError", "RouterConfig", "load_config"]
