"""What runs on the live model: evaluation data as token blocks, loss and accuracy per block
(with prefix reuse), statistics, provenance of results, and the one policy for output files
(atomic JSON, flushed JSON lines, output folders)."""
