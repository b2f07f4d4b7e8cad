"""The two checkpoints and the one live model: architectures (discovered or from the table of
known families), layer selection, lazy checkpoint readers, placement and quantization, moving the
live model's tensors along the path (interpolation), and the pair that holds it all."""
