"""What hf-llmc writes for people: merged checkpoints (streamed safetensors, reproduction recipe,
model card), Hub uploads, scan reports and revision sweeps."""
