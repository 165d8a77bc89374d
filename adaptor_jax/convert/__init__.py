"""Importers and exporters of pretrained weights."""
