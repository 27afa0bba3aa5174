"""Configuration: typed models, unit parsing, YAML loading with line numbers, lint."""
