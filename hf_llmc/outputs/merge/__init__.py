"""Merged checkpoints: the plan of a merge spec (:mod:`.plan`), the streamed safetensors writer
(:mod:`.writer`), merges of the live model (:mod:`.live`), evaluation of a merge
(:mod:`.evaluate`), its reproduction (:mod:`.reproduce`) and the whole folder (:mod:`.save`)."""
