"""Ray Serve entry points: `serve.app:build_app` (import path for `serve deploy serve/config.yaml`)."""
