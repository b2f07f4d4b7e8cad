"""Torch-free foundations: settings dataclasses, error types, layer-spec and α parsing, names
that are safe to publish, and small file primitives.

Nothing here imports torch or transformers, so the command line can parse, validate and print
help from these modules alone. Every other layer imports from here (arrows point one way:
config -> model -> engine -> analyses -> outputs -> api -> cli).
"""
