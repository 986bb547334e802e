"""Data layer: dataset loaders, the synthetic catalog, text templating, validation and splits."""
